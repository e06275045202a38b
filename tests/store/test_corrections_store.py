"""An operator's corrections stored as an exemplar set: on top of the current set, merged with earlier corrections,
checked like exemplars (data roots, inside the image, no two marks on one particle), and read back for training
only while the micrographs are unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cryomae.errors import InputError
from cryomae.io import Coordinates, write_coordinates, write_mrc
from cryomae.io.coordinates import Corrections
from cryomae.store.projects import DUPLICATE_FRACTION, ProjectStore

DIAMETER = 20.0


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ProjectStore, Path, list[Path], str]:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    mics = []
    for i in range(3):
        mics.append(data / f"mic_{i}.mrc")
        write_mrc(mics[-1], rng.normal(size=(100, 120)).astype(np.float32))
    store = ProjectStore(tmp_path / "store")
    store.create_project("p", DIAMETER)
    coords = tmp_path / "ex.star"
    write_coordinates(coords, Coordinates(np.array([[30.0, 40.0], [60.0, 50.0]])))
    base = store.add_exemplars("p", mics[0], coords, roots=[data])
    return store, data, mics, base.id


def _marks(mics: list[Path], rows: list[tuple[int, float, float, bool]]) -> Corrections:
    return Corrections(
        [str(mics[i]) for i, *_ in rows], np.array([[x, y] for _, x, y, _ in rows]), np.array([f for *_, f in rows])
    )


def test_corrections_become_a_set_on_the_current_one(setup, tmp_path: Path) -> None:
    store, data, mics, base = setup
    marks = _marks(mics, [(1, 10.0, 20.0, True), (1, 50.0, 50.0, False), (2, 70.0, 30.0, False)])
    exset, counts = store.add_corrections("p", base, marks, tmp_path / "corrections.star", roots=[data])
    assert counts == {"added": 3, "already": 0, "replaced": 0}
    assert (exset.base, exset.missed, exset.wrong) == (base, 1, 2)
    assert [c.path for c in exset.corrections] == [mics[1], mics[2]]
    first = store.exemplar_set("p", base)
    again = store.exemplar_set("p", exset.id)  # as stored
    assert again == exset
    assert (again.micrograph, again.diameter) == (first.micrograph, first.diameter)
    np.testing.assert_allclose(again.coordinates().xy, first.coordinates().xy)  # the reference's exemplars, kept
    inputs = again.read_corrections(roots=[data])
    assert [i.micrograph.path for i in inputs] == [mics[1], mics[2]]
    np.testing.assert_allclose(inputs[0].missed, [[10.0, 20.0]])
    np.testing.assert_allclose(inputs[0].wrong, [[50.0, 50.0]])
    assert inputs[1].missed.shape == (0, 2)
    assert store.current_exemplar_set("p").id == exset.id  # no model yet: the newest set


def test_a_second_round_keeps_the_first_and_skips_what_it_repeats(setup, tmp_path: Path) -> None:
    store, data, mics, base = setup
    src = tmp_path / "corrections.star"
    first, _ = store.add_corrections(
        "p", base, _marks(mics, [(1, 10.0, 20.0, True), (1, 50.0, 50.0, False)]), src, roots=[data]
    )
    # the page still holds the first marks: they come again with the new ones; one is turned round
    again = _marks(mics, [(1, 10.5, 20.0, True), (1, 51.0, 50.0, True), (2, 5.0, 5.0, False)])
    second, counts = store.add_corrections("p", first.id, again, src, roots=[data])
    assert counts == {"added": 1, "already": 1, "replaced": 1}
    assert (second.base, second.missed, second.wrong) == (first.id, 2, 1)
    with pytest.raises(InputError, match="nothing new: every mark is already in exemplar set"):
        store.add_corrections("p", second.id, again, src, roots=[data])
    # a micrograph only the earlier set marked keeps its record, even once gone from disk (training refuses it then)
    os.remove(mics[1])
    third, _ = store.add_corrections("p", second.id, _marks(mics, [(2, 60.0, 60.0, True)]), src, roots=[data])
    assert [c for c in third.corrections if c.path == mics[1]] == [c for c in second.corrections if c.path == mics[1]]
    with pytest.raises(InputError, match="no longer exists"):
        third.read_corrections(roots=[data])


def test_bad_corrections_are_refused_with_the_reason(setup, tmp_path: Path) -> None:
    store, data, mics, base = setup
    src = tmp_path / "corrections.star"
    outside = tmp_path / "elsewhere.mrc"
    write_mrc(outside, np.zeros((100, 120), np.float32))
    cases = [
        (_marks([outside], [(0, 10.0, 10.0, True)]), "outside the configured data roots"),
        (_marks(mics, [(1, 130.0, 10.0, True)]), "outside the 120x100 image"),
        (
            _marks(mics, [(1, 10.0, 10.0, True), (1, 10.0 + DUPLICATE_FRACTION * DIAMETER / 2, 10.0, False)]),
            "mark the same particle",
        ),
        (Corrections([str(data / "gone.mrc")], np.array([[1.0, 1.0]]), np.array([True])), "cannot be read"),
    ]
    for marks, problem in cases:
        with pytest.raises(InputError, match=problem):
            store.add_corrections("p", base, marks, src, roots=[data])
    assert [s.id for s in store.exemplar_sets("p")] == [base]  # nothing stored


def test_a_changed_micrograph_is_not_trained_on(setup, tmp_path: Path) -> None:
    store, data, mics, base = setup
    exset, _ = store.add_corrections(
        "p", base, _marks(mics, [(2, 10.0, 20.0, True)]), tmp_path / "c.star", roots=[data]
    )
    write_mrc(mics[2], np.ones((100, 120), np.float32))
    with pytest.raises(InputError, match="changed since its corrections were stored"):
        exset.read_corrections(roots=[data])
    os.remove(mics[2])
    with pytest.raises(InputError, match="no longer exists"):
        exset.read_corrections(roots=[data])
