"""Normalisation, resampling and border-band detection."""

import numpy as np

from cryomae.preprocess import normalize, padded_borders, resample


def test_normalize_is_robust_to_a_dark_contamination():
    rng = np.random.default_rng(0)
    img = rng.normal(5.0, 2.0, (256, 256)).astype(np.float32)
    img[:40, :40] = -500.0  # ice contamination
    out = normalize(img).numpy()
    interior = out[100:, 100:]
    assert abs(float(np.median(interior))) < 0.1
    assert 0.8 < float(interior.std()) < 1.2
    assert out.min() >= -5.0  # clipped, so it cannot dominate the scale


def test_the_gpu_normalisation_matches_the_cpu_one():
    import torch

    from cryomae.preprocess import _normalize_on_device

    rng = np.random.default_rng(4)
    img = rng.normal(3.0, 2.0, (300, 700)).astype(np.float32)
    img[10:20, 10:20] = 900.0  # hot pixels, clipped by both
    source = img.copy()
    on_device = _normalize_on_device(torch.from_numpy(img))
    np.testing.assert_allclose(on_device.numpy(), normalize(img).numpy(), atol=1e-6)
    np.testing.assert_array_equal(img, source)  # the caller's image is left alone
    assert float(on_device.max()) == 5.0


def test_resample_size_and_mean():
    img = np.ones((100, 60), np.float32)
    out = resample(img, 0.5)
    assert tuple(out.shape) == (50, 30)
    assert np.allclose(out.numpy(), 1.0, atol=1e-5)


def test_padded_borders_finds_replicated_bands():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(128, 160)).astype(np.float32)
    img[:, :11] = img[:, 11:12]  # left band: 11 columns repeat column 11
    img[:7, :] = img[7:8, :]  # top band: 7 rows repeat row 7
    left, right, top, bottom = padded_borders(img)
    assert (left, right, top, bottom) == (11, 0, 7, 0)


def test_padded_borders_none_on_a_clean_image():
    img = np.random.default_rng(2).normal(size=(64, 64)).astype(np.float32)
    assert padded_borders(img) == (0, 0, 0, 0)


def test_outlier_regions_flags_carbon_and_not_ice():
    from cryomae.preprocess import Geometry, outlier_regions, prepare_with_background

    rng = np.random.default_rng(3)
    img = rng.normal(size=(256, 256)).astype(np.float32)
    img[:, :80] -= 6.0  # a carbon film: much darker than the ice
    img += np.linspace(0, 0.5, 256, dtype=np.float32)[None, :]  # a mild ice-thickness gradient
    geo = Geometry(diameter=16.0, box_factor=1.0, img_size=16)
    _, level = prepare_with_background(img, geo)
    bad = outlier_regions(level.numpy(), 3.0)
    assert bad[:, :60].mean() > 0.95  # the carbon, away from its edge
    assert bad[:, 120:].mean() < 0.01  # the ice, gradient and all


def test_flattening_over_the_ice_leaves_the_ice_beside_carbon_unbiased():
    """A carbon film (much darker) beside the ice: flattening over everything pulls the background near the edge
    down, so the ice beside the carbon comes out brighter than the rest; flattening over the ice alone
    (``Geometry.ice_z``) leaves that ice like the rest and the carbon flat zero."""
    from cryomae.preprocess import Geometry, prepare_with_background

    rng = np.random.default_rng(5)
    img = rng.normal(size=(512, 512)).astype(np.float32)
    img[:, :160] -= 6.0
    plain = Geometry(diameter=16.0, box_factor=1.0, img_size=16, highpass=2.0, ice_z=None)
    masked = Geometry(diameter=16.0, box_factor=1.0, img_size=16, highpass=2.0, ice_z=3.0)
    near, far = (slice(None), slice(180, 220)), (slice(None), slice(400, 500))  # ice beside the edge, far from it
    flat_plain = prepare_with_background(img, plain)[0].numpy()
    flat_masked = prepare_with_background(img, masked)[0].numpy()
    assert flat_plain[near].mean() - flat_plain[far].mean() > 0.5  # the bias of flattening over the carbon
    assert abs(flat_masked[near].mean() - flat_masked[far].mean()) < 0.1
    assert np.all(flat_masked[:, :140] == 0.0)  # the carbon, away from its edge
    assert 0.8 < flat_masked[far].std() < 1.2  # unit spread over the ice
