"""Scoring picks against ground truth with the CryoMAE paper's rule.

The paper (section 4.1.3) counts a pick as a true positive when its box overlaps a ground-truth box with an
intersection over union of at least 0.5, each ground-truth particle being matched at most once; every other
pick is a false positive (including a second pick on an already matched particle) and every unmatched
ground-truth particle a false negative. Boxes are axis-aligned squares with the particle diameter as side,
centred on the coordinates (x = column, y = row, pixels).

Matching is greedy and one-to-one: picks are taken in descending score order, and each takes the still
unmatched ground-truth box it overlaps most. Candidate pairs come from a KD-tree query, so only pairs whose
boxes overlap are ever compared; 10,000 picks against 1,000 particles take milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from cryomae.errors import ConfigError, InputError

__all__ = [
    "Evaluation",
    "Score",
    "average_precision",
    "box_iou",
    "evaluate",
    "match_picks",
    "score_micrograph",
]

# IoUs are ratios of products of coordinate differences; an IoU meant to be exactly the threshold (e.g. 0.5)
# can land one ulp below it. Ties at the threshold count as matches, as the paper's ">= 0.5" says.
_IOU_TOLERANCE = 1e-9


def _as_points(xy: np.ndarray, name: str) -> np.ndarray:
    """Return ``xy`` as a float64 [N, 2] array, accepting an empty array of any shape as zero points."""
    arr = np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(None, f"{name} must have shape [N, 2], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(None, f"{name} contains non-finite coordinates")
    return arr


def _check_size(size: float, iou_threshold: float | None = None) -> None:
    """Reject box sizes and IoU thresholds for which the scoring rule means nothing."""
    if not (np.isfinite(size) and size > 0):
        raise ConfigError(f"box size (particle diameter) must be a positive number, got {size}")
    if iou_threshold is not None and not (0.0 < iou_threshold <= 1.0):
        raise ConfigError(f"IoU threshold must lie in (0, 1], got {iou_threshold}")


def _pair_iou(d_xy: np.ndarray, size: float) -> np.ndarray:
    """IoU of two squares of side ``size`` with centres ``d_xy`` apart (any leading shape; last axis x, y)."""
    overlap = np.clip(size - np.abs(d_xy), 0.0, None)  # [..., 2] overlap along x and y
    inter = overlap[..., 0] * overlap[..., 1]
    return inter / (2.0 * size * size - inter)


def box_iou(a_xy: np.ndarray, b_xy: np.ndarray, size: float) -> np.ndarray:
    """IoU between every square of ``a_xy`` and every square of ``b_xy``, all of side ``size``.

    Dense [N, M] result, so meant for small sets and tests; matching uses the sparse candidate pairs instead.
    """
    _check_size(size)
    a = _as_points(a_xy, "a_xy")  # [N, 2]
    b = _as_points(b_xy, "b_xy")  # [M, 2]
    return _pair_iou(a[:, None, :] - b[None, :, :], size)  # [N, M]


def _pick_order(n: int, scores: np.ndarray | None) -> np.ndarray:
    """Pick indices in processing order: descending score; input order among ties or without scores."""
    if scores is None:
        return np.arange(n)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise InputError(None, f"scores must have shape [{n}] to match the picks, got {s.shape}")
    if np.any(np.isnan(s)):
        raise InputError(None, "scores contain NaN")
    return np.argsort(-s, kind="stable")


def match_picks(
    pick_xy: np.ndarray,
    scores: np.ndarray | None,
    truth_xy: np.ndarray,
    diameter: float,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Flag each pick as true positive (True) or false positive, matching one-to-one against the truth.

    Picks are processed in descending ``scores`` (input order when ``scores`` is None, and among equal
    scores). Each pick takes the unmatched ground-truth box with the highest IoU (lowest truth index among
    equal IoUs) and is a true positive when that IoU reaches ``iou_threshold`` (within 1e-9); a pick below the
    threshold consumes nothing. Returns bool [N] in the input order of ``pick_xy``.
    """
    _check_size(diameter, iou_threshold)
    picks = _as_points(pick_xy, "pick_xy")  # [N, 2]
    truth = _as_points(truth_xy, "truth_xy")  # [M, 2]
    n = len(picks)
    order = _pick_order(n, scores)  # [N]
    tp = np.zeros(n, dtype=bool)
    if n == 0 or len(truth) == 0:
        return tp

    # Squares of side d overlap only when both |dx| and |dy| are below d: a Chebyshev ball of radius d.
    neighbours = cKDTree(truth).query_ball_point(picks, r=diameter, p=np.inf)  # object [N] of lists
    counts = np.fromiter((len(c) for c in neighbours), dtype=np.intp, count=n)
    if counts.sum() == 0:
        return tp
    pair_pick = np.repeat(np.arange(n), counts)  # [K]
    pair_truth = np.concatenate([np.asarray(c, dtype=np.intp) for c in neighbours if c])  # [K]
    pair_iou = _pair_iou(picks[pair_pick] - truth[pair_truth], diameter)  # [K]
    keep = pair_iou >= iou_threshold - _IOU_TOLERANCE
    pair_pick, pair_truth, pair_iou = pair_pick[keep], pair_truth[keep], pair_iou[keep]
    if len(pair_pick) == 0:
        return tp

    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)
    # Sort pairs by pick rank, then IoU descending, then truth index: the greedy visit order.
    visit = np.lexsort((pair_truth, -pair_iou, rank[pair_pick]))
    matched = np.zeros(len(truth), dtype=bool)
    # Sequential by nature (a match changes what later picks may take), but only over overlapping pairs.
    for p, t in zip(pair_pick[visit].tolist(), pair_truth[visit].tolist(), strict=True):
        if tp[p] or matched[t]:
            continue
        tp[p] = True
        matched[t] = True
    return tp


@dataclass(frozen=True)
class Score:
    """Counts of one micrograph (or a pool of them) and the ratios derived from them."""

    tp: int
    n_picks: int
    n_truth: int

    @property
    def precision(self) -> float:
        """TP / picks; 0.0 without picks."""
        return self.tp / self.n_picks if self.n_picks else 0.0

    @property
    def recall(self) -> float:
        """TP / ground-truth particles; 0.0 without ground truth."""
        return self.tp / self.n_truth if self.n_truth else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall, 2 TP / (picks + truth); 0.0 when both are empty."""
        total = self.n_picks + self.n_truth
        return 2.0 * self.tp / total if total else 0.0

    def __add__(self, other: Score) -> Score:
        """Pool two scores by adding their counts (micro-averaging)."""
        return Score(self.tp + other.tp, self.n_picks + other.n_picks, self.n_truth + other.n_truth)

    def to_dict(self) -> dict[str, int | float]:
        """Counts and ratios as a JSON-ready dict."""
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def score_micrograph(
    pick_xy: np.ndarray,
    scores: np.ndarray | None,
    truth_xy: np.ndarray,
    diameter: float,
    iou_threshold: float = 0.5,
) -> Score:
    """Match the picks of one micrograph against its ground truth and count the outcome."""
    tp = match_picks(pick_xy, scores, truth_xy, diameter, iou_threshold)
    return Score(tp=int(tp.sum()), n_picks=len(tp), n_truth=len(_as_points(truth_xy, "truth_xy")))


def average_precision(per_micrograph: list[tuple[np.ndarray, np.ndarray]], n_truth_total: int) -> float:
    """Area under the pooled precision-recall curve, without interpolation.

    All picks of all micrographs (each given as its true-positive flags [N] and scores [N]) are ranked
    together by descending score (stable, so ties keep micrograph-then-input order). With P(k) the precision
    of the top k and tp(k) 1 for a true positive at rank k:

        AP = sum_k P(k) * tp(k) / n_truth_total

    i.e. the mean over all ground-truth particles of the precision at the rank where each is found, a particle
    never found contributing 0 (the non-interpolated VOC 2010+ / scikit-learn definition). Returns 0.0 when
    there is no ground truth or no pick.
    """
    if n_truth_total <= 0:
        return 0.0
    flags_list, score_list = [], []
    for flags, scores in per_micrograph:
        f = np.asarray(flags, dtype=bool).ravel()
        s = np.asarray(scores, dtype=np.float64).ravel()
        if f.shape != s.shape:
            raise InputError(None, f"tp flags {f.shape} and scores {s.shape} differ in length")
        flags_list.append(f)
        score_list.append(s)
    if not flags_list:
        return 0.0
    flags_all = np.concatenate(flags_list)  # [N_total]
    scores_all = np.concatenate(score_list)  # [N_total]
    if flags_all.size == 0:
        return 0.0
    ranked = flags_all[np.argsort(-scores_all, kind="stable")]  # [N_total] bool
    cum_tp = np.cumsum(ranked)
    precision_at_k = cum_tp / np.arange(1, len(ranked) + 1)
    return float(np.sum(precision_at_k[ranked]) / n_truth_total)


@dataclass(frozen=True)
class Evaluation:
    """The outcome of scoring a set of micrographs.

    ``average_precision`` is None when some micrograph's picks carry no scores, since picks can then not be
    ranked across micrographs.
    """

    pooled: Score
    per_micrograph: dict[str, Score]
    average_precision: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: pooled counts and ratios, AP, and every micrograph's counts and ratios."""
        return {
            "pooled": self.pooled.to_dict(),
            "average_precision": self.average_precision,
            "per_micrograph": {stem: s.to_dict() for stem, s in self.per_micrograph.items()},
        }

    def format_table(self) -> str:
        """A fixed-width text table: one row per micrograph, then the pooled row and the AP."""
        names = list(self.per_micrograph)
        width = max([len("micrograph"), len("pooled"), *(len(n) for n in names)])
        header = f"{'micrograph':<{width}} {'picks':>7} {'truth':>7} {'TP':>7} {'prec':>6} {'recall':>6} {'F1':>6}"

        def row(name: str, s: Score) -> str:
            return (
                f"{name:<{width}} {s.n_picks:>7d} {s.n_truth:>7d} {s.tp:>7d} "
                f"{s.precision:>6.3f} {s.recall:>6.3f} {s.f1:>6.3f}"
            )

        rule = "-" * len(header)
        lines = [
            header,
            rule,
            *(row(n, self.per_micrograph[n]) for n in names),
            rule,
            row("pooled", self.pooled),
        ]
        ap = "n/a (picks without scores)" if self.average_precision is None else f"{self.average_precision:.3f}"
        lines.append(f"average precision: {ap}")
        return "\n".join(lines)


def evaluate(
    picks: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    truth: Mapping[str, np.ndarray],
    diameter: float,
    iou_threshold: float = 0.5,
) -> Evaluation:
    """Score picks of many micrographs (keyed by micrograph stem) against their ground truth.

    A micrograph in ``truth`` without picks counts all its particles as missed. Picks on a micrograph absent
    from ``truth`` raise ConfigError: it usually means mismatched names, and scoring those picks as false
    positives would hide that. Micrographs are reported in sorted stem order.
    """
    _check_size(diameter, iou_threshold)
    unknown = sorted(set(picks) - set(truth))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(f"picks given for micrograph(s) without ground truth: {shown}")

    per: dict[str, Score] = {}
    ranked: list[tuple[np.ndarray, np.ndarray]] = []
    all_scored = True
    for stem in sorted(truth):
        truth_xy = _as_points(truth[stem], f"truth[{stem!r}]")
        xy, scores = picks.get(stem, (np.zeros((0, 2)), None))
        xy = _as_points(xy, f"picks[{stem!r}]")
        flags = match_picks(xy, scores, truth_xy, diameter, iou_threshold)
        per[stem] = Score(tp=int(flags.sum()), n_picks=len(flags), n_truth=len(truth_xy))
        if scores is None:
            all_scored = all_scored and len(flags) == 0
        else:
            ranked.append((flags, np.asarray(scores, dtype=np.float64)))

    pooled = sum(per.values(), Score(0, 0, 0))
    ap = average_precision(ranked, pooled.n_truth) if all_scored else None
    return Evaluation(pooled=pooled, per_micrograph=per, average_precision=ap)
