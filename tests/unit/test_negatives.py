"""An operator's marked wrong picks in the model (``TrainedModel.negatives``): stored with it, and read by the cosine
score (``PickConfig.negative_weight``), the same way by the shared-token and the window-by-window evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cryomae.config import PickConfig, TrainConfig
from cryomae.errors import CheckpointError
from cryomae.model.checkpoint import NEGATIVES_KEY, WEIGHTS, load_model, save_model
from cryomae.picking.picker import compute_score_map
from cryomae.training.corrections import CorrectionMarks, apply_corrections
from tests.unit.test_checkpoint import _rehash
from tests.unit.test_shared_tokens import _micrograph, _trained

CPU = torch.device("cpu")


def _with_negatives(feature: Literal["mean", "flat"] = "mean", n: int = 3) -> tuple:
    trained = _trained(feature)
    image = _micrograph()
    base = compute_score_map(trained, image, PickConfig(device="cpu"))
    # wrong picks at the three highest cells of the map: what an operator would mark on a flood of false picks
    cells = np.argsort(-base.scores.ravel())[:n]
    rc = np.stack(np.unravel_index(cells, base.scores.shape), axis=1).astype(np.float64)
    xy = trained.geometry.to_original(base.centres(rc))
    marks = [CorrectionMarks(image=image, wrong=xy)]
    counts = apply_corrections(trained, marks, TrainConfig(bank_views=8), CPU)
    return trained, image, base, cells, counts


@pytest.mark.parametrize(
    ("feature", "score"), [("mean", "mean"), ("mean", "max"), ("flat", "mean"), ("flat", "mean_max")]
)
def test_a_window_like_a_marked_wrong_pick_loses_score(feature: Literal["mean", "flat"], score: str) -> None:
    trained, image, _, cells, counts = _with_negatives(feature)
    assert counts == {"missed": 0, "wrong": 3, "micrographs": 1}
    assert trained.negatives is not None and trained.negatives.shape == (3 * 8, trained.bank.shape[1])
    off = compute_score_map(trained, image, PickConfig(device="cpu", score=score, negative_weight=0.0))
    on = compute_score_map(
        trained, image, PickConfig(device="cpu", score=score, negative_weight=0.5, negative_rule="max")
    )
    drop = (off.scores - on.scores).ravel()
    # every window loses 0.5 x its cosine to the nearest negative; the marked windows (cosine ~1) lose the most
    assert drop[cells].mean() > np.percentile(drop, 90)
    assert np.all(drop[cells] > 0.3)
    # the shared-token and the window-by-window evaluations agree with negatives too
    slow = compute_score_map(
        trained,
        image,
        PickConfig(device="cpu", score=score, negative_weight=0.5, negative_rule="max", shared_tokens=False),
    )
    np.testing.assert_allclose(on.scores, slow.scores, atol=3e-5)


def test_the_mean_of_the_negatives_is_the_other_rule() -> None:
    trained, image, *_ = _with_negatives()
    nearest = compute_score_map(trained, image, PickConfig(device="cpu", negative_rule="max", negative_weight=0.25))
    mean = compute_score_map(trained, image, PickConfig(device="cpu", negative_rule="mean", negative_weight=0.25))
    off = compute_score_map(trained, image, PickConfig(device="cpu", negative_weight=0.0))
    # the nearest negative is at least as similar as their mean: the max rule takes off at least as much
    assert np.all(off.scores - nearest.scores >= off.scores - mean.scores - 1e-6)
    assert not np.allclose(nearest.scores, mean.scores)


def test_missed_particles_join_the_bank_in_their_views_where_asked() -> None:
    image = _micrograph()
    marks = [CorrectionMarks(image, missed=np.array([[60.0, 70.0], [90.0, 40.0]]))]
    trained = _trained("mean")
    before = trained.bank.clone()
    assert apply_corrections(trained, marks, TrainConfig(), CPU) == {"missed": 0, "wrong": 0, "micrographs": 0}
    torch.testing.assert_close(trained.bank, before)  # the default: missed particles are not used
    counts = apply_corrections(trained, marks, TrainConfig(corrections_missed=True), CPU)
    assert counts == {"missed": 2, "wrong": 0, "micrographs": 1}
    assert trained.negatives is None
    assert trained.bank.shape[0] == before.shape[0] + 2 * 8
    torch.testing.assert_close(trained.bank[: len(before)], before)


def test_negatives_are_stored_with_the_model_and_checked(tmp_path: Path) -> None:
    trained, image, *_ = _with_negatives()
    out = tmp_path / "model"
    save_model(out, trained.model, trained.bank, trained.geometry, {}, negatives=trained.negatives)
    loaded = load_model(out)
    assert loaded.negatives is not None
    torch.testing.assert_close(loaded.negatives, trained.negatives)
    cfg = PickConfig(device="cpu")
    np.testing.assert_allclose(
        compute_score_map(loaded, image, cfg).scores, compute_score_map(trained, image, cfg).scores
    )
    # weights without the negatives the manifest names: refused, not picked as if never corrected
    tensors = load_file(str(out / WEIGHTS))
    del tensors[NEGATIVES_KEY]
    save_file(tensors, str(out / WEIGHTS))
    _rehash(out)
    with pytest.raises(CheckpointError, match="disagree on the negatives"):
        load_model(out)
    # and a model without corrections has none
    plain = tmp_path / "plain"
    save_model(plain, trained.model, trained.bank, trained.geometry, {})
    assert load_model(plain).negatives is None


@pytest.mark.parametrize("rule", ["max", "mean", "orthogonal", "nearest"])
@pytest.mark.parametrize("feature", ["mean", "flat"])
def test_every_rule_scores_alike_both_ways_and_lowers_the_marked_windows(
    rule: str, feature: Literal["mean", "flat"]
) -> None:
    trained, image, base, cells, _ = _with_negatives(feature)
    cfg = PickConfig(device="cpu", negative_rule=rule, negative_weight=1.0)
    fast = compute_score_map(trained, image, cfg)
    slow = compute_score_map(trained, image, cfg.model_copy(update={"shared_tokens": False}))
    np.testing.assert_allclose(fast.scores, slow.scores, atol=3e-5)
    drop = (base.scores - fast.scores).ravel()
    if rule == "nearest":  # it takes off only where a negative is nearer than every exemplar: it never adds
        assert np.all(drop >= -1e-5)
    assert drop[cells].mean() > np.median(drop)  # the marked windows lose more than the typical one
