"""Coordinates through the pipeline: original <-> model pixels, crops, rotations, and score-map cells.

Convention everywhere: x = column, y = row, 0-based, pixel centres at integer positions (``image[y, x]``).
"""

import math

import numpy as np
import pytest
import torch

from cryomae.config import PickConfig
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import PRESETS
from cryomae.picking.picker import ScoreMap, compute_score_map, pick_micrograph
from cryomae.preprocess import Geometry, prepare, resample
from cryomae.training.regions import crop_regions, dihedral_views

# ------------------------------------------------------------------------------------------------ Geometry


@pytest.mark.parametrize(
    "geo",
    [Geometry(20.0, 1.5, 24), Geometry(12.0, 2.0, 24), Geometry(33.0, 2.0, 48), Geometry(10.0, 1.5, 24)],
    ids=["shrink0.8", "scale1", "shrink0.73", "grow1.6"],
)
def test_to_model_and_to_original_are_inverse(geo):
    xy = np.random.default_rng(0).uniform(-10, 500, (50, 2))
    np.testing.assert_allclose(geo.to_original(geo.to_model(xy)), xy, atol=1e-9)
    np.testing.assert_allclose(geo.to_model(geo.to_original(xy)), xy, atol=1e-9)


def test_to_model_maps_pixel_centres_and_image_edges():
    geo = Geometry(diameter=20.0, box_factor=1.5, img_size=24)
    assert geo.box == 30.0 and geo.scale == pytest.approx(0.8)
    # area-style resampling: the centre of original pixel x lands at (x + 0.5) * scale - 0.5
    np.testing.assert_allclose(geo.to_model(np.array([[0.0, 10.0]])), [[-0.1, 7.9]])
    # the outer edge of the image (-0.5 and W - 0.5) maps onto the outer edge of the resampled image
    np.testing.assert_allclose(geo.to_model(np.array([[-0.5, 99.5]])), [[-0.5, 100 * 0.8 - 0.5]])
    # x and y are mapped independently, each staying in its own column
    np.testing.assert_allclose(geo.to_model(np.array([[10.0, 0.0]])), [[7.9, -0.1]])


@pytest.mark.parametrize(
    ("geo", "expected"),
    [
        (Geometry(20.0, 1.5, 24), (80, 125)),  # scale 0.8: 80.8 -> 80, 125.6 -> 125
        (Geometry(33.0, 2.0, 48), (73, 114)),  # scale 0.727: 73.45 -> 73, 114.2 -> 114
        (Geometry(12.0, 2.0, 24), (101, 157)),  # scale 1: no resampling
        (Geometry(10.0, 1.5, 24), (161, 251)),  # scale 1.6: 161.6 -> 161, 251.2 -> 251
    ],
)
def test_prepare_output_size_is_floored_scaled_size(geo, expected):
    """Output pixel i samples input (i + 0.5) / scale - 0.5 exactly, so the size is floor(H * scale)."""
    img = np.random.default_rng(1).normal(size=(101, 157)).astype(np.float32)
    out = prepare(img, geo)
    assert tuple(out.shape) == expected == (int(101 * geo.scale), int(157 * geo.scale))
    assert out.dtype == torch.float32


def _blob_centroid_after_resampling(geo: Geometry, shape: tuple[int, int], x0: float, y0: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 4.0**2)).astype(np.float32)
    out = resample(img, geo.scale).numpy().astype(np.float64)
    ys, xs = np.mgrid[0 : out.shape[0], 0 : out.shape[1]]
    return np.array([(out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()])


@pytest.mark.parametrize(
    ("geo", "shape"),
    [
        (Geometry(20.0, 1.5, 24), (100, 155)),
        (Geometry(10.0, 1.5, 24), (100, 155)),
        (Geometry(12.0, 2.0, 24), (101, 157)),
    ],
    ids=["0.8", "1.6", "1.0"],
)
def test_resampling_keeps_a_blob_at_its_mapped_position(geo, shape):
    """A blob at original (x, y) appears at geometry.to_model((x, y)) in the resampled image.

    (prepare = per-pixel normalisation, which moves nothing, then this resampling.) The image sides times
    the scale are whole numbers here, so the resampled size is exact.
    """
    centroid = _blob_centroid_after_resampling(geo, shape, 100.0, 40.0)
    np.testing.assert_allclose(centroid, geo.to_model(np.array([[100.0, 40.0]]))[0], atol=0.02)


@pytest.mark.parametrize(
    ("geo", "shape"), [(Geometry(20.0, 1.5, 24), (101, 157)), (Geometry(10.0, 1.5, 24), (101, 157))], ids=["0.8", "1.6"]
)
def test_resampling_keeps_a_blob_at_its_mapped_position_for_any_image_size(geo, shape):
    centroid = _blob_centroid_after_resampling(geo, shape, 100.0, 40.0)
    np.testing.assert_allclose(centroid, geo.to_model(np.array([[100.0, 40.0]]))[0], atol=0.02)


# ------------------------------------------------------------------------------------------------- crops


def test_crop_centred_on_a_bright_pixel_has_its_maximum_at_the_centre():
    h, w = 25, 50  # not square, so a swapped x/y would land outside or on the wrong pixel
    img = torch.zeros(h, w)
    spots = [(30, 10), (7, 20), (44, 3)]  # (x, y)
    for k, (x, y) in enumerate(spots):
        img[y, x] = 1.0 + k
    crops = crop_regions(img, np.array(spots, dtype=np.float64), 9)
    assert tuple(crops.shape) == (3, 1, 9, 9)
    for k in range(3):
        c = crops[k, 0]
        assert np.unravel_index(int(torch.argmax(c)), c.shape) == (4, 4)
        assert float(c[4, 4]) == pytest.approx(1.0 + k)
        assert float(c.sum()) == pytest.approx(1.0 + k), "only its own spot is in the crop"


def test_crop_reads_zero_outside_the_image():
    img = torch.ones(20, 30)
    crop = crop_regions(img, np.array([[0.0, 0.0]]), 5)[0, 0]
    # the 2 rows above and 2 columns left of pixel (0, 0) are outside the image
    assert torch.equal(crop[2:, 2:], torch.ones(3, 3))
    assert float(crop[:2].abs().max()) < 1e-5 and float(crop[:, :2].abs().max()) < 1e-5


def _asymmetric_image() -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero image with two marks around the centre (x=20, y=15): 1.0 three pixels to its right (x=23),
    0.5 two pixels above it (y=13, rows grow downwards)."""
    img = torch.zeros(31, 41)
    cx, cy = 20, 15
    img[cy, cx + 3] = 1.0
    img[cy - 2, cx] = 0.5
    return img, (cx, cy)


def test_rotation_by_a_quarter_turn_goes_the_documented_way():
    """crop_regions samples the image at centre + R(angle) @ (ox, oy) for output offset (ox, oy).

    With angle = pi/2, output offset (ox, oy) reads image offset (-oy, ox). So the mark 3 px to the RIGHT of
    the centre (image offset (3, 0)) shows up at output offset (0, -3): 3 px ABOVE the centre, and the mark
    2 px ABOVE the centre (offset (0, -2)) shows up at (-2, 0): 2 px LEFT of it. Right -> up, up -> left:
    the content turns counter-clockwise as displayed (row 0 at the top), i.e. by -angle in (x, y) array
    coordinates, exactly numpy's rot90(crop, k=1).
    """
    img, (cx, cy) = _asymmetric_image()
    c0, c90 = crop_regions(img, np.array([[cx, cy], [cx, cy]], dtype=np.float64), 9, np.array([0.0, math.pi / 2]))
    c0, c90 = c0[0].numpy(), c90[0].numpy()
    assert c0[4, 7] == pytest.approx(1.0) and c0[2, 4] == pytest.approx(0.5), "angle 0 is the plain crop"
    assert c90[1, 4] == pytest.approx(1.0, abs=1e-5), "right mark now above the centre"
    assert c90[4, 2] == pytest.approx(0.5, abs=1e-5), "upper mark now left of the centre"
    np.testing.assert_allclose(c90, np.rot90(c0, k=1), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_k_quarter_turns_is_rot90(k):
    img = torch.from_numpy(np.random.default_rng(3).normal(size=(40, 50)).astype(np.float32))
    centre = np.array([[24.0, 17.0]])
    base = crop_regions(img, centre, 11)[0, 0].numpy()
    turned = crop_regions(img, centre, 11, np.array([k * math.pi / 2]))[0, 0].numpy()
    np.testing.assert_allclose(turned, np.rot90(base, k=k), atol=1e-4)


def test_flip_mirrors_x_before_the_rotation():
    img, (cx, cy) = _asymmetric_image()
    centres = np.array([[cx, cy]] * 3, dtype=np.float64)
    angles = np.array([0.0, 0.0, math.pi / 2])
    flips = np.array([False, True, True])
    plain, flipped, flipped90 = (c[0].numpy() for c in crop_regions(img, centres, 9, angles, flips))
    assert flipped[4, 1] == pytest.approx(1.0), "the right mark is now 3 px left of the centre"
    assert flipped[2, 4] == pytest.approx(0.5), "rows are untouched by a flip"
    np.testing.assert_allclose(flipped, plain[:, ::-1], atol=1e-6)
    # output offset o reads image offset R(angle) @ F @ o with F = diag(-1, 1): mirror the output columns
    np.testing.assert_allclose(flipped90, np.rot90(plain, k=1)[:, ::-1], atol=1e-5)


def test_dihedral_views_are_the_eight_distinct_symmetries_of_each_region():
    idx, angles, flips = dihedral_views(3)
    assert idx.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert len(angles) == len(flips) == 24
    assert len({(round(a, 6), bool(f)) for a, f in zip(angles[:8], flips[:8], strict=True)}) == 8
    img = torch.from_numpy(np.random.default_rng(4).normal(size=(60, 80)).astype(np.float32))
    centres = np.array([[20.0, 15.0], [50.0, 30.0], [65.0, 44.0]])
    views = crop_regions(img, centres[idx], 9, angles, flips)[:, 0].numpy()
    base = crop_regions(img, centres, 9)[:, 0].numpy()
    for r in range(3):
        v = views[8 * r : 8 * r + 8]
        for a in range(8):
            for b in range(a + 1, 8):
                assert not np.allclose(v[a], v[b], atol=1e-3), f"region {r}: views {a} and {b} coincide"
        group = [np.rot90(g, k) for g in (base[r], base[r][:, ::-1]) for k in range(4)]
        for view in v:
            assert min(np.abs(view - g).max() for g in group) < 1e-4, "every view is a symmetry of the crop"


# ---------------------------------------------------------------------------------------------- score map


def test_score_map_centres_maps_row_col_cells_to_xy():
    smap = ScoreMap(scores=np.zeros((10, 20)), stride=3, offset=-0.5)
    out = smap.centres(np.array([[2, 5], [0, 0], [9, 19]]))
    np.testing.assert_allclose(out, [[5 * 3 - 0.5, 2 * 3 - 0.5], [-0.5, -0.5], [19 * 3 - 0.5, 9 * 3 - 0.5]])
    np.testing.assert_allclose(smap.centres(np.array([1.5, 2.25])), [[2.25 * 3 - 0.5, 1.5 * 3 - 0.5]])


PATTERN = np.random.default_rng(42).choice([-4.0, 4.0], size=(8, 8)).astype(np.float32)


def _planted(shape: tuple[int, int], centres: list[tuple[float, float]], seed: int) -> np.ndarray:
    """Noise with PATTERN (8x8) planted centred on each (x, y); centres are half-integers."""
    img = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    for x, y in centres:
        x0, y0 = round(x - 3.5), round(y - 3.5)
        img[y0 : y0 + 8, x0 : x0 + 8] = PATTERN
    return img


def _trained(geo: Geometry, image: np.ndarray, centre: tuple[float, float]) -> TrainedModel:
    """A randomly initialised `test` model whose exemplar bank is the feature of a crop centred on ``centre``."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(PRESETS["test"]).eval()
    region = crop_regions(prepare(image, geo), geo.to_model(np.array([centre])), geo.img_size)
    return TrainedModel(model=model, bank=model.features(region), geometry=geo, manifest={})


# Window centres sit at x = 3j - 0.5 (stride 3, window 24, padded by 12); these centres are on that grid.
# (x, y, edge_margin): an interior one, one 5.5 px from the left edge, one 5.5 px from the right and bottom.
@pytest.mark.parametrize(
    ("x", "y", "margin"),
    [(41.5, 29.5, 1.0), (83.5, 62.5, 1.0), (5.5, 50.5, 0.0), (113.5, 83.5, 0.0)],
    ids=["interior", "interior2", "left-border", "bottom-right-corner"],
)
def test_picker_finds_a_planted_pattern_where_it_was_planted(x, y, margin):
    geo = Geometry(diameter=12.0, box_factor=2.0, img_size=24)  # scale 1: model pixels = original pixels
    image = _planted((90, 120), [(x, y)], seed=int(x))
    trained = _trained(geo, image, (x, y))
    cfg = PickConfig(device="cpu", edge_margin=margin, outlier_z=None)
    smap = compute_score_map(trained, image, cfg)
    assert smap.stride == 3 and smap.offset == pytest.approx(-0.5)
    best = np.array(np.unravel_index(int(np.argmax(smap.scores)), smap.scores.shape))
    assert smap.scores.max() == pytest.approx(1.0, abs=1e-4), "the window on the pattern is the exemplar itself"
    np.testing.assert_allclose(geo.to_original(smap.centres(best)), [[x, y]], atol=1e-6)
    result = pick_micrograph(trained, image, cfg)
    top = result.candidates_xy[0]
    assert np.hypot(*(top - [x, y])) <= 2.0, f"top candidate {top} vs planted ({x}, {y})"
    assert result.candidate_scores[0] == result.candidate_scores.max()


def _smooth_planted(shape: tuple[int, int], centre: tuple[float, float], seed: int) -> np.ndarray:
    """Noise plus an asymmetric group of four Gaussian blobs around ``centre`` (x, y), any sub-pixel position.

    Smooth, so that resampling and sub-pixel offsets between the exemplar crop and the window grid do not
    decorrelate it (a pixel-level pattern like PATTERN only matches windows exactly on the grid).
    """
    h, w = shape
    img = np.random.default_rng(seed).normal(size=shape)
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = centre
    for dx, dy, a in [(0, 0, 4.0), (5, -2, -4.0), (-3, 5, 3.0), (2, 6, -3.0)]:
        img += a * np.exp(-((xx - x - dx) ** 2 + (yy - y - dy) ** 2) / (2 * 1.8**2))
    return img.astype(np.float32)


@pytest.mark.parametrize(
    ("diameter", "box_factor"), [(16.0, 2.0), (10.0, 2.0), (20.0, 1.5)], ids=["scale0.75", "scale1.2", "scale0.8"]
)
@pytest.mark.parametrize(
    ("x", "y", "margin"),
    [(60.0, 45.0, 1.0), (27.3, 100.0, 1.0), (120.6, 30.2, 1.0), (8.4, 64.7, 0.0)],
    ids=["a", "b", "c", "left-border"],
)
def test_picker_finds_a_planted_pattern_with_resampling(diameter, box_factor, x, y, margin):
    """Off-grid centres and a micrograph resampled by the geometry: picks come back in original pixels."""
    geo = Geometry(diameter=diameter, box_factor=box_factor, img_size=24)
    image = _smooth_planted((130, 150), (x, y), seed=int(x * 10))
    trained = _trained(geo, image, (x, y))
    result = pick_micrograph(trained, image, PickConfig(device="cpu", edge_margin=margin, outlier_z=None))
    top = result.candidates_xy[0]
    assert np.hypot(*(top - [x, y])) <= 2.0, f"top candidate {top} vs planted ({x}, {y})"


def test_picks_keep_outlier_margin_diameters_away_from_carbon_and_contamination() -> None:
    """A score map whose local level shows a bright square (carbon): candidates on it are dropped by the level mask,
    and with ``outlier_margin`` also those within that many diameters of its edge (issue 24, item 4)."""
    from cryomae.config import PickConfig
    from cryomae.picking.picker import find_candidates

    geo = Geometry(diameter=10.0, box_factor=1.0, img_size=10)  # scale 1: model pixels are original pixels
    level = np.zeros((200, 200), np.float32)
    level += np.random.default_rng(0).normal(scale=0.01, size=level.shape).astype(np.float32)
    level[:, 120:] = 5.0  # carbon from column 120 on
    scores = np.zeros((100, 100))
    cells = {"far": (50, 40), "near": (50, 57), "on": (50, 70)}  # row, column of the map; x = 2 * column
    for k, (r, c) in enumerate(cells.values()):
        scores[r, c] = 1.0 + k
    smap = ScoreMap(scores=scores, stride=2, offset=0.0, level=level)
    image = np.random.default_rng(1).normal(size=(200, 200)).astype(np.float32)  # no padded border

    def kept(margin: float) -> set[float]:
        cfg = PickConfig(outlier_margin=margin, edge_margin=0.0, refine=False, nms_distance=0.4)
        xy, s = find_candidates(smap, geo, image, cfg)
        return {float(x) for x in xy[s >= 1.0][:, 0]}

    assert kept(0.0) == {80.0, 114.0}  # "on" (x 140) is on the carbon; "near" (x 114) is 6 px from its edge
    assert kept(0.5) == {80.0, 114.0}  # half a diameter, 5 px: "near" is outside the band
    assert kept(1.0) == {80.0}  # a diameter, 10 px: "near" is dropped, "far" (40 px off) kept
