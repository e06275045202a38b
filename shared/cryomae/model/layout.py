"""The files of a model directory and their checksum, without importing torch (the operator CLI and the project
store read manifests and verify checksums; only loading a model needs torch, in ``cryomae.model.checkpoint``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
