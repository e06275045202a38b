"""Tests of the difference-of-Gaussians baseline picker on synthetic micrographs with known particles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from cryomae.baselines import dog_pick, dog_response
from cryomae.errors import ConfigError, InputError


def _synthetic(
    size: int, diameter: float, centres: list[tuple[int, int]], contrast: float, seed: int = 0
) -> np.ndarray:
    """Unit Gaussian noise with uniform discs of ``contrast`` added at (x, y) ``centres``."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(size, size)).astype(np.float32)  # [H, W]
    yy, xx = np.mgrid[0:size, 0:size]
    for x, y in centres:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= (diameter / 2) ** 2] += contrast
    return img


SMALL = [(x, y) for x in (40, 100, 160, 220) for y in (40, 120, 200)]  # 12 centres in 256 x 256
LARGE = [(x, y) for x in (80, 200, 320, 440) for y in (80, 250, 420)]  # 12 centres in 512 x 512


def _found(xy: np.ndarray, centres: list[tuple[int, int]], tol: float = 4.0) -> int:
    if len(xy) == 0:
        return 0
    dist, _ = cKDTree(xy).query(np.asarray(centres, dtype=np.float64))
    return int(np.count_nonzero(dist <= tol))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_dark_discs(seed: int) -> None:
    img = _synthetic(256, 20.0, SMALL, contrast=-0.7, seed=seed)
    xy, scores = dog_pick(img, diameter=20.0)
    assert xy.shape[1] == 2 and scores.shape == (len(xy),)
    assert _found(xy, SMALL) >= 10
    assert len(xy) <= 20
    assert np.all(np.diff(scores) <= 0)  # descending


def test_auto_polarity_follows_the_contrast() -> None:
    dark = _synthetic(256, 20.0, SMALL, contrast=-0.7)
    light = _synthetic(256, 20.0, SMALL, contrast=0.7)
    assert dog_response(dark, 20.0)[2] == "dark"
    assert dog_response(light, 20.0)[2] == "light"
    assert _found(dog_pick(light, 20.0)[0], SMALL) >= 10
    # Forcing the wrong polarity finds the rings around the discs, not the centres.
    assert _found(dog_pick(light, 20.0, polarity="dark")[0], SMALL) <= 2


def test_binning_returns_original_pixel_coordinates() -> None:
    # Diameter 60 bins by 2; particles are most of the DoG peaks here, which a threshold estimated from the
    # peak values alone would get wrong.
    img = _synthetic(512, 60.0, LARGE, contrast=-0.7)
    response, factor, _ = dog_response(img, 60.0)
    assert factor == 2 and response.shape == (256, 256)
    xy, _ = dog_pick(img, diameter=60.0)
    assert _found(xy, LARGE) >= 11
    assert len(xy) <= 14


def test_pure_noise_gives_few_picks_and_explicit_threshold_applies() -> None:
    noise = np.random.default_rng(5).normal(size=(512, 512)).astype(np.float32)
    xy, _ = dog_pick(noise, diameter=20.0)
    assert len(xy) <= 3
    img = _synthetic(256, 20.0, SMALL, contrast=-0.7)
    xy_all, scores_all = dog_pick(img, 20.0, threshold=-np.inf)
    assert len(xy_all) > 20  # every local maximum
    xy_cut, scores_cut = dog_pick(img, 20.0, threshold=float(scores_all[5]))
    assert len(xy_cut) == 6
    np.testing.assert_array_equal(scores_cut, scores_all[:6])


def test_border_peaks_are_excluded() -> None:
    img = _synthetic(256, 20.0, [(3, 128), (128, 128)], contrast=-1.5)
    xy, _ = dog_pick(img, 20.0)
    assert np.all((xy >= 5) & (xy <= 250))
    assert _found(xy, [(128, 128)]) == 1


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        dog_pick(np.zeros((32, 32), np.float32), 10.0, polarity="bright")
    with pytest.raises(ConfigError):
        dog_pick(np.zeros((32, 32), np.float32), 0.0)
    with pytest.raises(InputError):
        dog_pick(np.zeros(32, np.float32), 10.0)
    flat_xy, flat_scores = dog_pick(np.zeros((64, 64), np.float32), 10.0)
    assert flat_xy.shape == (0, 2) and flat_scores.shape == (0,)


@pytest.mark.parametrize(("diameter", "size"), [(20.0, 256), (60.0, 512)])
def test_the_fourier_filter_is_the_spatial_filter(diameter: float, size: int) -> None:
    """``fast=True`` (the score's blob term) filters through the Fourier transform: the same response, edges
    included (the image is extended as the spatial filter extends it), to half a percent of its spread."""
    centres = SMALL if size == 256 else LARGE
    img = _synthetic(size, diameter, centres, contrast=-1.5) + np.linspace(0.0, 3.0, size)[None, :]  # and a ramp
    spatial, factor, _ = dog_response(img, diameter, "dark")
    fourier, fast_factor, _ = dog_response(img, diameter, "dark", fast=True)
    assert fast_factor == factor and fourier.shape == spatial.shape
    assert np.abs(fourier - spatial).max() < 0.006 * spatial.std()
