"""Out of space on the output disk: wait for space with backoff instead of failing the message.

A write that fails with ENOSPC (no space left on device) or EDQUOT (quota exceeded) says nothing about the message:
the same write succeeds once space is freed. ``SpaceWait.run`` therefore keeps the message in hand and tries the
write again after 1, 2, 4, ... seconds (at most ``MAX_WAIT_S``) until it succeeds, so that nothing is counted as a
bad input or a delivery and work resumes by itself. Meanwhile the service is *waiting for disk space*: its
``/readyz`` says so (503) with the path and the error, the gauge ``cryomae_disk_full`` is 1 (the alert
``CryomaeDiskFull``), and one warning is logged when it starts and one line when space is back.

Holding a message for hours would run into the broker's consumer timeout (RabbitMQ closes a channel that holds a
delivery for 30 minutes), so after ``HOLD_S`` the wait ends with ``StillNoSpaceError``: the caller publishes the message
again and acknowledges this delivery (nothing counted, nothing lost: a redelivery of an applied message is a no-op),
and the next message waits in its turn. A stop request ends the wait with a ``TransientError`` (requeued).

``disk_space`` reports the free space of a folder's filesystem for ``cryomae status``.
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from cryomae.errors import TransientError
from cryomae.service import metrics

log = structlog.get_logger("cryomae.diskspace")

OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 60.0
HOLD_S = 15 * 60.0  # under RabbitMQ's default consumer timeout (30 minutes)
LOW_SPACE_BYTES = 64 << 20  # ``cryomae status`` calls a filesystem full below this or 1 % of its size, the less

T = TypeVar("T")


class StillNoSpaceError(TransientError):
    """The disk stayed full for ``HOLD_S``: publish the message again and take the next one."""


def out_of_space(exc: BaseException) -> bool:
    """Whether an exception is a full disk or an exceeded quota."""
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE


def reason(exc: OSError, path: Path) -> str:
    """The message of a full disk, naming the path being written (the error's own file name, else ``path``)."""
    where = exc.filename or path
    return f"{where}: {exc.strerror or 'no space left on device'} (waiting for disk space; nothing is lost)"


class SpaceWait:
    """A service's state of waiting for disk space (one per service; thread-safe)."""

    def __init__(
        self,
        service: str,
        stop: threading.Event,
        *,
        hold_s: float = HOLD_S,
        first_wait_s: float = FIRST_WAIT_S,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.service = service
        self.stop = stop
        self.hold_s = hold_s
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._since: float | None = None  # wall time the current wait began
        self._reason = ""
        self.episodes = 0  # waits so far (each from the first failed write to the next one that succeeds)
        metrics.DISK_FULL.labels(service).set(0)

    def run(self, work: Callable[[], T], path: Path) -> T:
        """``work()``, tried again while it fails for want of space (see the module docstring)."""
        wait = self.first_wait_s
        held_from = time.monotonic()
        while True:
            try:
                out = work()
            except OSError as exc:
                if not out_of_space(exc):
                    raise
                why = reason(exc, path)
                self._full(why)
                if time.monotonic() - held_from >= self.hold_s:
                    raise StillNoSpaceError(why) from None
                if self.stop.wait(wait):
                    raise TransientError(why) from None
                wait = min(2 * wait, self.max_wait_s)
                continue
            self._clear()
            return out

    def _full(self, why: str) -> None:
        with self._lock:
            first = self._since is None
            if first:
                self._since = time.time()
                self.episodes += 1
            self._reason = why
        if first:
            metrics.DISK_FULL.labels(self.service).set(1)
            log.warning("disk_full", service=self.service, reason=why)

    def _clear(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            metrics.DISK_FULL.labels(self.service).set(0)
            log.info("disk_space_back", service=self.service, waited_s=round(time.time() - since, 1))

    def state(self) -> dict[str, Any]:
        """For ``/readyz``: ``disk_space`` is False while waiting, with the reason and since when."""
        with self._lock:
            if self._since is None:
                return {"disk_space": True}
            return {"disk_space": False, "disk_full": {"reason": self._reason, "since": self._since}}


def disk_space(folder: Path) -> dict[str, Any]:
    """Free space of the filesystem holding ``folder`` (its nearest existing parent): path, free and total bytes,
    and ``full`` when less than ``LOW_SPACE_BYTES`` or 1 % of the filesystem is free, whichever is less.
    Unreadable: ``free_bytes`` None."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return {"path": str(folder), "free_bytes": None, "total_bytes": None, "full": False}
    return {
        "path": str(folder),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "full": usage.free < min(LOW_SPACE_BYTES, usage.total // 100),
    }
