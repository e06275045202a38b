"""Training a project's model: MAE pre-training, then L_MSE + beta * L_SCS_hat on the exemplars (eq. 6).

Stage 1a, pre-training: reconstruction only, on random regions of the reference micrograph (and of any
extra micrographs given), freshly rotated and flipped every epoch.
Stage 1b, SCS training: every step sees all m exemplars (randomly rotated and flipped) and a batch of the n
unlabeled regions of the reference micrograph; the loss is the masked reconstruction error plus beta times
the PU-adjusted self-cross similarity loss on the encoder's latent features.
Finally the exemplar bank is the unmasked encoder features of the exemplars (with their 8 dihedral views
when ``bank_views == 8``).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import structlog
import torch

from cryomae import __version__
from cryomae.config import PickConfig, TrainConfig
from cryomae.device import autocast, resolve_device
from cryomae.errors import InputError, TransientError
from cryomae.io.micrographs import Micrograph
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import get_preset
from cryomae.picking.picker import reference_cutoff
from cryomae.preprocess import Geometry, prepare
from cryomae.training.losses import scs_loss_from_features, standardize, total_loss
from cryomae.training.regions import crop_regions, dihedral_views, random_augmentation, random_centres

log = structlog.get_logger("cryomae.train")

#: Called about every 10 % of a stage with (stage, step, total steps, running means of the losses).
ProgressHook = Callable[[str, int, int, dict[str, float]], None]


class TrainingInterruptedError(TransientError):
    """Training stopped at a step boundary because its ``cancel`` event was set (the service is stopping).

    Transient: the training request goes back to its queue and is trained again from the start.
    """


def _lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of the base rate."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class _Progress:
    """Progress log lines about every 10 % of a stage, with the running mean of each loss."""

    def __init__(
        self, stage: str, total: int, hook: ProgressHook | None = None, cancel: threading.Event | None = None
    ) -> None:
        self.stage, self.total, self.t0, self.hook = stage, total, time.perf_counter(), hook
        self.cancel = cancel
        self.every = max(1, total // 10)
        self.sums: dict[str, float] = {}
        self.count = 0

    def step(self, i: int, **losses: float) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise TrainingInterruptedError(f"training interrupted at {self.stage} step {i + 1}/{self.total}")
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            means = {k: round(v / self.count, 5) for k, v in self.sums.items()}
            log.info(self.stage, step=i + 1, of=self.total, seconds=round(time.perf_counter() - self.t0, 1), **means)
            if self.hook is not None:
                self.hook(self.stage, i + 1, self.total, means)
            self.sums, self.count = {}, 0


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "token" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def pretrain(
    model: MaskedAutoencoder,
    images: Sequence[torch.Tensor],
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> list[float]:
    """Reconstruction-only pre-training on random regions of the given resampled images."""
    size = model.preset.img_size
    areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
    counts = rng.multinomial(cfg.pretrain_regions, areas / areas.sum())
    pools = [
        random_centres(tuple(im.shape), int(c), rng, margin=size / 4) for im, c in zip(images, counts, strict=True)
    ]
    which = np.concatenate([np.full(len(p), i) for i, p in enumerate(pools)]).astype(int)
    centres = np.concatenate(pools) if pools else np.zeros((0, 2))
    n = len(centres)
    steps_per_epoch = math.ceil(n / cfg.batch_size) if n else 0
    total = steps_per_epoch * cfg.pretrain_epochs
    if total == 0:
        return []
    opt = _optimizer(model, cfg.pretrain_lr, cfg.weight_decay)
    progress, history, step = _Progress("pretrain", total, on_progress, cancel), [], 0
    model.train()
    for _ in range(cfg.pretrain_epochs):
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            angles, flips = random_augmentation(len(idx), rng, cfg.rotate, cfg.flip)
            batch = torch.cat(
                [
                    crop_regions(
                        images[k], centres[idx][which[idx] == k], size, angles[which[idx] == k], flips[which[idx] == k]
                    )
                    for k in np.unique(which[idx])
                ]
            )
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.pretrain_lr)
            with autocast(device):
                loss, _ = model(batch, cfg.mask_ratio)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            progress.step(step, mse=history[-1])
            step += 1
    return history


def scs_train(
    model: MaskedAutoencoder,
    image: torch.Tensor,
    exemplars: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> list[dict[str, float]]:
    """Training on exemplars [m, 2] (resampled-image coordinates) and n unlabeled regions with eq. 6."""
    size = model.preset.img_size
    unlabeled = random_centres(tuple(image.shape), cfg.n_unlabeled, rng, margin=size / 4)
    per_step = min(cfg.unlabeled_per_step, cfg.n_unlabeled)
    steps_per_epoch = math.ceil(cfg.n_unlabeled / per_step)
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        return []
    m = len(exemplars)
    opt = _optimizer(model, cfg.lr, cfg.weight_decay)
    progress, history, step = _Progress("scs_train", total, on_progress, cancel), [], 0
    model.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(cfg.n_unlabeled)
        for b in range(steps_per_epoch):
            idx = order[b * per_step : (b + 1) * per_step]
            centres = np.concatenate([exemplars, unlabeled[idx]])
            angles, flips = random_augmentation(len(centres), rng, cfg.rotate, cfg.flip)
            batch = crop_regions(image, centres, size, angles, flips)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.lr)
            with autocast(device):
                l_mse, feats = model(batch, cfg.mask_ratio)
                if cfg.scs_view == "full":
                    feats = model.encode(batch)
                if cfg.scs_standardize:
                    feats = standardize(feats, feats[m:])
                l_scs = scs_loss_from_features(
                    feats[:m], feats[m:], cfg.alpha, cfg.tau, cfg.pi_hat, cfg.scs_normalization
                )
                loss = total_loss(l_mse, l_scs, cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"mse": float(l_mse.detach()), "scs": float(l_scs.detach()), "total": float(loss.detach())}
            history.append(rec)
            progress.step(step, **rec)
            step += 1
    return history


@torch.no_grad()
def exemplar_bank(
    model: MaskedAutoencoder, image: torch.Tensor, exemplars: np.ndarray, views: int, device: torch.device
) -> torch.Tensor:
    """Unmasked encoder features of the exemplars [m, 2]: [m * views, D]."""
    model.eval()
    if views == 8:
        idx, angles, flips = dihedral_views(len(exemplars))
        regions = crop_regions(image, exemplars[idx], model.preset.img_size, angles, flips)
    else:
        regions = crop_regions(image, exemplars, model.preset.img_size)
    with autocast(device):
        return model.features(regions).float()


def train_model(
    reference: Micrograph,
    exemplars_xy: np.ndarray,
    diameter: float,
    cfg: TrainConfig,
    unlabeled: Sequence[Micrograph] = (),
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> tuple[TrainedModel, dict[str, Any]]:
    """Train a project's model from one reference micrograph and its exemplars [m, 2] (original pixels).
    ``on_progress`` hears about every 10 % of each stage (the trainer service reports it); setting ``cancel``
    stops training at the next step with ``TrainingInterruptedError``.

    Returns the trained model and the information for its manifest (hyperparameters, provenance, timings).
    """
    if len(exemplars_xy) < 1:
        raise InputError(reference.path, "no exemplars given; mark at least one particle (about 15 is best)")
    if diameter <= 0:
        raise InputError(None, f"particle diameter must be positive, got {diameter}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    preset = get_preset(cfg.preset)
    if cfg.feature is not None:
        preset = dataclasses.replace(preset, feature=cfg.feature)
    if cfg.feature_layer is not None:
        preset = dataclasses.replace(preset, feature_layer=cfg.feature_layer)
    geometry = Geometry(
        diameter=float(diameter),
        box_factor=cfg.box_factor,
        img_size=preset.img_size,
        highpass=cfg.highpass,
        lowpass=cfg.lowpass,
        ice_z=cfg.ice_z,
    )
    t0 = time.perf_counter()
    ref = prepare(reference.data, geometry, device)
    extra = [prepare(mic.data, geometry, device) for mic in unlabeled]
    exemplars = geometry.to_model(exemplars_xy)
    model = MaskedAutoencoder(preset).to(device)
    log.info(
        "train_start",
        preset=preset.name,
        device=str(device),
        exemplars=len(exemplars),
        diameter=diameter,
        box_px=round(geometry.box, 1),
        scale=round(geometry.scale, 4),
        extra_micrographs=len(extra),
    )
    t1 = time.perf_counter()
    pre_hist = pretrain(model, [ref, *extra], cfg, rng, device, on_progress, cancel)
    t2 = time.perf_counter()
    scs_hist = scs_train(model, ref, exemplars, cfg, rng, device, on_progress, cancel)
    t3 = time.perf_counter()
    bank = exemplar_bank(model, ref, exemplars, cfg.bank_views, device)
    model.eval()
    t4 = time.perf_counter()
    # the reference's own cutoff, with the default picking options: it seeds each session's auto cutoff
    calibration = reference_cutoff(
        TrainedModel(model=model, bank=bank, geometry=geometry, manifest={}),
        reference.data,
        PickConfig(device=str(device)),
    )
    info: dict[str, Any] = {
        "cryomae_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hyperparameters": cfg.model_dump(),
        "provenance": {
            "reference_micrograph": str(reference.path),
            "reference_shape": list(reference.shape),
            "pixel_size": reference.pixel_size,
            "exemplars": [[round(float(x), 2), round(float(y), 2)] for x, y in exemplars_xy],
            "unlabeled_micrographs": [str(m.path) for m in unlabeled],
            "device": str(device),
            "torch": torch.__version__,
        },
        "timings_s": {
            "prepare": round(t1 - t0, 3),
            "pretrain": round(t2 - t1, 3),
            "scs_train": round(t3 - t2, 3),
            "calibrate": round(time.perf_counter() - t4, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        "calibration": calibration,
        "final_losses": {
            "pretrain_mse": round(float(np.mean(pre_hist[-10:])), 5) if pre_hist else None,
            **({k: round(float(np.mean([h[k] for h in scs_hist[-10:]])), 5) for k in scs_hist[0]} if scs_hist else {}),
        },
    }
    log.info("train_done", **info["timings_s"])
    return TrainedModel(model=model, bank=bank, geometry=geometry, manifest=info), info
