"""Tests of the paper's scoring rule: box IoU, one-to-one matching, P/R/F1, AP and the evaluation table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryomae.errors import ConfigError
from cryomae.evaluation import (
    Evaluation,
    Score,
    average_precision,
    box_iou,
    evaluate,
    match_picks,
    score_micrograph,
)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        ((2.0, 0.0), 80.0 / 120.0),  # overlap 8 x 10 = 80; union 100 + 100 - 80 = 120
        ((5.0, 0.0), 50.0 / 150.0),  # overlap 5 x 10 = 50; union 150
        ((3.0, 4.0), 42.0 / 158.0),  # overlap 7 x 6 = 42; union 200 - 42 = 158 -> 0.2658
        ((0.0, 0.0), 1.0),
        ((10.0, 0.0), 0.0),  # touching edges: no area
        ((-12.0, 3.0), 0.0),
    ],
)
def test_box_iou_hand_values(offset: tuple[float, float], expected: float) -> None:
    iou = box_iou(np.array([[50.0, 50.0]]), np.array([[50.0 + offset[0], 50.0 + offset[1]]]), 10.0)
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(expected)


def test_box_iou_shape_and_symmetry() -> None:
    a = np.array([[0.0, 0.0], [2.0, 0.0], [30.0, 30.0]])
    b = np.array([[0.0, 0.0], [3.0, 4.0]])
    iou = box_iou(a, b, 10.0)
    assert iou.shape == (3, 2)
    np.testing.assert_allclose(iou, box_iou(b, a, 10.0).T)
    assert iou[1, 0] == pytest.approx(80 / 120)
    assert iou[2].tolist() == [0.0, 0.0]
    assert box_iou(np.zeros((0, 2)), b, 10.0).shape == (0, 2)


def test_two_picks_on_one_particle_higher_score_wins() -> None:
    truth = np.array([[100.0, 100.0]])
    picks = np.array([[101.0, 100.0], [100.0, 100.0]])  # both overlap the box with IoU >= 0.5
    flags = match_picks(picks, np.array([0.5, 0.9]), truth, diameter=20.0)
    assert flags.tolist() == [False, True]
    # Without scores the input order decides.
    assert match_picks(picks, None, truth, diameter=20.0).tolist() == [True, False]
    # Equal scores fall back to input order too.
    assert match_picks(picks, np.array([0.7, 0.7]), truth, diameter=20.0).tolist() == [True, False]


def test_pick_takes_its_best_unmatched_box_greedily() -> None:
    # Boxes of side 10. Pick A (score 0.9) at x=4 overlaps truth T0 at x=0 (IoU 60/140 < 0.5) and T1 at x=6
    # (IoU 80/120); it takes T1. Pick B (0.8) at x=7 overlaps T1 (IoU 90/110) but T1 is taken, and T0 at
    # distance 7 has IoU 30/170: B is a false positive.
    truth = np.array([[0.0, 0.0], [6.0, 0.0]])
    picks = np.array([[4.0, 0.0], [7.0, 0.0]])
    assert match_picks(picks, np.array([0.9, 0.8]), truth, 10.0).tolist() == [True, False]
    # Reversing the scores: B takes T1, A then takes nothing (T0 at IoU 0.43 is under the threshold).
    assert match_picks(picks, np.array([0.8, 0.9]), truth, 10.0).tolist() == [False, True]
    # A lower threshold lets A take T0.
    assert match_picks(picks, np.array([0.8, 0.9]), truth, 10.0, iou_threshold=0.4).tolist() == [True, True]


def test_iou_threshold_is_inclusive() -> None:
    # Side 12, offset 4: overlap 8 x 12 = 96, union 288 - 96 = 192 -> IoU exactly 0.5.
    assert match_picks(np.array([[4.0, 0.0]]), None, np.array([[0.0, 0.0]]), 12.0).tolist() == [True]
    assert match_picks(np.array([[4.01, 0.0]]), None, np.array([[0.0, 0.0]]), 12.0).tolist() == [False]
    # Side 10, offset 10/3 is IoU 0.5 too, but 10/3 is not exact in binary: still counted.
    assert match_picks(np.array([[10.0 / 3.0, 0.0]]), None, np.array([[0.0, 0.0]]), 10.0).tolist() == [True]


def _reference_match(picks: np.ndarray, scores: np.ndarray, truth: np.ndarray, size: float) -> np.ndarray:
    """Brute-force greedy matching, written independently of the library."""
    iou = box_iou(picks, truth, size)
    taken = np.zeros(len(truth), dtype=bool)
    out = np.zeros(len(picks), dtype=bool)
    for p in np.argsort(-scores, kind="stable"):
        row = np.where(taken, -1.0, iou[p])
        if len(row) and row.max() >= 0.5:
            j = int(np.argmax(row))
            taken[j] = True
            out[p] = True
    return out


def test_matching_agrees_with_brute_force() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 300, size=(60, 2))
    picks = np.concatenate([truth + rng.normal(0, 4, size=truth.shape), rng.uniform(0, 300, size=(80, 2))])
    scores = rng.uniform(size=len(picks))
    np.testing.assert_array_equal(match_picks(picks, scores, truth, 20.0), _reference_match(picks, scores, truth, 20.0))


def test_matching_a_crowded_micrograph_gives_one_true_pick_per_particle_at_most() -> None:
    """10,000 picks on 1,000 particles (three near each, the rest anywhere); its speed is measured in
    tests/benchmarks/speed.py --matching, not here."""
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 4000, size=(1000, 2))
    picks = np.concatenate([truth + rng.normal(0, 5, size=truth.shape)] * 3 + [rng.uniform(0, 4000, (7000, 2))])
    scores = rng.uniform(size=len(picks))
    flags = match_picks(picks, scores, truth, diameter=100.0)
    assert len(flags) == 10_000
    assert 900 <= flags.sum() <= 1000  # one TP per particle at most


def test_score_ratios_worked_example() -> None:
    s = Score(tp=3, n_picks=5, n_truth=4)
    assert s.precision == pytest.approx(0.6)
    assert s.recall == pytest.approx(0.75)
    assert s.f1 == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))  # = 6 / 9
    assert s.f1 == pytest.approx(2 / 3)
    d = s.to_dict()
    assert d["tp"] == 3 and d["n_picks"] == 5 and d["n_truth"] == 4
    assert d["f1"] == pytest.approx(2 / 3)


def test_empty_inputs_give_zero_not_nan() -> None:
    for s in (Score(0, 0, 0), Score(0, 0, 5), Score(0, 7, 0)):
        assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)
    s = score_micrograph(np.zeros((0, 2)), None, np.array([[10.0, 10.0]]), 20.0)
    assert (s.tp, s.n_picks, s.n_truth, s.recall) == (0, 0, 1, 0.0)
    s = score_micrograph(np.array([[10.0, 10.0]]), np.array([1.0]), np.zeros((0, 2)), 20.0)
    assert (s.tp, s.n_picks, s.n_truth, s.precision) == (0, 1, 0, 0.0)
    assert average_precision([], 3) == 0.0
    assert average_precision([(np.zeros(0, bool), np.zeros(0))], 3) == 0.0
    assert average_precision([(np.array([True]), np.array([1.0]))], 0) == 0.0


def test_score_micrograph_counts() -> None:
    truth = np.array([[50.0, 50.0], [150.0, 50.0], [250.0, 50.0], [350.0, 50.0]])
    picks = np.array([[51.0, 50.0], [149.0, 52.0], [50.0, 49.0], [250.0, 150.0], [352.0, 50.0]])
    s = score_micrograph(picks, np.array([0.9, 0.8, 0.7, 0.6, 0.5]), truth, 20.0)
    # TPs: pick 0 -> T0, pick 1 -> T1, pick 4 -> T3; pick 2 duplicates T0, pick 3 is on nothing.
    assert (s.tp, s.n_picks, s.n_truth) == (3, 5, 4)
    assert s.f1 == pytest.approx(2 / 3)


def test_average_precision_hand_ranking() -> None:
    # Ranked TP, FP, TP with 3 particles: (1/1 * 1 + 2/3 * 1) / 3 = 0.5556.
    flags = np.array([True, False, True])
    ap = average_precision([(flags, np.array([0.9, 0.8, 0.7]))], 3)
    assert ap == pytest.approx((1.0 + 2.0 / 3.0) / 3.0)
    assert ap == pytest.approx(0.5556, abs=1e-4)


def test_average_precision_pools_and_ranks_across_micrographs() -> None:
    # Pooled ranking: A 0.9 TP, B 0.7 TP, A 0.5 FP -> (1 + 2/2) / 3 = 0.6667.
    per = [(np.array([True, False]), np.array([0.9, 0.5])), (np.array([True]), np.array([0.7]))]
    assert average_precision(per, 3) == pytest.approx(2.0 / 3.0)
    # A perfect ranking that finds every particle scores 1.
    assert average_precision([(np.array([True, True, False]), np.array([3.0, 2.0, 1.0]))], 2) == 1.0


def test_evaluate_pools_micrographs_and_reports() -> None:
    truth = {
        "mic_a": np.array([[50.0, 50.0], [150.0, 50.0]]),
        "mic_b": np.array([[80.0, 80.0]]),
        "mic_c": np.array([[10.0, 10.0], [90.0, 90.0]]),  # no picks at all: both missed
    }
    picks: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "mic_a": (np.array([[50.0, 51.0], [300.0, 300.0]]), np.array([0.9, 0.4])),
        "mic_b": (np.array([[81.0, 80.0]]), np.array([0.6])),
    }
    ev = evaluate(picks, truth, diameter=20.0)
    assert isinstance(ev, Evaluation)
    assert list(ev.per_micrograph) == ["mic_a", "mic_b", "mic_c"]
    assert ev.per_micrograph["mic_a"] == Score(1, 2, 2)
    assert ev.per_micrograph["mic_b"] == Score(1, 1, 1)
    assert ev.per_micrograph["mic_c"] == Score(0, 0, 2)
    assert ev.pooled == Score(2, 3, 5)
    # Ranked: 0.9 TP, 0.6 TP, 0.4 FP with 5 particles -> (1 + 1) / 5.
    assert ev.average_precision == pytest.approx(0.4)

    d = json.loads(json.dumps(ev.to_dict()))
    assert d["pooled"]["tp"] == 2 and d["per_micrograph"]["mic_c"]["n_truth"] == 2
    table = ev.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["micrograph", "picks", "truth", "TP", "prec", "recall", "F1"]
    assert any(line.startswith("mic_c") and line.split()[1:4] == ["0", "2", "0"] for line in lines)
    pooled_row = next(line for line in lines if line.startswith("pooled"))
    assert pooled_row.split()[1:] == ["3", "5", "2", "0.667", "0.400", "0.500"]
    assert "average precision: 0.400" in table


def test_evaluate_rejects_picks_without_truth() -> None:
    with pytest.raises(ConfigError, match="mic_x"):
        evaluate({"mic_x": (np.array([[1.0, 1.0]]), None)}, {"mic_a": np.zeros((0, 2))}, 20.0)


def test_evaluate_without_scores_has_no_ap() -> None:
    ev = evaluate({"m": (np.array([[5.0, 5.0]]), None)}, {"m": np.array([[5.0, 5.0]])}, 10.0)
    assert ev.pooled == Score(1, 1, 1)
    assert ev.average_precision is None
    assert ev.to_dict()["average_precision"] is None
    assert "n/a" in ev.format_table()


def test_bad_parameters_raise() -> None:
    with pytest.raises(ConfigError):
        match_picks(np.zeros((1, 2)), None, np.zeros((1, 2)), diameter=0.0)
    with pytest.raises(ConfigError):
        match_picks(np.zeros((1, 2)), None, np.zeros((1, 2)), diameter=10.0, iou_threshold=0.0)
