"""The particle-probability head: its prior from the data, its positive-unlabeled fit, its storage with the model,
and the picker's use of it (the same scores by both evaluations, one probability cut)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cryomae.config import PickConfig
from cryomae.errors import CheckpointError
from cryomae.model.checkpoint import WEIGHTS, TrainedModel, load_model, save_model
from cryomae.model.head import ParticleHead
from cryomae.picking.picker import _cutoff, compute_score_map, find_candidates, pick_micrograph, uses_head
from cryomae.training.pu_head import (
    HeadFit,
    bank_owners,
    estimate_prior,
    fit_head,
    leave_one_out_similarity,
)
from tests.unit.test_checkpoint import _rehash, _save
from tests.unit.test_shared_tokens import _micrograph, _trained


def _mixture(prior: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarities of unlabeled candidates (a share ``prior`` of them particles), their true labels, and of 15
    labelled particles: particles N(0.6, 0.1), background N(0.1, 0.1)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < prior
    unlabeled = np.where(labels, rng.normal(0.6, 0.1, n), rng.normal(0.1, 0.1, n))
    return unlabeled, labels, rng.normal(0.6, 0.1, 15)


def test_the_prior_is_estimated_from_the_unlabeled_and_15_positives() -> None:
    """15 positives give the prior to within about a third (their own quantiles are that noisy), and in order."""
    priors = [0.05, 0.1, 0.3, 0.6]
    got = [np.median([estimate_prior(*_mixture(p, seed=s)[::2]) for s in range(5)]) for p in priors]
    assert got == sorted(got)
    for p, g in zip(priors, got, strict=True):
        assert g == pytest.approx(p, rel=0.35), (p, g)


def test_the_prior_is_clipped_and_needs_both_kinds() -> None:
    assert estimate_prior(np.zeros(100), np.ones(15)) == 0.01  # no unlabeled candidate reaches the positives
    assert estimate_prior(np.ones(100), np.zeros(15)) == 0.95
    with pytest.raises(ValueError, match="needs unlabeled and positive"):
        estimate_prior(np.zeros(0), np.ones(3))


def test_leave_one_out_similarity_leaves_each_exemplars_own_views_out() -> None:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(6, 8), dim=1)  # 3 exemplars x 2 views
    positives = bank[::2]
    owners = bank_owners(3, 6, "views")
    assert owners is not None and owners.tolist() == [0, 0, 1, 1, 2, 2]
    got = leave_one_out_similarity(positives, bank, owners)
    for i in range(3):
        others = torch.cat([bank[: 2 * i], bank[2 * i + 2 :]]).sum(dim=0)
        assert float(got[i]) == pytest.approx(float(positives[i] @ F.normalize(others, dim=0)), abs=1e-6)
    assert bank_owners(3, 32, "aligned") is None and bank_owners(3, 7, "views") is None
    whole = leave_one_out_similarity(positives, bank, None)
    assert torch.allclose(whole, positives @ F.normalize(bank.sum(dim=0), dim=0))


def test_the_calibrated_head_gives_the_class_probability() -> None:
    """On a 1-D mixture with a known posterior, the fitted probability is close to it and its cut at 0.5 keeps
    the particles it should."""
    prior = 0.3
    unlabeled, labels, positive = _mixture(prior, n=6000)
    head = fit_head(
        torch.tensor(unlabeled)[:, None], torch.tensor(positive)[:, None], torch.ones(1), prior, HeadFit(shrink=None)
    )
    grid = np.linspace(0.0, 0.8, 9)
    dens = lambda x, m: np.exp(-((x - m) ** 2) / (2 * 0.01))  # noqa: E731
    truth = prior * dens(grid, 0.6) / (prior * dens(grid, 0.6) + (1 - prior) * dens(grid, 0.1))
    got = head.probability(torch.tensor(grid)).numpy()
    assert np.max(np.abs(got - truth)) < 0.15, (got.round(2), truth.round(2))
    picked = head.probability(torch.tensor(unlabeled)).numpy() >= 0.5
    assert (picked == labels).mean() > 0.97
    assert head.info["expected_positives"] == pytest.approx(prior * len(unlabeled), rel=0.15)
    assert head.info["moved"] == 0.0 and head.info["prior"] == prior


def test_labelled_negatives_move_the_direction_away_from_them() -> None:
    """Two directions look alike to the bank mean; labelled negatives along the second turn the head from it."""
    torch.manual_seed(0)
    d = 16
    particle, junk = torch.zeros(d), torch.zeros(d)
    particle[0], junk[1] = 1.0, 1.0
    start = F.normalize(particle + junk, dim=0)  # the exemplars' mean also leans to the junk

    def around(v: torch.Tensor, n: int) -> torch.Tensor:
        return F.normalize(v + 0.3 * torch.randn(n, d), dim=1)

    unlabeled = torch.cat([around(particle, 300), around(junk, 300), around(torch.zeros(d), 600)])
    positive = around(particle, 30)
    fit = HeadFit(shrink=0.01)
    without = fit_head(unlabeled, positive, start, 0.25, fit)
    with_neg = fit_head(unlabeled, positive, start, 0.25, fit, negative=around(junk, 20))
    assert float(with_neg.direction @ junk) < float(without.direction @ junk)
    assert with_neg.info["negatives"] == 20 and without.info["negatives"] == 0
    assert float(with_neg.direction.norm()) == pytest.approx(1.0, abs=1e-5)


def test_the_cut_in_similarity_units_matches_the_probability() -> None:
    head = ParticleHead(direction=torch.ones(3) / math.sqrt(3), scale=8.0, bias=-2.0)
    s = head.similarity_at(0.7)
    assert float(head.probability(torch.tensor(s))) == pytest.approx(0.7)


def _head_for(trained: TrainedModel) -> ParticleHead:
    torch.manual_seed(1)
    direction = F.normalize(torch.randn(trained.bank.shape[1]), dim=0)
    return ParticleHead(direction=direction, scale=6.0, bias=-1.0, info={"prior": 0.2})


def test_the_head_round_trips_with_the_model_and_is_covered_by_the_checksum(tmp_path: Path) -> None:
    out = tmp_path / "model"
    model, bank = _save(out)
    plain = load_model(out)
    assert plain.head is None
    head = _head_for(plain)
    save_model(out, model, bank, plain.geometry, {"note": "head"}, head=head)
    loaded = load_model(out)
    assert loaded.head is not None
    assert torch.equal(loaded.head.direction, head.direction)
    assert (loaded.head.scale, loaded.head.bias) == (6.0, -1.0)
    assert loaded.manifest["particle_head"] == {"prior": 0.2}
    tensors = load_file(str(out / WEIGHTS))
    tensors["pu_head.bias"] = torch.tensor([3.0])
    save_file(tensors, str(out / WEIGHTS))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(out)


def test_an_incomplete_or_misfitting_head_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "model"
    model, bank = _save(out)
    head = _head_for(load_model(out))
    save_model(out, model, bank, load_model(out).geometry, {}, head=head)
    tensors = load_file(str(out / WEIGHTS))
    del tensors["pu_head.scale"]
    save_file(tensors, str(out / WEIGHTS))
    _rehash(out)
    with pytest.raises(CheckpointError, match=r"incomplete particle head: no pu_head\.scale"):
        load_model(out)
    tensors["pu_head.scale"] = torch.tensor([1.0])
    tensors["pu_head.direction"] = torch.ones(5)
    save_file(tensors, str(out / WEIGHTS))
    _rehash(out)
    with pytest.raises(CheckpointError, match="particle head of 5 dimensions"):
        load_model(out)


@pytest.mark.parametrize("feature", ["flat", "mean"])
def test_head_scores_are_the_same_by_both_evaluations_and_are_probabilities(feature: str) -> None:
    trained = _trained(feature)  # type: ignore[arg-type]
    trained.head = _head_for(trained)
    image = _micrograph()
    fast = PickConfig(device="cpu")
    a = compute_score_map(trained, image, fast)
    b = compute_score_map(trained, image, fast.model_copy(update={"shared_tokens": False}))
    np.testing.assert_allclose(a.scores, b.scores, atol=2e-5)
    assert a.logits and b.logits and a.scores.std() > 0.01  # logits: no saturation at the peaks
    _, p = find_candidates(a, trained.geometry, image, fast)
    assert len(p) > 0 and p.min() > 0.0 and p.max() < 1.0 and np.all(np.diff(p) <= 0)
    assert p.max() <= 1 / (1 + np.exp(-float(a.scores.max()))) + 1e-6  # each candidate's probability is its peak's
    cosine = compute_score_map(trained, image, fast.model_copy(update={"scorer": "cosine"}))
    assert not np.allclose(cosine.scores, a.scores, atol=1e-3)  # the cosine scorer ignores the head
    assert uses_head(trained, fast) and not uses_head(trained, fast.model_copy(update={"scorer": "cosine"}))
    trained.head = None
    assert not uses_head(trained, fast)
    np.testing.assert_allclose(compute_score_map(trained, image, fast).scores, cosine.scores, atol=1e-6)


def test_the_automatic_cut_of_head_scores_is_the_probability_minimum() -> None:
    trained = _trained()
    trained.head = _head_for(trained)
    cfg = PickConfig(device="cpu", probability_min=0.4)
    result = pick_micrograph(trained, _micrograph(), cfg)
    assert result.cutoff_rule == "probability" and result.threshold == 0.4
    assert np.all(result.scores >= 0.4) and np.all(result.candidate_scores[~result.selected] < 0.4)
    scores = np.array([0.9, 0.2, 0.6])
    assert _cutoff(scores, cfg, probabilities=True) == (0.4, "probability")
    assert _cutoff(scores, cfg.model_copy(update={"threshold": 0.7}), probabilities=True) == (0.7, "fixed")
    assert _cutoff(scores, cfg.model_copy(update={"threshold": "robust"}), probabilities=True)[1] == "robust"
