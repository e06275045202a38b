"""PNG previews of a micrograph with its picks, for an operator's eye.

Raw micrographs are too noisy and too large to judge picks on, so the image is low-pass filtered
(particle-scale detail stays), contrast-stretched between its 1st and 99th percentiles (a few hot or dark
pixels do not flatten everything else), and shrunk to a screen-sized PNG. Picks are yellow circles of the
particle diameter; ground truth, when given, green circles drawn first and slightly thinner so both stay
visible where they coincide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from cryomae.errors import ConfigError, InputError
from cryomae.io.atomic import atomic_output

__all__ = ["render_preview"]

PICK_COLOUR = (255, 255, 0)
TRUTH_COLOUR = (0, 255, 0)
_PERCENTILE_SAMPLES = 1_000_000


def _points(xy: np.ndarray | None, name: str) -> np.ndarray:
    """Coordinates as float64 [N, 2] (x, y); None or empty gives [0, 2]."""
    if xy is None:
        return np.zeros((0, 2), dtype=np.float64)
    arr = np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(None, f"{name} must have shape [N, 2], got {arr.shape}")
    return arr


def _to_grey(image: np.ndarray, sigma: float) -> np.ndarray:
    """Low-pass and stretch ``image`` [H, W] to uint8 [H, W] between its 1st and 99th percentiles."""
    img = np.asarray(image, dtype=np.float32)
    if sigma > 0:
        img = gaussian_filter(img, sigma)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros(img.shape, dtype=np.uint8)
    step = max(1, finite.size // _PERCENTILE_SAMPLES)  # percentiles of a strided sample: fast on 4k x 4k
    lo, hi = np.percentile(finite[::step], [1.0, 99.0])
    span = float(hi - lo) if hi > lo else 1.0
    scaled = np.clip((np.nan_to_num(img, nan=float(lo)) - lo) / span, 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def _draw_circles(
    draw: ImageDraw.ImageDraw,
    xy: np.ndarray,
    radius: float,
    scale: float,
    colour: tuple[int, int, int],
    width: int,
) -> None:
    """Circle each point of ``xy`` [N, 2] (original pixels, mapped by ``scale``); radius in preview pixels."""
    centres = (xy + 0.5) * scale - 0.5  # [N, 2] pixel centres map to pixel centres
    boxes = np.concatenate([centres - radius, centres + radius], axis=1)  # [N, 4] x0, y0, x1, y1
    for box in boxes.tolist():
        draw.ellipse(box, outline=colour, width=width)


def render_preview(
    image: np.ndarray,
    picks_xy: np.ndarray,
    diameter: float,
    out_path: str | Path,
    truth_xy: np.ndarray | None = None,
    max_size: int = 2048,
    lowpass_sigma: float | None = None,
) -> Path:
    """Write an RGB PNG of ``image`` [H, W] with ``picks_xy`` [N, 2] (and ``truth_xy`` [M, 2]) circled.

    ``lowpass_sigma`` is in original pixels, default ``diameter / 10`` (0 turns filtering off); the preview is
    shrunk so its longer side is at most ``max_size``. Coordinates are x = column, y = row, original pixels.
    The file is written to a temporary name beside ``out_path`` and renamed, so readers never see half a PNG.
    Returns ``out_path`` as a Path.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise InputError(None, f"image must be a non-empty 2-D array, got shape {img.shape}")
    if not (np.isfinite(diameter) and diameter > 0):
        raise ConfigError(f"diameter must be a positive number, got {diameter}")
    if max_size < 1:
        raise ConfigError(f"max_size must be at least 1, got {max_size}")
    picks = _points(picks_xy, "picks_xy")
    truth = _points(truth_xy, "truth_xy")
    sigma = diameter / 10.0 if lowpass_sigma is None else float(lowpass_sigma)

    grey = Image.fromarray(_to_grey(img, sigma))  # uint8 [H, W] -> mode "L"
    h, w = img.shape
    scale = min(1.0, max_size / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = grey.resize(size, Image.Resampling.LANCZOS)
    rgb = grey.convert("RGB")

    radius = diameter / 2.0 * scale
    pick_width = max(2, round(radius / 10.0))
    draw = ImageDraw.Draw(rgb)
    _draw_circles(draw, truth, radius, scale, TRUTH_COLOUR, max(1, pick_width - 1))
    _draw_circles(draw, picks, radius, scale, PICK_COLOUR, pick_width)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, mode=0o644) as tmp:  # a preview is meant to be read by others
        rgb.save(tmp, format="PNG")
    return out
