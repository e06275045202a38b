"""Per-micrograph score cutoffs: ``auto`` (the default: a two-Gaussian mixture where the scores are clearly
bimodal, else a robust background cut), the mixture alone, the robust cut alone, Otsu's, and the CryoMAE
paper's k-nearest-neighbour rule.

The paper (sections 3.3 and 4.1.4) ranks a micrograph's window scores, computes for each score the mean
distance to its k = 5 nearest neighbours in score space, and takes as cutoff the score where the rate of
change of those mean distances is largest. The intent: background windows form a dense cluster of scores
(small neighbour distances), particles a sparse high tail (large distances), and the boundary shows as the
sharpest change.

``knn_cutoff`` implements that rule literally and makes its loose ends explicit (see its docstring). Taken
literally the rule is often dominated by the few most isolated top scores, whose neighbour distances jump the
most, or by the sparse lower tail of the background; ``smooth``, ``min_picks`` and ``max_fraction`` are the
knobs to tame that, left for measurement on real data. All cutoffs are returned as a score such that ``scores
>= cutoff`` selects the picks.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cryomae.errors import ConfigError, InputError

# the registry of cutoff rules: the config's type, the CLI's choices and the picker's dispatch all read it
ThresholdRule = Literal["auto", "gmm", "robust", "otsu", "knn"]
THRESHOLD_RULES: tuple[ThresholdRule, ...] = get_args(ThresholdRule)

__all__ = [
    "THRESHOLD_RULES",
    "Mixture",
    "SessionCutoff",
    "ThresholdRule",
    "auto_cutoff",
    "fit_mixture",
    "gmm_cutoff",
    "knn_cutoff",
    "knn_mean_distances",
    "otsu_cutoff",
    "robust_cutoff",
]


def _as_scores(scores: np.ndarray) -> np.ndarray:
    """Scores as a finite float64 [N] array."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise InputError(None, "scores contain NaN or infinite values")
    return s


def knn_mean_distances(sorted_scores: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean distance of each score to its k nearest other scores, exactly.  # [N]

    ``sorted_scores`` must be monotone (ascending or descending). In sorted 1-D data the k nearest neighbours
    of element i lie among elements i-k .. i+k, so the 2k candidate distances are built at once from a padded
    sliding window (missing neighbours beyond the ends are +inf) and the k smallest kept with
    ``np.partition``. The point itself is excluded; equal values count as neighbours at distance 0. With fewer
    than k+1 scores every other score is a neighbour (k is reduced to N-1); a single score has distance 0.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    x = _as_scores(sorted_scores)  # [N]
    n = len(x)
    steps = np.diff(x)
    if not (np.all(steps >= 0) or np.all(steps <= 0)):
        raise InputError(None, "knn_mean_distances needs sorted scores")
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return np.zeros(n, dtype=np.float64)
    padded = np.concatenate([np.full(k_eff, np.inf), x, np.full(k_eff, np.inf)])  # [N + 2k]
    windows = sliding_window_view(padded, 2 * k_eff + 1)  # [N, 2k+1], column k_eff is the point itself
    others = np.delete(windows, k_eff, axis=1)  # [N, 2k]
    dist = np.abs(others - x[:, None])  # [N, 2k], inf where the neighbour is off the end
    nearest = np.partition(dist, k_eff - 1, axis=1)[:, :k_eff]  # [N, k]
    return nearest.mean(axis=1)


def knn_cutoff(
    scores: np.ndarray,
    k: int = 5,
    min_picks: int = 1,
    smooth: int = 0,
    max_fraction: float = 0.5,
) -> float:
    """The paper's automatic cutoff: the score where the k-NN mean distance changes fastest.

    Exactly what is computed, with s the scores sorted descending (s[0] the best window):

    1. d[i] = ``knn_mean_distances(s, k)[i]``.
    2. With ``smooth`` >= 2, d is replaced by its moving average over ``smooth`` samples (edges repeat the end
       value; an even window is centred half a sample early, scipy's convention). 0 or 1 leaves d unchanged.
    3. rate[i] = |d[i+1] - d[i]| for i = 0 .. N-2: the change between neighbours in rank order.
    4. i* = the first argmax of rate over ``min_picks`` - 1 <= i < floor(``max_fraction`` * N), so that at
       least ``min_picks`` and at most a fraction ``max_fraction`` of the scores pass.
    5. The cutoff is s[i*]: ``scores >= cutoff`` keeps ranks 0 .. i*, i.e. the scores up to and including the
       one before the sharpest change (plus any later scores tied with s[i*]).

    ``smooth`` damps rank-to-rank jitter of d; note that a moving average shrinks a one-rank spike of d and a
    step of d by the same factor, so against a few isolated top scores ``min_picks`` is the effective knob.

    ``max_fraction`` is not in the paper (1.0 gives its rule verbatim). The rule looks at both ends of the
    ranking alike, and the sparse lower tail of the background scores changes its neighbour distances as
    sharply as the particle/background boundary does, so the literal rule often cuts near the bottom and keeps
    nearly every window. Particles are sparse (a minority of windows), so by default the cut is searched in
    the upper half only.

    Edge cases: fewer than k+2 scores, or all scores equal, return the minimum score (keep everything: no
    density structure to cut on); a search range emptied by ``min_picks`` or ``max_fraction`` is widened to
    the single index ``min(min_picks, N-1) - 1`` (``min_picks`` beyond N-1 keeps all but the last score).
    Empty input raises InputError.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if min_picks < 1:
        raise ConfigError(f"min_picks must be at least 1, got {min_picks}")
    if smooth < 0:
        raise ConfigError(f"smooth must be >= 0, got {smooth}")
    if not 0.0 < max_fraction <= 1.0:
        raise ConfigError(f"max_fraction must lie in (0, 1], got {max_fraction}")
    s = np.sort(_as_scores(scores))[::-1]  # [N] descending
    n = len(s)
    if n == 0:
        raise InputError(None, "no scores to threshold")
    if n < k + 2 or s[0] == s[-1]:
        return float(s[-1])
    d = knn_mean_distances(s, k)  # [N]
    if smooth >= 2:
        from scipy.ndimage import uniform_filter1d  # here, not at the top: the CLI reads this module's registry

        d = uniform_filter1d(d, size=smooth, mode="nearest")
    rate = np.abs(np.diff(d))  # [N-1]
    lo = min(min_picks - 1, n - 2)
    hi = max(lo + 1, min(n - 1, int(np.floor(max_fraction * n))))
    i_star = lo + int(np.argmax(rate[lo:hi]))
    return float(s[i_star])


def otsu_cutoff(scores: np.ndarray) -> float:
    """Otsu's threshold on the score histogram (256 bins), for comparison with the k-NN rule.

    Otsu keeps scores strictly above its threshold; the smallest such score is returned, so that
    ``scores >= cutoff`` selects the same set. All-equal scores return that score (keep all).
    """
    s = _as_scores(scores)
    if len(s) == 0:
        raise InputError(None, "no scores to threshold")
    lowest = float(s.min())
    if lowest == float(s.max()):
        return lowest
    from skimage.filters import threshold_otsu  # here, not at the top: the CLI reads this module's registry

    t = float(threshold_otsu(s))
    above = s[s > t]
    return float(above.min()) if len(above) else float(s.max())


@dataclass(frozen=True)
class Mixture:
    """A two-Gaussian fit of candidate scores; index 1 is the upper (particle) mode."""

    means: tuple[float, float]
    sds: tuple[float, float]
    weights: tuple[float, float]

    @property
    def separation(self) -> float:
        """Ashman's D: distance of the means over their pooled spread (above 2: clearly bimodal)."""
        return float(math.sqrt(2.0) * abs(self.means[1] - self.means[0]) / math.hypot(*self.sds))

    def posterior(self, s: np.ndarray) -> np.ndarray:
        """Probability of the upper mode for each score.  # [N]"""
        mu, sd, w = np.array(self.means), np.array(self.sds), np.array(self.weights)
        dens = w / sd * np.exp(-0.5 * ((s[:, None] - mu) / sd) ** 2)  # [N, 2]
        return np.asarray(dens[:, 1] / np.maximum(dens.sum(axis=1), 1e-300))


def fit_mixture(scores: np.ndarray, iterations: int = 200, tol: float = 1e-9) -> Mixture:
    """Two Gaussians by expectation-maximisation, started from the median and the 95th percentile."""
    s = _as_scores(scores)
    spread = float(s.std())
    mu = np.array(np.percentile(s, [50.0, 95.0]), dtype=np.float64)  # [2]
    sd = np.array([spread, spread]) / 2.0
    w = np.array([0.8, 0.2])
    floor = 1e-6 * spread + 1e-300
    prev = -np.inf
    for _ in range(iterations):
        dens = w / sd * np.exp(-0.5 * ((s[:, None] - mu) / sd) ** 2) + 1e-300  # [N, 2]
        total = dens.sum(axis=1, keepdims=True)
        resp = dens / total
        nk = resp.sum(axis=0) + 1e-12
        w = nk / len(s)
        mu = (resp * s[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (s[:, None] - mu) ** 2).sum(axis=0) / nk) + floor
        ll = float(np.log(total).sum())
        if ll - prev < tol * len(s):
            break
        prev = ll
    order = np.argsort(mu)
    return Mixture(
        means=(float(mu[order[0]]), float(mu[order[1]])),
        sds=(float(sd[order[0]]), float(sd[order[1]])),
        weights=(float(w[order[0]]), float(w[order[1]])),
    )


def gmm_cutoff(scores: np.ndarray, posterior_min: float = 0.5, iterations: int = 200, tol: float = 1e-9) -> float:
    """Cut where a candidate becomes more likely a particle than background under a 2-Gaussian mixture.

    The candidates of a micrograph are background peaks (many, low scores) and particles (a higher mode);
    ``fit_mixture`` fits two Gaussians, and the cutoff is the lowest score above the lower mean whose
    posterior for the upper component is at least ``posterior_min`` (0.5: the likelier class; lower values
    trade precision for recall, and for calibrated posteriors the F1-optimal cut is half the best achievable
    F1). Unlike Otsu's (which minimises within-class variance and so assumes classes of similar spread), the
    mixture lets the particle mode be narrow or broad and small or large, and it follows each micrograph.
    Returns a score such that ``scores >= cutoff`` selects the picks; fewer than 4 distinct scores keep all.
    """
    s = _as_scores(scores)
    if len(s) == 0:
        raise InputError(None, "no scores to threshold")
    if len(np.unique(s)) < 4:
        return float(s.min())
    return _mixture_cut(s, fit_mixture(s, iterations, tol), posterior_min)


def _mixture_cut(s: np.ndarray, mix: Mixture, posterior_min: float) -> float:
    """The lowest score above the lower mean whose upper-mode posterior is at least ``posterior_min``."""
    selected = s[(mix.posterior(s) >= posterior_min) & (s >= mix.means[0])]
    return float(selected.min()) if len(selected) else float(s.max())


def robust_cutoff(scores: np.ndarray, z: float = 1.5) -> float:
    """The median plus ``z`` robust standard deviations (1.4826 x the median absolute deviation).

    Most candidates of a micrograph are background peaks, so the median and MAD describe the background;
    a candidate ``z`` robust deviations above it is unusual for background. Returns the lowest score at or
    above that level (all-equal scores keep all).
    """
    s = _as_scores(scores)
    if len(s) == 0:
        raise InputError(None, "no scores to threshold")
    med = float(np.median(s))
    mad = 1.4826 * float(np.median(np.abs(s - med)))
    if mad == 0.0:
        return float(s.min())
    above = s[s >= med + z * mad]
    return float(above.min()) if len(above) else float(s.max())


def auto_cutoff(
    scores: np.ndarray,
    posterior_min: float = 0.35,
    min_separation: float = 2.0,
    min_weight: float = 0.05,
    z: float = 1.25,
    max_weight: float = 0.5,
) -> tuple[float, str]:
    """The mixture cut where the scores are clearly bimodal, else the robust background cut.

    A two-Gaussian fit only describes particles when the particle mode is really there: its means must be
    apart by at least ``min_separation`` in Ashman's D (2 is the textbook mark of a clean split; scores of
    dense micrographs sit near 2) and the upper mode must hold at least ``min_weight`` and at most
    ``max_weight`` of the candidates (candidates are peaks about half a diameter apart, so particles are a
    minority of them even on a packed micrograph; an upper mode holding most candidates is the background split
    in two by carbon, thick ice or a low-score tail, and its cut would keep the background).
    Otherwise (sparse particles, weak contrast, a unimodal fit that split the background or kept only its
    top tail) the cut falls back to ``robust_cutoff``. Returns the cutoff and which rule made it ("gmm" or
    "robust"; "few" keeps all of fewer than 4 distinct scores).
    """
    s = _as_scores(scores)
    if len(s) == 0:
        raise InputError(None, "no scores to threshold")
    if len(np.unique(s)) < 4:
        return float(s.min()), "few"  # no distribution to fit: keep all
    mix = fit_mixture(s)
    if mix.separation >= min_separation and min_weight <= mix.weights[1] <= max_weight:
        return _mixture_cut(s, mix, posterior_min), "gmm"
    return robust_cutoff(s, z), "robust"


SESSION_HISTORY = 100  # trusted mixture cuts a session remembers (the most recent)


@dataclass
class SessionCutoff:
    """The ``auto`` cutoff across one session's micrographs: each micrograph's own mixture cut where its scores
    are clearly bimodal (``auto_cutoff``), else the median of the session's recent trusted mixture cuts (rule
    "session"), else, before the session has any, the robust cut.

    The scores are standardised cosines, comparable across micrographs of one session, and the particle/background
    boundary moves little between them; the fallback rules do not know where it is (the robust cut assumes that
    particles are a small minority of the candidates, which crowded micrographs break, keeping a tenth of their
    particles). ``seed`` is the reference micrograph's trusted mixture cut, measured when the model was trained
    (``cryomae.picking.picker.reference_cutoff``), so a session starts calibrated. Thread-safe: a picker with two
    workers shares one per session. The options are ``auto_cutoff``'s.
    """

    posterior_min: float = 0.35
    min_separation: float = 2.0
    min_weight: float = 0.05
    z: float = 1.25
    max_weight: float = 0.5
    seed: float | None = None
    history: deque[float] = field(default_factory=lambda: deque(maxlen=SESSION_HISTORY))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seed is not None and math.isfinite(self.seed) and not self.history:
            self.history.append(float(self.seed))

    def cut(self, scores: np.ndarray) -> tuple[float, str]:
        """The cutoff of one micrograph's candidate scores and its rule: "gmm", "session", "robust" or "few".
        Only a trusted mixture cut teaches the session."""
        cut, rule = auto_cutoff(
            scores, self.posterior_min, self.min_separation, self.min_weight, self.z, self.max_weight
        )
        with self._lock:
            if rule == "gmm":
                self.history.append(cut)
                return cut, rule
            if self.history:
                return float(np.median(self.history)), "session"
        return cut, rule
