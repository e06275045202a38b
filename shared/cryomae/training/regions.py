"""Training regions: exemplar crops and unlabeled crops, with in-plane rotation and flip augmentation.

Crops come from the resampled micrograph (see ``cryomae.preprocess``). Rotation by an arbitrary angle,
a flip and a sub-pixel shift are one ``grid_sample`` call over the whole batch: a crop is read through a
rotated sampling grid centred on the particle, so no corner of the output is ever empty (the image is
padded with its mean, zero, beyond its edges).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def crop_regions(
    image: torch.Tensor,
    centres: np.ndarray,
    size: int,
    angles: np.ndarray | None = None,
    flips: np.ndarray | None = None,
) -> torch.Tensor:
    """Cut square regions around centres, optionally rotated and flipped.

    image [H, W]; centres [N, 2] (x, y) in image pixels; angles [N] radians; flips [N] bool (mirror x).
    Returns [N, 1, size, size]. Bilinear sampling; outside the image reads as 0.
    """
    n = len(centres)
    h, w = image.shape
    dev = image.device
    c = torch.as_tensor(np.asarray(centres, dtype=np.float32), device=dev)  # [N, 2]
    theta = torch.as_tensor(np.zeros(n) if angles is None else angles, dtype=torch.float32, device=dev)
    flip = torch.as_tensor(np.zeros(n, bool) if flips is None else flips, device=dev)
    # Output pixel offsets from the region centre, in image pixels: [size]
    offs = torch.arange(size, dtype=torch.float32, device=dev) - (size - 1) / 2.0
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")  # [S, S]
    ox = ox[None].expand(n, -1, -1)
    oy = oy[None].expand(n, -1, -1)
    ox = torch.where(flip[:, None, None], -ox, ox)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    sx = c[:, 0, None, None] + cos * ox - sin * oy  # [N, S, S]
    sy = c[:, 1, None, None] + sin * ox + cos * oy
    # grid_sample with align_corners=True: -1 and +1 are the centres of the first and last pixels.
    # All regions share one input image, so they are sampled as one tall grid [1, N*S, S, 2].
    grid = torch.stack([sx / max(w - 1, 1) * 2 - 1, sy / max(h - 1, 1) * 2 - 1], dim=-1)
    out = F.grid_sample(
        image[None, None],
        grid.reshape(1, n * size, size, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return out.reshape(n, 1, size, size)


def random_augmentation(
    n: int, rng: np.random.Generator, rotate: bool = True, flip: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random in-plane angles [N] (radians) and mirror flags [N]: physically valid for particles."""
    angles = rng.uniform(0, 2 * math.pi, n) if rotate else np.zeros(n)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    return angles, flips


def dihedral_views(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8 exact rotations by 90 degrees and flips, for each of n regions.

    Returns (index [8N] of the region, angles [8N], flips [8N]).
    """
    idx = np.repeat(np.arange(n), 8)
    angles = np.tile(np.repeat(np.arange(4) * (math.pi / 2), 2), n)
    flips = np.tile(np.array([False, True] * 4), n)
    return idx, angles, flips


def random_centres(shape: tuple[int, ...], n: int, rng: np.random.Generator, margin: float = 0.0) -> np.ndarray:
    """n uniformly random centres [N, 2] (x, y) at least ``margin`` pixels inside the image."""
    h, w = shape[-2:]
    lo_x, hi_x = margin, max(margin, w - 1 - margin)
    lo_y, hi_y = margin, max(margin, h - 1 - margin)
    return np.stack([rng.uniform(lo_x, hi_x, n), rng.uniform(lo_y, hi_y, n)], axis=1)
