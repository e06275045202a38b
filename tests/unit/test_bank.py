"""The exemplar bank: the exemplars' dihedral views, or their aligned average at many in-plane angles."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import get_preset
from cryomae.training.bank import align, exemplar_bank
from cryomae.training.regions import crop_regions

CPU = torch.device("cpu")
SIZE = 24  # the test preset's window


def _asymmetric(angle: float, mirrored: bool) -> np.ndarray:
    """An L-shaped particle (no rotation or mirror maps it onto itself), turned by ``angle``, maybe mirrored."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    x = -xx if mirrored else xx
    u = math.cos(angle) * x + math.sin(angle) * yy
    v = -math.sin(angle) * x + math.cos(angle) * yy
    bar = (np.abs(v) < 1.8) & (u > -7) & (u < 7)
    foot = (np.abs(u - 6) < 1.8) & (v > -1) & (v < 6)
    return (bar | foot).astype(np.float32)


def _image(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Eight L-shaped particles at random angles, three of them mirrored, on noise: (image, centres [8, 2] x, y)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(scale=0.3, size=(160, 160)).astype(np.float32)
    centres = np.array([[30.0 + 33 * (i % 4), 40.0 + 70 * (i // 4)] for i in range(8)])
    for i, (x, y) in enumerate(centres):
        patch = _asymmetric(rng.uniform(0, 2 * math.pi), mirrored=i in (1, 4, 6))
        x0, y0 = round(x) - SIZE // 2, round(y) - SIZE // 2
        image[y0 : y0 + SIZE, x0 : x0 + SIZE] += 2.0 * patch
    return torch.from_numpy(image), centres


def _pairwise(crops: torch.Tensor) -> torch.Tensor:
    c = crops.reshape(len(crops), -1)
    c = F.normalize(c - c.mean(dim=1, keepdim=True), dim=1)
    sims = c @ c.T
    return sims[~torch.eye(len(c), dtype=torch.bool)]


def test_alignment_turns_and_mirrors_every_exemplar_onto_the_others() -> None:
    image, centres = _image()
    theta, mirrored = align(image, centres, SIZE, rotations=36)
    aligned = crop_regions(image, centres, SIZE, theta, mirrored)
    as_found = crop_regions(image, centres, SIZE)
    # at random angles the pairs correlate 0.33 on average; aligned, every pair correlates well
    assert _pairwise(aligned).min() > 0.6 > _pairwise(as_found).mean() + 0.2
    assert mirrored.sum() in (3, 5)  # the three mirrored ones, or the five others: the same alignment


def test_the_aligned_bank_is_the_average_at_every_rotation_and_mirror() -> None:
    torch.manual_seed(0)
    model = MaskedAutoencoder(get_preset("test")).eval()
    image, centres = _image()
    views = exemplar_bank(model, image, centres, CPU, kind="views")
    aligned = exemplar_bank(model, image, centres, CPU, kind="aligned", rotations=12)
    assert views.shape == (8 * 8, model.features(torch.zeros(1, 1, SIZE, SIZE)).shape[1])
    assert aligned.shape == (24, views.shape[1])
    # the average keeps the particle's shape: turned to the best angle, it matches a particle far better than
    # the rotational average of the dihedral views does
    particle = model.features(crop_regions(image, centres[:1], SIZE))
    best_aligned = F.cosine_similarity(aligned, particle).max()
    rotational = F.cosine_similarity(views.mean(dim=0, keepdim=True), particle)[0]
    assert best_aligned > rotational + 0.05
