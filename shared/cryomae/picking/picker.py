"""Sliding-window picking: score every window against the exemplar bank, find peaks, cut per micrograph.

The micrograph is normalised and resampled once (``cryomae.preprocess``), padded by half a window with its
mean, and its windows are taken as a strided view (``Tensor.unfold``, no copy). Rows of windows go to the
encoder in large batches; each window's score is the mean, the max or a blend of the cosine similarities of its
unmasked encoder feature to the exemplar bank, giving a score map with one cell per window position. Candidates are the
local maxima of that map at least ``nms_distance * diameter`` apart (or every window, as in the paper, when
``nms`` is off); the per-micrograph cutoff is set on the candidates' scores (``cryomae.picking.threshold``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from scipy.special import expit

from cryomae.config import PickConfig
from cryomae.device import autocast, resolve_device
from cryomae.errors import InputError
from cryomae.model.checkpoint import TrainedModel
from cryomae.picking.blobs import with_blobs
from cryomae.picking.nms import peak_nms, refine_peaks
from cryomae.picking.threshold import (
    THRESHOLD_RULES,
    SessionCutoff,
    gmm_cutoff,
    knn_cutoff,
    otsu_cutoff,
    robust_cutoff,
)
from cryomae.preprocess import Geometry, away_from_edges, outlier_regions, prepare_with_background


@dataclass
class ScoreMap:
    """Window scores on a grid; cell (i, j) is the window centred at (j*stride + offset, i*stride + offset)
    in resampled-image pixels."""

    scores: np.ndarray  # [Gy, Gx]
    stride: int  # model pixels between neighbouring windows
    offset: float  # resampled-image coordinate of the centre of cell 0
    level: np.ndarray | None = None  # [H', W'] local mean level of the resampled micrograph (carbon, ice)
    evaluated: int | None = None  # windows the encoder saw (coarse-to-fine search: fewer than the cells)
    logits: bool = False  # the scores are the particle head's logits: candidates get their probabilities

    def centres(self, rows_cols: np.ndarray) -> np.ndarray:
        """Grid positions [P, 2] (row, col), possibly fractional -> resampled-image (x, y) [P, 2]."""
        rc = np.asarray(rows_cols, dtype=np.float64).reshape(-1, 2)
        return np.stack([rc[:, 1], rc[:, 0]], axis=1) * self.stride + self.offset


@dataclass
class PickResult:
    """Every candidate with its score, and the per-micrograph cutoff; picks are candidates >= threshold."""

    candidates_xy: np.ndarray  # [C, 2] original pixels, descending score
    candidate_scores: np.ndarray  # [C]
    threshold: float
    n_windows: int
    n_evaluated: int  # windows scored by the encoder (equals n_windows unless the search was coarse-to-fine)
    timings: dict[str, float] = field(default_factory=dict)
    cutoff_rule: str = ""  # which rule set the threshold: gmm, session, robust (auto), or the configured one

    @property
    def selected(self) -> np.ndarray:
        return self.candidate_scores >= self.threshold

    @property
    def xy(self) -> np.ndarray:
        return self.candidates_xy[self.selected]

    @property
    def scores(self) -> np.ndarray:
        return self.candidate_scores[self.selected]


def _standardizer(
    feats_mean: torch.Tensor, feats_std: torch.Tensor, cfg: PickConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre and scale applied to every feature (window and exemplar) before the cosine."""
    mu = torch.zeros_like(feats_mean) if cfg.feature_norm == "none" else feats_mean
    sd = feats_std.clamp_min(1e-6) if cfg.feature_norm == "standardize" else torch.ones_like(feats_mean)
    return mu, sd


def uses_head(trained: TrainedModel, cfg: PickConfig) -> bool:
    """Whether windows are scored by the model's particle-probability head (``PickConfig.scorer``): ``auto``
    uses it where the model has one; ``cosine`` never."""
    return cfg.scorer != "cosine" and trained.head is not None


def _scoring_vectors(trained: TrainedModel, mu: torch.Tensor, sd: torch.Tensor, cfg: PickConfig) -> torch.Tensor:
    """The vectors [V, D] a unit-length standardised window feature is compared with, in the dtype of mu:
    the head's direction (one), or the bank standardised like the windows and made unit length (its mean,
    one vector, for the ``mean`` score: the mean of the cosines is one dot product with it). A model with
    negatives (an operator's corrections) adds them, standardised the same way, as the last vectors."""
    if uses_head(trained, cfg):
        assert trained.head is not None
        return F.normalize(trained.head.direction.to(mu.device, mu.dtype), dim=0)[None]
    bank = F.normalize((trained.bank.to(mu.device, mu.dtype) - mu) / sd, dim=-1)
    vectors = bank.mean(dim=0, keepdim=True) if cfg.score == "mean" else bank
    if not _n_negatives(trained, cfg):
        return vectors
    assert trained.negatives is not None
    negatives = F.normalize((trained.negatives.to(mu.device, mu.dtype) - mu) / sd, dim=-1)
    if cfg.negative_rule == "max":
        return torch.cat([vectors, negatives])
    if cfg.negative_rule == "nearest":
        return torch.cat([vectors, bank, negatives])
    away = negatives.mean(dim=0)
    if cfg.negative_rule == "orthogonal":  # only what the negatives do not share with the particles' prototype
        prototype = F.normalize(bank.mean(dim=0), dim=0)
        away = away - (away @ prototype) * prototype
    return torch.cat([vectors, away[None]])


def _n_negatives(trained: TrainedModel, cfg: PickConfig) -> int:
    """How many vectors for the negatives the cosine score reads (``PickConfig.negative_weight``; 0: none)."""
    if uses_head(trained, cfg) or trained.negatives is None or cfg.negative_weight <= 0:
        return 0
    if cfg.negative_rule == "max":
        return int(trained.negatives.shape[0])
    if cfg.negative_rule == "nearest":
        return int(trained.bank.shape[0]) + int(trained.negatives.shape[0])
    return 1


def _finish(trained: TrainedModel, sims: torch.Tensor, cfg: PickConfig, dim: int = 1) -> torch.Tensor:
    """Similarities to the scoring vectors (along ``dim``) -> one score per window: the head's logit (the map
    keeps logits, which do not saturate where peaks are found; candidates get probabilities), or the cosine
    score of ``PickConfig.score``, less ``negative_weight`` times its similarity to the negatives (the last
    vectors; ``negative_rule``) where the model has negatives: a window like a marked wrong pick loses score."""
    if uses_head(trained, cfg):
        assert trained.head is not None
        return trained.head.logit(sims.squeeze(dim))
    n = _n_negatives(trained, cfg)
    if not n:
        return _reduce(sims, cfg, dim)
    bank, negatives = sims.split([sims.shape[dim] - n, n], dim=dim)
    if cfg.negative_rule == "nearest":  # only where a negative is nearer than every positive, by that much
        assert trained.negatives is not None
        positives, negatives = negatives.split([n - len(trained.negatives), len(trained.negatives)], dim=dim)
        away = (negatives.amax(dim=dim) - positives.amax(dim=dim)).clamp_min(0)
        return _reduce(bank, cfg, dim) - cfg.negative_weight * away
    return _reduce(bank, cfg, dim) - cfg.negative_weight * negatives.amax(dim=dim)


def _reduce(sims: torch.Tensor, cfg: PickConfig, dim: int = 1) -> torch.Tensor:
    """Cosine similarities to the bank (along ``dim``) -> one score per window (``PickConfig.score``)."""
    if cfg.score == "max":
        return sims.amax(dim=dim)
    if cfg.score == "mean_max":
        return (1 - cfg.max_weight) * sims.mean(dim=dim) + cfg.max_weight * sims.amax(dim=dim)
    return sims.mean(dim=dim)


def shared_token_stride(preset_patch: int, stride: int) -> int:
    """The token-grid step that serves every window at ``stride``: the greatest common divisor of the patch
    size and the window stride (all patch origins of all windows lie on that grid)."""
    return math.gcd(preset_patch, stride)


def scoring_flops(
    trained: TrainedModel, image_shape: tuple[int, int], stride: int, cfg: PickConfig
) -> dict[str, float]:
    """Multiply-adds of scoring one micrograph of ``image_shape`` (resampled and padded model pixels) by
    embedding every window separately ("windowed") and, at layer 0, by one convolution ("shared").

    Windowed: the encoder up to the feature layer on every window (patch embedding + blocks) plus the cosine
    with the bank. Shared: the embedding on the token grid plus the matrix products of ``_shared_token_scores``.
    The transformer blocks count 12 * D^2 per token (qkv, projection, 8 x D^2 MLP) and 2 * L * D (attention).
    """
    preset = trained.preset
    s, p, d, tokens = preset.img_size, preset.patch_size, preset.embed_dim, preset.tokens
    h, w = image_shape
    n_win = ((h - s) // stride + 1) * ((w - s) // stride + 1)
    layer = preset.feature_layer if 0 <= preset.feature_layer <= preset.depth else preset.depth
    per_window = tokens * p * p * d + layer * (tokens + 1) * (12 * d * d + 2 * (tokens + 1) * d)
    n_bank = _n_vectors(trained, cfg)
    feat_dim = int(trained.bank.shape[1])
    out = {"windows": float(n_win), "windowed": float(n_win * (per_window + feat_dim * n_bank))}
    if preset.feature_layer == 0 and preset.feature in ("flat", "mean"):
        g = shared_token_stride(p, stride)
        cells = ((h - p) // g + 1) * ((w - p) // g + 1)
        per_cell = p * p * d + (d * (n_bank * tokens + 2 * tokens) if preset.feature == "flat" else 0)
        mean_extra = n_win * d * (tokens + n_bank) if preset.feature == "mean" else 0
        out["shared"] = float(cells * per_cell + mean_extra)
    return out


def _n_vectors(trained: TrainedModel, cfg: PickConfig) -> int:
    """How many vectors each window is compared with (``_scoring_vectors``)."""
    if uses_head(trained, cfg):
        return 1
    return (1 if cfg.score == "mean" else int(trained.bank.shape[0])) + _n_negatives(trained, cfg)


def memory_budget(device: torch.device) -> int:
    """Bytes one micrograph's intermediate maps (token maps, or window features kept for scoring) may take: a
    quarter of the free GPU memory, or on the CPU a quarter of the memory available now (at least 1 GiB)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 4
    return max(1 << 30, _available_memory() // 4)


CPU_BATCH = 2048  # windows per encoder batch on the CPU


def window_batch_size(trained: TrainedModel, cfg: PickConfig, device: torch.device) -> int:
    """Windows per encoder batch: ``cfg.batch_size`` when set; else on a GPU as many as fit ``memory_budget``
    (between 64 and 65,536), on the CPU ``CPU_BATCH``.

    A window costs its pixels (float32) and, per token, the activations one transformer block holds at once in
    bf16 (about 12 x D: qkv, attention output, the 4 x D MLP hidden layer, residual and norms; attention itself
    is the fused kernel and keeps no tokens x tokens matrix), plus its float32 feature.
    """
    if cfg.batch_size is not None:
        return cfg.batch_size
    if device.type != "cuda":
        return CPU_BATCH
    preset = trained.preset
    per_token = 12 * preset.embed_dim * 2 if preset.feature_layer != 0 else 2 * preset.embed_dim * 4
    per_window = preset.img_size**2 * 4 + (preset.tokens + 1) * per_token + int(trained.bank.shape[1]) * 4
    return int(min(65536, max(64, memory_budget(device) // per_window)))


def _available_memory() -> int:
    """Bytes of memory available without swapping: MemAvailable (it counts the reclaimable page cache, so a
    long-running service with a full cache keeps the same budget), else the free pages, else 8 GiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def shared_tokens_apply(
    trained: TrainedModel, image_shape: tuple[int, int], stride: int, cfg: PickConfig, device: torch.device
) -> bool:
    """Whether ``compute_score_map`` uses the convolutional (shared-token) evaluation: allowed by the config,
    the feature is taken from the patch embedding (layer 0, where a window's tokens do not depend on its other
    patches) pooled by ``flat`` or ``mean``, it needs fewer multiply-adds than embedding every window, and its
    token maps fit ``memory_budget``."""
    if not cfg.shared_tokens:
        return False
    flops = scoring_flops(trained, image_shape, stride, cfg)
    if "shared" not in flops or flops["shared"] >= flops["windowed"]:
        return False
    preset = trained.preset
    g = shared_token_stride(preset.patch_size, stride)
    cells = (image_shape[0] // g + 1) * (image_shape[1] // g + 1)
    n_bank = _n_vectors(trained, cfg)
    # bytes: the token map, its centred copy and square, two float64 integral images, the per-token maps
    need = cells * (preset.embed_dim * 7 + preset.tokens * (n_bank + 3)) * 4
    return need <= memory_budget(device)


def _shared_token_scores(trained: TrainedModel, img: torch.Tensor, stride: int, cfg: PickConfig) -> torch.Tensor:
    """Window scores [Gy, Gx] from one convolution of the whole (padded) image with the patch embedding.

    At layer 0 a window's token for patch (r, c) is the patch embedding of the image square at the window's
    origin + (r, c) * patch, plus a position embedding: the same square, hence the same token, serves every
    window that contains it. The embedding is computed once on the grid of step g = gcd(patch, stride), and
    each window's feature is assembled from strided views of that token map, never materialised per window.
    Exactly the score of the windowed evaluation (up to float rounding).
    """
    model = trained.model
    preset = model.preset
    s, p = preset.img_size, preset.patch_size
    grid = s // p
    g = shared_token_stride(p, stride)
    m = stride // g  # token-map cells between neighbouring windows
    k = p // g  # token-map cells between neighbouring patches of one window
    gy = (img.shape[0] - s) // stride + 1
    gx = (img.shape[1] - s) // stride + 1
    proj = model.patch_embed.proj
    with autocast(img.device):
        tok = F.conv2d(img[None, None], proj.weight, proj.bias, stride=g)[0].float()  # [D, Ty, Tx]
    d = tok.shape[0]
    n = gy * gx
    offsets = [(r * k, c * k) for r in range(grid) for c in range(grid)]  # token l's cell offset in a window

    def window_view(mp: torch.Tensor, o: tuple[int, int]) -> torch.Tensor:
        """The cells of map mp [..., Ty, Tx] that token offset o takes for every window: [..., Gy, Gx]."""
        return mp[..., o[0] : o[0] + (gy - 1) * m + 1 : m, o[1] : o[1] + (gx - 1) * m + 1 : m]

    if preset.feature == "mean":
        pos = model.pos_embed[0, 1:].float()  # [L, D]
        feat = torch.zeros(d, gy, gx, device=img.device)
        for idx, o in enumerate(offsets):
            feat += window_view(tok, o) + pos[idx][:, None, None]
        feats = (feat / len(offsets)).reshape(d, n).T  # [N, D]
        mu, sd = _standardizer(feats.mean(dim=0, keepdim=True), feats.std(dim=0, keepdim=True), cfg)
        vectors = _scoring_vectors(trained, mu, sd, cfg)
        return _finish(trained, F.normalize((feats - mu) / sd, dim=-1) @ vectors.T, cfg).reshape(gy, gx)

    # flat: the feature is the window's L tokens in turn, standardised per (token, channel). Write token l of
    # window w as x_l(w) = t(w + o_l) + e_l with t the mean-centred token map, o_l the token's offset in the
    # window and e_l = (token-map mean + position embedding - window mean) a constant; then its dot product
    # with a bank vector and its squared norm are linear in t and t^2, so three matrix products over the
    # token map give per-token maps, and each window's sums are L strided additions of [Gy, Gx] maps.
    centre = tok.mean(dim=(1, 2), keepdim=True)
    tc = tok - centre  # [D, Ty, Tx]

    # per-token mean and spread over the windows, from integral images of t and t^2 (float64) of each
    # residue class of the token grid modulo the window step
    sums: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    mean_l, std_l = [], []
    for o in offsets:
        cls = (o[0] % m, o[1] % m)
        if cls not in sums:
            sub = tc[:, cls[0] :: m, cls[1] :: m].double()
            pad = (1, 0, 1, 0)
            sums[cls] = (
                F.pad(sub.cumsum(1).cumsum(2), pad),
                F.pad(sub.square().cumsum(1).cumsum(2), pad),
            )
        i0, j0 = o[0] // m, o[1] // m
        tot = [ii[:, i0 + gy, j0 + gx] - ii[:, i0, j0 + gx] - ii[:, i0 + gy, j0] + ii[:, i0, j0] for ii in sums[cls]]
        mean = tot[0] / n
        var = (tot[1] - n * mean.square()) / max(n - 1, 1)
        mean_l.append(mean)
        std_l.append(var.clamp_min(0).sqrt())
    del sums
    pos = model.pos_embed[0, 1:].double()  # [L, D]
    win_mean = torch.stack(mean_l) + centre.reshape(1, d).double() + pos  # [L, D] mean of x_l over windows
    mu, sd = _standardizer(win_mean.reshape(1, -1), torch.stack(std_l).reshape(1, -1), cfg)
    bank_n = _scoring_vectors(trained, mu, sd, cfg).reshape(-1, len(offsets), d)  # [B or 1, L, D]
    mu, sd = mu.reshape(len(offsets), d), sd.reshape(len(offsets), d)
    e = centre.reshape(1, d).double() + pos - mu  # [L, D]
    nb = bank_n.shape[0]
    inv = 1.0 / sd  # [L, D]
    w_dot = (bank_n * inv).permute(2, 0, 1).reshape(d, nb * len(offsets))  # [D, B*L]
    w_lin = (2 * e * inv.square()).T  # [D, L]
    w_sq = inv.square().T  # [D, L]
    x = tc.reshape(d, -1).T  # [T, D]
    ty, tx = tc.shape[1:]
    lin = (x @ torch.cat([w_dot, w_lin], dim=1).float()).T  # [B*L + L, T]
    quad = (x.square() @ w_sq.float()).T  # [L, T]
    dot_maps = lin[: nb * len(offsets)].reshape(nb, len(offsets), ty, tx)
    lin_maps = lin[nb * len(offsets) :].reshape(len(offsets), ty, tx)
    quad_maps = quad.reshape(len(offsets), ty, tx)
    const_dot = (bank_n * e * inv).sum(dim=2).sum(dim=1).float()  # [B]
    const_sq = (e.square() * inv.square()).sum().float()
    dots = const_dot[:, None, None].expand(nb, gy, gx).clone()
    sq = torch.full((gy, gx), float(const_sq), device=img.device)
    for idx, o in enumerate(offsets):
        dots += window_view(dot_maps[:, idx], o)
        sq += window_view(lin_maps[idx], o) + window_view(quad_maps[idx], o)
    scores = dots / sq.clamp_min(0).sqrt().clamp_min(1e-12)  # [B or 1, Gy, Gx]
    return _finish(trained, scores, cfg, dim=0)


def check_fits(shape: tuple[int, ...], geometry: Geometry) -> None:
    """InputError (no path: the caller knows the file) when a micrograph [H, W] is smaller than one picking window
    of the model (``geometry.box`` original pixels) in either direction: there is not one window to score."""
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < geometry.box:
        side = math.ceil(geometry.box)
        raise InputError(
            None, f"micrograph {w}x{h} px is smaller than one picking window ({side}x{side} px) of this model"
        )


def _padded(
    trained: TrainedModel, image: np.ndarray, cfg: PickConfig, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The prepared micrograph padded by half a window with zeros (its windows' centres cover every pixel), on the
    device, with the model on it: (padded image [H' + 2p, W' + 2p], local level [H', W'], window stride, the
    resampled-image coordinate of window cell 0's centre)."""
    dev = device or resolve_device(cfg.device)
    trained.model.to(dev).eval()
    s = trained.preset.img_size
    stride = max(1, round(s * cfg.stride_fraction))
    pad = s // 2
    prepared, level = prepare_with_background(image, trained.geometry, dev)
    return F.pad(prepared, (pad, pad, pad, pad)), level, stride, (s - 1) / 2 - pad


@torch.no_grad()
def compute_score_map(
    trained: TrainedModel, image: np.ndarray, cfg: PickConfig, device: torch.device | None = None
) -> ScoreMap:
    """Score every window of a micrograph [H, W] against the exemplar bank; InputError when it is smaller than
    one window (``check_fits``)."""
    check_fits(image.shape, trained.geometry)
    img, level, stride, offset = _padded(trained, image, cfg, device)
    dev, s = img.device, trained.preset.img_size
    if shared_tokens_apply(trained, (img.shape[0], img.shape[1]), stride, cfg, dev):
        out = _shared_token_scores(trained, img, stride, cfg)
        return ScoreMap(
            scores=out.cpu().numpy(),
            stride=stride,
            offset=offset,
            level=level.cpu().numpy(),
            logits=uses_head(trained, cfg),
        )
    windows = img.unfold(0, s, stride).unfold(1, s, stride)  # [Gy, Gx, s, s], a view
    gy, gx = windows.shape[:2]
    evaluated = None
    if cfg.search == "coarse_to_fine" and cfg.coarse_factor > 1:
        out, evaluated = _coarse_to_fine(trained, windows, stride, cfg)
    else:
        rows_cols = torch.cartesian_prod(torch.arange(gy, device=dev), torch.arange(gx, device=dev))
        out = _score_windows(trained, windows, rows_cols, cfg).reshape(gy, gx)
    return ScoreMap(
        scores=out.cpu().numpy(),
        stride=stride,
        offset=offset,
        level=level.cpu().numpy(),
        evaluated=evaluated,
        logits=uses_head(trained, cfg),
    )


@torch.no_grad()
def unit_features(
    trained: TrainedModel, image: np.ndarray, xy: np.ndarray, cfg: PickConfig, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the head reads: of the windows nearest to xy [N, 2] (original pixels) on a micrograph
    [H, W], and of the exemplar bank, each standardised by all windows of the micrograph at the picking stride
    (as ``compute_score_map`` standardises them) and made unit length. Returns (windows [N, D], bank [B, D])."""
    img, _, stride, offset = _padded(trained, image, cfg, device)
    dev, s = img.device, trained.preset.img_size
    windows = img.unfold(0, s, stride).unfold(1, s, stride)  # [Gy, Gx, s, s]
    gy, gx = windows.shape[:2]
    every = torch.cartesian_prod(torch.arange(gy, device=dev), torch.arange(gx, device=dev))
    d = int(trained.bank.shape[1])
    mean, std = _window_statistics(trained, windows, every, cfg)
    mu, sd = _standardizer(mean.float().reshape(1, -1), std.float().reshape(1, -1), cfg)
    cells = np.rint((trained.geometry.to_model(np.asarray(xy, dtype=np.float64).reshape(-1, 2)) - offset) / stride)
    rc = torch.as_tensor(np.stack([cells[:, 1].clip(0, gy - 1), cells[:, 0].clip(0, gx - 1)], axis=1), device=dev)
    feats = torch.cat([torch.zeros(0, d, device=dev), *_iter_window_features(trained, windows, rc.long(), cfg)])
    bank = trained.bank.to(dev).float()
    return F.normalize((feats - mu) / sd, dim=-1), F.normalize((bank - mu) / sd, dim=-1)


def _iter_window_features(
    trained: TrainedModel, windows: torch.Tensor, rows_cols: torch.Tensor, cfg: PickConfig
) -> Iterator[torch.Tensor]:
    """Encoder features [b, D] of the windows at grid positions rows_cols [n, 2] of the view [Gy, Gx, s, s],
    batch by batch (``window_batch_size`` windows, each batch gathered from the view, never all at once)."""
    model = trained.model
    s = windows.shape[-1]
    size = window_batch_size(trained, cfg, windows.device)
    for i in range(0, len(rows_cols), size):
        rc = rows_cols[i : i + size]
        batch = windows[rc[:, 0], rc[:, 1]].reshape(-1, 1, s, s)
        with autocast(windows.device):
            yield model.features(batch).float()


def _window_scores(
    trained: TrainedModel, mean: torch.Tensor, std: torch.Tensor, cfg: PickConfig
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The score function of window features [n, D] -> [n], standardising by the windows' mean and spread."""
    mu, sd = _standardizer(mean.reshape(1, -1).float(), std.reshape(1, -1).float(), cfg)
    bank = _scoring_vectors(trained, mu, sd, cfg)  # [B or 1, D]
    # in chunks of at most 8 encoder batches and the memory budget: no second copy of all window features
    budget_rows = memory_budget(mu.device) // (4 * bank.shape[1])
    step = max(64, min(window_batch_size(trained, cfg, mu.device) * 8, budget_rows))

    def score(f: torch.Tensor) -> torch.Tensor:
        out = torch.empty(f.shape[0], device=f.device)
        for i in range(0, f.shape[0], step):
            out[i : i + step] = _finish(trained, F.normalize((f[i : i + step] - mu) / sd, dim=-1) @ bank.T, cfg)
        return out

    return score


def _score_windows(
    trained: TrainedModel, windows: torch.Tensor, rows_cols: torch.Tensor, cfg: PickConfig
) -> torch.Tensor:
    """Scores [n] of the windows at rows_cols [n, 2]. The features are kept when they fit the memory budget;
    otherwise (large flat features, e.g. the paper preset's 150,528 numbers per window) a first pass gathers
    their mean and spread and a second recomputes them to score."""
    n, d = len(rows_cols), int(trained.bank.shape[1])
    if n * d * 4 <= memory_budget(windows.device):
        feats = torch.cat(list(_iter_window_features(trained, windows, rows_cols, cfg)))  # [n, D]
        return _window_scores(trained, feats.mean(dim=0), feats.std(dim=0), cfg)(feats)
    score = _window_scores(trained, *_window_statistics(trained, windows, rows_cols, cfg), cfg)
    return torch.cat([score(f) for f in _iter_window_features(trained, windows, rows_cols, cfg)])


def _window_statistics(
    trained: TrainedModel, windows: torch.Tensor, rows_cols: torch.Tensor, cfg: PickConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread [D] (float64) of the features of the windows at rows_cols [n, 2], batch by batch: no
    window's feature is kept."""
    n, d = len(rows_cols), int(trained.bank.shape[1])
    s1 = torch.zeros(d, dtype=torch.float64, device=windows.device)
    s2 = torch.zeros(d, dtype=torch.float64, device=windows.device)
    for f in _iter_window_features(trained, windows, rows_cols, cfg):
        s1 += f.sum(dim=0, dtype=torch.float64)
        s2 += f.double().square().sum(dim=0)
    mean = s1 / n
    return mean, ((s2 - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt()


COARSE_PEAK_SPACING = 0.4  # diameters between the coarse peaks whose neighbourhoods are scored finely


def _coarse_to_fine(
    trained: TrainedModel, windows: torch.Tensor, stride: int, cfg: PickConfig
) -> tuple[torch.Tensor, int]:
    """Score every ``coarse_factor``-th window in each direction, then every fine window around the coarse
    peaks (within one coarse step); the cells not visited take the nearest coarse score.
    Returns the fine score map [Gy, Gx] and the number of windows scored."""
    dev = windows.device
    gy, gx = windows.shape[:2]
    f = cfg.coarse_factor
    cy, cx = (gy + f - 1) // f, (gx + f - 1) // f
    coarse_rc = torch.cartesian_prod(torch.arange(cy, device=dev) * f, torch.arange(cx, device=dev) * f)
    coarse_feats = torch.cat(list(_iter_window_features(trained, windows, coarse_rc, cfg)))
    # the coarse windows' statistics serve for all
    score = _window_scores(trained, coarse_feats.mean(dim=0), coarse_feats.std(dim=0), cfg)
    coarse = score(coarse_feats).reshape(cy, cx)
    del coarse_feats
    geo = trained.geometry
    # coarse peaks at most COARSE_PEAK_SPACING diameters apart, closer than the picks may be: every peak of the
    # fine map then lies within one coarse step of a coarse peak, whatever ``nms_distance`` keeps at the end
    cells = min(cfg.nms_distance, COARSE_PEAK_SPACING) * geo.diameter * geo.scale / (stride * f)
    peaks, _ = peak_nms(coarse.cpu().numpy(), cells)
    fine = torch.repeat_interleave(torch.repeat_interleave(coarse, f, dim=0), f, dim=1)[:gy, :gx].clone()
    evaluated = len(coarse_rc)
    if len(peaks):
        centre = torch.as_tensor(peaks, device=dev) * f  # [P, 2] fine grid positions of the coarse peaks
        offsets = torch.cartesian_prod(torch.arange(-f + 1, f, device=dev), torch.arange(-f + 1, f, device=dev))
        around = (centre[:, None, :] + offsets[None]).reshape(-1, 2)
        around[:, 0].clamp_(0, gy - 1)
        around[:, 1].clamp_(0, gx - 1)
        flat = torch.unique(around[:, 0] * gx + around[:, 1])
        rc = torch.stack([flat // gx, flat % gx], dim=1)
        fine[rc[:, 0], rc[:, 1]] = torch.cat([score(b) for b in _iter_window_features(trained, windows, rc, cfg)])
        evaluated += len(rc)
    return fine, evaluated


def _cutoff(
    scores: np.ndarray, cfg: PickConfig, session: SessionCutoff | None = None, probabilities: bool = False
) -> tuple[float, str]:
    """The cutoff of one micrograph's candidate scores and the rule that set it. Where the scores are the
    head's ``probabilities``, ``auto`` is the one cut ``cfg.probability_min`` (the same on every micrograph)."""
    if isinstance(cfg.threshold, float):
        return cfg.threshold, "fixed"
    if probabilities and cfg.threshold == "auto":
        return cfg.probability_min, "probability"
    if len(scores) == 0:
        return math.inf, cfg.threshold
    return _CUTOFF_RULES[cfg.threshold](scores, cfg, session)


# each registered threshold rule (picking.threshold.THRESHOLD_RULES): its cutoff and the rule that set it
_CUTOFF_RULES: dict[str, Callable[[np.ndarray, PickConfig, SessionCutoff | None], tuple[float, str]]] = {
    "auto": lambda scores, cfg, session: (session or session_cutoff(cfg)).cut(scores),
    "gmm": lambda scores, cfg, _: (gmm_cutoff(scores, cfg.gmm_posterior), "gmm"),
    "robust": lambda scores, cfg, _: (robust_cutoff(scores, cfg.robust_z), "robust"),
    "otsu": lambda scores, _cfg, _: (otsu_cutoff(scores), "otsu"),
    "knn": lambda scores, cfg, _: (knn_cutoff(scores, k=cfg.knn_k, smooth=cfg.knn_smooth), "knn"),
}
if set(_CUTOFF_RULES) != set(THRESHOLD_RULES):  # checked once, at import
    raise ImportError(f"threshold rules without a cutoff: {set(THRESHOLD_RULES) ^ set(_CUTOFF_RULES)}")


def session_cutoff(cfg: PickConfig, trained: TrainedModel | None = None) -> SessionCutoff:
    """A new session's ``auto`` cutoff with cfg's options, seeded by the model's reference cutoff (if any)."""
    seed = (trained.manifest.get("calibration") or {}).get("reference_cutoff") if trained is not None else None
    return SessionCutoff(
        posterior_min=cfg.gmm_posterior,
        min_separation=cfg.gmm_min_separation,
        min_weight=cfg.gmm_min_weight,
        z=cfg.robust_z,
        max_weight=cfg.gmm_max_weight,
        seed=float(seed) if isinstance(seed, int | float) else None,
    )


def reference_cutoff(trained: TrainedModel, reference: np.ndarray, cfg: PickConfig) -> dict[str, Any]:
    """Pick the reference micrograph with a freshly trained model and measure its ``auto`` cutoff: the
    ``calibration`` entry of the model's manifest. Its ``reference_cutoff`` (the mixture cut, present only where
    the reference's scores are clearly bimodal) seeds every session's ``SessionCutoff``."""
    result = pick_micrograph(trained, reference, cfg.model_copy(update={"threshold": "auto"}))
    out: dict[str, Any] = {
        "rule": result.cutoff_rule,
        "candidates": len(result.candidate_scores),
        "picks": int(result.selected.sum()),
    }
    if result.cutoff_rule == "gmm":
        out["reference_cutoff"] = round(float(result.threshold), 6)
    return out


def find_candidates(smap: ScoreMap, geo: Geometry, image: np.ndarray, cfg: PickConfig) -> tuple[np.ndarray, np.ndarray]:
    """The candidates of a score map: its peaks (or every window with ``nms`` off), placed between cells,
    without those too near the image's edges or on carbon and contamination. Returns (xy [C, 2] original
    pixels, scores [C]) in descending score order; the scores of a map of logits are probabilities."""
    if cfg.nms:
        cells = cfg.nms_distance * geo.diameter * geo.scale / smap.stride
        rc, scores = peak_nms(smap.scores, cells)
        pos = refine_peaks(smap.scores, rc) if cfg.refine else rc.astype(np.float64)
    else:
        flat = smap.scores.ravel()
        order = np.argsort(-flat, kind="stable")
        pos = np.stack(np.unravel_index(order, smap.scores.shape), axis=1).astype(np.float64)
        scores = flat[order]
    xy = geo.to_original(smap.centres(pos))
    inside = away_from_edges(xy, image, cfg.edge_margin * geo.diameter)
    if cfg.outlier_z is not None and smap.level is not None:
        bad = outlier_regions(smap.level, cfg.outlier_z)  # [H', W']
        m_xy = np.rint(geo.to_model(xy)).astype(int)
        mx = np.clip(m_xy[:, 0], 0, bad.shape[1] - 1)
        my = np.clip(m_xy[:, 1], 0, bad.shape[0] - 1)
        inside &= ~bad[my, mx]
        if cfg.outlier_margin > 0:  # and a band around them, in model pixels
            inside &= _distance_to(bad, my, mx) > cfg.outlier_margin * geo.diameter * geo.scale
    kept = np.asarray(scores, dtype=np.float64)[inside]
    return xy[inside], expit(kept) if smap.logits else kept


def _distance_to(region: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Distance [P] from pixels (rows, cols) outside a region [H, W] (bool) to its nearest pixel, as
    ``scipy.ndimage.distance_transform_edt`` gives it, from the region's boundary pixels alone (a k-d tree of a
    few thousand points, not a transform of the whole map); infinite when there is no region."""
    inner = region.copy()  # pixels whose four neighbours are in the region too
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    edge = np.argwhere(region & ~inner)
    if len(edge) == 0:
        return np.full(len(rows), np.inf)
    return cKDTree(edge).query(np.stack([rows, cols], axis=1))[0]


def pick_micrograph(
    trained: TrainedModel,
    image: np.ndarray,
    cfg: PickConfig,
    device: torch.device | None = None,
    session: SessionCutoff | None = None,
) -> PickResult:
    """Pick particles on one micrograph [H, W]; coordinates in original micrograph pixels.

    ``session`` carries the ``auto`` cutoff across the micrographs of one session (``session_cutoff``); without
    it the micrograph is cut on its own. InputError (without a path) when the micrograph is smaller than one
    window; with no candidate left (all too near the edges), the threshold is infinite: nothing is selected."""
    t0 = time.perf_counter()
    smap = with_blobs(compute_score_map(trained, image, cfg, device), trained.geometry, trained.manifest, image, cfg)
    t1 = time.perf_counter()
    xy, scores = find_candidates(smap, trained.geometry, image, cfg)
    threshold, rule = _cutoff(scores, cfg, session, probabilities=uses_head(trained, cfg))
    t2 = time.perf_counter()
    return PickResult(
        candidates_xy=xy,
        candidate_scores=scores,
        threshold=float(threshold),
        n_windows=int(smap.scores.size),
        n_evaluated=int(smap.scores.size if smap.evaluated is None else smap.evaluated),
        timings={"score_map": t1 - t0, "peaks_threshold": t2 - t1, "total": t2 - t0},
        cutoff_rule=rule,
    )
