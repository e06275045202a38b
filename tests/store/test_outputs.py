"""Tests of the writer's per-session outputs: real STAR files in tmp_path, read back with ``starfile.read``.

Covered: files, rows and index of new micrographs; redeliveries and re-picks replace rows (never duplicate);
appends leave particles.star in place; re-thresholds up, down and back to the picker's cutoff; repair of a
torn last line and of a crash between the state and the STAR files; bad input named and nothing lost; a
micrograph with no picks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryomae.errors import InputError
from cryomae.io.writers import AUTOPICK_SUFFIX, VERSION_LABEL
from cryomae.io.writers import SESSION_PARTICLE_COLUMNS as PARTICLE_COLUMNS
from cryomae.messages import PicksReady
from cryomae.store import outputs
from cryomae.store.outputs import SessionOutputs

AUTOPICK_COLUMNS = ["rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit", "rlnAnglePsi"]
MIC_A = "/data/grid1/FoilHole_1_Data_1.mrc"
MIC_B = "/data/grid1/FoilHole_2_Data_1.mrc"
SHAPE = (1000, 800)  # rows, columns


class Clock:
    """A clock the test moves by hand, so latencies are exact."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def picks(
    micrograph: str,
    scores: list[float],
    *,
    threshold: float = 0.5,
    version: str = "v1",
    picked_at: float = 990.0,
    session: str = "s1",
    xy: list[tuple[float, float]] | None = None,
) -> PicksReady:
    """A PicksReady with one candidate per score, at distinct places inside a 800x1000 micrograph."""
    if xy is None:
        xy = [(10.0 + 20.5 * i, 700.25 - 15.0 * i) for i in range(len(scores))]
    return PicksReady(
        project="proj",
        session=session,
        micrograph=micrograph,
        micrograph_id="m-" + Path(micrograph).stem,
        model_version=version,
        diameter=20.0,
        threshold=threshold,
        x=[p[0] for p in xy],
        y=[p[1] for p in xy],
        scores=scores,
        shape=SHAPE,
        complete_at=980.0,
        picked_at=picked_at,
    )


def read_particles(out: SessionOutputs) -> pd.DataFrame:
    table = starfile.read(out.particles_path, always_dict=True)["particles"]
    assert list(table.columns) == list(PARTICLE_COLUMNS)
    return table


def read_index(out: SessionOutputs) -> pd.DataFrame:
    table = starfile.read(out.index_path, always_dict=True)["coordinate_files"]
    assert list(table.columns) == ["rlnMicrographName", "rlnMicrographCoordinates"]
    return table


def read_autopick(path: Path) -> pd.DataFrame:
    table = starfile.read(path, always_dict=True)[""]
    assert list(table.columns) == AUTOPICK_COLUMNS
    return table


def star_files(out: SessionOutputs) -> dict[str, bytes]:
    """Every STAR file of the session by name, with its bytes."""
    files = [out.index_path, out.particles_path, *out.coordinates_dir.iterdir()]
    return {p.name: p.read_bytes() for p in files if p.exists()}


def per_micrograph(table: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in table.groupby("rlnMicrographName").size().items()}


# ------------------------------------------------------------------------------------------------ writing


def test_two_micrographs_give_files_rows_and_index(tmp_path: Path) -> None:
    clock = Clock()
    out = SessionOutputs(tmp_path / "proj" / "s1", clock=clock)
    a = out.apply(picks(MIC_A, [0.9, 0.2, 0.6]))
    clock.now = 1002.5
    b = out.apply(picks(MIC_B, [0.55, 0.7], version="v1"))

    assert (a.outcome, a.rows, a.previous_rows, a.candidates, a.threshold) == ("new", 2, 0, 3, 0.5)
    assert a.latency_s == pytest.approx(20.0) and b.latency_s == pytest.approx(22.5)
    assert not a.replaced and not a.particles_rewritten
    assert a.coordinate_file == out.coordinates_dir / f"FoilHole_1_Data_1{AUTOPICK_SUFFIX}"

    coords = read_autopick(a.coordinate_file)  # picks above 0.5 in candidate order, class 0, psi 0
    np.testing.assert_allclose(coords["rlnCoordinateX"], [10.0, 51.0])
    np.testing.assert_allclose(coords["rlnCoordinateY"], [700.25, 670.25])
    np.testing.assert_allclose(coords["rlnAutopickFigureOfMerit"], [0.9, 0.6])
    assert (coords["rlnClassNumber"] == 0).all() and (coords["rlnAnglePsi"] == 0.0).all()
    assert len(read_autopick(b.coordinate_file)) == 2

    index = read_index(out)
    assert list(index["rlnMicrographName"]) == [MIC_A, MIC_B]  # exactly as the picker named them
    assert list(index["rlnMicrographCoordinates"]) == [str(a.coordinate_file), str(b.coordinate_file)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in index["rlnMicrographCoordinates"])

    particles = read_particles(out)
    assert list(particles["rlnMicrographName"]) == [MIC_A, MIC_A, MIC_B, MIC_B]
    np.testing.assert_allclose(particles["rlnAutopickFigureOfMerit"], [0.9, 0.6, 0.55, 0.7])
    np.testing.assert_allclose(particles["rlnCoordinateX"], [10.0, 51.0, 10.0, 30.5])
    assert set(particles[VERSION_LABEL]) == {"v1"}

    counts = out.counts()
    assert (counts.micrographs, counts.particles, counts.candidates, counts.threshold) == (2, 4, 5, None)
    entries = out.micrographs()
    listed = [(e.micrograph, e.name, e.particles, e.candidates) for e in entries]
    assert listed == [(MIC_A, MIC_A, 2, 3), (MIC_B, MIC_B, 2, 2)]
    assert entries[1].applied_at == 1002.5 and entries[0].message_id != entries[1].message_id


def test_redelivery_writes_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    msg = picks(MIC_A, [0.9, 0.8, 0.1])
    out.apply(msg)
    out.apply(picks(MIC_B, [0.7]))
    before = star_files(out)

    again = out.apply(msg)
    assert (again.outcome, again.rows, again.previous_rows) == ("duplicate", 2, 2)
    assert star_files(out) == before
    # also across a restart of the writer
    assert SessionOutputs(tmp_path).apply(msg).outcome == "duplicate"
    assert per_micrograph(read_particles(out)) == {MIC_A: 2, MIC_B: 1}
    assert len(read_index(out)) == 2


def test_repick_with_a_new_model_replaces_rows_and_version(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9, 0.8, 0.1], version="v1", picked_at=990.0))
    out.apply(picks(MIC_B, [0.7, 0.6], version="v1"))
    xy = [(400.0, 300.0), (401.5, 600.0), (50.0, 50.0), (5.0, 999.0)]
    repick = out.apply(picks(MIC_A, [0.95, 0.75, 0.65, 0.2], version="v2", picked_at=995.0, xy=xy))

    assert (repick.outcome, repick.rows, repick.previous_rows) == ("replaced", 3, 2)
    assert repick.replaced and repick.particles_rewritten and repick.model_version == "v2"
    particles = read_particles(out)
    assert per_micrograph(particles) == {MIC_A: 3, MIC_B: 2}
    rows_a = particles[particles["rlnMicrographName"] == MIC_A]
    assert set(rows_a[VERSION_LABEL]) == {"v2"}
    np.testing.assert_allclose(rows_a["rlnCoordinateX"], [400.0, 401.5, 50.0])
    assert set(particles[particles["rlnMicrographName"] == MIC_B][VERSION_LABEL]) == {"v1"}
    np.testing.assert_allclose(read_autopick(repick.coordinate_file)["rlnCoordinateY"], [300.0, 600.0, 50.0])
    assert list(read_index(out)["rlnMicrographName"]) == [MIC_A, MIC_B]  # same entry, same place
    assert out.counts().particles == 5

    # the v1 picks redelivered late (older picked_at) must not undo the re-pick
    before = star_files(out)
    late = out.apply(picks(MIC_A, [0.9, 0.8, 0.1], version="v1", picked_at=990.0))
    assert late.outcome == "stale" and late.rows == 3
    assert star_files(out) == before


V1, V2 = "v0001-20261201T000000Z", "v0002-20261202T000000Z"


def test_repicks_are_ordered_by_model_version_not_by_the_pickers_clocks(tmp_path: Path) -> None:
    """Issue 25, item 8: a re-pick by model v0002 on a picker whose clock is behind (an older picked_at than v0001's)
    replaces v0001's rows; v0001's picks arriving after it do not undo it, whatever their time."""
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9, 0.8, 0.1], version=V1, picked_at=990.0))
    behind = out.apply(picks(MIC_A, [0.95], version=V2, picked_at=500.0))
    assert behind.outcome == "replaced" and out.entry(MIC_A).model_version == V2
    late = out.apply(picks(MIC_A, [0.9, 0.8, 0.7], version=V1, picked_at=2000.0))
    assert late.outcome == "stale" and out.entry(MIC_A).model_version == V2 and late.rows == 1


def test_a_time_far_in_the_future_is_refused_and_cannot_pin_the_rows(tmp_path: Path) -> None:
    import time

    out = SessionOutputs(tmp_path)
    future = time.time() + 10 * 365 * 86400
    with pytest.raises(InputError, match=r"picked_at is \d+\.\d h in the future"):
        out.apply(picks(MIC_A, [0.9], version=V1, picked_at=future))
    assert out.counts().micrographs == 0
    out.apply(picks(MIC_A, [0.9], version=V1, picked_at=time.time() + 60))  # a clock a minute ahead: fine
    assert out.apply(picks(MIC_A, [0.8, 0.7], version=V1, picked_at=time.time() + 120)).outcome == "replaced"


def test_appends_leave_particles_star_in_place_and_replacements_rewrite_it(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks("/data/m000.mrc", [0.9]))
    inode = out.particles_path.stat().st_ino
    for i in range(1, 25):
        result = out.apply(picks(f"/data/m{i:03d}.mrc", [0.9, 0.8, 0.3]))
        assert not result.particles_rewritten
    assert out.particles_path.stat().st_ino == inode  # appended to, never replaced
    assert len(read_particles(out)) == 1 + 24 * 2

    out.apply(picks("/data/m003.mrc", [0.9], picked_at=999.0))
    assert out.particles_path.stat().st_ino != inode  # a replacement is an atomic rewrite
    assert per_micrograph(read_particles(out))["/data/m003.mrc"] == 1
    assert len(read_particles(out)) == 1 + 23 * 2 + 1


def test_micrograph_without_picks_is_indexed_with_an_empty_file(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    none_above = out.apply(picks(MIC_A, [0.1, 0.2]))
    no_candidates = out.apply(picks(MIC_B, []))
    assert none_above.rows == 0 and no_candidates.rows == 0 and no_candidates.candidates == 0

    for result in (none_above, no_candidates):
        table = read_autopick(result.coordinate_file)  # header and an empty loop: parseable, no rows
        assert len(table) == 0
    assert list(read_index(out)["rlnMicrographName"]) == [MIC_A, MIC_B]
    assert len(read_particles(out)) == 0

    # the kept candidates still count: lowering the cutoff brings MIC_A's picks in
    assert out.set_threshold(0.15).particles == 1
    assert len(read_autopick(none_above.coordinate_file)) == 1


# ------------------------------------------------------------------------------------------------ rethreshold


def test_rethreshold_up_down_and_back_to_the_pickers_cutoff(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    a = out.apply(picks(MIC_A, [0.9, 0.6, 0.4, 0.2], threshold=0.5))
    b = out.apply(picks(MIC_B, [0.8, 0.35, 0.25], threshold=0.3))
    assert per_micrograph(read_particles(out)) == {MIC_A: 2, MIC_B: 2}

    up = out.set_threshold(0.7)
    assert (up.threshold, up.micrographs_changed, up.particles) == (0.7, 2, 2)
    assert per_micrograph(read_particles(out)) == {MIC_A: 1, MIC_B: 1}
    np.testing.assert_allclose(read_autopick(a.coordinate_file)["rlnAutopickFigureOfMerit"], [0.9])

    down = out.apply_rethreshold("proj", "s1", 0.22)
    assert (down.micrographs_changed, down.particles) == (2, 6)
    assert per_micrograph(read_particles(out)) == {MIC_A: 3, MIC_B: 3}
    np.testing.assert_allclose(read_autopick(b.coordinate_file)["rlnAutopickFigureOfMerit"], [0.8, 0.35, 0.25])

    # the session cutoff persists and applies to micrographs that arrive later
    reopened = SessionOutputs(tmp_path)
    assert reopened.threshold == 0.22
    late = reopened.apply(picks("/data/grid1/late.mrc", [0.3, 0.21], threshold=0.9))
    assert late.rows == 1 and late.threshold == 0.22

    back = reopened.set_threshold(None)
    assert back.threshold is None and back.particles == 2 + 2 + 0
    assert per_micrograph(read_particles(reopened)) == {MIC_A: 2, MIC_B: 2}
    assert len(read_autopick(late.coordinate_file)) == 0
    assert [e.threshold for e in reopened.micrographs()] == [0.5, 0.3, 0.9]

    same = reopened.set_threshold(None)
    assert same.micrographs_changed == 0
    with pytest.raises(InputError, match="finite number"):
        reopened.set_threshold(float("nan"))
    with pytest.raises(InputError, match="proj/other"):
        reopened.apply_rethreshold("proj", "other", 0.1)


def test_rethreshold_rewrites_only_micrographs_whose_rows_change(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    a = out.apply(picks(MIC_A, [0.9, 0.1], threshold=0.5))
    b = out.apply(picks(MIC_B, [0.9, 0.6], threshold=0.5))
    inode_a, inode_b = a.coordinate_file.stat().st_ino, b.coordinate_file.stat().st_ino
    result = out.set_threshold(0.55)  # MIC_A keeps [0.9]; MIC_B keeps [0.9, 0.6]
    assert result.micrographs_changed == 0
    assert (a.coordinate_file.stat().st_ino, b.coordinate_file.stat().st_ino) == (inode_a, inode_b)
    assert out.set_threshold(0.7).micrographs_changed == 1
    assert a.coordinate_file.stat().st_ino == inode_a and b.coordinate_file.stat().st_ino != inode_b


# ------------------------------------------------------------------------------------------------ repair


@pytest.mark.parametrize("torn", ["/data/grid1/FoilHole_1_Data_1.mrc\t12.5", "/data/x.mrc\t1.00\t2.00\n"])
def test_torn_last_line_is_cut_on_open(tmp_path: Path, torn: str) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9, 0.8]))
    good = out.particles_path.read_bytes()
    inode = out.particles_path.stat().st_ino
    with open(out.particles_path, "a", encoding="utf-8") as f:
        f.write(torn)  # a crash in the middle of an append (unterminated, or too few fields)

    reopened = SessionOutputs(tmp_path)
    assert out.particles_path.read_bytes() == good
    assert out.particles_path.stat().st_ino == inode  # cut in place, not rewritten
    reopened.apply(picks(MIC_B, [0.7]))
    assert per_micrograph(read_particles(reopened)) == {MIC_A: 2, MIC_B: 1}


@pytest.mark.parametrize("crashed", ["new micrograph", "re-pick"])
def test_crash_after_state_before_star_files_is_repaired_on_open(tmp_path: Path, monkeypatch, crashed: str) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9, 0.8], version="v1"))
    good = star_files(out)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash after the state was written")

    monkeypatch.setattr(outputs, "write_autopick_star", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):  # noqa: PT012 -- one apply, chosen by the case
        if crashed == "new micrograph":  # state of MIC_B written, no STAR file of it anywhere
            out.apply(picks(MIC_B, [0.7, 0.6, 0.1]))
        else:  # state of MIC_A is v2, its STAR files still v1
            out.apply(picks(MIC_A, [0.95], version="v2", picked_at=999.0))
    monkeypatch.undo()

    pending = tmp_path / ".cryomae" / "pending.json"
    assert pending.exists()
    assert star_files(out) == good  # still the old, parseable content

    reopened = SessionOutputs(tmp_path)
    assert not pending.exists()
    particles = read_particles(reopened)
    entries = {e.micrograph: e for e in reopened.micrographs()}
    if crashed == "new micrograph":
        assert per_micrograph(particles) == {MIC_A: 2, MIC_B: 2}
        assert list(read_index(reopened)["rlnMicrographName"]) == [MIC_A, MIC_B]
        assert len(read_autopick(entries[MIC_B].coordinate_file)) == 2
    else:
        assert per_micrograph(particles) == {MIC_A: 1}
        assert set(particles[VERSION_LABEL]) == {"v2"}
        fom = read_autopick(entries[MIC_A].coordinate_file)["rlnAutopickFigureOfMerit"]
        np.testing.assert_allclose(fom, [0.95])


def test_a_failed_apply_leaves_nothing_and_the_same_message_is_new_when_retried(tmp_path: Path, monkeypatch) -> None:
    """A write that fails half-way (a full disk) is undone: the next call repairs the files without it, and the
    message, retried by the broker (it was not acknowledged), is then written as new, once (issue 25, item 3)."""
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9]))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    failed = picks(MIC_B, [0.7, 0.6])
    monkeypatch.setattr(outputs, "write_autopick_star", crash)
    with pytest.raises(OSError, match="No space left"):
        out.apply(failed)
    monkeypatch.undo()

    out.apply(picks("/data/grid1/third.mrc", [0.8]))  # same object: repairs the files first
    assert per_micrograph(read_particles(out)) == {MIC_A: 1, "/data/grid1/third.mrc": 1}
    assert list(read_index(out)["rlnMicrographName"]) == [MIC_A, "/data/grid1/third.mrc"]
    assert out.apply(failed).outcome == "new"
    assert per_micrograph(read_particles(out)) == {MIC_A: 1, "/data/grid1/third.mrc": 1, MIC_B: 2}
    assert SessionOutputs(tmp_path).counts().micrographs == 3  # and so after a restart


def test_deleted_or_edited_outputs_are_restored_on_open_and_by_rebuild(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9, 0.8]))
    out.apply(picks(MIC_B, [0.7]))
    good = star_files(out)

    out.index_path.unlink()
    (out.coordinates_dir / f"FoilHole_2_Data_1{AUTOPICK_SUFFIX}").unlink()
    with open(out.particles_path, "a", encoding="utf-8") as f:
        f.write(f"{MIC_B}\t1.00\t2.00\t0.900000\tv1\n")  # a duplicated row, complete and well formed
    SessionOutputs(tmp_path)
    assert star_files(out) == good

    for path in [out.index_path, out.particles_path, *out.coordinates_dir.iterdir()]:
        path.write_text("garbage\n", encoding="utf-8")
    counts = out.rebuild()
    assert (counts.micrographs, counts.particles) == (2, 3)
    assert star_files(out) == good


def test_damaged_state_file_is_named(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9]))
    state = tmp_path / ".cryomae" / "micrographs" / "FoilHole_1_Data_1.json"
    data = json.loads(state.read_text(encoding="utf-8"))
    assert len(data["scores"]) == 1 and data["model_version"] == "v1"  # every candidate is kept
    state.write_text('{"format": 1, "key": "FoilHole_1_Data_1"', encoding="utf-8")
    with pytest.raises(InputError, match=r"FoilHole_1_Data_1\.json: damaged session state"):
        SessionOutputs(tmp_path)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("msg", "problem"),
    [
        (picks(MIC_B, [0.9, 0.8], xy=[(1.0, 2.0), (float("nan"), 3.0)]), r"x\[1\] is NaN"),
        (picks(MIC_B, [0.9, float("inf")]), r"scores\[1\] is infinite"),
        (picks(MIC_B, [0.9], xy=[(900.0, 10.0)]), "outside the 800x1000 image"),
        (picks('/data/grid1/bad"name.mrc', [0.9]), "cannot hold quotes"),
        (picks("/data/grid1/..", [0.9]), "does not name a file"),
        (picks(MIC_B, [0.9], version="v 1\n"), "model version"),
        (picks(MIC_B, [0.9], session="s2"), "outputs of proj/s1"),
        (picks(MIC_B, [0.9]).model_copy(update={"complete_at": float("nan")}), "complete_at is nan"),
        (picks(MIC_B, [0.9]).model_copy(update={"threshold": float("-inf")}), "threshold is -inf"),
    ],
)
def test_bad_input_is_named_and_nothing_is_lost(tmp_path: Path, msg: PicksReady, problem: str) -> None:
    out = SessionOutputs(tmp_path)
    out.apply(picks(MIC_A, [0.9, 0.8]))
    before = star_files(out)
    state_before = sorted(p.name for p in (tmp_path / ".cryomae" / "micrographs").iterdir())
    with pytest.raises(InputError, match=problem):
        out.apply(msg)
    assert star_files(out) == before
    assert sorted(p.name for p in (tmp_path / ".cryomae" / "micrographs").iterdir()) == state_before
    assert out.counts().micrographs == 1


def test_name_root_writes_names_as_relions_micrographs_star_does(tmp_path: Path) -> None:
    project = tmp_path / "relion"
    out = SessionOutputs(tmp_path / "out", name_root=project)
    mic = f"{project}/MotionCorr/job002/Movies/mic_001.mrc"
    out.apply(picks(mic, [0.9]))
    assert list(read_index(out)["rlnMicrographName"]) == ["MotionCorr/job002/Movies/mic_001.mrc"]
    assert list(read_particles(out)["rlnMicrographName"]) == ["MotionCorr/job002/Movies/mic_001.mrc"]
    with pytest.raises(InputError, match="outside name_root"):
        out.apply(picks(f"{project}/../elsewhere/mic_002.mrc", [0.9]))


def test_same_file_name_in_two_folders_gets_two_coordinate_files(tmp_path: Path) -> None:
    out = SessionOutputs(tmp_path)
    first = out.apply(picks("/data/GridSquare_1/Data/mic.mrc", [0.9]))
    second = out.apply(picks("/data/GridSquare_2/Data/MIC.mrc", [0.8, 0.7]))  # also clashes on SMB
    assert first.coordinate_file.name == "mic_autopick.star"
    assert second.coordinate_file != first.coordinate_file and second.coordinate_file.name.endswith(AUTOPICK_SUFFIX)
    assert len(read_autopick(first.coordinate_file)) == 1 and len(read_autopick(second.coordinate_file)) == 2
    files = [str(first.coordinate_file), str(second.coordinate_file)]
    assert list(read_index(out)["rlnMicrographCoordinates"]) == files


def _relion31_coordinate_file(micrograph_name: str, coord_dir: str, coord_suffix: str) -> str:
    """Where RELION 3.1's ``relion_preprocess --extract --coord_dir D --coord_suffix S`` looks for the coordinates of
    a micrograph its micrographs STAR names ``micrograph_name`` (3.1 has no ``--coord_list``): D, then the name with
    its leading ``<Job>/jobNNN/`` folders dropped (the whole name when it has none) and its extension replaced by S.
    """
    parts = micrograph_name.split("/")
    job = next((i for i in range(1, len(parts) - 1) if re.fullmatch(r"job\d{3}.*", parts[i])), None)
    rest = "/".join(parts if job is None else parts[job + 1 :])
    return coord_dir.rstrip("/") + "/" + rest.rsplit(".", 1)[0] + coord_suffix


def test_relion_3_1_finds_each_file_with_coord_dir_and_coord_suffix(tmp_path: Path) -> None:
    """The command the docs give for RELION 3.1, ``--coord_dir <session>/coordinates/ --coord_suffix _autopick.star``,
    finds the file of a micrograph RELION names ``<Job>/jobNNN/<stem>.mrc``; one in a sub-folder of the job is found
    through a folder of links that mirrors it; every file carries the labels RELION 3.1 reads."""
    project = tmp_path / "relion"
    out = SessionOutputs(tmp_path / "proj" / "s1", name_root=project)
    flat = out.apply(picks(f"{project}/MotionCorr/job002/FoilHole_1_Data_1.mrc", [0.9, 0.2, 0.6]))
    deeper = out.apply(picks(f"{project}/MotionCorr/job002/Movies/FoilHole_2_Data_1.mrc", [0.7]))
    names = list(read_index(out)["rlnMicrographName"])
    assert names == ["MotionCorr/job002/FoilHole_1_Data_1.mrc", "MotionCorr/job002/Movies/FoilHole_2_Data_1.mrc"]

    found = _relion31_coordinate_file(names[0], f"{out.coordinates_dir}/", AUTOPICK_SUFFIX)
    assert Path(found) == flat.coordinate_file and Path(found).is_file()
    # in a sub-folder of the job, RELION 3.1 looks in the same sub-folder of --coord_dir: the links the docs give
    # (mkdir -p links/Movies && ln -s <session>/coordinates/*_autopick.star links/Movies/) mirror it
    assert not Path(_relion31_coordinate_file(names[1], f"{out.coordinates_dir}/", AUTOPICK_SUFFIX)).exists()
    (tmp_path / "links" / "Movies").mkdir(parents=True)
    for file in out.coordinates_dir.glob(f"*{AUTOPICK_SUFFIX}"):
        (tmp_path / "links" / "Movies" / file.name).symlink_to(file)
    linked = Path(_relion31_coordinate_file(names[1], str(tmp_path / "links"), AUTOPICK_SUFFIX))
    assert linked.resolve() == deeper.coordinate_file.resolve()

    for result in (flat, deeper):  # one data block, a loop with RELION's labels only: X, Y and the figure of merit
        lines = result.coordinate_file.read_text().splitlines()
        labels = [line for line in lines if line.startswith("_")]
        assert "data_" in lines and "loop_" in lines
        assert labels[:2] == ["_rlnCoordinateX #1", "_rlnCoordinateY #2"] and "_rlnAutopickFigureOfMerit #4" in labels
        assert all(label.startswith("_rln") for label in labels)
        table = read_autopick(result.coordinate_file)
        assert len(table) == result.rows and (table["rlnAutopickFigureOfMerit"] >= 0.5).all()
