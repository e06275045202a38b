"""Atomic writes: the one way every file of the project is written so that a reader never sees half of it.

A file is written under a hidden temporary name beside its target (``.<name>.<12 hex>.tmp``), flushed to disk
(fsync) and renamed over the target; on failure the temporary file is removed and the target is left as it was.
``durable=True`` also flushes the folder, so that the rename itself survives a machine crash and writes reach
the disk in the order they were made (the session outputs and the queue journal rely on this order).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # what ``atomic_output`` leaves behind when killed


def fsync_path(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to disk, so a rename never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | Path, *, durable: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; when the block succeeds, fsync it and move it over ``path``
    (with ``durable``, fsync the folder too; with ``mode``, set the file's permissions first).

    Readers (and file watchers, which ignore the ``.tmp`` suffix) never see a half-written file; on failure the
    temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(target.parent)


def write_json(
    path: Path, data: Any, *, indent: int | None = None, allow_nan: bool = True, durable: bool = False
) -> None:
    """Write ``data`` as JSON atomically (``atomic_output``); indented files end with a newline."""
    text = json.dumps(data, indent=indent, allow_nan=allow_nan) + ("\n" if indent is not None else "")
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
