"""Micrograph preparation shared by training and picking: normalisation and the single resampling step.

A region (training crop or picking window) is a square of ``box = box_factor * diameter`` original pixels.
The whole micrograph is resampled once by ``scale = img_size / box`` so that every region is exactly
``img_size`` model pixels; crops and windows are then cut from the resampled image without interpolation.

Coordinates: x = column, y = row, pixel centres at integer positions (0-based). With area-style
resampling the centre of original pixel x lands at ``(x + 0.5) * scale - 0.5`` in the resampled image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Geometry:
    """How original micrograph pixels map to model pixels for one particle size and preset."""

    diameter: float  # particle diameter, original pixels
    box_factor: float  # region side / particle diameter
    img_size: int  # region side, model pixels

    @property
    def box(self) -> float:
        """Region side in original pixels."""
        return self.box_factor * self.diameter

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.img_size / self.box

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        """Original-pixel coordinates [N, 2] -> resampled-image coordinates [N, 2]."""
        return (np.asarray(xy, dtype=np.float64) + 0.5) * self.scale - 0.5

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """Resampled-image coordinates [N, 2] -> original-pixel coordinates [N, 2]."""
        return (np.asarray(xy, dtype=np.float64) + 0.5) / self.scale - 0.5


def normalize(image: np.ndarray) -> np.ndarray:
    """Zero median, unit robust spread, outliers (ice, carbon edges, hot pixels) clipped to +-5.

    image [H, W] -> float32 [H, W]. Robust statistics keep one dark contamination from setting the scale.
    """
    img = np.asarray(image, dtype=np.float32)
    sample = img[:: max(1, img.shape[0] // 512), :: max(1, img.shape[1] // 512)]
    med = float(np.median(sample))
    lo, hi = np.percentile(sample, [1.0, 99.0])
    spread = float(hi - lo) / 4.65  # the 1-99 % range of a Gaussian spans 4.65 sigma
    if not np.isfinite(spread) or spread <= 0:
        spread = float(sample.std()) or 1.0
    out = (img - med) / spread
    return np.clip(out, -5.0, 5.0, out=out)


def resample(image: np.ndarray | torch.Tensor, scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Resample a 2-D image by ``scale`` once, antialiased when shrinking.

    image [H, W] -> float32 tensor [round(H*scale), round(W*scale)] on ``device``.
    """
    t = torch.as_tensor(image, dtype=torch.float32, device=device)
    if abs(scale - 1.0) < 1e-6:
        return t.contiguous()
    h, w = t.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(t[None, None], size=size, mode="bilinear", antialias=scale < 1.0, align_corners=False)
    return out[0, 0].contiguous()


def prepare(image: np.ndarray, geometry: Geometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalise then resample a micrograph to model pixels: [H, W] -> [H', W'] float32 tensor."""
    return resample(normalize(image), geometry.scale, device)


def padded_borders(image: np.ndarray, rel_tol: float = 0.05) -> tuple[int, int, int, int]:
    """Widths (left, right, top, bottom) of border bands that hold no image: rows or columns that merely
    repeat their neighbour, as left by edge padding in some motion-correction and denoising pipelines.

    A column belongs to a band when its mean absolute difference to the next one is below ``rel_tol`` of the
    image's median column-to-column difference. image [H, W].
    """
    img = np.asarray(image, dtype=np.float32)

    def band(diffs: np.ndarray) -> int:
        small = diffs < rel_tol * max(float(np.median(diffs)), 1e-12)
        return int(np.argmin(small)) if not small.all() else len(diffs)

    col = np.abs(np.diff(img, axis=1)).mean(axis=0)  # [W - 1]
    row = np.abs(np.diff(img, axis=0)).mean(axis=1)  # [H - 1]
    return band(col), band(col[::-1]), band(row), band(row[::-1])
