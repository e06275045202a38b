"""What a long-running service keeps open per session, bounded: the least recently used entry goes when more than
``max_open`` are open, and any entry unused for ``idle_s`` seconds goes at the next use of the cache. A session's
state is on disk, so an evicted entry is opened again (read back) when its session is busy again: a two-week run's
memory follows the sessions in progress, not every session it ever served.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

IDLE_S = 600.0  # a session that has had no message for 10 minutes is closed (opened again when it has one)
MAX_OPEN = 16  # sessions open at once in one writer


class OpenSessions(Generic[K, V]):
    """A thread-safe map of open entries with the eviction of the module docstring."""

    def __init__(
        self,
        max_open: int = MAX_OPEN,
        idle_s: float = IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_open = max_open
        self.idle_s = idle_s
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0  # entries closed so far (for tests and the log)

    def get(self, key: K, open_: Callable[[], V]) -> V:
        """The open entry of ``key`` (opened with ``open_`` when it is not), marked as just used."""
        with self._lock:
            now = self._clock()
            found = self._entries.pop(key, None)
            value = found[0] if found is not None else None
        if value is None:
            value = open_()  # outside the lock: opening reads a session's state from disk
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (value, now)
            else:  # opened meanwhile by another thread: keep one
                value = self._entries[key][0]
                self._entries[key] = (value, now)
            self._entries.move_to_end(key)
            self._evict(now, keep=key)
            return value

    def peek(self, key: K) -> V | None:
        """The open entry of ``key``, if any, without marking it used."""
        with self._lock:
            found = self._entries.get(key)
            return None if found is None else found[0]

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _evict(self, now: float, keep: K) -> None:
        for key in list(self._entries):
            if key == keep:
                continue
            _, used = self._entries[key]
            if len(self._entries) > self.max_open or now - used > self.idle_s:
                del self._entries[key]
                self.evicted += 1
