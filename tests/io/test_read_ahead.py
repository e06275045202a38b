"""read_ahead: micrographs decoded one file ahead of the caller, in order, bad files reported and skipped."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cryomae.io.micrographs as micrographs
from cryomae.errors import InputError
from cryomae.io import read_ahead, read_micrograph, write_mrc


def _files(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = tmp_path / f"mic_{i}.mrc"
        write_mrc(p, rng.normal(size=(32, 48)).astype(np.float32), pixel_size=1.5)
        paths.append(p)
    jpg = tmp_path / "mic_4.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(jpg, quality=95)
    paths.append(jpg)
    bad = tmp_path / "mic_2.mrc"
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated
    return paths


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_micrographs_in_the_same_order_as_reading_one_by_one(tmp_path: Path, depth: int) -> None:
    paths = _files(tmp_path)
    got = list(read_ahead(paths, depth=depth))
    assert [p for p, _ in got] == paths
    for path, mic in got:
        if path.name == "mic_2.mrc":
            assert isinstance(mic, InputError) and "mic_2.mrc" in str(mic)
            with pytest.raises(InputError):
                read_micrograph(path)
        else:
            assert not isinstance(mic, InputError)
            np.testing.assert_array_equal(mic.data, read_micrograph(path).data)


def test_the_next_file_is_read_before_the_caller_asks_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [p for p in _files(tmp_path) if p.name != "mic_2.mrc"]
    started = {p: threading.Event() for p in paths}
    real = micrographs.read_micrograph

    def recording(p: str | Path) -> micrographs.Micrograph:
        started[Path(p)].set()
        return real(p)

    monkeypatch.setattr(micrographs, "read_micrograph", recording)
    it = read_ahead(paths, depth=1)
    first, _ = next(it)
    assert first == paths[0]
    # while the caller holds the first micrograph, the second is being read in the background
    assert started[paths[1]].wait(timeout=30)
    assert not started[paths[2]].is_set()  # but no further than depth ahead
    it.close()


def test_an_unexpected_error_surfaces_at_its_files_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [p for p in _files(tmp_path) if p.name != "mic_2.mrc"]

    def broken(p: str | Path) -> micrographs.Micrograph:
        if Path(p) == paths[1]:
            raise RuntimeError("disk on fire")
        return micrographs.Micrograph(np.ones((2, 2), np.float32), Path(p))

    monkeypatch.setattr(micrographs, "read_micrograph", broken)
    it = read_ahead(paths, depth=2)
    assert next(it)[0] == paths[0]
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(it)
