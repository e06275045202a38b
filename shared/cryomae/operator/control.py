"""How the operator CLI reaches the running services, whatever the broker.

With RabbitMQ the CLI talks to the broker itself (``BrokerControl``). With the in-memory broker the queues live
inside the ``cryomae run`` process, so the CLI cannot reach them; it writes its requests as files into the
state folder's ``inbox/`` instead (``SpoolControl``), and the running process (``Inbox``) carries them out
within a second, then deletes them. Requests written while nothing runs wait there for the next
``cryomae run``. The process also writes ``broker.json`` (queue depths and the first dead letters of each
dead-letter queue, every second) for ``cryomae status`` and ``cryomae dlq list``.

An inbox file is written under a temporary name and renamed, so a half-written request is never read; it is
deleted only after its publish returned (a crash in between repeats it: at least once, as everywhere else).
"""

from __future__ import annotations

import abc
import base64
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cryomae.errors import InputError, TransientError
from cryomae.io.atomic import write_json
from cryomae.messages import Message, decode
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Envelope
from cryomae.service.handling import pid_running
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


@dataclass(frozen=True)
class Outcome:
    """What a control action did: ``count`` messages, or ``count`` None when it was queued for the process."""

    count: int | None
    note: str = ""


class Control(abc.ABC):
    """The operator's handle on the running system."""

    #: True when requests are carried out later by the running process (in-memory broker).
    deferred: bool = False

    @abc.abstractmethod
    def send(self, queue: str, message: Message) -> None:
        """Deliver a message to a work queue."""

    @abc.abstractmethod
    def depths(self) -> dict[str, int] | None:
        """Ready messages per queue (None when not known: no process running)."""

    @abc.abstractmethod
    def dead_letters(self, queue: str, limit: int = DLQ_LISTED) -> list[Envelope] | None:
        """The first dead letters of a work queue's dead-letter queue (None when not known)."""

    @abc.abstractmethod
    def replay(self, queue: str, limit: int | None = None) -> Outcome:
        """Move dead letters of a work queue back onto it."""

    @abc.abstractmethod
    def purge(self, queue: str) -> Outcome:
        """Delete the dead letters of a work queue."""

    def close(self) -> None:  # noqa: B027 (optional to override)
        """Release the connection, if any."""


class BrokerControl(Control):
    """Straight to the broker (RabbitMQ, or an in-memory broker in the same process)."""

    def __init__(self, broker: Broker, store: ProjectStore) -> None:
        self.broker = broker
        self.store = store

    def send(self, queue: str, message: Message) -> None:
        self.broker.publish(queue, message)

    def depths(self) -> dict[str, int]:
        return {q: self.broker.depth(q) for q in queue_names(self.store)}

    def dead_letters(self, queue: str, limit: int = DLQ_LISTED) -> list[Envelope]:
        return self.broker.peek(topology.dead_letters(queue), limit)

    def replay(self, queue: str, limit: int | None = None) -> Outcome:
        return Outcome(self.broker.move(topology.dead_letters(queue), queue, limit))

    def purge(self, queue: str) -> Outcome:
        return Outcome(self.broker.purge(topology.dead_letters(queue)))

    def close(self) -> None:
        self.broker.close()


class SpoolControl(Control):
    """Requests as files in ``<state>/inbox`` for the ``cryomae run`` process; reports from its snapshot."""

    deferred = True

    def __init__(self, state: Path) -> None:
        self.state = state
        self.inbox = state / INBOX

    def _request(self, op: dict[str, Any]) -> None:
        try:
            self.inbox.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            write_json(self.inbox / name, op)
        except OSError as exc:
            raise InputError(self.inbox, f"cannot write a request for the running process: {exc}") from None

    def snapshot(self) -> dict[str, Any] | None:
        """The running process's last snapshot, or None when there is none or it is stale."""
        try:
            data: dict[str, Any] = json.loads((self.state / SNAPSHOT).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if time.time() - float(data.get("written", 0)) > STALE_SNAPSHOT_S:
            return None
        if not pid_running(data.get("pid")):  # killed since it wrote it (the state folder is on this machine's disk)
            return None
        return data

    def send(self, queue: str, message: Message) -> None:
        self._request({"op": "publish", "queue": queue, "body": message.body().decode()})

    def depths(self) -> dict[str, int] | None:
        snap = self.snapshot()
        return None if snap is None else {k: int(v) for k, v in snap["depths"].items()}

    def dead_letters(self, queue: str, limit: int = DLQ_LISTED) -> list[Envelope] | None:
        snap = self.snapshot()
        if snap is None:
            return None
        dlq = topology.dead_letters(queue)
        rows = snap.get("dead_letters", {}).get(dlq, [])[:limit]
        return [Envelope(dlq, base64.b64decode(r["body"]), r["headers"], int(r["deliveries"])) for r in rows]

    def replay(self, queue: str, limit: int | None = None) -> Outcome:
        self._request({"op": "replay", "queue": queue, "limit": limit})
        return Outcome(None, "the running `cryomae run` process replays them within a second")

    def purge(self, queue: str) -> Outcome:
        self._request({"op": "purge", "queue": queue})
        return Outcome(None, "the running `cryomae run` process purges them within a second")


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
