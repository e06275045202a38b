"""Tests of the automatic per-micrograph cutoffs (the paper's k-NN rule and Otsu's)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from cryomae.errors import ConfigError, InputError
from cryomae.picking.threshold import knn_cutoff, knn_mean_distances, otsu_cutoff


def test_knn_mean_distances_by_hand() -> None:
    x = np.array([0.0, 1.0, 3.0, 7.0])
    # k=2: 0 -> {1, 3} -> 2; 1 -> {1 (to 0), 2 (to 3)} -> 1.5; 3 -> {2 (to 1), 3 (to 0)} -> 2.5;
    # 7 -> {4 (to 3), 6 (to 1)} -> 5.
    np.testing.assert_allclose(knn_mean_distances(x, 2), [2.0, 1.5, 2.5, 5.0])
    # k=1: nearest only: 1, 1, 2, 4.
    np.testing.assert_allclose(knn_mean_distances(x, 1), [1.0, 1.0, 2.0, 4.0])
    # Descending order gives the same distances, reversed.
    np.testing.assert_allclose(knn_mean_distances(x[::-1], 2), [5.0, 2.5, 1.5, 2.0])


def test_knn_mean_distances_matches_brute_force() -> None:
    x = np.sort(np.random.default_rng(3).normal(size=200))
    dist = np.abs(x[:, None] - x[None, :])
    np.fill_diagonal(dist, np.inf)
    expected = np.sort(dist, axis=1)[:, :5].mean(axis=1)
    np.testing.assert_allclose(knn_mean_distances(x, 5), expected)


def test_knn_mean_distances_small_inputs() -> None:
    # k larger than N-1: every other point is a neighbour. [0, 1, 3]: 2, 1.5, 2.5.
    np.testing.assert_allclose(knn_mean_distances(np.array([0.0, 1.0, 3.0]), 5), [2.0, 1.5, 2.5])
    np.testing.assert_array_equal(knn_mean_distances(np.array([4.0]), 5), [0.0])
    assert knn_mean_distances(np.zeros(0), 5).shape == (0,)
    # Ties are neighbours at distance 0.
    np.testing.assert_allclose(knn_mean_distances(np.array([1.0, 1.0, 1.0, 2.0]), 2), [0.0, 0.0, 0.0, 1.0])


def test_knn_mean_distances_rejects_unsorted() -> None:
    with pytest.raises(InputError):
        knn_mean_distances(np.array([0.0, 2.0, 1.0]), 1)
    with pytest.raises(ConfigError):
        knn_mean_distances(np.array([0.0, 1.0]), 0)


# Two clusters of 6, scores x100 so that every distance is exact in binary.
_TWO_CLUSTERS = np.array([100, 99, 98, 97, 96, 95, 50, 49, 48, 47, 46, 45], dtype=np.float64)


def test_knn_cutoff_hand_worked_k2() -> None:
    # k=2, ranks 0..11 (descending):
    #   d = [1.5, 1, 1, 1, 1, 1.5, | 1.5, 1, 1, 1, 1, 1.5]
    #   (the ends and the two points beside the gap have nearest distances 1 and 2, the others 1 and 1;
    #   the 45-unit gap is never among the 2 nearest)
    #   rate = |d[i+1] - d[i]| = [0.5, 0, 0, 0, 0.5, 0, 0.5, 0, 0, 0, 0.5]
    # First argmax is rank 0, so the literal rule keeps only the top score: cutoff 100.
    np.testing.assert_allclose(knn_mean_distances(_TWO_CLUSTERS, 2), [1.5, 1, 1, 1, 1, 1.5] * 2)
    assert knn_cutoff(_TWO_CLUSTERS, k=2) == 100.0
    assert knn_cutoff(_TWO_CLUSTERS, k=2, max_fraction=1.0) == 100.0
    # min_picks=2 moves the search past rank 0: the next maximum, rate[4] (between 96 and 95), gives 96.
    assert knn_cutoff(_TWO_CLUSTERS, k=2, min_picks=2) == 96.0


def test_knn_cutoff_hand_worked_k5() -> None:
    # k=5: d = [3, 2.2, 1.8, 1.8, 2.2, 3] for each cluster (e.g. rank 1 = 99: neighbours 1,1,2,3,4 -> 11/5);
    # rate = [0.8, 0.4, 0, 0.4, 0.8, 0, 0.8, 0.4, 0, 0.4, 0.8]: again rank 0 first, then rank 4.
    np.testing.assert_allclose(knn_mean_distances(_TWO_CLUSTERS, 5), [3, 2.2, 1.8, 1.8, 2.2, 3] * 2)
    assert knn_cutoff(_TWO_CLUSTERS, k=5) == 100.0
    assert knn_cutoff(_TWO_CLUSTERS, k=5, min_picks=2) == 96.0


def test_knn_cutoff_separates_sparse_particles_from_dense_background() -> None:
    # The realistic case: few particle windows spread over a wide range, many background windows packed tight.
    # Top: 30 evenly spaced in [0.8, 0.9] (step h = 0.1/29); background: 1000 in [0.1, 0.3] (step 0.0002).
    # The last top score (0.8) has one-sided neighbours, d = 3h ~ 0.0103; the first background score has
    # d = 3 * 0.0002 = 0.0006: rate ~ 0.0097 there, versus 0.8h ~ 0.0028 inside or at the top of the cluster.
    top = np.linspace(0.8, 0.9, 30)
    scores = np.random.default_rng(0).permutation(np.concatenate([np.linspace(0.1, 0.3, 1000), top]))
    cutoff = knn_cutoff(scores)
    assert cutoff == pytest.approx(0.8)
    assert np.count_nonzero(scores >= cutoff) == 30


@pytest.mark.parametrize("seed", range(5))
def test_knn_cutoff_bimodal_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    particles = rng.normal(0.85, 0.02, 40)
    scores = np.concatenate([rng.normal(0.3, 0.05, 3000), particles])
    cutoff = knn_cutoff(scores)
    kept = np.count_nonzero(scores >= cutoff)
    assert 35 <= kept <= 45  # the cut lies in or next to the gap, not in the background's lower tail


def test_knn_cutoff_literal_rule_can_cut_in_the_lower_tail() -> None:
    # Why max_fraction exists: with the search over all ranks (the paper verbatim), the sparse lower tail of
    # the background wins on this seed and nearly everything is kept.
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.3, 0.05, 3000), rng.normal(0.85, 0.02, 40)])
    assert np.count_nonzero(scores >= knn_cutoff(scores, max_fraction=1.0)) > 1500
    assert np.count_nonzero(scores >= knn_cutoff(scores)) <= 45


def test_knn_cutoff_smoothing_changes_d_before_differencing() -> None:
    # k=1, scores (descending) 20 19 17 13 12 11 10: gaps 1 2 4 1 1 1,
    #   d = nearest gap = [1, 1, 2, 1, 1, 1, 1].
    # Raw: rate = [0, 1, 1, 0, 0, 0]; the search covers ranks < floor(0.5 * 7) = 3 -> argmax 1 -> cutoff 19.
    # smooth=3 (edges repeat): d_s = [1, 4/3, 4/3, 4/3, 1, 1, 1]; rate = [1/3, 0, 0, 1/3, 0, 0]
    #   -> rank 0 -> cutoff 20.
    scores = np.array([10.0, 11.0, 12.0, 13.0, 17.0, 19.0, 20.0])
    assert knn_cutoff(scores, k=1) == 19.0
    assert knn_cutoff(scores, k=1, smooth=1) == 19.0  # a window of 1 is no smoothing
    assert knn_cutoff(scores, k=1, smooth=3) == 20.0


def test_knn_cutoff_edge_cases() -> None:
    # Fewer than k+2 scores: keep all.
    assert knn_cutoff(np.array([0.9, 0.1, 0.5]), k=5) == 0.1
    # All equal: keep all.
    assert knn_cutoff(np.full(50, 0.7)) == 0.7
    # min_picks beyond N-1 keeps all but the last.
    s = np.arange(10, dtype=np.float64)
    assert knn_cutoff(s, k=2, min_picks=100, max_fraction=1.0) == 1.0
    with pytest.raises(InputError):
        knn_cutoff(np.zeros(0))
    with pytest.raises(InputError):
        knn_cutoff(np.array([0.1, np.nan, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]))
    for bad in ({"k": 0}, {"min_picks": 0}, {"smooth": -1}, {"max_fraction": 0.0}, {"max_fraction": 1.5}):
        with pytest.raises(ConfigError):
            knn_cutoff(s, **bad)


def test_otsu_cutoff_splits_two_clusters() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.3, 0.05, 3000), rng.normal(0.85, 0.02, 40)])
    cutoff = otsu_cutoff(scores)
    assert cutoff in scores  # the smallest kept score, so >= reproduces Otsu's >
    assert 0.45 < cutoff < 0.9
    assert otsu_cutoff(np.full(5, 2.0)) == 2.0
    with pytest.raises(InputError):
        otsu_cutoff(np.zeros(0))


# --------------------------------------------------------------------------------------- gmm_cutoff


def test_gmm_cutoff_symmetric_mixture_cuts_at_the_midpoint():
    """Equal weights and spreads: the posterior is 0.5 exactly halfway between the means (0 and 1), so the
    selection is every score above 0.5 (the returned cutoff is the lowest selected score)."""
    from cryomae.picking.threshold import gmm_cutoff

    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(0.0, 0.2, 5000), rng.normal(1.0, 0.2, 5000)])
    cut = gmm_cutoff(s)
    assert 0.47 < cut < 0.53  # the fitted means and spreads carry sampling error of about 0.01
    assert abs(int(np.sum(s >= cut)) - int(np.sum(s > 0.5))) <= 15


def test_gmm_cutoff_finds_a_small_particle_mode_otsu_misplaces():
    """900 broad background peaks and 100 narrow particles: the mixture cut sits at the particle mode's foot."""
    from cryomae.picking.threshold import gmm_cutoff

    rng = np.random.default_rng(1)
    bg = rng.normal(0.0, 0.05, 900)
    particles = rng.normal(0.3, 0.02, 100)
    s = np.concatenate([bg, particles])
    cut = gmm_cutoff(s)
    kept = s >= cut
    assert kept[900:].mean() > 0.97  # almost every particle kept
    assert kept[:900].mean() < 0.01  # almost no background


def test_gmm_cutoff_edge_cases():
    from cryomae.picking.threshold import gmm_cutoff

    assert gmm_cutoff(np.array([0.3, 0.3, 0.3])) == pytest.approx(0.3)
    assert gmm_cutoff(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.1)  # too few distinct scores: keep all
    with pytest.raises(InputError):
        gmm_cutoff(np.array([]))


def test_gmm_cutoff_lower_posterior_keeps_more():
    """A lower least-posterior moves the cut down into the overlap: more recall, never fewer picks."""
    from cryomae.picking.threshold import gmm_cutoff

    rng = np.random.default_rng(4)
    s = np.concatenate([rng.normal(0.0, 0.1, 2000), rng.normal(0.35, 0.1, 300)])
    strict, loose = gmm_cutoff(s, posterior_min=0.7), gmm_cutoff(s, posterior_min=0.3)
    assert loose < gmm_cutoff(s) < strict
    assert np.sum(s >= loose) > np.sum(s >= strict)


# ------------------------------------------------------------------------------ robust_cutoff, auto_cutoff


def test_robust_cutoff_by_hand():
    """Median 3, absolute deviations {2, 1, 0, 1, 7} -> MAD 1, robust sd 1.4826; z = 1 -> level 4.4826."""
    from cryomae.picking.threshold import robust_cutoff

    s = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    assert robust_cutoff(s, z=1.0) == pytest.approx(10.0)  # the lowest score at or above 4.4826
    assert robust_cutoff(s, z=0.0) == pytest.approx(3.0)  # the median itself
    assert robust_cutoff(np.full(5, 0.2)) == pytest.approx(0.2)  # no spread: keep all
    with pytest.raises(InputError):
        robust_cutoff(np.array([]))


def test_mixture_separation_is_ashmans_d():
    from cryomae.picking.threshold import Mixture

    mix = Mixture(means=(0.0, 2.0), sds=(1.0, 1.0), weights=(0.5, 0.5))
    assert mix.separation == pytest.approx(2.0)  # sqrt(2) * 2 / sqrt(2)


def test_auto_cutoff_uses_the_mixture_when_bimodal():
    from cryomae.picking.threshold import auto_cutoff, gmm_cutoff

    rng = np.random.default_rng(1)
    s = np.concatenate([rng.normal(0.0, 0.05, 900), rng.normal(0.3, 0.02, 100)])
    cut, rule = auto_cutoff(s)
    assert rule == "gmm"
    assert cut == pytest.approx(gmm_cutoff(s, 0.35))


def test_auto_cutoff_falls_back_when_the_mixture_does_not_describe_particles():
    """A heavy-tailed background (Student's t, 4 degrees of freedom) with 10% particles 2.5 units above it:
    the Gaussian mixture spends a component on the background's tails or keeps only the particles' top (no
    trustworthy particle mode), so its cut keeps far too much or too little; auto falls back to the robust cut."""
    from cryomae.picking.threshold import auto_cutoff, fit_mixture, gmm_cutoff, robust_cutoff

    def f1(cut: float, s: np.ndarray) -> float:
        kept = s >= cut
        return 2 * kept[900:].sum() / (kept.sum() + 100)

    auto_f1, gmm_f1 = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        s = np.concatenate([rng.standard_t(4, 900), rng.normal(2.5, 0.5, 100)])
        mix = fit_mixture(s)
        assert mix.separation < 1.5 or mix.weights[1] < 0.05
        cut, rule = auto_cutoff(s)
        assert rule == "robust"
        assert cut == pytest.approx(robust_cutoff(s, 1.25))
        auto_f1.append(f1(cut, s))
        gmm_f1.append(f1(gmm_cutoff(s, 0.35), s))
    assert min(auto_f1) > 0.6
    assert all(a > g for a, g in zip(auto_f1, gmm_f1, strict=True))
    assert sum(auto_f1) > 1.5 * sum(gmm_f1)


def test_auto_cutoff_distrusts_an_upper_mode_that_holds_most_candidates():
    """Background split in two (a low tail of 300 carbon-like candidates far below 600 ordinary ones) plus 100
    particles: the two-Gaussian fit spends its lower mode on the tail and puts the ordinary background and the
    particles together in its upper mode, whose cut keeps the whole background. Particles are a minority of the
    candidates, so auto refuses an upper mode holding more than half of them and cuts by the robust rule."""
    from cryomae.picking.threshold import auto_cutoff, fit_mixture, gmm_cutoff, robust_cutoff

    for seed in (3, 4, 5):
        rng = np.random.default_rng(seed)
        s = np.concatenate([rng.normal(-2.0, 0.15, 300), rng.normal(0.0, 0.1, 600), rng.normal(0.4, 0.05, 100)])
        mix = fit_mixture(s)
        assert mix.weights[1] > 0.5 and mix.separation >= 1.5
        assert np.sum(s[:900] >= gmm_cutoff(s, 0.35)) > 500  # the mixture's own cut keeps the background
        cut, rule = auto_cutoff(s, min_separation=1.5)  # the modes are apart enough: the weight alone decides
        assert rule == "robust"
        assert cut == pytest.approx(robust_cutoff(s, 1.25))
        kept = s >= cut
        assert kept[900:].mean() > 0.9 and kept[:900].sum() < 20
        cut_trusting, rule_trusting = auto_cutoff(s, min_separation=1.5, max_weight=1.0)
        assert rule_trusting == "gmm" and cut_trusting == pytest.approx(gmm_cutoff(s, 0.35))


def _micrograph(rng: np.random.Generator, background: int, particles: int) -> np.ndarray:
    """Candidate scores: background peaks about 0 and particles about 0.5 (the session's usual boundary)."""
    return np.concatenate([rng.normal(0.0, 0.1, background), rng.normal(0.5, 0.1, particles)])


def test_the_session_cutoff_follows_the_sessions_trusted_mixture_cuts():
    """Micrographs whose scores are clearly bimodal set their own cut and teach it to the session; a micrograph
    where the mixture is not trusted (here: so crowded that particles are most of the candidates) takes the median
    of those cuts instead of the robust cut, which assumes sparse particles and keeps only the best of them."""
    from cryomae.picking.threshold import SessionCutoff, auto_cutoff, robust_cutoff

    rng = np.random.default_rng(7)
    session = SessionCutoff()
    own = []
    for _ in range(3):
        s = _micrograph(rng, 700, 300)
        cut, rule = session.cut(s)
        assert rule == "gmm" and cut == pytest.approx(auto_cutoff(s)[0])
        own.append(cut)
    assert list(session.history) == own
    crowded = _micrograph(rng, 350, 650)
    assert auto_cutoff(crowded)[1] == "robust"  # on its own: an upper mode holding most candidates is distrusted
    cut, rule = session.cut(crowded)
    assert rule == "session" and cut == pytest.approx(float(np.median(own)))
    assert list(session.history) == own  # an untrusted micrograph teaches nothing
    f1 = {}
    for name, c in (("session", cut), ("robust", robust_cutoff(crowded, 1.25))):
        kept = crowded >= c
        f1[name] = 2 * kept[350:].sum() / (kept.sum() + 650)
    assert f1["session"] > 0.9 and f1["session"] > f1["robust"] + 0.2, f1


def test_a_new_session_starts_from_its_seed_or_else_cuts_each_micrograph_alone():
    from cryomae.picking.threshold import SESSION_HISTORY, SessionCutoff, robust_cutoff

    rng = np.random.default_rng(8)
    crowded = _micrograph(rng, 350, 650)
    assert SessionCutoff(seed=0.2).cut(crowded) == (0.2, "session")
    alone = SessionCutoff()
    assert alone.cut(crowded) == (pytest.approx(robust_cutoff(crowded, 1.25)), "robust")
    assert not alone.history
    assert SessionCutoff(seed=float("inf")).history == deque()  # no cutoff to start from (no candidates)
    full = SessionCutoff(seed=-1.0)
    for _ in range(SESSION_HISTORY + 5):
        full.cut(_micrograph(rng, 700, 300))
    assert len(full.history) == SESSION_HISTORY and -1.0 not in full.history  # the oldest forgotten


def test_a_micrograph_with_too_few_candidates_teaches_the_session_nothing():
    """Three candidates (a micrograph mostly carbon): nothing to fit; on its own all are kept, in a session it
    takes the session's cut, and the session's memory stays as it was."""
    from cryomae.picking.threshold import SessionCutoff, auto_cutoff

    few = np.array([0.1, 0.4, 0.9])
    assert auto_cutoff(few) == (0.1, "few")
    session = SessionCutoff(seed=0.3)
    assert session.cut(few) == (0.3, "session")
    assert list(session.history) == [0.3]
    assert SessionCutoff().cut(few) == (0.1, "few")
