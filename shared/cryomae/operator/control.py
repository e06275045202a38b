"""How the operator CLI reaches the running services, whatever the broker.

With RabbitMQ the CLI talks to the broker itself (``BrokerControl``). With the in-memory broker the queues live
inside the ``cryomae run`` process, so the CLI cannot reach them; it writes its requests as files into the
state folder's ``inbox/`` instead (``SpoolControl``), and the running process (``cryomae.service.inbox``)
carries them out within a second, then deletes them. Requests written while nothing runs wait there for the
next ``cryomae run``. The process also writes ``broker.json`` (queue depths and the first dead letters of each
dead-letter queue, every second) for ``cryomae status`` and ``cryomae dlq list``.

An inbox file is written under a temporary name and renamed, so a half-written request is never read; it is
deleted only after its publish returned (a crash in between repeats it: at least once, as everywhere else).
"""

from __future__ import annotations

import abc
import base64
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cryomae.errors import InputError
from cryomae.io.atomic import write_json
from cryomae.messages import Message
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Envelope
from cryomae.service.handling import pid_running
from cryomae.service.inbox import DLQ_LISTED, INBOX, SNAPSHOT, STALE_SNAPSHOT_S, queue_names
from cryomae.store.projects import ProjectStore

log = structlog.get_logger("cryomae.control")


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
