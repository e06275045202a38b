"""Helpers of the watcher tests: real MRC files written whole or in parts, a publish callback to wait on, and a
clock the test moves by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cryomae.io import write_mrc
from cryomae.messages import MicrographReady
from cryomae.watching import WatchSettings

WAIT_S = 10.0  # upper bound of every wait; a passing test waits a fraction of a second


def image(rows: int = 32, cols: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)


def write_micrograph(path: Path, rows: int = 32, cols: int = 48, seed: int = 0) -> Path:
    """A complete MRC (written under a temporary name and renamed into place, as write_mrc does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(path, image(rows, cols, seed), pixel_size=1.5, dtype=np.float32)
    return path


def mrc_bytes(scratch: Path, rows: int = 32, cols: int = 48, seed: int = 0) -> bytes:
    """The bytes of a complete MRC file, made with write_mrc in a scratch folder."""
    return write_micrograph(scratch / f"whole_{rows}x{cols}_{seed}.mrc", rows, cols, seed).read_bytes()


class SlowWrite:
    """Writes an MRC file the way a slow copy does: the header first, then the data in parts."""

    def __init__(self, path: Path, content: bytes) -> None:
        self.path = path
        self.content = content
        self.written = 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def write_to(self, end: int) -> None:
        with open(self.path, "ab") as f:
            f.write(self.content[self.written : end])
        self.written = end

    def header(self) -> None:
        self.write_to(1024)

    def fraction(self, part: float) -> None:
        self.write_to(1024 + int((len(self.content) - 1024) * part))

    def rest(self) -> None:
        self.write_to(len(self.content))


class Published:
    """The publish callback: keeps the messages and wakes whoever waits for them."""

    def __init__(self, fail: Callable[[MicrographReady], None] | None = None) -> None:
        self.messages: list[MicrographReady] = []
        self._fail = fail
        self._changed = threading.Condition()

    def __call__(self, message: MicrographReady) -> None:
        if self._fail is not None:
            self._fail(message)
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT_S) -> list[MicrographReady]:
        """The first ``count`` messages, once they are there; AssertionError after ``timeout``."""
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.messages) >= count, timeout)
            assert arrived, f"expected {count} publications within {timeout} s, got {len(self.messages)}"
            return list(self.messages[:count])

    def paths(self) -> list[str]:
        with self._changed:
            return [m.path for m in self.messages]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll a condition with a deadline (for state that has no event of its own)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        pause.wait(0.01)


class FakeClock:
    """A monotonic clock the test advances by hand (for Watcher.step() without the loop thread)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fast_settings(root: Path, **overrides: object) -> WatchSettings:
    """Settings for tests: short settle and intervals, no periodic rescan (so inotify mode is tested alone)."""
    values: dict[str, object] = {
        "data_roots": [root],
        "mode": "poll",
        "settle_seconds": 0.2,
        "give_up_seconds": 5.0,
        "poll_interval": 0.1,
        "rescan_interval": 0.0,
        "check_interval": 0.03,
    }
    values.update(overrides)
    return WatchSettings.model_validate(values)


def patched(content: bytes, offset: int, value: bytes) -> bytes:
    """``content`` with ``value`` written over it at ``offset`` (a damaged MRC header)."""
    return content[:offset] + value + content[offset + len(value) :]
