"""The writer: PicksReady and Rethreshold -> the session's STAR files (``cryomae.store.outputs``).

The picks queue has a single active consumer, so one writer writes a session at a time even with several
replicas. One ``SessionOutputs`` per session stays open (opening one checks its particles STAR in full).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cryomae.live import metrics
from cryomae.live.common import get_logger, handling
from cryomae.messages import PicksReady, Rethreshold
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Consumer, Envelope
from cryomae.store.outputs import SessionOutputs

log = get_logger("writer")


class Writer:
    """Applies picks and threshold changes to per-session outputs under ``outputs/<project>/<session>``."""

    def __init__(self, broker: Broker, outputs: Path) -> None:
        self.broker = broker
        self.outputs = outputs
        self._sessions: dict[tuple[str, str], SessionOutputs] = {}
        self._lock = threading.Lock()
        self._consumer: Consumer | None = None

    def session(self, project: str, session: str) -> SessionOutputs:
        with self._lock:
            key = (project, session)
            if key not in self._sessions:
                self._sessions[key] = SessionOutputs(self.outputs / project / session)
            return self._sessions[key]

    def handle(self, env: Envelope) -> None:
        with handling(log, env, (PicksReady, Rethreshold)) as h:
            msg, out = h.message, h.fields
            if isinstance(msg, Rethreshold):
                out["threshold"] = msg.threshold
                changed = self.session(msg.project, msg.session).apply_rethreshold(msg)
                out.update(micrographs_changed=changed.micrographs_changed, particles=changed.particles)
                return
            assert isinstance(msg, PicksReady)
            out.update(micrograph=msg.micrograph, model_version=msg.model_version)
            result = self.session(msg.project, msg.session).apply(msg)
            out.update(result=result.outcome, rows=result.rows, latency_s=round(result.latency_s, 3))
            metrics.MICROGRAPHS_WRITTEN.labels(msg.project, result.outcome).inc()
            if result.outcome == "new":
                metrics.PARTICLES_WRITTEN.labels(msg.project).inc(result.rows)
                metrics.LATENCY.observe(result.latency_s)

    def start(self) -> None:
        self._consumer = self.broker.consume(topology.PICKS, self.handle, prefetch=1)
        log.info("writer_started", outputs=str(self.outputs))

    def stop(self, timeout: float | None = None) -> None:
        if self._consumer is not None:
            self._consumer.stop(timeout)

    def ready(self) -> dict[str, Any]:
        return {"broker": self.broker.connected, "consumer": self._consumer is not None and self._consumer.running}
