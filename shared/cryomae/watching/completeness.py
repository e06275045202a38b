"""When a micrograph file is complete: quiet for the settle time, and for MRC files a header that agrees with the
file length.

Time is the watcher's own clock (monotonic), never the file's mtime: network filesystems and acquisition PCs
disagree about the time, but "unchanged between two looks ``settle`` seconds apart" does not depend on it.

A file that settles but fails the check (an MRC header that disagrees with the length, a file that is not an MRC
at all, an empty file) is kept waiting; once it has been unchanged for the give-up time it is published anyway,
so that the picker rejects it with a clear reason (dead-letter) instead of the watcher hiding it forever.
"""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryomae.errors import InputError
from cryomae.io.micrographs import MRC_SUFFIXES, read_micrograph, validate_mrc_complete


@dataclass(frozen=True)
class Signature:
    """What identifies one version of a file: its size and modification time."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_size, st.st_mtime_ns)

    @property
    def mtime(self) -> float:
        """Unix seconds, as messages carry them."""
        return self.mtime_ns / 1e9


class Verdict(enum.Enum):
    """Where a pending file stands after a check."""

    SETTLING = "settling"  # changed within the settle time (or first seen)
    INCOMPLETE = "incomplete"  # settled, but fails the completeness check: waiting, up to the give-up time
    COMPLETE = "complete"  # settled and passes the check: publish
    GIVE_UP = "give_up"  # unchanged for the give-up time and still failing the check: publish for the picker to reject
    GONE = "gone"  # deleted, renamed away, or no longer a regular file


def looks_complete(path: Path, size: int) -> bool:
    """The content check: non-empty, and an MRC header that declares exactly the file's length."""
    if size == 0:
        return False
    return path.suffix.lower() not in MRC_SUFFIXES or validate_mrc_complete(path)


def incompleteness(path: Path) -> str:
    """Why a settled file fails the check, in the reader's words (for the give-up warning)."""
    try:
        if os.stat(path).st_size == 0:
            return "file is empty (0 bytes)"
        read_micrograph(path)  # an incomplete MRC fails on its header, before any data is read
    except InputError as exc:
        return exc.problem
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the header disagreed with the file length when checked"


@dataclass
class PendingFile:
    """A candidate not yet published: its last signature and since when (watcher clock) it has been unchanged."""

    path: Path
    signature: Signature | None
    since: float
    verdict: Verdict = Verdict.SETTLING
    retry_at: float = 0.0  # after a failed publish: not before this time
    first_seen: float = field(init=False)

    def __post_init__(self) -> None:
        self.first_seen = self.since

    def check(self, now: float, settle: float, give_up: float) -> Verdict:
        """Look at the file again and decide; a changed signature restarts the settle time."""
        signature = signature_of(self.path)
        if signature is None:
            self.verdict = Verdict.GONE
        elif signature != self.signature:
            self.signature, self.since = signature, now
            self.verdict = Verdict.SETTLING
        elif now - self.since < settle:
            self.verdict = Verdict.SETTLING
        elif not looks_complete(self.path, signature.size):
            self.verdict = Verdict.GIVE_UP if now - self.since >= give_up else Verdict.INCOMPLETE
        elif signature_of(self.path) != signature:  # written to while its header was read
            self.verdict = Verdict.SETTLING
        else:
            self.verdict = Verdict.COMPLETE
        return self.verdict


def signature_of(path: Path) -> Signature | None:
    """Size and mtime of a regular file (symlinks followed), or None when there is none to read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Signature.of(st) if stat.S_ISREG(st.st_mode) else None
