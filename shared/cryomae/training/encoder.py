"""The facility encoder: an MAE pre-trained by masked reconstruction on many micrographs of any samples.

A project's training from 15 exemplars sees one micrograph; a facility has an archive of thousands. Pre-training
on that archive once (``cryomae encoder pretrain``) and starting every project's training from it
(``TrainConfig.encoder``) is how the CryoMAE paper's ViT would be used at a facility.

How the regions are made: an archive mixes particle sizes, so each micrograph is prepared (the same high-pass,
low-pass and ice flattening as a project's training) at particle diameters drawn log-uniformly from
``EncoderConfig.min_diameter`` to ``max_diameter`` original pixels, and random regions (rotated and flipped) are
cut from it. Micrographs are read and prepared a chunk at a time, so memory stays bounded for any archive size.

Resuming: after every epoch the model, the optimizer's state and the epoch count are written to
``<out>.partial/`` (safetensors and a sealed JSON record, never pickle); a run given the same micrographs and
configuration continues from there, and its result is the same as an uninterrupted run's (each epoch's random
draws depend only on the seed and the epoch). An interrupted run loses at most the epoch in progress.

The encoder directory holds ``weights.safetensors`` (the whole MAE, decoder included, so that a project's
pre-training continues it) and ``manifest.json`` (``kind: encoder``, preset, preprocessing, configuration, the
micrographs' names and sizes, timings), sealed by the same checksum as a project model's manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from safetensors.torch import load_file, save_file

from cryomae import __version__
from cryomae.config import EncoderConfig, TrainConfig
from cryomae.device import autocast, resolve_device
from cryomae.errors import CheckpointError, CryomaeError, InputError
from cryomae.io.micrographs import MAX_MICROGRAPH_PIXELS, read_micrograph
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
from cryomae.model.presets import Preset, get_preset
from cryomae.preprocess import Geometry, prepare
from cryomae.training.regions import crop_regions, random_augmentation, random_centres
from cryomae.training.steps import Progress, ProgressHook, adamw, lr_at

log = structlog.get_logger("cryomae.encoder")

ENCODER_KIND = "encoder"
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
_VERSION = re.compile(r"^v(\d{4,})$")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A verified facility encoder: its weights (the whole MAE) and its manifest."""

    path: Path
    preset: Preset
    state: dict[str, torch.Tensor]
    manifest: dict[str, Any]

    @property
    def checksum(self) -> str:
        return str(self.manifest["checksum"])


def preprocessing(train: TrainConfig | None = None) -> dict[str, Any]:
    """The preprocessing a facility encoder is pre-trained with: a project's (``TrainConfig``'s defaults)."""
    t = train or TrainConfig()
    return {"box_factor": t.box_factor, "highpass": t.highpass, "lowpass": t.lowpass, "ice_z": t.ice_z}


def _run_key(files: Sequence[Path], cfg: EncoderConfig, prep: dict[str, Any]) -> str:
    """What a partial run must match to be resumed: the micrographs (path, size, mtime) and every setting."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps({"cfg": cfg.model_dump(exclude={"device"}), "prep": prep}, sort_keys=True).encode())
    return h.hexdigest()


def _steps_per_epoch(n_files: int, cfg: EncoderConfig) -> int:
    steps = 0
    for start in range(0, n_files, cfg.micrographs_per_chunk):
        chunk = min(cfg.micrographs_per_chunk, n_files - start)
        steps += math.ceil(chunk * cfg.scales_per_micrograph * cfg.regions_per_micrograph / cfg.batch_size)
    return steps


def _save_partial(folder: Path, model: MaskedAutoencoder, opt: torch.optim.Optimizer, record: dict[str, Any]) -> None:
    """The run's state after an epoch, written to a temporary sibling and renamed into place."""
    tensors = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"opt.{i}.{name}"] = t.detach().float().cpu().contiguous().reshape(t.shape)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file(tensors, str(tmp / STATE_FILE))
    write_manifest(tmp / PROGRESS_FILE, {**record, "state_sha256": sha256_file(tmp / STATE_FILE)})
    replace_dir(tmp, folder)


def _load_partial(
    folder: Path, model: MaskedAutoencoder, opt: torch.optim.Optimizer, key: str
) -> dict[str, Any] | None:
    """The record of a partial run that matches ``key``, with its state loaded; None if there is none to resume."""
    if not (folder / PROGRESS_FILE).is_file():
        return None
    try:
        record = read_manifest(folder / PROGRESS_FILE)
        if record.get("run_key") != key:
            log.warning("encoder_partial_run_ignored", folder=str(folder), reason="other micrographs or settings")
            return None
        if sha256_file(folder / STATE_FILE) != record.get("state_sha256"):
            raise CheckpointError(f"{folder / STATE_FILE}: checksum mismatch")
        tensors = load_file(str(folder / STATE_FILE), device="cpu")
    except (CheckpointError, OSError, ValueError) as e:
        log.warning("encoder_partial_run_ignored", folder=str(folder), reason=str(e))
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return record


def next_version(folder: Path) -> Path:
    """``folder/vNNNN`` one past the highest complete version there (v0001 for an empty or new folder)."""
    numbers = [int(m.group(1)) for p in folder.glob("v*") if (m := _VERSION.match(p.name)) and (p / MANIFEST).is_file()]
    return folder / f"v{max(numbers, default=0) + 1:04d}"


def resolve_encoder(path: str | Path) -> Path:
    """An encoder directory, or the newest complete version ``vNNNN`` in a folder of versions."""
    p = Path(path).expanduser()
    if (p / MANIFEST).is_file():
        return p
    versions = sorted(
        ((int(m.group(1)), c) for c in (p.glob("v*") if p.is_dir() else ()) if (m := _VERSION.match(c.name))),
        reverse=True,
    )
    for _, candidate in versions:
        if (candidate / MANIFEST).is_file():
            return candidate
    raise CheckpointError(f"{p}: no facility encoder here (neither {MANIFEST} nor a version folder v0001, ...)")


def load_encoder(path: str | Path) -> Encoder:
    """Load and verify a facility encoder (manifest checksum, then the weights' sha256); CheckpointError if not."""
    d = resolve_encoder(path)
    manifest = read_manifest(d / MANIFEST)
    if manifest.get("kind") != ENCODER_KIND:
        raise CheckpointError(f"{d / MANIFEST}: not a facility encoder (kind {manifest.get('kind')!r})")
    try:
        preset = Preset(**manifest["preset"])
        expected = manifest["weights"]["sha256"]
        # read by project training (the preprocessing check, the provenance): absent keys fail here, clearly
        dict(manifest["preprocessing"]), int(manifest["micrographs"]["count"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / MANIFEST}: incomplete encoder manifest ({e})") from None
    if sha256_file(d / WEIGHTS) != expected:
        raise CheckpointError(f"{d / WEIGHTS}: checksum mismatch with its manifest")
    state = load_file(str(d / WEIGHTS), device="cpu")
    try:
        MaskedAutoencoder(preset).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{d / WEIGHTS}: weights do not fit preset {preset.name!r}: {e}") from None
    return Encoder(path=d, preset=preset, state=state, manifest=manifest)


def start_from_encoder(model: MaskedAutoencoder, encoder: Encoder) -> None:
    """Load a facility encoder's weights into a project's model; InputError when its preset is not the project's."""
    ours, theirs = model.preset, encoder.preset
    if dataclasses.replace(ours, feature=theirs.feature, feature_layer=theirs.feature_layer) != theirs:
        raise InputError(
            encoder.path,
            f"facility encoder is preset {theirs.name!r}, the project trains preset {ours.name!r}: pre-train an "
            "encoder of the same preset, or train the project with the encoder's",
        )
    model.load_state_dict(encoder.state, strict=True)


def _chunk_regions(
    files: Sequence[Path],
    cfg: EncoderConfig,
    prep: dict[str, Any],
    size: int,
    rng: np.random.Generator,
    device: torch.device,
    max_pixels: int | None,
) -> tuple[torch.Tensor, list[str]]:
    """Regions [N, 1, size, size] of a chunk of micrographs at random particle sizes; the files that failed."""
    regions, failed = [], []
    lo, hi = math.log(cfg.min_diameter), math.log(cfg.max_diameter)
    for f in files:
        try:
            image = read_micrograph(f, max_pixels=max_pixels).data
        except (CryomaeError, OSError, ValueError) as e:
            failed.append(f"{f}: {e}")
            continue
        for diameter in np.exp(rng.uniform(lo, hi, cfg.scales_per_micrograph)):
            geometry = Geometry(diameter=float(diameter), img_size=size, **prep)
            img = prepare(image, geometry, device)
            n = cfg.regions_per_micrograph
            centres = random_centres(tuple(img.shape), n, rng, margin=size / 4)
            angles, flips = random_augmentation(n, rng)
            regions.append(crop_regions(img, centres, size, angles, flips))
    if not regions:
        return torch.zeros((0, 1, size, size), device=device), failed
    return torch.cat(regions), failed


def pretrain_encoder(
    micrographs: Sequence[Path],
    out: Path,
    cfg: EncoderConfig,
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
    max_pixels: int | None = MAX_MICROGRAPH_PIXELS,
) -> Path:
    """Pre-train a facility encoder on ``micrographs`` and write it to ``out`` (replaced atomically).

    Resumes from ``<out>.partial`` when a previous run with the same micrographs and settings was interrupted.
    Micrographs that cannot be read are skipped and named in the manifest (the run fails only if none can).
    """
    files = sorted({Path(m).expanduser().resolve() for m in micrographs})
    if not files:
        raise InputError(None, "no micrographs given to pre-train the facility encoder on")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(Path(missing[0]), f"{len(missing)} micrograph(s) not found, e.g. {missing[0]}")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    device = resolve_device(cfg.device)
    preset = get_preset(cfg.preset)
    prep = preprocessing()
    key = _run_key(files, cfg, prep)
    torch.manual_seed(cfg.seed)
    model = MaskedAutoencoder(preset).to(device)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = _steps_per_epoch(len(files), cfg)
    total = steps_per_epoch * cfg.epochs
    record = _load_partial(partial, model, opt, key)
    first_epoch = int(record["epochs_done"]) if record else 0
    seconds = float(record["seconds"]) if record else 0.0
    failed: set[str] = set(record["failed"]) if record else set()
    history: list[float] = list(record["loss_per_epoch"]) if record else []
    if record:
        log.info("encoder_resumed", from_epoch=first_epoch, of=cfg.epochs, partial=str(partial))
    log.info(
        "encoder_pretrain_start",
        micrographs=len(files),
        preset=preset.name,
        device=str(device),
        epochs=cfg.epochs,
        steps=total,
    )
    progress = Progress("encoder_pretrain", total, on_progress, cancel)
    model.train()
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])  # each epoch's draws depend on the seed and epoch alone
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        order = rng.permutation(len(files))
        losses = []
        step = epoch * steps_per_epoch
        for start in range(0, len(files), cfg.micrographs_per_chunk):
            chunk = [files[i] for i in order[start : start + cfg.micrographs_per_chunk]]
            regions, bad = _chunk_regions(chunk, cfg, prep, preset.img_size, rng, device, max_pixels)
            for problem in bad:
                if problem not in failed:
                    log.warning("encoder_micrograph_skipped", reason=problem)
                failed.add(problem)
            wanted = math.ceil(len(chunk) * cfg.scales_per_micrograph * cfg.regions_per_micrograph / cfg.batch_size)
            perm = torch.randperm(len(regions), device=device)
            for b in range(wanted):  # a fixed number of steps per chunk: skipped files shorten none of the plan
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                if len(idx) >= 2:
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, total, cfg.lr)
                    with autocast(device):
                        loss, _ = model(regions[idx], cfg.mask_ratio)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                progress.step(step, mse=losses[-1] if losses else float("nan"))
                step += 1
        if len(failed) == len(files):
            raise InputError(files[0], "none of the micrographs could be read: " + "; ".join(sorted(failed))[:2000])
        seconds += time.perf_counter() - t0
        history.append(round(float(np.mean(losses)), 5) if losses else float("nan"))
        _save_partial(
            partial,
            model,
            opt,
            {
                "run_key": key,
                "epochs_done": epoch + 1,
                "seconds": round(seconds, 2),
                "failed": sorted(failed),
                "loss_per_epoch": history,
            },
        )
    info = {
        "format_version": FORMAT_VERSION,
        "kind": ENCODER_KIND,
        "cryomae_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "preset": preset.to_dict(),
        "preprocessing": prep,
        "config": cfg.model_dump(),
        "micrographs": {
            "count": len(files) - len(failed),
            "files": [str(f) for f in files],
            "skipped": sorted(failed),
        },
        "loss_per_epoch": history,
        "timings_s": {"pretrain": round(seconds, 2)},
        "device": str(device),
        "torch": torch.__version__,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
    write_manifest(tmp / MANIFEST, {**info, "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)}})
    replace_dir(tmp, out)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("encoder_pretrain_done", out=str(out), seconds=round(seconds, 1), final_mse=history[-1])
    return out
