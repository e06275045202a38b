"""The trainer: TrainRequest -> a new model version in the store -> ModelPublished to every picker.

Training runs the core library (pre-training, then SCS training) on the stored exemplar set. The version is
written in a staging folder and renamed into place, then made current; a failed training leaves the previous
version current, records why in the project's ``training.json`` and dead-letters the request when the input
is at fault (InputError) or lets the broker retry it otherwise. The exemplar micrograph must lie inside the data
roots (resolved, so a symlink leading outside is refused), as when the set was added.

Stopping the trainer (SIGTERM, Ctrl-C) interrupts a training at its next step: the request is returned to the
training queue unacknowledged (``TrainingInterruptedError``), its status becomes ``queued``, and the next trainer
to run trains it again. While it runs, the trainer writes a heartbeat file, ``<store>/.trainers/<id>.json``,
every ``HEARTBEAT_S`` seconds, so that ``cryomae status`` can tell a training in progress from one whose
trainer is gone (``cryomae.service.heartbeats``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryomae.config import TrainConfig
from cryomae.errors import CryomaeError
from cryomae.io.atomic import atomic_output
from cryomae.io.micrographs import MAX_MICROGRAPH_PIXELS
from cryomae.messages import ModelPublished, TrainRequest
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Consumer, Envelope
from cryomae.model.checkpoint import save_model
from cryomae.service import metrics
from cryomae.service.handling import get_logger, handling
from cryomae.service.heartbeats import HEARTBEAT_KEEP_S, HEARTBEAT_S, heartbeat_file, trainer_liveness
from cryomae.store.outputs import SessionOutputs, repick_messages
from cryomae.store.projects import ProjectStore
from cryomae.training.corrections import CorrectionMarks
from cryomae.training.train import TrainingInterruptedError, train_model

log = get_logger("trainer")


class Trainer:
    """Handles training requests; ``start`` binds the handler to the broker."""

    def __init__(
        self,
        broker: Broker,
        store: ProjectStore,
        defaults: TrainConfig,
        device: str = "auto",
        max_pixels: int | None = MAX_MICROGRAPH_PIXELS,
        *,
        roots: Sequence[Path],
        outputs: Path | None = None,
    ) -> None:
        self.broker = broker
        self.outputs = outputs  # the sessions' outputs (read only): what a re-pick after corrections re-picks
        self.roots = list(roots)  # data roots: an exemplar micrograph resolving outside them is dead-lettered
        self.max_pixels = max_pixels  # largest exemplar micrograph read (``read_micrograph``)
        self.store = store
        self.defaults = defaults
        self.device = device
        self._consumer: Consumer | None = None
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self._cancel = threading.Event()  # set by stop(): a training in progress ends at its next step
        self._in_hand: dict[str, Any] = {}  # project and request being trained (for the heartbeat)
        self._heartbeat: threading.Thread | None = None

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
                "trainer": self.id,
            }
            self._in_hand = {"project": msg.project, "request": msg.id}
            try:
                exemplars = self.store.exemplar_set(msg.project, msg.exemplar_set)
                self.store.write_training_status(msg.project, status)
                micrograph, coords = exemplars.read_inputs(self.max_pixels, roots=self.roots)
                corrections = [
                    CorrectionMarks(c.micrograph.data, c.missed, c.wrong, micrograph=str(c.micrograph.path))
                    for c in exemplars.read_corrections(self.max_pixels, roots=self.roots)
                ]
                cfg = self.config_for(msg.project)

                planned = cfg.planned_steps()

                def report(stage: str, step: int, total: int, losses: dict[str, float]) -> None:
                    # the stages' steps cost about the same on one device: the time left is the steps left at the
                    # pace so far (which follows the machine's load as it changes)
                    stages = list(planned)
                    before = sum(planned[s] for s in stages[: stages.index(stage)]) if stage in planned else 0
                    done, steps = before + step, max(sum(planned.values()), before + total)
                    elapsed = time.time() - started
                    status["progress"] = f"{stage} {step}/{total}"
                    status["fraction"] = round(done / steps, 4)
                    status["eta_s"] = round(elapsed / max(done, 1) * (steps - done), 1)
                    status["losses"] = losses
                    self.store.write_training_status(msg.project, status)
                    metrics.TRAINING_PROGRESS.labels(msg.project).set(done / steps)
                    for name, value in losses.items():
                        metrics.TRAINING_LOSS.labels(msg.project, stage, name).set(value)

                trained, info = train_model(
                    micrograph,
                    coords.xy,
                    exemplars.diameter,
                    cfg,
                    on_progress=report,
                    cancel=self._cancel,
                    corrections=corrections,
                )
                info["exemplar_set"] = exemplars.to_json()
                with self.store.staged_version(msg.project) as (version, folder):
                    save_model(
                        folder,
                        trained.model,
                        trained.bank,
                        trained.geometry,
                        info,
                        head=trained.head,
                        negatives=trained.negatives,
                    )
            except TrainingInterruptedError as exc:
                metrics.TRAININGS.labels("interrupted").inc()
                self._interrupted(msg.project, status, exc)
                raise
            except Exception as exc:
                metrics.TRAININGS.labels("failed").inc()
                self._failed(msg.project, status, exc)
                raise
            finally:
                self._in_hand = {}
            self.broker.broadcast(ModelPublished(project=msg.project, version=version))
            if msg.repick_session is not None:
                out["repicked"] = self._repick(msg.project, msg.repick_session, version)
            seconds = time.time() - started
            metrics.TRAININGS.labels("done").inc()
            metrics.TRAINING_SECONDS.observe(seconds)
            metrics.TRAINING_PROGRESS.labels(msg.project).set(1.0)
            self.store.write_training_status(
                msg.project,
                {**status, "state": "done", "version": version, "finished": time.time(), "seconds": seconds},
            )
            out.update(version=version, train_s=round(seconds, 2))

    def _repick(self, project: str, session: str, version: str) -> int:
        """Ask for the session's micrographs picked by an older version to be picked again with ``version`` (the
        path of ``cryomae session repick``); the number asked for. A session with no outputs has nothing to
        re-pick; the version is published either way, and a re-pick that fails (damaged outputs, the broker) is
        logged for ``cryomae session repick``, not a reason to train again."""
        folder = None if self.outputs is None else self.outputs / project / session
        if folder is None or not folder.is_dir():
            log.warning("repick_skipped", project=project, session=session, reason=f"no outputs at {folder}")
            return 0
        try:
            messages, missing = repick_messages(SessionOutputs(folder, read_only=True), project, session, version)
            for message in messages:
                self.broker.publish(topology.MICROGRAPHS, message)
        except (CryomaeError, OSError) as exc:  # the version stands: the operator can re-pick with the command
            log.warning("repick_failed", project=project, session=session, reason=str(exc), command="session repick")
            return 0
        log.info("repick_requested", project=project, session=session, micrographs=len(messages), missing=len(missing))
        return len(messages)

    def _interrupted(self, project: str, status: dict[str, Any], exc: BaseException) -> None:
        queued = {
            **status,
            "state": "queued",
            "interrupted": f"{exc} (the trainer stopped); the request waits in the training queue",
            "interrupted_at": time.time(),
        }
        with contextlib.suppress(CryomaeError):
            self.store.write_training_status(project, queued)

    def _failed(self, project: str, status: dict[str, Any], exc: BaseException) -> None:
        failed = {**status, "state": "failed", "error": str(exc), "finished": time.time()}
        with contextlib.suppress(CryomaeError):  # an unknown project has nowhere to keep a status
            self.store.write_training_status(project, failed)

    def start(self) -> None:
        self._cancel.clear()
        for old in trainer_liveness(self.store.root):
            if old["age_s"] > HEARTBEAT_KEEP_S:
                heartbeat_file(self.store.root, old["id"]).unlink(missing_ok=True)
        self._beat()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="trainer-heartbeat", daemon=True)
        self._heartbeat.start()
        self._consumer = self.broker.consume(topology.TRAINING, self.handle, prefetch=1)
        log.info("trainer_started", device=self.device, trainer=self.id)

    def stop(self, timeout: float | None = None) -> None:
        """Interrupt a training in progress (its request goes back to the queue) and stop consuming."""
        self._cancel.set()
        if self._consumer is not None:
            self._consumer.stop(timeout)
        if self._heartbeat is not None:
            self._heartbeat.join(HEARTBEAT_S)
        self._heartbeat_file().unlink(missing_ok=True)

    def _heartbeat_file(self) -> Path:
        return heartbeat_file(self.store.root, self.id)

    def _beat(self) -> None:
        path = self._heartbeat_file()
        data = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **self._in_hand}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                tmp.write_text(json.dumps(data))
        except OSError as exc:  # a full or read-only store must not stop the trainer; status then says unknown
            log.warning("heartbeat_failed", file=str(path), error=str(exc))

    def _heartbeat_loop(self) -> None:
        while not self._cancel.wait(HEARTBEAT_S):
            self._beat()

    def ready(self) -> dict[str, Any]:
        return {"broker": self.broker.connected, "consumer": self._consumer is not None and self._consumer.running}
