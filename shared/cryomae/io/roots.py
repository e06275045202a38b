"""The data-roots rule: a file the services read must resolve (symlinks followed) to a path under a data root."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryomae.errors import InputError


def inside_roots(path: str | Path, roots: Sequence[Path], purpose: str = "") -> Path:
    """The resolved path, if it lies under one of the (resolved) data ``roots``; InputError naming it otherwise,
    with where a symlink leads and ``purpose`` (e.g. "; picks are written only for micrographs under them")."""
    p = Path(path)
    if not p.is_absolute():
        raise InputError(path, "micrograph path is not absolute")
    resolved = p.resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        via = f" (it resolves to {resolved})" if resolved != Path(os.path.normpath(p)) else ""
        shown = ", ".join(str(r) for r in roots)
        raise InputError(path, f"outside the configured data roots ({shown}){via}{purpose}")
    return resolved
