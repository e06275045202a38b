"""Watched sessions: checking a session folder, what the watcher knows about each session, and its reports."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from watchdog.observers.api import BaseObserver

from cryomae.errors import InputError
from cryomae.watching.completeness import PendingFile, Signature, Verdict
from cryomae.watching.ledger import SessionRecord

SessionState = Literal["pending", "watching", "unavailable"]
Mode = Literal["inotify", "poll"]


@dataclass(frozen=True)
class SessionInfo:
    """A session as the watcher holds it.

    ``state``: ``pending`` until the watcher's loop takes the session up (or after the loop stopped), ``watching``,
    or ``unavailable`` when its folder cannot be watched now (``reason`` says why; retried every poll interval).
    ``mode`` is the way it is watched and ``reason`` why that way was chosen.
    """

    project: str
    session: str
    folder: Path
    pattern: str
    recursive: bool
    started_at: float
    state: SessionState
    mode: Mode | None
    reason: str


@dataclass(frozen=True)
class SessionStats:
    """Counts for one session. ``published``, ``gave_up`` (published without passing the completeness check: after
    the give-up time, or at once when it never can) and ``last_published_at`` come from the ledger (all time,
    also for a session no longer watched); ``pending`` (found, not yet published), ``incomplete`` (of those,
    settled but failing the completeness check) and ``replaced`` (published files since changed on disk, not
    re-published) describe the files as the running watcher sees them. ``seen`` = ``published`` + ``pending``.
    ``state`` is None when the session is not watched."""

    project: str
    session: str
    state: SessionState | None
    seen: int
    published: int
    pending: int
    incomplete: int
    gave_up: int
    replaced: int
    last_published_at: float | None


def _roots(data_roots: Sequence[Path]) -> list[Path]:
    """Each root as written (normalised) and as resolved, so that symlinked roots match either way."""
    roots = [Path(os.path.normpath(root)) for root in data_roots]
    return roots + [root.resolve() for root in roots]


def _outside(folder: Path, roots: list[Path]) -> bool:
    return not any(folder.is_relative_to(root) for root in roots)


def check_folder(folder: str | Path, data_roots: Sequence[Path]) -> Path:
    """The resolved session folder, or InputError naming it: not absolute, outside every data root (also after
    resolving symlinks), missing, not a folder, or not readable."""
    given = Path(folder)
    if not given.is_absolute():
        raise InputError(given, "the session folder must be an absolute path")
    roots = _roots(data_roots)
    shown = ", ".join(str(r) for r in data_roots)
    refusal = f"the session folder is outside every data root ({shown}); the watcher only watches under them"
    if _outside(Path(os.path.normpath(given)), roots):
        raise InputError(given, refusal)
    try:
        resolved = given.resolve(strict=True)
    except FileNotFoundError:
        raise InputError(given, "the session folder does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise InputError(given, f"the session folder cannot be resolved: {exc}") from None
    if _outside(resolved, roots):
        raise InputError(given, f"{refusal} (it resolves to {resolved})")
    if not resolved.is_dir():
        raise InputError(given, "the session folder is not a folder")
    try:
        with os.scandir(resolved) as entries:
            next(entries, None)
    except OSError as exc:
        raise InputError(given, f"the session folder is not readable: {exc.strerror or exc}") from None
    return resolved


@dataclass(eq=False)
class WatchedSession:
    """The watcher's working state for one session. Changed only by the watcher's loop (or with it held), under
    the watcher's lock where other threads read it (``pending``, ``replaced``, state fields)."""

    record: SessionRecord
    folder: Path = field(init=False)
    state: SessionState = "pending"
    mode: Mode | None = None
    reason: str = ""
    observer: BaseObserver | None = None
    identity: tuple[int, int] = (0, 0)  # (device, inode) of the folder when taken up
    published: dict[str, Signature] = field(default_factory=dict)
    pending: dict[str, PendingFile] = field(default_factory=dict)
    replaced: dict[str, Signature] = field(default_factory=dict)  # path -> the changed signature warned about
    folders_to_list: set[Path] = field(default_factory=set)
    next_scan: float = 0.0
    next_attempt: float = 0.0
    listing_problem: str = ""
    unexaminable: dict[str, str] = field(default_factory=dict)  # path -> why it cannot be examined (in the ledger)

    def __post_init__(self) -> None:
        self.folder = self.record.folder

    @property
    def key(self) -> tuple[str, str]:
        return self.record.project, self.record.session

    def info(self) -> SessionInfo:
        r = self.record
        return SessionInfo(
            r.project, r.session, self.folder, r.pattern, r.recursive, r.started_at, self.state, self.mode, self.reason
        )

    def incomplete(self) -> int:
        return sum(1 for p in self.pending.values() if p.verdict is Verdict.INCOMPLETE)

    def consider(self, path: Path, signature: Signature | None, now: float) -> Signature | None:
        """Start tracking a new candidate. For a published path nothing is tracked; the changed signature is
        returned the first time the file on disk differs from what was published (the caller warns)."""
        key = str(path)
        if key in self.pending:
            return None
        done = self.published.get(key)
        if done is None:
            self.pending[key] = PendingFile(path, signature, now)
            return None
        if signature is None or signature == done or self.replaced.get(key) == signature:
            return None
        self.replaced[key] = signature
        return signature
