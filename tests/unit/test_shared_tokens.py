"""The convolutional (shared-token) evaluation gives the windowed evaluation's scores, and is used only where
it is cheaper and allowed."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pytest
import torch

from cryomae.config import PickConfig
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import get_preset
from cryomae.picking.picker import compute_score_map, scoring_flops, shared_tokens_apply
from cryomae.preprocess import Geometry, prepare
from cryomae.training.train import exemplar_bank

CPU = torch.device("cpu")


def _trained(
    feature: Literal["mean", "cls", "flat"] = "flat", layer: int = 0, img_size: int = 32, n_bank: int = 6
) -> TrainedModel:
    torch.manual_seed(0)
    preset = dataclasses.replace(get_preset("test"), feature=feature, feature_layer=layer, img_size=img_size)
    model = MaskedAutoencoder(preset).eval()
    image = torch.randn(n_bank, 1, img_size, img_size)
    bank = model.features(image) + 0.1 * torch.randn(n_bank, 1)  # exemplar-like features with a spread
    return TrainedModel(model, bank, Geometry(diameter=20.0, box_factor=1.0, img_size=img_size), {})


def _micrograph(seed: int = 1, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(size, size + 12)).astype(np.float32)
    yy, xx = np.mgrid[:size, : size + 12]
    for cy, cx in rng.uniform(20, size - 20, size=(12, 2)):  # blobs: a score map with structure
        img -= 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
    return img


@pytest.mark.parametrize(
    ("feature", "overrides"),
    [
        ("flat", {}),
        ("flat", {"score": "max"}),
        ("flat", {"feature_norm": "center"}),
        ("flat", {"feature_norm": "none"}),
        ("flat", {"stride_fraction": 0.5}),  # stride 16, patch 8: windows 2 token-grid cells apart
        ("flat", {"stride_fraction": 0.25}),  # stride 8 = patch: one token per patch position
        ("flat", {"score": "mean_max"}),
        ("mean", {}),
        ("mean", {"score": "max"}),
        ("mean", {"score": "mean_max", "max_weight": 0.7}),
    ],
)
def test_shared_tokens_give_the_windowed_scores(feature: Literal["mean", "flat"], overrides: dict[str, object]) -> None:
    trained = _trained(feature)
    image = _micrograph()
    fast = PickConfig(device="cpu", **overrides)
    slow = fast.model_copy(update={"shared_tokens": False})
    s = trained.preset.img_size
    stride = max(1, round(s * fast.stride_fraction))
    padded = (round(image.shape[0] * trained.geometry.scale) + s, round(image.shape[1] * trained.geometry.scale) + s)
    assert shared_tokens_apply(trained, padded, stride, fast, CPU)
    assert not shared_tokens_apply(trained, padded, stride, slow, CPU)
    a = compute_score_map(trained, image, fast)
    b = compute_score_map(trained, image, slow)
    assert a.scores.shape == b.scores.shape
    assert a.scores.std() > 0.01  # a real map, not a constant
    np.testing.assert_allclose(a.scores, b.scores, atol=2e-5)
    assert np.argmax(a.scores) == np.argmax(b.scores)


def test_deeper_feature_layers_are_scored_window_by_window() -> None:
    # after a transformer block every token depends on the whole window: no sharing is possible
    trained = _trained(layer=1)
    assert "shared" not in scoring_flops(trained, (200, 200), 3, PickConfig())
    assert not shared_tokens_apply(trained, (200, 200), 3, PickConfig(), CPU)


def test_shared_tokens_are_skipped_where_they_cost_more() -> None:
    # stride 7 with patch 8: the token grid has step 1, 49x denser than the windows; one token per window
    # would be cheaper window by window
    trained = _trained(img_size=8)
    flops = scoring_flops(trained, (400, 400), 7, PickConfig())
    assert flops["shared"] > flops["windowed"]
    assert not shared_tokens_apply(trained, (400, 400), 7, PickConfig(), CPU)


def test_flop_count_of_the_patch_embedding() -> None:
    trained = _trained(img_size=24)
    p, d, tokens = 8, trained.preset.embed_dim, trained.preset.tokens
    flops = scoring_flops(trained, (24 + 3 * 10, 24 + 3 * 10), 3, PickConfig())
    assert flops["windows"] == 11 * 11
    assert flops["windowed"] == 11 * 11 * (tokens * p * p * d + tokens * d)  # mean score: one bank vector


def test_coarse_to_fine_finds_the_full_search_peaks_with_fewer_windows() -> None:
    from cryomae.picking.picker import pick_micrograph

    trained = _trained()
    rng = np.random.default_rng(3)
    image = rng.normal(size=(240, 240)).astype(np.float32)
    yy, xx = np.mgrid[:240, :240]
    centres = rng.uniform(30, 210, size=(10, 2))
    for cy, cx in centres:  # particle-sized blobs: broad score peaks
        image -= 3.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
    geo = trained.geometry
    prepared = prepare(image, geo)
    trained.bank = exemplar_bank(trained.model, prepared, geo.to_model(centres[:4, ::-1]), CPU, kind="views")
    windowed = PickConfig(device="cpu", threshold=0.0, shared_tokens=False)  # the search matters window by window
    full = pick_micrograph(trained, image, windowed)
    c2f = pick_micrograph(trained, image, windowed.model_copy(update={"search": "coarse_to_fine"}))
    assert full.n_evaluated == full.n_windows
    assert c2f.n_windows == full.n_windows
    assert c2f.n_evaluated < 0.8 * full.n_windows
    # the best pick of the full search is found again, and most of its strongest ones, within a fine stride
    top = full.candidates_xy[:10]
    d = np.linalg.norm(top[:, None, :] - c2f.candidates_xy[None, :, :], axis=2).min(axis=1)
    stride_px = round(trained.preset.img_size * 0.125) / trained.geometry.scale
    assert d[0] <= stride_px
    assert np.mean(d <= 1.5 * stride_px) >= 0.5


def test_features_too_large_to_keep_are_scored_in_two_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import cryomae.picking.picker as picker

    trained = _trained(layer=1)
    image = _micrograph()
    cfg = PickConfig(device="cpu", batch_size=256)
    kept = compute_score_map(trained, image, cfg).scores
    monkeypatch.setattr(picker, "memory_budget", lambda device: 0)  # nothing may be kept: stream twice
    streamed = compute_score_map(trained, image, cfg).scores
    assert kept.std() > 0.01
    np.testing.assert_allclose(streamed, kept, atol=2e-5)


def test_window_batch_size_follows_the_config_the_device_and_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import cryomae.picking.picker as picker

    shallow, deep = _trained(layer=0), _trained(layer=2)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    assert picker.window_batch_size(deep, PickConfig(batch_size=100), gpu) == 100  # an explicit size wins
    assert picker.window_batch_size(deep, PickConfig(), cpu) == picker.CPU_BATCH
    monkeypatch.setattr(picker, "memory_budget", lambda device: 1 << 30)
    big = picker.window_batch_size(deep, PickConfig(), gpu)
    monkeypatch.setattr(picker, "memory_budget", lambda device: 1 << 28)
    assert picker.window_batch_size(deep, PickConfig(), gpu) == pytest.approx(big / 4, rel=0.01)  # a quarter
    assert picker.window_batch_size(shallow, PickConfig(), gpu) > big / 4  # no transformer block: cheaper
    monkeypatch.setattr(picker, "memory_budget", lambda device: 0)
    assert picker.window_batch_size(deep, PickConfig(), gpu) == 64  # never below 64
    monkeypatch.setattr(picker, "memory_budget", lambda device: 1 << 50)
    assert picker.window_batch_size(deep, PickConfig(), gpu) == 65536


@pytest.mark.parametrize("batch_size", [97, None])
def test_scores_do_not_depend_on_the_batch_size(batch_size: int | None) -> None:
    trained = _trained(layer=1)
    image = _micrograph()
    reference = compute_score_map(trained, image, PickConfig(device="cpu", batch_size=4096)).scores
    got = compute_score_map(trained, image, PickConfig(device="cpu", batch_size=batch_size)).scores
    np.testing.assert_allclose(got, reference, atol=2e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_the_blended_score_is_the_weighted_mean_and_max(shared: bool) -> None:
    trained, image = _trained(), _micrograph()
    cfg = PickConfig(device="cpu", shared_tokens=shared)
    mean = compute_score_map(trained, image, cfg).scores
    best = compute_score_map(trained, image, cfg.model_copy(update={"score": "max"})).scores
    blend = compute_score_map(trained, image, cfg.model_copy(update={"score": "mean_max", "max_weight": 0.4})).scores
    assert np.abs(best - mean).max() > 0.05  # the two differ, so the blend is a real test
    np.testing.assert_allclose(blend, 0.6 * mean + 0.4 * best, atol=2e-5)
