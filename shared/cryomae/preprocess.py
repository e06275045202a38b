"""Micrograph preparation shared by training and picking: normalisation and the single resampling step.

A region (training crop or picking window) is a square of ``box = box_factor * diameter`` original pixels.
The whole micrograph is resampled once by ``scale = img_size / box`` so that every region is exactly
``img_size`` model pixels; crops and windows are then cut from the resampled image without interpolation.

Coordinates: x = column, y = row, pixel centres at integer positions (0-based). With area-style
resampling the centre of original pixel x lands at ``(x + 0.5) * scale - 0.5`` in the resampled image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

LevelMap = TypeVar("LevelMap", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Geometry:
    """How original micrograph pixels map to model pixels for one particle size and preset."""

    diameter: float  # particle diameter, original pixels
    box_factor: float  # region side / particle diameter
    img_size: int  # region side, model pixels
    highpass: float | None = 2.0  # background-flattening width in region sides (None: off), see ``prepare``
    lowpass: float | None = None  # Gaussian smoothing sigma in model pixels (None: off), see ``prepare``
    # flatten the background over the ice only, carbon and contamination (``outlier_regions`` at this robust z
    # of the local level) set to zero; None flattens over everything (models of format 3 and before)
    ice_z: float | None = None

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


def robust_spread(values: np.ndarray, centre: float) -> float:
    """Scaled median absolute deviation about ``centre``: the standard deviation for Gaussian data, and
    unmoved by up to half the values being outliers (ice, carbon, particles)."""
    return 1.4826 * float(np.median(np.abs(values - centre)))


def _robust_stats(image: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Median and scaled MAD (``robust_spread``) of an image [H, W] from a strided sample of at most about
    512 x 512 values. A tensor's sample (at most 1 MB) is brought to the host: numpy's selection-based median
    is several times faster there than torch's. A spread that is not positive and finite falls back to the
    sample's standard deviation, then to 1."""
    sample = image[:: max(1, image.shape[0] // 512), :: max(1, image.shape[1] // 512)]
    if isinstance(sample, torch.Tensor):
        sample = sample.cpu().numpy()
    med = float(np.median(sample))
    spread = robust_spread(sample, med)
    if not np.isfinite(spread) or spread <= 0:
        spread = float(sample.std())
        if not np.isfinite(spread) or spread <= 0:
            spread = 1.0
    return med, spread


def normalize(image: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Zero median, unit robust spread (scaled MAD), outliers (ice, carbon edges, hot pixels) clipped to +-5.

    image [H, W] -> float32 tensor [H, W] on ``device``. Robust statistics keep one dark contamination from
    setting the scale. For a GPU the image is copied there as it is and normalised there (the CPU is then free
    to read the next micrograph); on the CPU numpy does it (measured faster than torch's element-wise ops on
    a fresh 4096 x 4096 image, where allocation dominates).
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        img = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        med, spread = _robust_stats(img)
        out = np.subtract(img, np.float32(med))
        out /= np.float32(spread)
        return torch.from_numpy(np.clip(out, -5.0, 5.0, out=out))
    return _normalize_on_device(torch.as_tensor(image, device=dev))


def _normalize_on_device(image: torch.Tensor) -> torch.Tensor:
    """``normalize`` with torch's element-wise ops, where the tensor lives (a GPU): [H, W] -> float32 [H, W]."""
    img = image.float()
    med, spread = _robust_stats(img)
    return img.sub(med).div_(spread).clamp_(-5.0, 5.0)


def resample(image: np.ndarray | torch.Tensor, scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Resample a 2-D image by ``scale`` once, antialiased when shrinking.

    image [H, W] -> float32 tensor [floor(H*scale), floor(W*scale)] on ``device``.
    """
    t = torch.as_tensor(image, dtype=torch.float32, device=device)
    if abs(scale - 1.0) < 1e-6:
        return t.contiguous()
    # scale_factor with recompute_scale_factor=False makes torch map output pixel i to input (i + 0.5) / scale
    # - 0.5 exactly (``Geometry.to_model``); the output size is floor(H * scale).
    out = F.interpolate(
        t[None, None],
        scale_factor=scale,
        mode="bilinear",
        antialias=scale < 1.0,
        align_corners=False,
        recompute_scale_factor=False,
    )
    return out[0, 0].contiguous()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected edges: [H, W] -> [H, W]."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(image.dtype)
    y = image[None, None]
    pad_h, pad_w = min(radius, image.shape[0] - 1), min(radius, image.shape[1] - 1)
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else y
    y = F.conv2d(y, k[None, None, None, radius - pad_w : radius + pad_w + 1])
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else y
    y = F.conv2d(y, k[None, None, radius - pad_h : radius + pad_h + 1, None])
    return y[0, 0]


def smooth_background(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of width ``sigma`` pixels, computed on a 4x smaller copy (it only has to follow slow
    variations such as ice thickness): [H, W] -> [H, W]."""
    h, w = image.shape
    f = 4 if min(h, w) >= 64 and sigma >= 8 else 1
    small = F.avg_pool2d(image[None, None], f, ceil_mode=True) if f > 1 else image[None, None]
    y = gaussian_blur(small[0, 0], sigma / f)[None, None]
    if f > 1:
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    return y[0, 0]


def prepare_with_background(
    image: np.ndarray, geometry: Geometry, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise, resample to model pixels and flatten the background: [H, W] -> ([H', W'], [H', W']).

    ``geometry.lowpass`` (model pixels) smooths the image once; ``geometry.highpass`` (in region sides)
    subtracts a Gaussian-smoothed copy of that width, removing ice-thickness gradients and uneven
    illumination far larger than a particle (None keeps them); with ``geometry.ice_z`` that background is the
    ice's alone, and carbon and contamination are set to zero. The second tensor is the local mean level at
    the scale of one region, before flattening, in the normalised units: it shows carbon and contamination
    (see ``outlier_regions``).
    """
    img = resample(normalize(image, device), geometry.scale, device)
    if geometry.lowpass:
        img = gaussian_blur(img, geometry.lowpass)
    level = smooth_background(img, geometry.img_size / 2)
    if geometry.highpass:
        sigma = geometry.highpass * geometry.img_size
        if geometry.ice_z is None:
            img = img - smooth_background(img, sigma)
            _, spread = _robust_stats(img)
        else:
            ice = (~outlier_regions(level, geometry.ice_z)).float()
            # the background of the ice alone (a normalised convolution): carbon and contamination neither pull
            # the ice next to them up or down nor keep their own texture, they become flat zero
            bg = smooth_background(img * ice, sigma) / smooth_background(ice, sigma).clamp_min(1e-3)
            img = (img - bg).mul_(ice)
            spread = _ice_spread(img, ice)
        img = img.div_(spread).clamp_(-5.0, 5.0)
    return img, level


def _ice_spread(img: torch.Tensor, ice: torch.Tensor) -> float:
    """Robust spread (``robust_spread``) of the flattened image over the ice: a strided sample of at most about
    256 K of its ice pixels; 1 when the ice is nearly absent."""
    values = img[ice > 0]
    sample = values[:: max(1, values.numel() // 262144)].cpu().numpy()
    if sample.size < 64:
        return 1.0
    spread = robust_spread(sample, float(np.median(sample)))
    return spread if np.isfinite(spread) and spread > 0 else 1.0


def prepare(image: np.ndarray, geometry: Geometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """The prepared micrograph alone (see ``prepare_with_background``): [H, W] -> [H', W']."""
    return prepare_with_background(image, geometry, device)[0]


def outlier_regions(level: LevelMap, z_max: float) -> LevelMap:
    """Where the local mean level is far from the micrograph's typical ice: carbon, thick contamination.

    level [H', W'] (numpy or torch) from ``prepare_with_background``; returns a bool mask of the same kind,
    True where the robust z-score of the level (median and scaled MAD of a strided sample of at most about
    512 x 512 values) exceeds ``z_max`` in either direction; all False when the level has no spread.
    The picker drops candidates there (``PickConfig.outlier_z``) and ``prepare_with_background`` flattens the
    background without them (``Geometry.ice_z``).
    """
    strided = level[:: max(1, level.shape[0] // 512), :: max(1, level.shape[1] // 512)]
    sample = strided.cpu().numpy() if isinstance(strided, torch.Tensor) else np.asarray(strided, dtype=np.float32)
    med = float(np.median(sample))
    mad = robust_spread(sample, med)
    if isinstance(level, torch.Tensor):
        if not mad > 0:
            return torch.zeros(level.shape, dtype=torch.bool, device=level.device)
        return (level - med).abs_() > z_max * mad
    lv = np.asarray(level, dtype=np.float32)
    if not mad > 0:
        return np.zeros(lv.shape, bool)
    return np.abs(lv - med) > z_max * mad


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


def away_from_edges(xy: np.ndarray, image: np.ndarray, margin: float) -> np.ndarray:
    """Which points [N, 2] (x, y) lie at least ``margin`` pixels inside the image and its padded border bands.

    Returns bool [N]. A particle closer than about its diameter to the edge cannot be extracted whole, and
    padded bands (see ``padded_borders``) hold no particles at all.
    """
    h, w = image.shape
    left, right, top, bottom = padded_borders(image)
    x, y = xy[:, 0], xy[:, 1]
    return (x >= left + margin) & (x <= w - 1 - right - margin) & (y >= top + margin) & (y <= h - 1 - bottom - margin)
