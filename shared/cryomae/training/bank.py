"""The exemplar bank: the encoder features the picker compares every window with.

Two kinds (``TrainConfig.bank``):

- ``views``: each exemplar in its 8 dihedral views (or 1), as the CryoMAE paper's bank. Its mean over the bank
  is a rotational average of the exemplars: it finds round blobs of the particle's size, and loses an elongated
  or asymmetric particle's shape.
- ``aligned``: the exemplars are first aligned to one another in the plane (rotation and mirror, by normalised
  cross-correlation inside the particle's circle, iterated from the first exemplar, as a 2-D class average is
  made), and the bank is the average of the aligned exemplars at ``rotations`` in-plane angles, each also
  mirrored: 2 x rotations templates that keep the particle's shape. The picker's ``mean_max`` score reads both the
  rotational average (the mean over these templates) and the best-matching orientation (their max).

Every view is cut from the prepared reference micrograph with ``crop_regions`` (bilinear), so the templates are
averages of real pixels, not of features: at the patch-embedding layer the two are the same (the embedding is
linear), at deeper layers the feature of each aligned crop is averaged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cryomae.device import autocast
from cryomae.model.mae import MaskedAutoencoder
from cryomae.training.regions import crop_regions, dihedral_views

ALIGN_ITERATIONS = 5  # rounds of "each exemplar's best view against the average"; it settles in 2-3


def _views(rotations: int) -> tuple[np.ndarray, np.ndarray]:
    """(angles [2R], flips [2R]): R in-plane rotations, each without and with a mirror."""
    return np.repeat(np.arange(rotations) * (2 * math.pi / rotations), 2), np.tile([False, True], rotations)


def align(image: torch.Tensor, exemplars: np.ndarray, size: int, rotations: int) -> tuple[np.ndarray, np.ndarray]:
    """Each exemplar's angle and mirror [m] that best match the others' average (pixels inside the circle)."""
    m = len(exemplars)
    angles, flips = _views(rotations)
    v = len(angles)
    crops = crop_regions(image, np.repeat(exemplars, v, axis=0), size, np.tile(angles, m), np.tile(flips, m))
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    circle = torch.as_tensor(np.hypot(yy, xx) <= size / 2, dtype=crops.dtype, device=crops.device).reshape(-1)
    c = crops.reshape(m, v, -1) * circle
    c = F.normalize(c - c.mean(dim=-1, keepdim=True), dim=-1)  # [m, V, P]
    average = c[0, 0]
    choice = torch.zeros(m, dtype=torch.long)
    for _ in range(ALIGN_ITERATIONS):
        choice = (c @ average).argmax(dim=1).cpu()  # [m]
        average = F.normalize(c[torch.arange(m), choice].mean(dim=0), dim=0)
    return angles[choice.numpy()], flips[choice.numpy()]


@torch.no_grad()
def exemplar_bank(
    model: MaskedAutoencoder,
    image: torch.Tensor,
    exemplars: np.ndarray,
    device: torch.device,
    kind: str = "views",
    views: int = 8,
    rotations: int = 16,
) -> torch.Tensor:
    """The bank for exemplars [m, 2] (prepared-image coordinates): [m * views, D] or [2 * rotations, D]."""
    model.eval()
    size = model.preset.img_size
    if kind == "views":
        if views == 8:
            idx, angles, flips = dihedral_views(len(exemplars))
            regions = crop_regions(image, exemplars[idx], size, angles, flips)
        else:
            regions = crop_regions(image, exemplars, size)
        with autocast(device):
            return model.features(regions).float()
    theta, mirrored = align(image, exemplars, size, rotations)
    phi, flip_w = _views(rotations)
    # view w of the aligned average: exemplar i seen through its alignment and then the view's rotation and
    # mirror. A mirror turns a later rotation by phi into one by -phi.
    ang = np.where(mirrored[None, :], theta[None, :] - phi[:, None], theta[None, :] + phi[:, None])  # [2R, m]
    flp = mirrored[None, :] ^ flip_w[:, None]
    idx = np.tile(np.arange(len(exemplars)), len(phi))
    regions = crop_regions(image, exemplars[idx], size, ang.reshape(-1), flp.reshape(-1))
    with autocast(device):
        feats = model.features(regions).float()
    return feats.reshape(len(phi), len(exemplars), -1).mean(dim=1)  # [2R, D]
