"""Tests of coordinate files: STAR/.box/CSV round trips, RELION output tables that must stay loops, the
inside-the-image check, and readable InputErrors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryomae.errors import InputError
from cryomae.io.coordinates import COORDINATE_SUFFIXES, Coordinates, check_inside, read_coordinates
from cryomae.io.writers import write_autopick_star, write_coordinate_index, write_coordinates, write_particles_star

REAL_COORDS = Path("/work/shared/data/empiar10017/bin4/coords")
AUTOPICK_COLUMNS = [
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnClassNumber",
    "rlnAutopickFigureOfMerit",
    "rlnAnglePsi",
]
XY = np.array([[10.25, 20.5], [300.125, 4.0], [0.0, 1023.0]])
SCORES = np.array([0.9, 0.25, 0.123456])


def _error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        read_coordinates(path)
    assert path.name in str(info.value)
    return str(info.value)


def _only_file(tmp_path: Path, name: str) -> None:
    """The write left exactly the target file behind (no temporary files)."""
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("with_scores", [False, True])
def test_star_round_trip(tmp_path: Path, with_scores: bool) -> None:
    path = tmp_path / "c.star"
    write_coordinates(path, Coordinates(XY, SCORES if with_scores else None))
    _only_file(tmp_path, "c.star")
    back = read_coordinates(path)
    assert back.xy.dtype == np.float64 and back.xy.shape == (3, 2)
    np.testing.assert_allclose(back.xy, XY, atol=1e-6)
    if with_scores:
        assert back.scores is not None
        np.testing.assert_allclose(back.scores, SCORES, atol=1e-6)
    else:
        assert back.scores is None
    assert back.micrograph_names is None
    table = starfile.read(path)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns)[:2] == ["rlnCoordinateX", "rlnCoordinateY"]


def test_star_round_trip_with_micrograph_names(tmp_path: Path) -> None:
    names = ["mic 1.mrc", "0002", "data_3.mrc"]  # a space, a number-like name, a STAR keyword prefix
    write_coordinates(tmp_path / "n.star", Coordinates(XY, SCORES, names))
    back = read_coordinates(tmp_path / "n.star")
    assert back.micrograph_names == names


@pytest.mark.parametrize("with_scores", [False, True])
def test_box_round_trip(tmp_path: Path, with_scores: bool) -> None:
    path = tmp_path / "c.box"
    write_coordinates(path, Coordinates(XY, SCORES if with_scores else None), box_size=64)
    first = path.read_text().splitlines()[0].split()
    assert first == ["-21.75", "-11.50", "64", "64"]  # corner = centre - box/2
    back = read_coordinates(path)
    np.testing.assert_allclose(back.xy, XY, atol=0.005)
    assert back.scores is None  # .box has no score column


def test_box_reader_uses_width_and_height_and_ignores_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "e.box"
    path.write_text("100\t200\t50\t30\t-3\n\n  7 8 10 10\n")
    back = read_coordinates(path)
    np.testing.assert_array_equal(back.xy, [[125.0, 215.0], [12.0, 13.0]])


def test_box_write_needs_box_size(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="needs a positive box_size"):
        write_coordinates(tmp_path / "c.box", Coordinates(XY))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("with_scores", [False, True])
def test_csv_round_trip(tmp_path: Path, with_scores: bool) -> None:
    path = tmp_path / "c.csv"
    names = ["a.mrc", 'odd, "quoted" name.mrc', "c.mrc"]
    write_coordinates(path, Coordinates(XY, SCORES if with_scores else None, names))
    header = path.read_text().splitlines()[0]
    assert header == ("x,y,score,micrograph" if with_scores else "x,y,micrograph")
    back = read_coordinates(path)
    np.testing.assert_allclose(back.xy, XY, atol=1e-6)
    assert (back.scores is not None) == with_scores
    assert back.micrograph_names == names


def test_csv_column_names_are_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text("Micrograph, X ,Y,FOM\nm1.mrc,1.5,2.5,0.7\nm2.mrc,3,4,0.1\n")
    back = read_coordinates(path)
    np.testing.assert_array_equal(back.xy, [[1.5, 2.5], [3.0, 4.0]])
    assert back.scores is not None and back.scores.tolist() == [0.7, 0.1]
    assert back.micrograph_names == ["m1.mrc", "m2.mrc"]
    (tmp_path / "r.csv").write_text("rlnCoordinateX,rlnCoordinateY,rlnAutopickFigureOfMerit\n5,6,0.5\n")
    assert read_coordinates(tmp_path / "r.csv").xy.tolist() == [[5.0, 6.0]]


@pytest.mark.skipif(not REAL_COORDS.is_dir(), reason="development data not present")
def test_real_star_files() -> None:
    files = sorted(REAL_COORDS.glob("*.star"))
    assert files
    for path in files[:5]:
        coords = read_coordinates(path)
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and ln.strip()[0].isdigit()]
        assert coords.xy.shape == (len(rows), 2) and len(rows) > 100
        assert coords.xy.min() >= 0 and coords.xy.max() <= 1023  # bin4 micrographs are 1024x1024
        assert coords.xy[:, 0].std() > 100 and coords.xy[:, 1].std() > 100  # spread over the image


def test_relion31_multi_block_star(tmp_path: Path) -> None:
    path = tmp_path / "particles.star"
    path.write_text(
        "# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
        "_rlnImagePixelSize #3\nopticsGroup1 1 1.77\n\n\n"
        "# version 30001\n\ndata_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n"
        "_rlnCoordinateY #3\n_rlnAutopickFigureOfMerit #4\n_rlnOpticsGroup #5\n"
        "MotionCorr/job002/mic_001.mrc 100.5 200.25 1.5 1\n"
        "MotionCorr/job002/mic_002.mrc 7 8 -0.5 1\n"
    )
    back = read_coordinates(path)
    assert back.xy.tolist() == [[100.5, 200.25], [7.0, 8.0]]
    assert back.scores is not None and back.scores.tolist() == [1.5, -0.5]
    assert back.micrograph_names == ["MotionCorr/job002/mic_001.mrc", "MotionCorr/job002/mic_002.mrc"]


def test_single_row_key_value_star_is_read(tmp_path: Path) -> None:
    path = tmp_path / "kv.star"
    starfile.write({"rlnCoordinateX": 3.0, "rlnCoordinateY": 4.0}, path)
    assert "loop_" not in path.read_text()
    assert read_coordinates(path).xy.tolist() == [[3.0, 4.0]]


@pytest.mark.parametrize("suffix", COORDINATE_SUFFIXES)
def test_empty_table_gives_zero_coordinates(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    write_coordinates(path, Coordinates(np.zeros((0, 2)), np.zeros(0)), box_size=10)
    back = read_coordinates(path)
    assert len(back) == 0 and back.xy.shape == (0, 2)


def test_header_only_csv_is_empty(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("x,y\n")
    assert len(read_coordinates(tmp_path / "h.csv")) == 0


# ------------------------------------------------------------------------------------------- RELION tables


@pytest.mark.parametrize("n", [0, 1, 3])
def test_autopick_star_is_always_a_loop(tmp_path: Path, n: int) -> None:
    path = tmp_path / "mic_autopick.star"
    write_autopick_star(path, XY[:n], SCORES[:n])
    _only_file(tmp_path, path.name)
    text = path.read_text()
    assert "data_\n" in text and "loop_" in text
    assert "_rlnCoordinateX #1" in text and "_rlnAnglePsi #5" in text
    table = starfile.read(path)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == AUTOPICK_COLUMNS
    assert len(table) == n
    if n:
        assert table["rlnClassNumber"].tolist() == [0] * n
        assert table["rlnAnglePsi"].tolist() == [0.0] * n
        np.testing.assert_allclose(table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), XY[:n], atol=0.005)
    back = read_coordinates(path)
    assert back.xy.shape == (n, 2) and back.scores is not None
    np.testing.assert_allclose(back.scores, SCORES[:n], atol=1e-6)


def test_autopick_number_formats(tmp_path: Path) -> None:
    path = tmp_path / "f_autopick.star"
    write_autopick_star(path, np.array([[1.0, 2.0]]), np.array([0.5]))
    assert "1.00\t2.00\t0\t0.500000\t0.0" in path.read_text().splitlines()


@pytest.mark.parametrize("n", [0, 1, 3])
def test_coordinate_index_round_trip(tmp_path: Path, n: int) -> None:
    entries = [
        ("Micrographs/mic 1.mrc", "out/mic 1_autopick.star"),
        ("0002", "out/0002_autopick.star"),
        ("MotionCorr/job003/c.mrc", "out/c_autopick.star"),
    ][:n]
    path = tmp_path / "autopick.star"
    write_coordinate_index(path, entries)
    text = path.read_text()
    assert "data_coordinate_files" in text and "loop_" in text
    table = starfile.read(path, parse_as_string=["rlnMicrographName", "rlnMicrographCoordinates"])
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["rlnMicrographName", "rlnMicrographCoordinates"]
    assert list(zip(table["rlnMicrographName"], table["rlnMicrographCoordinates"], strict=True)) == entries
    assert "no coordinate columns" in _error(path)


def test_particles_star_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "particles.star"
    names = ["mics/a.mrc", "mics/a.mrc", "mics/b c.mrc"]
    write_particles_star(path, names, XY, SCORES, {"cryomaeModelVersion": ["v1", "v1", "v2"]})
    table = starfile.read(path)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == [
        "rlnMicrographName",
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnAutopickFigureOfMerit",
        "cryomaeModelVersion",
    ]
    assert table["rlnMicrographName"].tolist() == names
    assert table["cryomaeModelVersion"].tolist() == ["v1", "v1", "v2"]
    assert "data_particles" in path.read_text()
    back = read_coordinates(path)
    assert back.micrograph_names == names
    np.testing.assert_allclose(back.xy, XY, atol=1e-6)
    assert back.scores is not None
    np.testing.assert_allclose(back.scores, SCORES, atol=1e-6)


def test_particles_star_with_one_row_stays_a_loop(tmp_path: Path) -> None:
    path = tmp_path / "one.star"
    write_particles_star(path, ["m.mrc"], XY[:1], SCORES[:1])
    assert "loop_" in path.read_text()
    table = starfile.read(path)
    assert isinstance(table, pd.DataFrame) and len(table) == 1


@pytest.mark.parametrize("bad", ['say "hi".mrc', "tab\tname.mrc", "new\nline.mrc", ""])
def test_unwritable_names_are_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InputError, match="micrograph name") as info:
        write_coordinate_index(tmp_path / "i.star", [(bad, "x.star")])
    assert "i.star" in str(info.value)
    with pytest.raises(InputError, match="micrograph name"):
        write_particles_star(tmp_path / "p.star", [bad], XY[:1], SCORES[:1])
    assert list(tmp_path.iterdir()) == []


def test_writers_reject_mismatched_or_non_finite_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scores"):
        write_autopick_star(tmp_path / "a.star", XY, SCORES[:2])
    with pytest.raises(ValueError, match="NaN or infinite coordinates"):
        write_autopick_star(tmp_path / "a.star", np.array([[np.nan, 1.0]]), np.array([1.0]))
    with pytest.raises(ValueError, match="micrograph names"):
        write_particles_star(tmp_path / "p.star", ["a"], XY, SCORES)
    with pytest.raises(ValueError, match="extra column"):
        write_particles_star(tmp_path / "p.star", ["a"] * 3, XY, SCORES, {"v": [1]})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- checks / errors


def test_check_inside_message(tmp_path: Path) -> None:
    coords = Coordinates(np.array([[5.0, 5.0], [1100.0, 20.0], [-1.0, 3.0], [4.0, 1024.0]]))
    with pytest.raises(InputError) as info:
        check_inside(coords, (1024, 1024), tmp_path / "ex.star")
    assert str(info.value) == (
        f"{tmp_path / 'ex.star'}: 3 coordinates lie outside the 1024x1024 image "
        "(first: x=1100.0, y=20.0; x is the column, y the row)"
    )


def test_check_inside_edges_and_axes(tmp_path: Path) -> None:
    check_inside(Coordinates(np.array([[0.0, 0.0], [199.0, 99.0]])), (100, 200), "f.star")  # H=100, W=200
    expected = r"1 coordinate lies outside the 200x100 image \(200 columns, 100 rows\)"
    with pytest.raises(InputError, match=expected):
        check_inside(Coordinates(np.array([[150.0, 150.0]])), (100, 200), "f.star")  # y beyond the rows
    check_inside(Coordinates(np.zeros((0, 2))), (10, 10), "f.star")


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    assert "file not found" in _error(tmp_path / "none.star")
    (tmp_path / "c.txt").write_text("1 2\n")
    message = _error(tmp_path / "c.txt")
    assert "unsupported coordinate file type '.txt'" in message and ".star, .box, .csv" in message


def test_csv_missing_columns_lists_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("col,row\n1,2\n")
    message = _error(tmp_path / "m.csv")
    assert "no coordinate columns" in message and "found header col, row" in message
    (tmp_path / "noheader.csv").write_text("1,2\n3,4\n")
    assert "a header row is required" in _error(tmp_path / "noheader.csv")


def test_csv_non_numeric_and_nan(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("x,y\n1,2\n3,abc\n")
    assert "non-numeric value 'abc' in column y at row 2 (line 3)" in _error(tmp_path / "t.csv")
    (tmp_path / "n.csv").write_text("x,y\nnan,2\n")
    assert "NaN value in column x at row 1 (line 2)" in _error(tmp_path / "n.csv")
    (tmp_path / "w.csv").write_text("x,y\n1,2,3\n")
    assert "line 2 has 3 fields but the header has 2" in _error(tmp_path / "w.csv")
    (tmp_path / "e.csv").write_text("")
    assert "header row" in _error(tmp_path / "e.csv")


def test_star_errors(tmp_path: Path) -> None:
    head = "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
    (tmp_path / "cols.star").write_text("data_mics\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\na.mrc 1\n")
    message = _error(tmp_path / "cols.star")
    assert "no coordinate columns" in message and "data_mics (rlnMicrographName, rlnDefocusU)" in message
    (tmp_path / "text.star").write_text(head + "1 2\n3 oops\n")
    message = _error(tmp_path / "text.star")
    assert "non-numeric value 'oops' in column rlnCoordinateY at row 2 of data_" in message
    (tmp_path / "nan.star").write_text(head + "nan 2\n")
    assert "NaN value in column rlnCoordinateX at row 1" in _error(tmp_path / "nan.star")
    (tmp_path / "none.star").write_text("just some text\n")
    assert "no data_ block" in _error(tmp_path / "none.star")


def test_box_errors(tmp_path: Path) -> None:
    (tmp_path / "s.box").write_text("1 2 3 4\n1 2 3\n")
    assert "line 2 has 3 columns" in _error(tmp_path / "s.box")
    (tmp_path / "t.box").write_text("1 2 3 4\n1 x 3 4\n")
    assert "non-numeric value 'x' (corner y) on line 2" in _error(tmp_path / "t.box")
    (tmp_path / "b.box").write_bytes(b"\xff\xfe\x00garbage")
    assert "not a text file" in _error(tmp_path / "b.box")


def test_coordinates_validates_shapes() -> None:
    assert len(Coordinates(np.array([[1, 2], [3, 4]]))) == 2
    assert Coordinates(np.array([])).xy.shape == (0, 2)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        Coordinates(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="scores"):
        Coordinates(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="micrograph names"):
        Coordinates(np.zeros((3, 2)), None, ["a"])
