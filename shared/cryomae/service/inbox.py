"""The ``cryomae run`` end of the operator's inbox (the one-process mode): requests the CLI wrote as files into
``<state>/inbox/`` (``cryomae.operator.control.SpoolControl``) are carried out within a second and deleted, and
``broker.json`` (queue depths and the first dead letters of each dead-letter queue) is written every second for
``cryomae status`` and ``cryomae dlq list``. The file names and timings here are the protocol both ends use.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import structlog

from cryomae.errors import InputError, TransientError
from cryomae.io.atomic import write_json
from cryomae.messages import decode
from cryomae.messaging import topology
from cryomae.messaging.base import Broker
from cryomae.store.projects import ProjectStore

log = structlog.get_logger("cryomae.control")

INBOX = "inbox"
SNAPSHOT = "broker.json"
SNAPSHOT_INTERVAL_S = 1.0
STALE_SNAPSHOT_S = 10.0  # older than this: the process that wrote it is not running
DLQ_LISTED = 100  # dead letters kept per queue in the snapshot


def queue_names(store: ProjectStore) -> list[str]:
    """Every queue worth reporting: the work queues, their dead-letter queues and each project's waiting queue."""
    names = [q for w in topology.WORK_QUEUES for q in (w, topology.dead_letters(w))]
    return names + [topology.waiting(p.name) for p in store.projects()]


class Inbox:
    """The ``cryomae run`` side of ``SpoolControl``: carries out inbox requests and writes the snapshot."""

    def __init__(self, broker: Broker, store: ProjectStore, state: Path, interval_s: float = SNAPSHOT_INTERVAL_S):
        self.broker = broker
        self.store = store
        self.state = state
        self.inbox = state / INBOX
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.step()
        self._thread = threading.Thread(target=self._loop, name="cryomae-inbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        (self.state / SNAPSHOT).unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except TransientError as exc:  # e.g. the broker closing under us at shutdown
                log.warning("inbox_step_failed", error=str(exc))

    def step(self) -> int:
        """Carry out every waiting request (oldest first), then write the snapshot; how many were done."""
        done = 0
        for path in sorted(self.inbox.glob("*.json")):
            self._carry_out(path)
            path.unlink(missing_ok=True)
            done += 1
        self._write_snapshot()
        return done

    def _carry_out(self, path: Path) -> None:
        try:
            op = json.loads(path.read_text())
            kind, queue = op["op"], op["queue"]
            if queue not in topology.WORK_QUEUES:
                raise ValueError(f"unknown queue {queue!r}")
            if kind == "publish":
                self.broker.publish(queue, decode(op["body"], source=str(path)))
                log.info("inbox_published", queue=queue, request=path.name)
            elif kind == "replay":
                moved = self.broker.move(topology.dead_letters(queue), queue, op.get("limit"))
                log.info("dead_letters_replayed", queue=queue, messages=moved)
            elif kind == "purge":
                purged = self.broker.purge(topology.dead_letters(queue))
                log.info("dead_letters_purged", queue=queue, messages=purged)
            else:
                raise ValueError(f"unknown operation {kind!r}")
        except (OSError, KeyError, TypeError, ValueError, InputError) as exc:
            # a bad request file is reported and removed; it must not block the inbox
            log.error("inbox_request_refused", request=str(path), error=str(exc))

    def _write_snapshot(self) -> None:
        names = queue_names(self.store)
        letters = {}
        for work in topology.WORK_QUEUES:
            dlq = topology.dead_letters(work)
            letters[dlq] = [
                {"body": base64.b64encode(e.body).decode(), "headers": dict(e.headers), "deliveries": e.delivery_count}
                for e in self.broker.peek(dlq, DLQ_LISTED)
            ]
        snap = {
            "written": time.time(),
            "pid": os.getpid(),
            "depths": {q: self.broker.depth(q) for q in names},
            "dead_letters": letters,
        }
        write_json(self.state / SNAPSHOT, snap)
