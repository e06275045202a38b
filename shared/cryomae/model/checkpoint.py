"""Model directories: safetensors weights plus a JSON manifest, loaded without pickle and verified.

A model directory holds ``weights.safetensors`` (the MAE's parameters, the exemplar bank under the key
``exemplar_bank``, the particle-probability head, if any, under ``pu_head.*``, and the features of an operator's
marked wrong picks, if any, under ``negative_bank``) and ``manifest.json`` (preset,
geometry, training hyperparameters, data provenance and the sha256 of the weights file), sealed by a checksum
over all of its fields (``cryomae.model.layout``). Loading verifies the manifest's checksum, then the weights'
sha256, before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cryomae.errors import CheckpointError
from cryomae.model.head import ParticleHead
from cryomae.model.layout import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    read_manifest,
    replace_dir,
    sha256_file,
    write_manifest,
)
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import Preset
from cryomae.preprocess import Geometry

BANK_KEY = "exemplar_bank"
NEGATIVES_KEY = "negative_bank"
__all__ = ["BANK_KEY", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "TrainedModel", "load_model", "save_model"]


@dataclass
class TrainedModel:
    """A trained MAE with its exemplar bank and the geometry it was trained for."""

    model: MaskedAutoencoder
    bank: torch.Tensor  # [B, D] encoder features of the exemplars (and their dihedral views)
    geometry: Geometry
    manifest: dict[str, Any]
    head: ParticleHead | None = None  # the particle-probability head (models trained before it have none)
    # [N, D] encoder features of an operator's marked wrong picks (and their dihedral views); None: no corrections
    negatives: torch.Tensor | None = None

    @property
    def preset(self) -> Preset:
        return self.model.preset


def save_model(
    out_dir: str | Path,
    model: MaskedAutoencoder,
    bank: torch.Tensor,
    geometry: Geometry,
    info: dict[str, Any],
    head: ParticleHead | None = None,
    negatives: torch.Tensor | None = None,
) -> Path:
    """Write a model directory atomically: a temporary sibling directory renamed into place.

    ``info`` (hyperparameters, provenance, timings) is stored in the manifest as given. An existing
    directory at ``out_dir`` is replaced only after the new one is complete.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors[BANK_KEY] = bank.detach().float().cpu().contiguous()
    if head is not None:
        tensors.update(head.tensors())
    if negatives is not None:
        tensors[NEGATIVES_KEY] = negatives.detach().float().cpu().contiguous()
    save_file(tensors, str(tmp / WEIGHTS))
    manifest = {
        "format_version": FORMAT_VERSION,
        "preset": model.preset.to_dict(),
        "geometry": dataclasses.asdict(geometry),
        "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)},
        "exemplar_bank": {"size": int(bank.shape[0]), "dim": int(bank.shape[1])},
        **({"particle_head": head.info} if head is not None else {}),
        **({"negative_bank": {"size": int(negatives.shape[0])}} if negatives is not None else {}),
        **info,
    }
    write_manifest(tmp / MANIFEST, manifest)
    replace_dir(tmp, out)
    return out


def load_model(model_dir: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """Load and verify a model directory; raises CheckpointError naming the directory and the problem."""
    d = Path(model_dir)
    try:
        manifest = read_manifest(d / MANIFEST)  # its checksum: every value as written (diameter, weights' sha256)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{d}: no {MANIFEST}; is this a cryomae model directory?") from None
    try:
        preset = Preset(**manifest["preset"])
        # fields that older formats lack keep their behaviour: no high-pass (format 1), no low-pass, no ice mask
        geometry = Geometry(**{"highpass": None, "lowpass": None, "ice_z": None, **manifest["geometry"]})
        expected = manifest["weights"]["sha256"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{d / MANIFEST}: incomplete manifest ({e})") from None
    weights = d / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    actual = sha256_file(weights)
    if actual != expected:
        raise CheckpointError(f"{weights}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")
    tensors = load_file(str(weights), device="cpu")
    bank = tensors.pop(BANK_KEY, None)
    if bank is None:
        raise CheckpointError(f"{weights}: no exemplar bank in the weights file")
    negatives = tensors.pop(NEGATIVES_KEY, None)
    if (negatives is None) != ("negative_bank" not in manifest):
        raise CheckpointError(f"{weights}: the manifest and the weights disagree on the negatives (corrections)")
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1:] != bank.shape[1:]):
        raise CheckpointError(f"{weights}: negatives of shape {tuple(negatives.shape)} for a bank of {bank.shape[1]}")
    try:
        head = ParticleHead.pop_from(tensors, manifest.get("particle_head"))
    except KeyError as e:
        raise CheckpointError(f"{weights}: {e.args[0]}") from None
    if head is not None and head.direction.shape != bank.shape[1:]:
        raise CheckpointError(
            f"{weights}: particle head of {head.direction.shape[0]} dimensions for a bank of {bank.shape[1]}"
        )
    model = MaskedAutoencoder(preset)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit preset {preset.name!r}: {e}") from None
    model.to(device).eval()
    if head is not None:
        head.direction = head.direction.to(device)
    return TrainedModel(
        model=model,
        bank=bank.to(device),
        geometry=geometry,
        manifest=manifest,
        head=head,
        negatives=None if negatives is None else negatives.to(device),
    )
