"""Sliding-window picking: score every window against the exemplar bank, find peaks, cut per micrograph.

The micrograph is normalised and resampled once (``cryomae.preprocess``), padded by half a window with its
mean, and its windows are taken as a strided view (``Tensor.unfold``, no copy). Rows of windows go to the
encoder in large batches; each window's score is the max (or mean) cosine similarity of its unmasked encoder
feature to the exemplar bank, giving a score map with one cell per window position. Candidates are the
local maxima of that map at least ``nms_distance * diameter`` apart (or every window, as in the paper, when
``nms`` is off); the per-micrograph cutoff is set on the candidates' scores (``cryomae.picking.threshold``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cryomae.config import PickConfig
from cryomae.device import autocast, resolve_device
from cryomae.model.checkpoint import TrainedModel
from cryomae.picking.nms import peak_nms, refine_peaks
from cryomae.picking.threshold import auto_cutoff, gmm_cutoff, knn_cutoff, otsu_cutoff, robust_cutoff
from cryomae.preprocess import away_from_edges, outlier_regions, prepare_with_background


@dataclass
class ScoreMap:
    """Window scores on a grid; cell (i, j) is the window centred at (j*stride + offset, i*stride + offset)
    in resampled-image pixels."""

    scores: np.ndarray  # [Gy, Gx]
    stride: int  # model pixels between neighbouring windows
    offset: float  # resampled-image coordinate of the centre of cell 0
    level: np.ndarray | None = None  # [H', W'] local mean level of the resampled micrograph (carbon, ice)

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
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def selected(self) -> np.ndarray:
        return self.candidate_scores >= self.threshold

    @property
    def xy(self) -> np.ndarray:
        return self.candidates_xy[self.selected]

    @property
    def scores(self) -> np.ndarray:
        return self.candidate_scores[self.selected]


@torch.no_grad()
def compute_score_map(
    trained: TrainedModel, image: np.ndarray, cfg: PickConfig, device: torch.device | None = None
) -> ScoreMap:
    """Score every window of a micrograph [H, W] against the exemplar bank."""
    dev = device or resolve_device(cfg.device)
    model = trained.model.to(dev).eval()
    s = model.preset.img_size
    stride = max(1, round(s * cfg.stride_fraction))
    pad = s // 2
    prepared, level = prepare_with_background(image, trained.geometry, dev)
    img = F.pad(prepared, (pad, pad, pad, pad))  # [Hs + 2p, Ws + 2p]
    windows = img.unfold(0, s, stride).unfold(1, s, stride)  # [Gy, Gx, s, s], a view
    gy, gx = windows.shape[:2]
    rows = max(1, cfg.batch_size // gx)
    chunks = []
    for r in range(0, gy, rows):
        batch = windows[r : r + rows].reshape(-1, 1, s, s)
        with autocast(dev):
            chunks.append(model.features(batch).float())
    feats = torch.cat(chunks)  # [Gy*Gx, D]
    bank = trained.bank.to(dev).float()
    mu = torch.zeros_like(bank[:1])
    sd = torch.ones_like(bank[:1])
    if cfg.feature_norm != "none":
        mu = feats.mean(dim=0, keepdim=True)
    if cfg.feature_norm == "standardize":
        sd = feats.std(dim=0, keepdim=True).clamp_min(1e-6)
    bank = F.normalize((bank - mu) / sd, dim=-1)  # [B, D]
    out = torch.empty(feats.shape[0], device=dev)
    step = max(1, cfg.batch_size * 8)
    for i in range(0, feats.shape[0], step):  # in chunks: no second copy of all window features
        sims = F.normalize((feats[i : i + step] - mu) / sd, dim=-1) @ bank.T  # [n, B]
        out[i : i + step] = sims.amax(dim=1) if cfg.score == "max" else sims.mean(dim=1)
    out = out.reshape(gy, gx)
    return ScoreMap(scores=out.cpu().numpy(), stride=stride, offset=(s - 1) / 2 - pad, level=level.cpu().numpy())


def _cutoff(scores: np.ndarray, cfg: PickConfig) -> float:
    if isinstance(cfg.threshold, float):
        return cfg.threshold
    if len(scores) == 0:
        return math.inf
    if cfg.threshold == "otsu":
        return otsu_cutoff(scores)
    if cfg.threshold == "auto":
        cut, _ = auto_cutoff(scores, cfg.gmm_posterior, cfg.gmm_min_separation, cfg.gmm_min_weight, cfg.robust_z)
        return cut
    if cfg.threshold == "gmm":
        return gmm_cutoff(scores, cfg.gmm_posterior)
    if cfg.threshold == "robust":
        return robust_cutoff(scores, cfg.robust_z)
    return knn_cutoff(scores, k=cfg.knn_k, smooth=cfg.knn_smooth)


def pick_micrograph(
    trained: TrainedModel, image: np.ndarray, cfg: PickConfig, device: torch.device | None = None
) -> PickResult:
    """Pick particles on one micrograph [H, W]; coordinates in original micrograph pixels."""
    t0 = time.perf_counter()
    smap = compute_score_map(trained, image, cfg, device)
    t1 = time.perf_counter()
    geo = trained.geometry
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
    xy, scores = xy[inside], np.asarray(scores, dtype=np.float64)[inside]
    threshold = _cutoff(scores, cfg)
    t2 = time.perf_counter()
    return PickResult(
        candidates_xy=xy,
        candidate_scores=scores,
        threshold=float(threshold),
        n_windows=int(smap.scores.size),
        timings={"score_map": t1 - t0, "peaks_threshold": t2 - t1, "total": t2 - t0},
    )
