"""The trainer: TrainRequest -> a new model version in the store -> ModelPublished to every picker.

Training runs the core library (pre-training, then SCS training) on the stored exemplar set. The version is
written in a staging folder and renamed into place, then made current; a failed training leaves the previous
version current, records why in the project's ``training.json`` and dead-letters the request when the input
is at fault (InputError) or lets the broker retry it otherwise.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from cryomae.config import TrainConfig
from cryomae.errors import CryomaeError
from cryomae.live import metrics
from cryomae.live.common import get_logger, handling
from cryomae.messages import ModelPublished, TrainRequest
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Consumer, Envelope
from cryomae.model.checkpoint import save_model
from cryomae.store.projects import ProjectStore
from cryomae.training.train import train_model

log = get_logger("trainer")


class Trainer:
    """Handles training requests; ``start`` binds the handler to the broker."""

    def __init__(self, broker: Broker, store: ProjectStore, defaults: TrainConfig, device: str = "auto") -> None:
        self.broker = broker
        self.store = store
        self.defaults = defaults
        self.device = device
        self._consumer: Consumer | None = None

    def config_for(self, project: str) -> TrainConfig:
        """Service defaults, then the project's own overrides, on the service's device."""
        project_cfg = self.store.get_project(project).train_overrides
        return TrainConfig(**{**self.defaults.model_dump(exclude_defaults=True), **project_cfg, "device": self.device})

    def handle(self, env: Envelope) -> None:
        with handling(log, env, (TrainRequest,)) as h:
            msg, out = h.message, h.fields
            out["exemplar_set"] = msg.exemplar_set
            started = time.time()
            status: dict[str, Any] = {
                "state": "training",
                "request": msg.id,
                "exemplar_set": msg.exemplar_set,
                "started": started,
            }
            try:
                exemplars = self.store.exemplar_set(msg.project, msg.exemplar_set)
                self.store.write_training_status(msg.project, status)
                micrograph, coords = exemplars.read_inputs()
                cfg = self.config_for(msg.project)

                def report(stage: str, step: int, total: int, losses: dict[str, float]) -> None:
                    status["progress"] = f"{stage} {step}/{total}"
                    status["losses"] = losses
                    self.store.write_training_status(msg.project, status)
                    # pre-training is the first half of the progress, SCS training the second
                    done = (0.0 if stage == "pretrain" else 0.5) + 0.5 * step / max(total, 1)
                    metrics.TRAINING_PROGRESS.labels(msg.project).set(done)
                    for name, value in losses.items():
                        metrics.TRAINING_LOSS.labels(msg.project, stage, name).set(value)

                trained, info = train_model(micrograph, coords.xy, exemplars.diameter, cfg, on_progress=report)
                info["exemplar_set"] = exemplars.to_json()
                with self.store.staged_version(msg.project) as (version, folder):
                    save_model(folder, trained.model, trained.bank, trained.geometry, info)
            except Exception as exc:
                metrics.TRAININGS.labels("failed").inc()
                self._failed(msg.project, status, exc)
                raise
            self.broker.broadcast(ModelPublished(project=msg.project, version=version))
            seconds = time.time() - started
            metrics.TRAININGS.labels("done").inc()
            metrics.TRAINING_SECONDS.observe(seconds)
            metrics.TRAINING_PROGRESS.labels(msg.project).set(1.0)
            self.store.write_training_status(
                msg.project,
                {**status, "state": "done", "version": version, "finished": time.time(), "seconds": seconds},
            )
            out.update(version=version, train_s=round(seconds, 2))

    def _failed(self, project: str, status: dict[str, Any], exc: BaseException) -> None:
        failed = {**status, "state": "failed", "error": str(exc), "finished": time.time()}
        with contextlib.suppress(CryomaeError):  # an unknown project has nowhere to keep a status
            self.store.write_training_status(project, failed)

    def start(self) -> None:
        self._consumer = self.broker.consume(topology.TRAINING, self.handle, prefetch=1)
        log.info("trainer_started", device=self.device)

    def stop(self, timeout: float | None = None) -> None:
        if self._consumer is not None:
            self._consumer.stop(timeout)

    def ready(self) -> dict[str, Any]:
        return {"broker": self.broker.connected, "consumer": self._consumer is not None and self._consumer.running}
