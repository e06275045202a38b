"""Which files in a session folder are micrographs to consider, and listing them.

A candidate matches the session's file-name glob (case-sensitive, on the name only, e.g. ``*.mrc`` or
``*.tif*``), is not a temporary name, and does not lie in a hidden folder. Detectors, motion correction, rsync
and our own ``atomic_output`` write under temporary names (``.name``, ``name.tmp``, ``name.part``, ``name~``) and
rename into place; only the final name counts. Hidden folders are skipped because NFS servers expose snapshot
copies of every file there (``.snapshot``, ``.zfs``).
"""

from __future__ import annotations

import os
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
    """The candidates found under a folder, with their stat results, and the folders that could not be read."""

    files: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


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
    """Queue a subfolder or record a candidate file (a file that vanished meanwhile is skipped)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            if recursive and not entry.name.startswith("."):
                stack.append(path)
        elif is_candidate(path.relative_to(folder), pattern, recursive) and entry.is_file():
            listing.files.append((path, entry.stat()))
    except FileNotFoundError:
        pass
