"""Per-micrograph score cutoffs: the CryoMAE paper's k-nearest-neighbour rule, and Otsu's for comparison.

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

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import uniform_filter1d
from skimage.filters import threshold_otsu

from cryomae.errors import ConfigError, InputError

__all__ = ["knn_cutoff", "knn_mean_distances", "otsu_cutoff"]


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
    t = float(threshold_otsu(s))
    above = s[s > t]
    return float(above.min()) if len(above) else float(s.max())
