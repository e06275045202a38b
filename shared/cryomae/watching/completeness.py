"""When a micrograph file is complete: quiet for the settle time, and for MRC files a header that agrees with the
file length.

Time is the watcher's own clock (monotonic), never the file's mtime: network filesystems and acquisition PCs
disagree about the time, but "unchanged between two looks ``settle`` seconds apart" does not depend on it.

A file that settles but fails the check while it may still grow (an MRC shorter than its header declares, or
than a header; an empty file) is kept waiting (the watcher lists it in its ledger, for ``cryomae status``); once
it has been unchanged for the give-up time it is published anyway, so that the picker rejects it with a clear
reason (dead-letter) instead of the watcher hiding it forever. A settled file that can never pass (a whole MRC
header that is invalid, a file that is not an MRC, one longer than its header declares) or that resolves outside
the data roots (a symlink) is published at once, for the picker to reject with its reason.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryomae.errors import InputError
from cryomae.io.micrographs import MRC_SUFFIXES, mrc_can_never_complete, read_micrograph, validate_mrc_complete


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
    REJECT = "reject"  # settled, and can never pass (or outside the data roots): publish now for the picker to reject
    GONE = "gone"  # deleted, renamed away, or no longer a regular file


def looks_complete(path: Path, size: int) -> bool:
    """The content check: non-empty, and an MRC header that declares exactly the file's length."""
    if size == 0:
        return False
    return path.suffix.lower() not in MRC_SUFFIXES or validate_mrc_complete(path)


def never_complete(path: Path, max_pixels: int | None = None) -> bool:
    """Whether a settled file that fails the check can never pass it however long it waits, or could never be
    picked once it did: an MRC file with a whole header that is invalid (also: no MRC at all), that declares what
    the picker refuses (more than ``max_pixels``, an extended header over the limit, a stack, no pixels), or that
    is longer than its header declares."""
    return path.suffix.lower() in MRC_SUFFIXES and mrc_can_never_complete(path, max_pixels)


def outside_roots(path: Path, roots: Sequence[Path]) -> str:
    """Why a file resolves outside every data root (a symlink out of them), or "" when it does not (or when no
    roots are given); the picker refuses such a path, so the watcher publishes it at once."""
    if not roots:
        return ""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return ""  # gone or a loop: the next look decides
    if resolved == path:
        return ""  # no symlink on the way; the session folder is under a root
    resolved_roots = [Path(root).resolve() for root in roots]
    if any(resolved.is_relative_to(root) for root in resolved_roots):
        return ""
    shown = ", ".join(str(root) for root in roots)
    return f"resolves to {resolved}, outside the data roots ({shown})"


def incompleteness(path: Path, max_pixels: int | None = None) -> str:
    """Why a settled file fails the check, in the reader's words (for the give-up warning)."""
    try:
        if os.stat(path).st_size == 0:
            return "file is empty (0 bytes)"
        read_micrograph(path, max_pixels)  # an incomplete MRC fails on its header, before any data is read
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
    problem: str = ""  # why it was rejected (Verdict.REJECT); "" otherwise
    noted: bool = False  # listed as incomplete in the ledger (the watcher clears the row when it goes)
    first_seen: float = field(init=False)

    def __post_init__(self) -> None:
        self.first_seen = self.since

    def check(
        self, now: float, settle: float, give_up: float, roots: Sequence[Path] = (), max_pixels: int | None = None
    ) -> Verdict:
        """Look at the file again and decide; a changed signature restarts the settle time. ``roots``: the data
        roots, for a symlink that resolves outside them (REJECT); ``max_pixels``: the picker's pixel limit, for an
        MRC header that declares more (REJECT)."""
        signature = signature_of(self.path)
        self.problem = ""
        if signature is None:
            self.verdict = Verdict.GONE
        elif signature != self.signature:
            self.signature, self.since = signature, now
            self.verdict = Verdict.SETTLING
        elif now - self.since < settle:
            self.verdict = Verdict.SETTLING
        elif outside := outside_roots(self.path, roots):
            self.verdict, self.problem = Verdict.REJECT, outside
        elif never_complete(self.path, max_pixels):  # also when its size agrees with a header that is invalid
            self.verdict, self.problem = Verdict.REJECT, incompleteness(self.path, max_pixels)
        elif looks_complete(self.path, signature.size):
            self.verdict = Verdict.COMPLETE
        else:
            self.verdict = Verdict.GIVE_UP if now - self.since >= give_up else Verdict.INCOMPLETE
        if self.verdict in (Verdict.COMPLETE, Verdict.REJECT) and signature_of(self.path) != signature:
            self.verdict, self.problem = Verdict.SETTLING, ""  # written to while it was read
        return self.verdict


def signature_of(path: Path) -> Signature | None:
    """Size and mtime of a regular file (symlinks followed), or None when there is none to read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Signature.of(st) if stat.S_ISREG(st.st_mode) else None
