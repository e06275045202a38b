"""Training a project's model: MAE pre-training, then L_MSE + beta * L_SCS_hat on the exemplars (eq. 6).

Stage 1a, pre-training: reconstruction only, on random regions of the reference micrograph (and of any
extra micrographs given), freshly rotated and flipped every epoch.
Stage 1b, SCS training: every step sees all m exemplars (randomly rotated and flipped) and a batch of the n
unlabeled regions of the reference micrograph; the loss is the masked reconstruction error plus beta times
the PU-adjusted self-cross similarity loss on the encoder's latent features.
Finally the exemplar bank is made from the unmasked encoder features of the exemplars (``cryomae.training.bank``:
their 8 dihedral views by default).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog
import torch

from cryomae import __version__
from cryomae.config import PickConfig, TrainConfig
from cryomae.device import resolve_device
from cryomae.errors import InputError
from cryomae.io.micrographs import Micrograph
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import get_preset
from cryomae.picking.blobs import BLOBS_KEY, blob_profile
from cryomae.picking.marks import MARKS_KEY, marks_by_micrograph, marks_for_manifest
from cryomae.picking.picker import reference_cutoff
from cryomae.preprocess import Geometry, prepare
from cryomae.training.bank import exemplar_bank
from cryomae.training.corrections import CorrectionMarks, apply_corrections
from cryomae.training.encoder import load_encoder, start_from_encoder
from cryomae.training.losses import scs_loss_from_features, standardize, total_loss
from cryomae.training.pu_head import train_head
from cryomae.training.regions import crop_regions, random_augmentation, random_centres
from cryomae.training.steps import ProgressHook, TrainingInterruptedError, TrainingLoop

__all__ = ["ProgressHook", "TrainingInterruptedError", "exemplar_bank", "pretrain", "scs_train", "train_model"]

log = structlog.get_logger("cryomae.train")


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

    def batch(idx: np.ndarray) -> torch.Tensor:
        angles, flips = random_augmentation(len(idx), rng, cfg.rotate, cfg.flip)
        return torch.cat(
            [
                crop_regions(
                    images[k], centres[idx][which[idx] == k], size, angles[which[idx] == k], flips[which[idx] == k]
                )
                for k in np.unique(which[idx])
            ]
        )

    def loss(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mse, _ = model(batch, cfg.mask_ratio)
        return mse, {"mse": float(mse.detach())}

    loop = TrainingLoop("pretrain", cfg.pretrain_epochs, cfg.batch_size, cfg.pretrain_lr, cfg.weight_decay)
    return [h["mse"] for h in loop.run(model, len(centres), batch, loss, rng, device, on_progress, cancel)]


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
    m = len(exemplars)

    def batch(idx: np.ndarray) -> torch.Tensor:
        centres = np.concatenate([exemplars, unlabeled[idx]])
        angles, flips = random_augmentation(len(centres), rng, cfg.rotate, cfg.flip)
        return crop_regions(image, centres, size, angles, flips)

    def loss(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        l_mse, feats = model(batch, cfg.mask_ratio)
        if cfg.scs_view == "full":
            feats = model.encode(batch)
        if cfg.scs_standardize:
            feats = standardize(feats, feats[m:])
        l_scs = scs_loss_from_features(feats[:m], feats[m:], cfg.alpha, cfg.tau, cfg.pi_hat, cfg.scs_normalization)
        total = total_loss(l_mse, l_scs, cfg.beta)
        return total, {"mse": float(l_mse.detach()), "scs": float(l_scs.detach()), "total": float(total.detach())}

    loop = TrainingLoop("scs_train", cfg.epochs, per_step, cfg.lr, cfg.weight_decay)
    return loop.run(model, cfg.n_unlabeled, batch, loss, rng, device, on_progress, cancel)


def train_model(
    reference: Micrograph,
    exemplars_xy: np.ndarray,
    diameter: float,
    cfg: TrainConfig,
    unlabeled: Sequence[Micrograph] = (),
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
    corrections: Sequence[CorrectionMarks] = (),
) -> tuple[TrainedModel, dict[str, Any]]:
    """Train a project's model from one reference micrograph and its exemplars [m, 2] (original pixels), and an
    operator's ``corrections`` on other micrographs, if any (``cryomae.training.corrections``).
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
    model = MaskedAutoencoder(preset)
    encoder = None
    if cfg.encoder is not None:
        encoder = load_encoder(cfg.encoder)
        start_from_encoder(model, encoder)
        differs = {k: v for k, v in encoder.manifest["preprocessing"].items() if getattr(cfg, k) != v}
        if differs:
            log.warning("encoder_preprocessing_differs", encoder=str(encoder.path), encoder_values=differs)
    model = model.to(device)
    log.info(
        "train_start",
        preset=preset.name,
        device=str(device),
        exemplars=len(exemplars),
        diameter=diameter,
        box_px=round(geometry.box, 1),
        scale=round(geometry.scale, 4),
        extra_micrographs=len(extra),
        encoder=None if encoder is None else str(encoder.path),
    )
    t1 = time.perf_counter()
    pre_hist = pretrain(model, [ref, *extra], cfg, rng, device, on_progress, cancel)
    t2 = time.perf_counter()
    scs_hist = scs_train(model, ref, exemplars, cfg, rng, device, on_progress, cancel)
    t3 = time.perf_counter()
    bank = exemplar_bank(
        model, ref, exemplars, device, kind=cfg.bank, views=cfg.bank_views, rotations=cfg.bank_rotations
    )
    model.eval()
    t4 = time.perf_counter()
    # the DoG's polarity on the reference, for the blob term of the score (cryomae.picking.blobs)
    blobs = blob_profile(reference.data, exemplars_xy, geometry.diameter)
    trained = TrainedModel(model=model, bank=bank, geometry=geometry, manifest={BLOBS_KEY: blobs})
    if cfg.head:
        trained.head = train_head(trained, reference.data, exemplars_xy, cfg, device)
        log.info("particle_head", **trained.head.info)
    corrected = apply_corrections(trained, corrections, cfg, device) if corrections else None
    t5 = time.perf_counter()
    # the reference's own cutoff, with the default picking options: it seeds each session's auto cutoff
    calibration = reference_cutoff(trained, reference.data, PickConfig(device=str(device)))
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
            **({"corrections": corrected} if corrected else {}),
            "device": str(device),
            "torch": torch.__version__,
            # the facility encoder it started from, named by its manifest's checksum (covers its weights)
            "encoder": None
            if encoder is None
            else {
                "path": str(encoder.path),
                "checksum": encoder.checksum,
                "micrographs": encoder.manifest["micrographs"]["count"],
            },
        },
        "timings_s": {
            "prepare": round(t1 - t0, 3),
            "pretrain": round(t2 - t1, 3),
            "scs_train": round(t3 - t2, 3),
            "head": round(t5 - t4, 3),
            "calibrate": round(time.perf_counter() - t5, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        "calibration": calibration,
        BLOBS_KEY: blobs,
        "final_losses": {
            "pretrain_mse": round(float(np.mean(pre_hist[-10:])), 5) if pre_hist else None,
            **({k: round(float(np.mean([h[k] for h in scs_hist[-10:]])), 5) for k in scs_hist[0]} if scs_hist else {}),
        },
    }
    marks = marks_by_micrograph(
        [c.micrograph for c in corrections], [c.missed for c in corrections], [c.wrong for c in corrections]
    )
    if marks:  # the operator's marks, to hold on their micrographs when this model picks them again
        info[MARKS_KEY] = marks_for_manifest(marks)
    log.info("train_done", **info["timings_s"])
    trained.manifest = info
    return trained, info
