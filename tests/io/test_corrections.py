"""The session page's corrections.star: read as the page writes it, written back the same way, and refused with
the reason when it is not one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cryomae.errors import InputError
from cryomae.io.coordinates import MAX_CORRECTIONS_BYTES, read_corrections
from cryomae.io.writers import write_corrections

PAGE_FILE = (
    "# cryomae corrections: project proj, session sess, from the session page\n\n"
    "data_corrections\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
    "_cryomaeParticle #4\n"
    "s1/mic_001.mrc\t10.5\t20.0\t0\n"
    '"s1/grid #1 x.mrc"\t30.0\t40.5\t1\n'
    '"data_02.mrc"\t1.0\t2.0\t1\n'
)


def test_the_page_file_is_read_with_its_origin(tmp_path: Path) -> None:
    path = tmp_path / "corrections.star"
    path.write_text(PAGE_FILE)
    c = read_corrections(path)
    assert c.names == ["s1/mic_001.mrc", "s1/grid #1 x.mrc", "data_02.mrc"]
    np.testing.assert_allclose(c.xy, [[10.5, 20.0], [30.0, 40.5], [1.0, 2.0]])
    assert c.particle.tolist() == [False, True, True]
    assert (c.project, c.session) == ("proj", "sess")


def test_written_corrections_read_back(tmp_path: Path) -> None:
    path = tmp_path / "c.star"
    names = ["/data/s 1/a.mrc", "/data/b.mrc"]
    write_corrections(path, names, np.array([[1.25, 2.0], [3.0, 4.0]]), np.array([True, False]), "p", "s")
    c = read_corrections(path)
    assert c.names == names and c.particle.tolist() == [True, False] and (c.project, c.session) == ("p", "s")
    np.testing.assert_allclose(c.xy, [[1.2, 2.0], [3.0, 4.0]], atol=0.051)  # one decimal, as the page writes


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (PAGE_FILE.replace("\t0\n", "\t2\n"), "must be 1 (missed particle) or 0 (wrong pick), got 2.0 at row 1"),
        (PAGE_FILE.replace("\t10.5\t", "\tnan\t"), "NaN value in column rlnCoordinateX"),
        (PAGE_FILE.replace("_cryomaeParticle #4\n", "_rlnAutopickFigureOfMerit #4\n"), "no loop with _cryomaeParticle"),
        (PAGE_FILE.split("s1/mic_001")[0], "no marks in the file"),
        ("data_x\n\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n_cryomaeParticle\n1 2 1\n", "no rlnMicrographName"),
        ("not a star file at all\n", "no loop with _cryomaeParticle"),
    ],
)
def test_a_bad_file_is_refused_with_the_reason(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "corrections.star"
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(problem)) as info:
        read_corrections(path)
    assert str(path) in str(info.value)


def test_a_huge_or_misnamed_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    huge = tmp_path / "corrections.star"
    with open(huge, "wb") as f:
        f.truncate(MAX_CORRECTIONS_BYTES + 1)  # sparse: nothing is read, the size alone refuses it
    with pytest.raises(InputError, match="not a corrections file"):
        read_corrections(huge)
    with pytest.raises(InputError, match=r"must be a \.star file"):
        read_corrections(tmp_path / "corrections.csv")
    with pytest.raises(InputError, match="file not found"):
        read_corrections(tmp_path / "missing.star")
