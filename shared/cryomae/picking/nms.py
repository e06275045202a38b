"""Duplicate suppression: one pick per particle instead of one per overlapping window.

Sliding windows with a stride much smaller than the particle give every particle a blob of high scores on the
score map (the grid of window scores), and thresholding alone turns the blob into several picks (the paper's
Table 7 shows the precision this costs). ``peak_nms`` keeps one peak per blob; ``point_nms`` does the same for
scattered picks (e.g. after merging tiles); ``refine_peaks`` places a peak between grid cells.

Distances are Euclidean and inclusive: a lower peak at distance <= ``min_distance`` from a kept one is
dropped.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cryomae.errors import ConfigError, InputError

__all__ = ["peak_nms", "point_nms", "refine_peaks"]


def _greedy_suppress(points: np.ndarray, order: np.ndarray, min_distance: float) -> np.ndarray:
    """Indices (into ``points`` [N, 2]) kept by greedy suppression, visiting ``order``; in visit order.

    A point is kept unless an already kept point lies within ``min_distance`` of it. The loop is sequential by
    nature but runs over points with a neighbour only; isolated points are kept without looking.
    """
    n = len(points)
    if n == 0 or min_distance <= 0:
        return order.copy()
    neighbours = cKDTree(points).query_ball_point(points, r=min_distance)  # object [N] of lists (incl. self)
    crowded = np.fromiter((len(c) > 1 for c in neighbours), dtype=bool, count=n)
    suppressed = np.zeros(n, dtype=bool)
    keep = np.ones(n, dtype=bool)
    for i in order[crowded[order]].tolist():
        if suppressed[i]:
            keep[i] = False
            continue
        suppressed[neighbours[i]] = True
    return order[keep[order]]


def peak_nms(
    score_map: np.ndarray,
    min_distance_px: float,
    threshold: float = -np.inf,
    exclude_border: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a score map with lower peaks within ``min_distance_px`` cells suppressed.

    ``score_map`` [H, W] is in grid units (one cell per window position); NaN cells never become peaks. Steps:
    (1) candidates are the cells equal to the maximum of their 3x3 neighbourhood, with score >= ``threshold``;
    (2) a plateau (connected candidates, necessarily of equal score) becomes one candidate, its cell nearest
    the plateau's centroid; (3) with ``exclude_border``, candidates in the outermost row or column are dropped
    (their true maximum may lie off the map); (4) greedy suppression in descending score among the remaining
    candidates: a candidate is dropped only when an already *kept* peak lies within ``min_distance_px``. (A
    disk-shaped maximum filter of that radius as the candidate test would be cheaper but also drops a peak
    whose only higher neighbour within reach is itself suppressed, losing the second of two particles just
    over the distance apart.)

    Returns (rows_cols int [P, 2], scores [P]) in descending score order (raster order among ties).
    """
    s = np.asarray(score_map, dtype=np.float64)
    if s.ndim != 2:
        raise InputError(None, f"score_map must be 2-D, got shape {s.shape}")
    if not min_distance_px >= 0:
        raise ConfigError(f"min_distance_px must be >= 0, got {min_distance_px}")
    empty = (np.zeros((0, 2), dtype=np.intp), np.zeros(0, dtype=np.float64))
    if s.size == 0:
        return empty
    s = np.where(np.isnan(s), -np.inf, s)

    local_max = ndimage.maximum_filter(s, size=3, mode="constant", cval=-np.inf)
    candidate = (s == local_max) & np.isfinite(s) & (s >= threshold)
    if not candidate.any():
        return empty

    # Plateaus: adjacent candidates are in each other's 3x3 neighbourhood, so they share one value.
    labels, n_labels = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    rows, cols = np.nonzero(candidate)  # raster order
    lab = labels[rows, cols] - 1  # [C] plateau index of each candidate cell
    sizes = np.bincount(lab, minlength=n_labels).astype(np.float64)
    centroid_r = np.bincount(lab, weights=rows, minlength=n_labels) / sizes
    centroid_c = np.bincount(lab, weights=cols, minlength=n_labels) / sizes
    dist2 = (rows - centroid_r[lab]) ** 2 + (cols - centroid_c[lab]) ** 2
    by_plateau = np.lexsort((np.arange(len(lab)), dist2, lab))  # per plateau: nearest centroid, then raster
    first = np.ones(len(by_plateau), dtype=bool)
    first[1:] = lab[by_plateau][1:] != lab[by_plateau][:-1]
    pick = np.sort(by_plateau[first])  # one cell per plateau, raster order
    rows, cols = rows[pick], cols[pick]

    if exclude_border:
        h, w = s.shape
        inside = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
        rows, cols = rows[inside], cols[inside]
        if len(rows) == 0:
            return empty

    values = s[rows, cols]
    order = np.argsort(-values, kind="stable")
    points = np.stack([rows, cols], axis=1).astype(np.float64)  # [C, 2]
    kept = _greedy_suppress(points, order, float(min_distance_px))
    rows_cols = np.stack([rows[kept], cols[kept]], axis=1).astype(np.intp)  # [P, 2]
    return rows_cols, values[kept]


def point_nms(xy: np.ndarray, scores: np.ndarray, min_distance: float) -> np.ndarray:
    """Greedy suppression of scattered points: indices of the survivors, in descending score order.

    Points are visited by descending score (input order among ties); a point is dropped when an already kept
    point lies within ``min_distance`` (inclusive).
    """
    pts = np.asarray(xy, dtype=np.float64)
    if pts.size == 0:
        return np.zeros(0, dtype=np.intp)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InputError(None, f"xy must have shape [N, 2], got {pts.shape}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != (len(pts),):
        raise InputError(None, f"scores must have shape [{len(pts)}], got {s.shape}")
    if not min_distance >= 0:
        raise ConfigError(f"min_distance must be >= 0, got {min_distance}")
    order = np.argsort(-s, kind="stable")
    return _greedy_suppress(pts, order, float(min_distance)).astype(np.intp)


def refine_peaks(score_map: np.ndarray, rows_cols: np.ndarray) -> np.ndarray:
    """Sub-cell peak positions from a parabola through each peak and its two neighbours, per axis.

    Along one axis, with values l, c, r at offsets -1, 0, +1, the vertex of the parabola through them lies at
    offset (l - r) / (2 (l - 2c + r)). The offset is clamped to [-0.5, 0.5] (beyond that the neighbour would
    be the peak) and is 0 where the cell is on the map's border along that axis, where a neighbour is not
    finite, or where the three values do not curve downwards (l - 2c + r >= 0, e.g. a flat run). Returns float
    [P, 2] as (row, col).
    """
    s = np.asarray(score_map, dtype=np.float64)
    rc = np.asarray(rows_cols, dtype=np.intp).reshape(-1, 2)  # [P, 2]
    if s.ndim != 2:
        raise InputError(None, f"score_map must be 2-D, got shape {s.shape}")
    if len(rc) and (rc.min() < 0 or np.any(rc.max(axis=0) >= np.array(s.shape))):
        raise InputError(None, "rows_cols lie outside the score map")
    refined = rc.astype(np.float64)
    for axis in (0, 1):
        step = np.zeros(2, dtype=np.intp)
        step[axis] = 1
        inner = (rc[:, axis] > 0) & (rc[:, axis] < s.shape[axis] - 1)
        lo = np.where(inner[:, None], rc - step, rc)  # [P, 2]; border peaks index themselves (offset 0 below)
        hi = np.where(inner[:, None], rc + step, rc)
        left, centre, right = s[lo[:, 0], lo[:, 1]], s[rc[:, 0], rc[:, 1]], s[hi[:, 0], hi[:, 1]]
        curvature = left - 2.0 * centre + right
        ok = inner & np.isfinite(left) & np.isfinite(right) & np.isfinite(centre) & (curvature < 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = np.where(ok, (left - right) / (2.0 * np.where(ok, curvature, -1.0)), 0.0)
        refined[:, axis] += np.clip(offset, -0.5, 0.5)
    return refined
