"""An operator's marks hold on the micrographs they were made on (``cryomae.picking.marks``): a pick marked wrong is
gone at any cutoff, a particle marked missed is picked at any cutoff that picks anything, elsewhere nothing changes."""

from __future__ import annotations

import json

import numpy as np

from cryomae.picking.marks import (
    MicrographMarks,
    honour_marks,
    marks_by_micrograph,
    marks_for_manifest,
    marks_from_manifest,
    marks_on,
)
from cryomae.picking.picker import PickResult

D = 20.0  # particle diameter, pixels


def _result(xy: list[list[float]], scores: list[float], threshold: float) -> PickResult:
    return PickResult(np.array(xy, dtype=np.float64).reshape(-1, 2), np.array(scores), threshold, 0, 0)


def test_a_wrong_mark_drops_the_pick_and_a_missed_mark_is_picked_at_the_top() -> None:
    result = _result([[100, 100], [200, 200], [300, 300], [400, 400]], [0.9, 0.8, 0.3, 0.2], threshold=0.5)
    marks = MicrographMarks(
        missed=np.array([[303.0, 298.0], [50.0, 60.0]]),  # one on a candidate below the cut, one on nothing
        wrong=np.array([[104.0, 97.0]]),  # a click a few pixels off the best pick
    )
    out, counts = honour_marks(result, marks, D)
    assert counts == {"dropped": 1, "added": 2}
    # the wrong pick is no candidate at all: no cutoff brings it back
    assert np.min(np.linalg.norm(out.candidates_xy - [104.0, 97.0], axis=1)) > D / 2
    # the missed particles are picks at their marked centres, scored as the best candidate; the candidate below
    # the cut beside the first one is the same particle and gives way to it
    picked = {tuple(p) for p in out.xy}
    assert {(303.0, 298.0), (50.0, 60.0)} <= picked and (300.0, 300.0) not in {tuple(p) for p in out.candidates_xy}
    assert np.all(out.candidate_scores[:2] == 0.8) and out.threshold == 0.5
    # the rest as the model scored it, still in descending score
    assert {(200.0, 200.0), (400.0, 400.0)} <= {tuple(p) for p in out.candidates_xy}
    assert np.all(np.diff(out.candidate_scores) <= 0)
    assert len(out.xy) == 3  # 2 marked + the pick at (200, 200)


def test_a_mark_just_beyond_half_a_diameter_leaves_the_pick() -> None:
    result = _result([[100, 100]], [0.9], threshold=0.5)
    out, counts = honour_marks(result, MicrographMarks(np.zeros((0, 2)), np.array([[100.0 + D / 2 + 0.5, 100.0]])), D)
    assert counts["dropped"] == 0 and len(out.xy) == 1


def test_a_missed_mark_is_picked_above_a_cutoff_higher_than_every_score() -> None:
    # every candidate below the cut (a micrograph the model found empty): the marked particle is still picked
    result = _result([[100, 100]], [0.2], threshold=0.6)
    out, _ = honour_marks(result, MicrographMarks(np.array([[300.0, 300.0]]), np.zeros((0, 2))), D)
    assert [tuple(p) for p in out.xy] == [(300.0, 300.0)]
    # no candidate at all (the cutoff infinite): the marked particle is the one pick
    empty = _result([], [], threshold=float("inf"))
    out, _ = honour_marks(empty, MicrographMarks(np.array([[300.0, 300.0]]), np.zeros((0, 2))), D)
    assert [tuple(p) for p in out.xy] == [(300.0, 300.0)]


def test_no_marks_change_nothing() -> None:
    result = _result([[100, 100], [200, 200]], [0.9, 0.1], threshold=0.5)
    for marks in (None, MicrographMarks(np.zeros((0, 2)), np.zeros((0, 2)))):
        out, counts = honour_marks(result, marks, D)
        assert out is result and counts == {"dropped": 0, "added": 0}


def test_marks_are_kept_in_the_manifest_by_micrograph_and_merged_over_rounds() -> None:
    merged = marks_by_micrograph(
        ["/data/a.mrc", "/data/b.mrc", None, "/data/a.mrc"],
        [np.array([[1.0, 2.0]]), np.zeros((0, 2)), np.array([[9.0, 9.0]]), np.array([[5.0, 6.0]])],
        [np.zeros((0, 2)), np.array([[3.0, 4.0]]), np.zeros((0, 2)), np.array([[7.0, 8.0]])],
    )
    assert sorted(merged) == ["/data/a.mrc", "/data/b.mrc"]  # marks without a micrograph path are left out
    manifest = json.loads(json.dumps({"operator_marks": marks_for_manifest(merged)}))  # as written and read
    back = marks_from_manifest(manifest)
    np.testing.assert_array_equal(back["/data/a.mrc"].missed, [[1.0, 2.0], [5.0, 6.0]])
    np.testing.assert_array_equal(back["/data/a.mrc"].wrong, [[7.0, 8.0]])
    np.testing.assert_array_equal(back["/data/b.mrc"].wrong, [[3.0, 4.0]])
    assert back["/data/b.mrc"].missed.shape == (0, 2)
    assert marks_from_manifest({}) == {}  # a model trained without corrections


def test_the_picker_reads_the_marks_of_the_one_micrograph_it_picks() -> None:
    manifest = {"operator_marks": {"/data/a.mrc": {"missed": [[1.0, 2.0]], "wrong": []}}}
    on_a = marks_on(manifest, "/data/a.mrc")
    assert on_a is not None
    np.testing.assert_array_equal(on_a.missed, [[1.0, 2.0]])
    assert on_a.wrong.shape == (0, 2)
    assert marks_on(manifest, "/data/b.mrc") is None and marks_on({}, "/data/a.mrc") is None
