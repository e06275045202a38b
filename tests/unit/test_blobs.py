"""The size-tuned blob term beside the cosine score (``cryomae.picking.blobs``): its polarity measured on the
exemplars, and a score map raised at the centres of particle-sized blobs, only where it applies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cryomae.config import PickConfig
from cryomae.picking.blobs import BLOBS_KEY, blob_profile, contrast_z, with_blobs
from cryomae.picking.picker import ScoreMap
from cryomae.preprocess import Geometry

D = 24.0
CENTRES = np.array([[60.0, 60.0], [150.0, 80.0], [100.0, 170.0], [200.0, 200.0]])  # x, y


def _micrograph(sign: float = -1.0, seed: int = 0) -> np.ndarray:
    """Noise with particle-sized discs darker (sign -1) or lighter (+1) than the background at CENTRES."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    img = rng.normal(scale=0.5, size=(256, 256))
    for x, y in CENTRES:
        img += sign * 2.0 * (((xx - x) ** 2 + (yy - y) ** 2) <= (D / 2) ** 2)
    return img.astype(np.float32)


def _flat_map(geometry: Geometry, seed: int = 1) -> ScoreMap:
    """A cosine map that knows nothing (noise), one cell every 4 model pixels."""
    rng = np.random.default_rng(seed)
    cells = int(256 * geometry.scale / 4)
    return ScoreMap(
        scores=rng.normal(0.3, 0.02, size=(cells, cells)).astype(np.float32), stride=4, offset=0.0, level=np.zeros(1)
    )


def _geometry() -> Geometry:
    return Geometry(diameter=D, box_factor=1.0, img_size=32)


@pytest.mark.parametrize(("sign", "polarity"), [(-1.0, "dark"), (1.0, "light")])
def test_the_polarity_is_read_from_the_exemplars(sign: float, polarity: str) -> None:
    profile = blob_profile(_micrograph(sign), CENTRES, D)
    assert profile["polarity"] == polarity
    assert profile["exemplar_z"] > 2.0  # discs of the particle's size stand out of the noise
    assert profile["exemplar_share"] == 1.0  # every one of them
    # exemplars on the background: not blobs to the DoG
    background = blob_profile(_micrograph(sign), np.array([[20.0, 230.0], [230.0, 20.0], [120.0, 120.0]]), D)
    assert background["exemplar_z"] < 1.0
    assert background["exemplar_share"] < PickConfig().blob_min_share
    # half of them on particles, half on the background: the share says so, whatever the median
    mixed = blob_profile(_micrograph(sign), np.concatenate([CENTRES[:2], [[230.0, 20.0], [120.0, 120.0]]]), D)
    assert mixed["polarity"] == polarity
    assert mixed["exemplar_share"] == 0.5


def test_the_blob_term_raises_the_map_at_the_particles_centres() -> None:
    geometry, image = _geometry(), _micrograph()
    smap = _flat_map(geometry)
    manifest = {BLOBS_KEY: blob_profile(image, CENTRES, D)}
    dog_only = PickConfig(contrast_weight=0.0)  # the contrast term has a test of its own
    out = with_blobs(smap, geometry, manifest, image, dog_only)
    assert out.scores.shape == smap.scores.shape and out.scores.dtype == smap.scores.dtype
    gy, gx = smap.scores.shape
    rc = np.stack(np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij"), axis=-1).reshape(-1, 2)
    xy = geometry.to_original(smap.centres(rc))
    near = np.min(np.linalg.norm(xy[:, None] - CENTRES[None], axis=2), axis=1) < D / 4
    far = np.min(np.linalg.norm(xy[:, None] - CENTRES[None], axis=2), axis=1) > D
    gain = (out.scores - smap.scores).ravel()
    assert gain[near].min() > gain[far].max()  # every particle's centre gains more than any background cell
    # the size of the term: blob_weight x the map's robust spread x the DoG's robust z
    spread = 1.4826 * np.median(np.abs(smap.scores - np.median(smap.scores)))
    double = with_blobs(
        smap, geometry, manifest, image, dog_only.model_copy(update={"blob_weight": 2 * dog_only.blob_weight})
    )
    np.testing.assert_allclose(double.scores - smap.scores, 2 * (out.scores - smap.scores), rtol=1e-3, atol=1e-6)
    assert gain[near].mean() > 2 * PickConfig().blob_weight * spread


def test_the_cosine_alone_where_the_term_does_not_apply() -> None:
    geometry, image = _geometry(), _micrograph()
    smap = _flat_map(geometry)
    profile = blob_profile(image, CENTRES, D)
    cases = {
        "weights 0": ({BLOBS_KEY: profile}, smap, PickConfig(blob_weight=0.0, contrast_weight=0.0)),
        "a model trained before the term": ({}, smap, PickConfig()),
        "exemplars that are no blobs": ({BLOBS_KEY: {**profile, "exemplar_share": 0.3}}, smap, PickConfig()),
        "an older model's exemplars that are no blobs": (
            {BLOBS_KEY: {"polarity": "dark", "exemplar_z": 0.9}},
            smap,
            PickConfig(),
        ),
        "the particle head's logits": ({BLOBS_KEY: profile}, dataclasses.replace(smap, logits=True), PickConfig()),
    }
    for case, (manifest, m, cfg) in cases.items():
        assert with_blobs(m, geometry, manifest, image, cfg) is m, case
    # a lower bar lets the weak exemplars' term through
    weak = {BLOBS_KEY: {**profile, "exemplar_share": 0.3}}
    assert with_blobs(smap, geometry, weak, image, PickConfig(blob_min_share=0.25)) is not smap
    # the share decides, not the median: a weak median with enough strong blobs among the exemplars gets the term
    strong_few = {BLOBS_KEY: {**profile, "exemplar_z": 0.7, "exemplar_share": 0.45}}
    assert with_blobs(smap, geometry, strong_few, image, PickConfig()) is not smap
    # a model trained before the share was measured: gated on its median, as when it was trained
    older = {BLOBS_KEY: {"polarity": "dark", "exemplar_z": 1.2}}
    assert with_blobs(smap, geometry, older, image, PickConfig()) is not smap


def test_junk_that_is_a_stronger_blob_than_the_particles_earns_no_more_than_they_do() -> None:
    geometry, image = _geometry(), _micrograph()
    yy, xx = np.mgrid[:256, :256]
    junk = np.array([200.0, 50.0])
    image = image - 8.0 * (((xx - junk[0]) ** 2 + (yy - junk[1]) ** 2) <= (D / 2) ** 2)  # an aggregate: 4x darker
    smap = _flat_map(geometry)
    manifest = {BLOBS_KEY: blob_profile(image, CENTRES, D)}
    gy, gx = smap.scores.shape
    rc = np.stack(np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij"), axis=-1).reshape(-1, 2)
    xy = geometry.to_original(smap.centres(rc))
    on_junk = np.linalg.norm(xy - junk, axis=1) < D / 4
    on_particle = np.min(np.linalg.norm(xy[:, None] - CENTRES[None], axis=2), axis=1) < D / 4

    def gains(cap: float | None) -> np.ndarray:
        return (
            with_blobs(smap, geometry, manifest, image, PickConfig(blob_z_cap=cap, contrast_weight=0.0)).scores
            - smap.scores
        ).ravel()

    uncapped, capped = gains(None), gains(1.0)
    assert uncapped[on_junk].max() > 1.5 * uncapped[on_particle].max()  # the DoG alone loves the aggregate
    # capped: no more than a particle as much a blob as the exemplars' median (their centres, measured at training)
    spread = 1.4826 * np.median(np.abs(smap.scores - np.median(smap.scores)))
    ceiling = PickConfig().blob_weight * spread * manifest[BLOBS_KEY]["exemplar_z"]
    assert capped[on_junk].max() <= ceiling * (1 + 1e-4)
    assert capped[on_junk].max() < 1.02 * capped[on_particle].max()


def test_the_contrast_term_raises_the_map_where_the_micrograph_holds_structure() -> None:
    """Particles whose halves are dark and light (no net blob for the DoG) still hold more contrast than the
    ice: the contrast term raises the map at their centres, by ``contrast_weight`` x the map's spread x its z."""
    geometry = _geometry()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    image = rng.normal(scale=0.5, size=(256, 256))
    for x, y in CENTRES:
        disc = ((xx - x) ** 2 + (yy - y) ** 2) <= (D / 2) ** 2
        image += 2.0 * disc * np.where(xx < x, 1.0, -1.0)  # half light, half dark: zero mean
    image = image.astype(np.float32)
    smap = _flat_map(geometry)
    xy = geometry.to_original(
        smap.centres(np.stack(np.meshgrid(*map(np.arange, smap.scores.shape), indexing="ij"), -1).reshape(-1, 2))
    )
    dist = np.min(np.linalg.norm(xy[:, None] - CENTRES[None], axis=2), axis=1)
    inside = np.all((xy > D) & (xy < 256 - D), axis=1)  # the picker keeps no candidate nearer the edges
    near, far = dist < D / 4, (dist > 1.5 * D) & inside
    z = contrast_z(smap, geometry, image).ravel()
    assert z[near].min() > 10.0 > 3.0 > z[far].max()

    profile = {"polarity": "dark", "exemplar_z": 2.0, "exemplar_share": 1.0}  # the gate open
    only_contrast = PickConfig(blob_weight=0.0, contrast_weight=0.5)
    out = with_blobs(smap, geometry, {BLOBS_KEY: profile}, image, only_contrast)
    spread = 1.4826 * np.median(np.abs(smap.scores - np.median(smap.scores)))
    np.testing.assert_allclose((out.scores - smap.scores).ravel(), 0.5 * spread * z, rtol=1e-3, atol=1e-6)
    # the same gate as the DoG's: exemplars that are no blobs keep the cosine alone
    closed = {BLOBS_KEY: {**profile, "exemplar_share": 0.1}}
    assert with_blobs(smap, geometry, closed, image, only_contrast) is smap
    # beside the DoG term, the two add up
    both = with_blobs(smap, geometry, {BLOBS_KEY: profile}, image, PickConfig(contrast_weight=0.5))
    dog = with_blobs(smap, geometry, {BLOBS_KEY: profile}, image, PickConfig(contrast_weight=0.0))
    np.testing.assert_allclose(both.scores - dog.scores, out.scores - smap.scores, rtol=1e-3, atol=1e-6)
