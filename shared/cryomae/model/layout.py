"""The files of a model directory and their checksums, without importing torch (the operator CLI and the project
store read manifests and verify checksums; only loading a model needs torch, in ``cryomae.model.checkpoint``).

The manifest is sealed: since format 3 it records ``checksum``, the sha256 of the canonical JSON of every other
field (sorted keys, no whitespace), and it holds the weights file's sha256, so the checksum covers both. Every
manifest is written by ``write_manifest`` and read by ``read_manifest``, which refuses a changed manifest and one
without a checksum (an older format, or a downgrade meant to skip the check).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryomae.errors import CheckpointError

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: the manifest is covered by its checksum; 2: high-pass in the geometry; 1: first
CHECKSUM_KEY = "checksum"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """The sha256 of the canonical JSON (sorted keys, compact) of every manifest field but ``checksum``."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` sealed with its checksum (replacing any it had); returns what was written.

    The checksum is computed over the manifest as JSON reads it back (tuples become lists), so that reading
    the file gives the same checksum.
    """
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != CHECKSUM_KEY}))
    sealed = {**body, CHECKSUM_KEY: manifest_checksum(body)}
    Path(path).write_text(json.dumps(sealed, indent=2) + "\n", encoding="utf-8")
    return sealed


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest whose checksum matches its content; CheckpointError naming the file otherwise.

    FileNotFoundError is left to the caller (which knows whether a missing manifest means "not a model directory"
    or "not fully written").
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: not a JSON object but {type(manifest).__name__}; not a cryomae manifest")
    recorded = manifest.get(CHECKSUM_KEY)
    if not isinstance(recorded, str):
        raise CheckpointError(
            f"{path}: no checksum (format {manifest.get('format_version')!r}; cryomae now writes format "
            f"{FORMAT_VERSION}, whose manifest is covered by a checksum): the manifest cannot be verified; "
            "retrain the model (a new exemplar set, or `cryomae train`)"
        )
    actual = manifest_checksum(manifest)
    if actual != recorded:
        raise CheckpointError(
            f"{path}: manifest.json was changed after the model was written (checksum mismatch); it records "
            f"{recorded[:12]}…, its content hashes to {actual[:12]}…; restore the original manifest or retrain"
        )
    return manifest


def replace_dir(new: Path, target: Path) -> None:
    """Rename the complete directory ``new`` to ``target``; an existing ``target`` is replaced only then, and a
    reader sees either the old directory or the new one (``.<name>.old`` is the old one, briefly)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left by an interrupted earlier replace
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)
