"""The in-memory broker's journal: every queued message also on disk, so that a stop loses nothing.

``MemoryBroker(journal=Journal(folder))`` keeps each message of a durable queue as one file,
``<folder>/<queue>/<sequence>.<deliveries>.msg`` (JSON: base64 body and the headers), written under a temporary
name, fsynced and renamed into place before ``publish`` returns. Acknowledging a message deletes its file; a
delivery renames it to count the delivery (so a message that kills its process every time still reaches the
delivery limit); dead-lettering and moving write the message into the other queue's folder first, then delete
the old file (a crash in between leaves it in both: at least once, as everywhere else). Purging deletes the
files. At start-up ``load`` returns every queue's messages in their order, including those that were in hand
when the process stopped: they are delivered again, as RabbitMQ redelivers the unacknowledged messages of a
consumer whose connection closed.

A lock file (``flock``) keeps a second process off the same journal. Broadcast queues (each picker's private
subscription) are not journaled, as RabbitMQ's exclusive queues are not durable.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog

from cryomae.errors import ConfigError
from cryomae.io.atomic import atomic_output

log = structlog.get_logger("cryomae.messaging")

LOCK = "journal.lock"
SUFFIX = ".msg"
_FILE = re.compile(r"^(\d{20})\.(\d+)\.msg$")
_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


@dataclass(frozen=True)
class Stored:
    """One journaled message as read back at start-up."""

    sequence: int
    body: bytes
    headers: dict[str, Any]
    deliveries: int


def _encode(value: Any) -> Any:
    """AMQP header values as JSON (bytes, Decimal and datetime tagged)."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        if set(value) == {"$decimal"}:
            return Decimal(value["$decimal"])
        if set(value) == {"$datetime"}:
            return datetime.fromisoformat(value["$datetime"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@dataclass(frozen=True)
class Unreadable:
    """A journal file that could not be read: its queue, why, and the message body (recovered where the file's
    base64 body survived, else the start of the file as it is)."""

    queue: str
    reason: str
    body: bytes


MAX_FILE_BYTES = 6 * 1024 * 1024  # a message of MAX_MESSAGE_BYTES (4 MiB) as base64 in JSON, with its headers
RAW_KEPT_BYTES = 4096  # of a file whose message cannot be recovered, the start kept in its dead letter
_BODY = re.compile(rb'"body"\s*:\s*"([A-Za-z0-9+/]*=*)')


def _recover_body(raw: bytes) -> bytes | None:
    """The message body of a damaged journal file, where its base64 ``body`` field survived whole enough to decode
    to a JSON object (a file torn after the body, or with its headers damaged); None otherwise."""
    m = _BODY.search(raw)
    if m is None:
        return None
    text = m.group(1)
    text = text[: len(text) - len(text) % 4]  # whole base64 quanta only
    try:
        body = base64.b64decode(text, validate=True)
        value = json.loads(body)
    except ValueError:
        return None
    return body if isinstance(value, dict) else None


class Journal:
    """A folder of queued messages; see the module docstring. Not thread-safe: the broker's lock guards it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd: int | None = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.folder}: cannot open the message journal ({exc})") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigError(
                f"{self.folder}: the message journal is in use by another `cryomae run` process ({LOCK} is "
                "locked); stop that one first, or give this one another state folder (CRYOMAE_STATE)"
            ) from None
        self._next = 1 + max((s for _, s, _ in self._files()), default=0)
        self.unreadable: list[Unreadable] = []  # what the last ``load`` set aside

    def _files(self) -> list[tuple[Path, int, int]]:
        """Every journaled message file: (path, sequence, deliveries)."""
        found = []
        for queue in self.folder.iterdir():
            if not queue.is_dir():
                continue
            for path in queue.iterdir():
                m = _FILE.match(path.name)
                if m:
                    found.append((path, int(m.group(1)), int(m.group(2))))
        return found

    def _queue_dir(self, queue: str) -> Path:
        if not _QUEUE.match(queue):
            raise ValueError(f"queue name {queue!r} cannot be journaled")
        return self.folder / queue

    def add(self, queue: str, body: bytes, headers: dict[str, Any], deliveries: int = 0) -> Path:
        """Write one message durably; returns its file (the handle for ``delivered`` and ``remove``)."""
        folder = self._queue_dir(queue)
        folder.mkdir(exist_ok=True)
        sequence, self._next = self._next, self._next + 1
        path = folder / f"{sequence:020d}.{deliveries}{SUFFIX}"
        record = {"body": base64.b64encode(body).decode(), "headers": _encode(headers)}
        with atomic_output(path, durable=True) as tmp:  # written, fsynced, renamed; the rename survives a crash
            tmp.write_text(json.dumps(record), encoding="utf-8")
        return path

    @staticmethod
    def delivered(path: Path, deliveries: int) -> Path:
        """Record the delivery count of a message being handed to a consumer; returns its new file."""
        m = _FILE.match(path.name)
        if m is None:
            raise ValueError(f"{path} is not a journal file")
        target = path.with_name(f"{m.group(1)}.{deliveries}{SUFFIX}")
        os.replace(path, target)
        return target

    @staticmethod
    def remove(path: Path | None) -> None:
        """Forget a message (acknowledged, dead-lettered elsewhere, moved or purged)."""
        if path is not None:
            path.unlink(missing_ok=True)

    def load(self) -> dict[str, list[tuple[Path, Stored]]]:
        """Every queue's journaled messages, oldest first. An unreadable file (torn, edited, not ours) is set
        aside as ``*.bad`` for a person to look at and listed in ``self.unreadable``, with the message it held
        where its body can still be recovered, so that the broker dead-letters it with the reason."""
        queues: dict[str, list[tuple[Path, Stored]]] = {}
        self.unreadable = []
        for path, sequence, deliveries in sorted(self._files(), key=lambda f: f[1]):
            try:
                size = path.stat().st_size
                if size > MAX_FILE_BYTES:
                    raise ValueError(f"{size} bytes, more than a journaled message can take")
                record = json.loads(path.read_text(encoding="utf-8"))
                stored = Stored(sequence, base64.b64decode(record["body"]), _decode(record["headers"]), deliveries)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.unreadable.append(self._set_aside(path, exc))
                continue
            queues.setdefault(path.parent.name, []).append((path, stored))
        for leftover in self.folder.glob("*/.*.tmp"):  # a write a crash interrupted: never renamed, never sent
            leftover.unlink(missing_ok=True)
        return queues

    def _set_aside(self, path: Path, exc: BaseException) -> Unreadable:
        """Rename an unreadable journal file to ``*.bad`` and say what it held, as far as can be told."""
        bad = path.with_name(path.name + ".bad")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES)
        except OSError:
            raw = b""
        body = _recover_body(raw)
        why = f"journal file {path} could not be read ({str(exc) or type(exc).__name__}); kept as {bad.name}"
        try:
            os.replace(path, bad)
        except OSError as move:
            why += f" (could not be renamed: {move})"
        log.error(
            "journal_file_unreadable", file=str(path), error=str(exc), kept_as=bad.name, recovered=body is not None
        )
        return Unreadable(queue=path.parent.name, reason=why, body=body if body is not None else raw[:RAW_KEPT_BYTES])

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
