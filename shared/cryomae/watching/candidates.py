"""Which files in a session folder are micrographs to consider, and listing them.

A candidate matches the session's file-name glob (case-sensitive, on the name only, e.g. ``*.mrc`` or
``*.tif*``), is not a temporary name, and does not lie in a hidden folder. Detectors, motion correction, rsync
and our own ``atomic_output`` write under temporary names (``.name``, ``name.tmp``, ``name.part``, ``name~``) and
rename into place; only the final name counts. Hidden folders are skipped because NFS servers expose snapshot
copies of every file there (``.snapshot``, ``.zfs``).

Each entry is examined on its own: one that cannot be (a symlink loop, a dangling symlink, no permission, a name
too long) is skipped with its reason (``Listing.unexaminable``), and the rest of the folder is listed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePath

from cryomae.errors import InputError

TEMPORARY_PREFIXES: tuple[str, ...] = (".", "~$", "#")
TEMPORARY_SUFFIXES: tuple[str, ...] = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", "~")


def is_temporary(name: str) -> bool:
    """Whether a file name is one writers use before renaming into place (suffixes compared case-insensitively)."""
    lower = name.lower()
    return name.startswith(TEMPORARY_PREFIXES) or lower.endswith(TEMPORARY_SUFFIXES)


def check_pattern(pattern: str) -> str:
    """The glob itself, or InputError when it cannot match file names (empty, or with a folder part)."""
    if not pattern or "/" in pattern or os.sep in pattern:
        raise InputError(None, f"file pattern {pattern!r} must be a non-empty glob of file names, e.g. '*.mrc'")
    return pattern


def is_candidate(relative: PurePath, pattern: str, recursive: bool) -> bool:
    """Whether a path relative to the session folder names a micrograph to consider."""
    parts = relative.parts
    if not parts or (not recursive and len(parts) > 1):
        return False
    if any(part.startswith(".") or part == ".." for part in parts[:-1]):
        return False
    name = parts[-1]
    return not is_temporary(name) and fnmatchcase(name, pattern)


@dataclass
class Listing:
    """The candidates found under a folder, with their stat results, the candidates that cannot be examined (with
    why), and the folders that could not be read."""

    files: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    unexaminable: list[tuple[Path, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_HINTS = {errno.ELOOP: " (a symlink loop)"}


def examine(path: Path) -> tuple[os.stat_result | None, str]:
    """The stat result of a candidate (symlinks followed), or None with why it cannot be examined ("" when it is
    simply gone): ``cannot be examined: too many levels of symbolic links (a symlink loop)``, ``... permission
    denied``, ``... its symlink leads nowhere (a dangling symlink)``."""
    try:
        return os.stat(path), ""
    except FileNotFoundError:
        try:
            dangling = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            dangling = False  # removed meanwhile
        return None, "cannot be examined: its symlink leads nowhere (a dangling symlink)" if dangling else ""
    except OSError as exc:
        why = exc.strerror or str(exc)
        return None, f"cannot be examined: {why[:1].lower()}{why[1:]}{_HINTS.get(exc.errno or 0, '')}"


def list_candidates(folder: Path, pattern: str, recursive: bool, start: Path | None = None) -> Listing:
    """List candidate files under ``folder`` (or only under its subfolder ``start``), without following folder
    symlinks (no loops); file symlinks are followed for size and mtime."""
    listing = Listing()
    stack = [start or folder]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    _visit(folder, Path(entry.path), entry, pattern, recursive, stack, listing)
        except OSError as exc:
            listing.errors.append(f"cannot list {directory}: {exc.strerror or exc}")
    return listing


def _visit(
    folder: Path,
    path: Path,
    entry: os.DirEntry[str],
    pattern: str,
    recursive: bool,
    stack: list[Path],
    listing: Listing,
) -> None:
    """Queue a subfolder or record a candidate file (one that vanished meanwhile is skipped; one that cannot be
    examined is recorded as such)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            if recursive and not entry.name.startswith("."):
                stack.append(path)
            return
    except OSError:
        pass  # not known to be a folder: examined below if its name is a candidate's
    if not is_candidate(path.relative_to(folder), pattern, recursive):
        return
    st, problem = examine(path)
    if problem:
        listing.unexaminable.append((path, problem))
    elif st is not None and stat.S_ISREG(st.st_mode):
        listing.files.append((path, st))
