"""Tests of the PNG preview: circles where the picks and the truth are, size limits, atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cryomae.errors import ConfigError, InputError
from cryomae.preview import render_preview


def _is_yellow(rgb: float | tuple[int, ...]) -> bool:
    assert isinstance(rgb, tuple)
    r, g, b = rgb[:3]
    return r > 200 and g > 200 and b < 80


def _is_green(rgb: float | tuple[int, ...]) -> bool:
    assert isinstance(rgb, tuple)
    r, g, b = rgb[:3]
    return g > 200 and r < 80 and b < 80


def _image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)


def test_picks_yellow_truth_green(tmp_path: Path) -> None:
    out = render_preview(
        _image(), np.array([[30.0, 50.0]]), 20.0, tmp_path / "prev.png", truth_xy=np.array([[90.0, 90.0]])
    )
    assert out == tmp_path / "prev.png"
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (128, 128)
        px = im.load()
        assert px is not None
        assert _is_yellow(px[40, 50])  # right edge of the pick circle (centre 30, radius 10)
        assert _is_yellow(px[30, 40])  # its top edge
        assert not _is_yellow(px[30, 50])  # its centre is image, not circle
        assert _is_green(px[100, 90])  # right edge of the truth circle
        assert _is_green(px[90, 80])
        assert not _is_green(px[90, 90])
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_greyscale_is_stretched(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0.0, 1.0, 100, dtype=np.float32), (50, 1))  # [50, 100], x from 0 to 1
    out = render_preview(ramp, np.zeros((0, 2)), 10.0, tmp_path / "ramp.png", lowpass_sigma=0)
    grey = np.asarray(Image.open(out))[:, :, 0]
    assert grey.shape == (50, 100)
    assert grey[25, 0] == 0 and grey[25, 99] == 255  # below the 1st / above the 99th percentile: clipped
    assert np.all(np.diff(grey[25].astype(int)) >= 0)


def test_downscaling_to_max_size(tmp_path: Path) -> None:
    img = np.random.default_rng(1).normal(size=(300, 600)).astype(np.float32)  # [H, W]
    # Pick at (400, 150) with diameter 40: at scale 0.5 the circle is centred at (199.75, 74.75), radius 10;
    # the outline (2 px) is drawn inward from the bounding box, covering x = 189-190 and 208-209 on row 75.
    out = render_preview(img, np.array([[400.0, 150.0]]), 40.0, tmp_path / "small.png", max_size=300)
    with Image.open(out) as im:
        assert im.size == (300, 150)
        px = im.load()
        assert px is not None
        assert _is_yellow(px[209, 75])
        assert _is_yellow(px[190, 75])
    # No upscaling of small images.
    out = render_preview(img, np.zeros((0, 2)), 40.0, tmp_path / "full.png", max_size=4096)
    with Image.open(out) as im:
        assert im.size == (600, 300)


def test_overwrites_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "p.png"
    render_preview(_image(), np.array([[30.0, 50.0]]), 20.0, str(target))
    render_preview(_image(), np.zeros((0, 2)), 20.0, target)
    assert target.is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.png"]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        render_preview(np.zeros(10), np.zeros((0, 2)), 10.0, tmp_path / "x.png")
    with pytest.raises(InputError):
        render_preview(_image(), np.zeros((3, 3)), 10.0, tmp_path / "x.png")
    with pytest.raises(ConfigError):
        render_preview(_image(), np.zeros((0, 2)), -1.0, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
