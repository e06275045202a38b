"""Tests of duplicate suppression on score maps and point sets, and of sub-cell peak refinement."""

from __future__ import annotations

import numpy as np
import pytest

from cryomae.errors import ConfigError, InputError
from cryomae.picking.nms import peak_nms, point_nms, refine_peaks


def _map_with(peaks: dict[tuple[int, int], float], shape: tuple[int, int] = (30, 30)) -> np.ndarray:
    """Isolated peaks on a zero background (a flat background is itself a plateau maximum: tests pass
    ``threshold=T`` to leave it out)."""
    m = np.zeros(shape)
    for (r, c), v in peaks.items():
        m[r, c] = v
    return m


T = 0.1


def test_close_peaks_keep_the_higher() -> None:
    m = _map_with({(10, 10): 1.0, (10, 13): 0.8})  # 3 cells apart
    rc, s = peak_nms(m, min_distance_px=4.0, threshold=T)
    assert rc.tolist() == [[10, 10]]
    assert s.tolist() == [1.0]
    # The lower peak first in raster order makes no difference.
    m = _map_with({(10, 10): 0.8, (10, 13): 1.0})
    assert peak_nms(m, 4.0, threshold=T)[0].tolist() == [[10, 13]]


def test_far_peaks_both_survive_in_score_order() -> None:
    m = _map_with({(5, 5): 0.7, (20, 5): 0.9, (5, 25): 0.8})
    rc, s = peak_nms(m, min_distance_px=4.0, threshold=T)
    assert rc.tolist() == [[20, 5], [5, 25], [5, 5]]
    assert s.tolist() == [0.9, 0.8, 0.7]
    assert rc.dtype.kind == "i"


def test_distance_is_euclidean_and_inclusive() -> None:
    # (3, 4) apart = 5 cells: suppressed at min_distance 5, kept at 4.9.
    m = _map_with({(10, 10): 1.0, (13, 14): 0.5})
    assert len(peak_nms(m, 5.0, threshold=T)[0]) == 1
    assert len(peak_nms(m, 4.9, threshold=T)[0]) == 2


def test_suppression_among_candidates_is_greedy() -> None:
    # Three peaks in a row, 3 cells apart. At distance 2.5 none is within reach of another: all stay.
    # At 3.0 the middle one is suppressed by the left one; the right one is 6 from the left and survives,
    # although the (suppressed) middle peak next to it is higher: only kept peaks suppress.
    m = _map_with({(10, 4): 1.0, (10, 7): 0.9, (10, 10): 0.8})
    assert len(peak_nms(m, 2.5, threshold=T)[0]) == 3
    rc, _ = peak_nms(m, 3.0, threshold=T)
    assert rc.tolist() == [[10, 4], [10, 10]]


def test_plateau_gives_one_peak_at_its_centre() -> None:
    m = np.zeros((20, 20))
    m[8:11, 8:11] = 2.0  # 3 x 3 plateau centred on (9, 9)
    for dist in (0.5, 1.0, 2.0, 6.0):
        rc, s = peak_nms(m, dist, threshold=T)
        assert rc.tolist() == [[9, 9]], dist
        assert s.tolist() == [2.0]
    # A 1 x 2 plateau: both cells are equally central; the first in raster order is returned.
    m = _map_with({(4, 4): 1.0, (4, 5): 1.0}, shape=(10, 10))
    assert peak_nms(m, 1.0, threshold=T)[0].tolist() == [[4, 4]]
    # A plateau wider than the distance still yields one peak.
    m = np.zeros((20, 20))
    m[5, 2:15] = 1.0
    assert peak_nms(m, 2.0, threshold=T)[0].tolist() == [[5, 8]]


def test_threshold_and_border() -> None:
    m = _map_with({(0, 10): 1.0, (10, 10): 0.6, (20, 20): 0.3})
    rc, _ = peak_nms(m, 3.0, threshold=0.5)
    assert rc.tolist() == [[0, 10], [10, 10]]
    rc, _ = peak_nms(m, 3.0, threshold=0.5, exclude_border=True)
    assert rc.tolist() == [[10, 10]]


def test_nan_cells_and_empty_maps() -> None:
    m = _map_with({(3, 3): 1.0}, shape=(8, 8))
    m[6, 6] = np.nan
    assert peak_nms(m, 2.0, threshold=T)[0].tolist() == [[3, 3]]
    rc, s = peak_nms(np.full((5, 5), np.nan), 2.0)
    assert rc.shape == (0, 2) and s.shape == (0,)
    rc, s = peak_nms(np.zeros((4, 4)), 1.0, threshold=1.0)
    assert rc.shape == (0, 2) and s.shape == (0,)
    with pytest.raises(InputError):
        peak_nms(np.zeros(5), 1.0)
    with pytest.raises(ConfigError):
        peak_nms(np.zeros((4, 4)), -1.0)


def test_smooth_blobs_give_one_peak_each() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    centres = [(10, 12), (30, 40), (50, 20)]
    m = sum(np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 3.0**2)) for r, c in centres)
    m = np.asarray(m) + 0.01 * np.random.default_rng(0).normal(size=m.shape)
    rc, _ = peak_nms(m, 6.0, threshold=0.5)
    assert sorted(map(tuple, rc.tolist())) == sorted(centres)


def test_refine_parabola_by_hand() -> None:
    m = np.zeros((5, 5))
    m[2, 1:4] = [1.0, 3.0, 2.0]  # along x: offset = (1 - 2) / (2 (1 - 6 + 2)) = 1/6
    m[1, 2], m[3, 2] = 1.0, 1.0  # along y: symmetric -> 0
    out = refine_peaks(m, np.array([[2, 2]]))
    np.testing.assert_allclose(out, [[2.0, 2.0 + 1.0 / 6.0]])
    assert out[0, 1] == pytest.approx(2.1667, abs=1e-4)


def test_refine_clamps_and_leaves_borders() -> None:
    m = np.zeros((5, 5))
    m[2, 1:4] = [1.0, 3.0, 4.0]  # not a maximum along x: (1 - 4) / (2 (1 - 6 + 4)) = 1.5 -> clamped to 0.5
    m[1, 2], m[3, 2] = 2.0, 4.0  # along y: curvature 2 - 6 + 4 = 0 -> no curvature, offset 0
    np.testing.assert_allclose(refine_peaks(m, np.array([[2, 2]])), [[2.0, 2.5]])
    m = np.zeros((5, 5))
    m[0, 0:2] = [3.0, 1.0]
    np.testing.assert_allclose(refine_peaks(m, np.array([[0, 0]])), [[0.0, 0.0]])  # corner: unchanged
    m[4, 3:5] = [1.0, 3.0]
    np.testing.assert_allclose(refine_peaks(m, np.array([[4, 4], [0, 0]])), [[4.0, 4.0], [0.0, 0.0]])
    assert refine_peaks(m, np.zeros((0, 2), dtype=int)).shape == (0, 2)
    with pytest.raises(InputError):
        refine_peaks(m, np.array([[5, 0]]))


def test_refine_recovers_a_subcell_centre() -> None:
    yy, xx = np.mgrid[0:21, 0:21]
    m = -((yy - 10.3) ** 2) - (xx - 9.8) ** 2  # a paraboloid: refinement is exact
    rc, _ = peak_nms(m, 3.0)
    np.testing.assert_allclose(refine_peaks(m, rc), [[10.3, 9.8]], atol=1e-9)


def test_point_nms_by_hand() -> None:
    # Points on a line at x = 0, 3, 6 with scores 1.0, 0.9, 0.8 and distance 4: 3 is within 4 of 0 and
    # dropped; 6 is 6 from 0 (its only neighbour, 3, was dropped, so it suppresses nothing) and kept.
    xy = np.array([[0.0, 0.0], [3.0, 0.0], [6.0, 0.0]])
    assert point_nms(xy, np.array([1.0, 0.9, 0.8]), 4.0).tolist() == [0, 2]
    # The middle point strongest: it suppresses both ends.
    assert point_nms(xy, np.array([0.5, 0.9, 0.8]), 4.0).tolist() == [1]
    # Survivors come back in descending score order; distance is inclusive.
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 4.0]])
    assert point_nms(xy, np.array([0.1, 0.5, 0.9]), 4.0).tolist() == [2, 0]
    assert point_nms(xy, np.array([0.1, 0.5, 0.9]), 3.9).tolist() == [2, 1, 0]
    assert point_nms(np.zeros((0, 2)), np.zeros(0), 4.0).tolist() == []
    with pytest.raises(InputError):
        point_nms(xy, np.array([1.0]), 4.0)
