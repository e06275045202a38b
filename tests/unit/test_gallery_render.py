"""The pictures of the gallery and ``cryomae preview``: circles land on the particles, colours say kept or
rejected, the picture is shrunk by whole blocks and written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cryomae.errors import ConfigError, InputError
from cryomae.gallery.render import (
    KEPT_COLOUR,
    REJECTED_COLOUR,
    TRUTH_COLOUR,
    draw,
    near_cutoff,
    render_preview,
    thumbnail,
)


def _discs(shape: tuple[int, int], centres: np.ndarray, radius: float) -> np.ndarray:
    """Noise with bright discs at ``centres`` [N, 2] (x, y)."""
    rng = np.random.default_rng(0)
    img = rng.normal(0.0, 0.2, size=shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y in centres:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] += 3.0
    return img


def _mask(picture: Image.Image, colour: tuple[int, int, int], tolerance: int = 40) -> np.ndarray:
    rgb = np.asarray(picture).astype(int)
    return np.all(np.abs(rgb - np.array(colour)) <= tolerance, axis=2)


def _ring_centres(mask: np.ndarray) -> np.ndarray:
    """Centres (x, y) of the rings of a colour: each ring's pixels averaged."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    centres = ndimage.center_of_mass(mask, labels, range(1, n + 1))
    return np.array([(c[1], c[0]) for c in centres]).reshape(-1, 2)


def test_circles_are_drawn_around_the_planted_particles() -> None:
    centres = np.array([[300.0, 400.0], [1500.0, 700.0], [900.0, 1700.0], [1800.0, 1800.0]])
    image = _discs((2048, 2048), centres, radius=40)
    thumb = thumbnail(image, diameter=100.0, size=512)
    assert thumb.factor == 4 and thumb.grey.shape == (512, 512) and thumb.grey.dtype == np.uint8
    # the discs are bright in the picture itself
    for x, y in thumb.to_pixels(centres):
        assert thumb.grey[round(y), round(x)] > 200
    picture = draw(thumb, 100.0, kept=centres[:3], rejected=centres[3:], legend=False)
    kept = _ring_centres(_mask(picture, KEPT_COLOUR))
    rejected = _ring_centres(_mask(picture, REJECTED_COLOUR))
    expected = thumb.to_pixels(centres)
    assert len(kept) == 3 and len(rejected) == 1
    for want in expected[:3]:
        assert np.min(np.linalg.norm(kept - want, axis=1)) < 1.0  # within a picture pixel
    assert np.linalg.norm(rejected[0] - expected[3]) < 1.0
    # the ring's radius is the particle's: 100 px diameter at factor 4 is 12.5 picture pixels
    ys, xs = np.nonzero(_mask(picture, KEPT_COLOUR))
    near_first = np.hypot(xs - expected[0][0], ys - expected[0][1])
    assert 10.0 < np.median(near_first[near_first < 20]) < 13.5


def test_truth_is_drawn_in_its_own_colour_and_the_legend_counts_each() -> None:
    image = _discs((256, 256), np.array([[128.0, 128.0]]), 10)
    thumb = thumbnail(image, 24.0, size=256)
    plain = draw(thumb, 24.0, kept=np.array([[128.0, 128.0]]), legend=False)
    both = draw(thumb, 24.0, kept=np.array([[128.0, 128.0]]), truth=np.array([[60.0, 60.0]]), legend=False)
    assert _mask(both, TRUTH_COLOUR, 30).sum() > 0 and _mask(plain, TRUTH_COLOUR, 30).sum() == 0
    keyed = draw(thumb, 24.0, kept=np.array([[128.0, 128.0]]), rejected=np.zeros((0, 2)), legend=True)
    bottom_left = np.asarray(keyed)[200:, :120]
    assert (bottom_left.sum(axis=2) == 0).mean() > 0.3  # the legend's dark box
    assert _mask(Image.fromarray(bottom_left), REJECTED_COLOUR).any()  # its rejected entry, though 0 of them


def test_near_cutoff_keeps_the_rejected_within_a_tenth_of_the_score_range() -> None:
    scores = np.array([0.0, 0.5, 0.55, 0.58, 0.6, 0.9, 1.0])
    # range 1.0: band 0.1 below the cutoff 0.6 -> 0.5 <= s < 0.6
    assert near_cutoff(scores, 0.6).tolist() == [False, True, True, True, False, False, False]
    assert near_cutoff(np.zeros(0), 0.5).shape == (0,)


def test_thumbnail_shrinks_by_whole_blocks_and_never_enlarges() -> None:
    image = np.arange(600 * 300, dtype=np.float32).reshape(300, 600)
    thumb = thumbnail(image, 10.0, size=200, lowpass_sigma=0)
    assert thumb.factor == 3 and thumb.grey.shape == (100, 200)
    assert thumbnail(image, 10.0, size=4096).grey.shape == (300, 600)
    ramp = np.tile(np.linspace(0.0, 1.0, 100, dtype=np.float32), (50, 1))
    grey = thumbnail(ramp, 10.0, size=100, lowpass_sigma=0).grey
    assert grey[25, 0] == 0 and grey[25, 99] == 255 and np.all(np.diff(grey[25].astype(int)) >= 0)


def test_bad_input_is_refused() -> None:
    with pytest.raises(InputError):
        thumbnail(np.zeros(5, dtype=np.float32), 10.0)
    with pytest.raises(ConfigError):
        thumbnail(np.zeros((8, 8), dtype=np.float32), 0.0)
    with pytest.raises(ConfigError):
        thumbnail(np.zeros((8, 8), dtype=np.float32), 10.0, size=0)
    strip = thumbnail(np.arange(3 * 5000, dtype=np.float32).reshape(3, 5000), 4.0, size=500)  # thinner than a block
    assert strip.factor == 10 and strip.grey.shape == (1, 500)
    thumb = thumbnail(np.ones((8, 8), dtype=np.float32), 4.0)
    with pytest.raises(InputError):
        draw(thumb, 4.0, kept=np.zeros((3, 3)))


def test_preview_is_written_atomically_at_the_size_asked(tmp_path: Path) -> None:
    image = _discs((1000, 1500), np.array([[700.0, 500.0]]), 30)
    out = render_preview(image, np.array([[700.0, 500.0]]), 80.0, tmp_path / "a" / "p.png", max_size=300)
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (300, 200)
    jpeg = render_preview(image, np.zeros((0, 2)), 80.0, tmp_path / "p.jpg", rejected_xy=np.array([[10.0, 10.0]]))
    with Image.open(jpeg) as im:
        assert im.format == "JPEG" and max(im.size) <= 1024
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["p.png"]  # no temporary file left
