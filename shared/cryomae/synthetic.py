"""Small synthetic micrographs with known particle centres, for tests and the built-in example.

Not a physical simulation (the development data under ../shared/data has those): a particle is an
elongated dark body with a lighter core at a random in-plane angle, so the picker must learn a shape, not
just a blob. Each micrograph also has distractors that are NOT particles (small dark specks and large
round aggregates), a smooth ice-thickness gradient and correlated noise, so a picker that keys on
"anything dark" loses precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SyntheticMicrograph:
    image: np.ndarray  # float32 [H, W]
    centres: np.ndarray  # [N, 2] (x, y) of the particles
    distractors: np.ndarray  # [K, 2] (x, y) of the junk, not ground truth


def _stamp(size: int, diameter: float, angle: float, kind: str) -> np.ndarray:
    """A density stamp [size, size] centred in the array (positive = more scattering = darker)."""
    r = np.arange(size) - (size - 1) / 2.0
    yy, xx = np.meshgrid(r, r, indexing="ij")
    if kind == "particle":
        c, s = np.cos(angle), np.sin(angle)
        u, v = c * xx + s * yy, -s * xx + c * yy
        a, b = diameter / 2.0, diameter / 3.2
        body = np.clip(1.0 - (u / a) ** 2 - (v / b) ** 2, 0, None) ** 0.5
        knob = np.exp(-(((u - 0.55 * a) ** 2 + v**2) / (2 * (0.16 * diameter) ** 2)))  # asymmetric lobe
        core = np.exp(-((u**2 + v**2) / (2 * (0.12 * diameter) ** 2)))
        return (body + 0.6 * knob - 0.7 * core).astype(np.float32)
    if kind == "speck":
        return np.exp(-((xx**2 + yy**2) / (2 * (0.12 * diameter) ** 2))).astype(np.float32) * 1.6
    # aggregate: a large, round, uniform blob
    return (np.clip(1.0 - (xx**2 + yy**2) / (0.9 * diameter) ** 2, 0, None) ** 0.5).astype(np.float32) * 1.2


def make_micrograph(
    shape: tuple[int, int] = (384, 384),
    diameter: float = 24.0,
    n_particles: int = 40,
    n_distractors: int = 12,
    snr: float = 1.2,
    seed: int = 0,
) -> SyntheticMicrograph:
    """One synthetic micrograph; particles never overlap and stay a radius away from the edges."""
    rng = np.random.default_rng(seed)
    h, w = shape
    density = np.zeros(shape, np.float32)
    placed: list[tuple[float, float]] = []
    size = int(np.ceil(diameter * 2.2)) | 1
    half = size // 2

    def place(min_sep: float, margin: float) -> tuple[float, float] | None:
        for _ in range(200):
            x, y = rng.uniform(margin, w - 1 - margin), rng.uniform(margin, h - 1 - margin)
            if all((x - px) ** 2 + (y - py) ** 2 >= min_sep**2 for px, py in placed):
                placed.append((x, y))
                return x, y
        return None

    def add(x: float, y: float, stamp: np.ndarray) -> None:
        ix, iy = round(x), round(y)
        shifted = ndimage.shift(stamp, (y - iy, x - ix), order=1)
        y0, x0 = iy - half, ix - half
        ys, xs = slice(max(0, y0), min(h, y0 + size)), slice(max(0, x0), min(w, x0 + size))
        density[ys, xs] += shifted[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]

    centres = []
    for _ in range(n_particles):
        pos = place(1.1 * diameter, diameter / 2 + 1)
        if pos is None:
            break
        centres.append(pos)
        add(*pos, _stamp(size, diameter, rng.uniform(0, 2 * np.pi), "particle"))
    junk = []
    for i in range(n_distractors):
        kind = "speck" if i % 2 == 0 else "aggregate"
        pos = place(1.2 * diameter, diameter)
        if pos is None:
            break
        junk.append(pos)
        add(*pos, _stamp(size, diameter, 0.0, kind))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    gx, gy = rng.normal(0, 1, 2)
    ice = 0.4 * (gx * xx + gy * yy)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0)
    noise /= noise.std()
    image = -density * snr - ice + noise
    return SyntheticMicrograph(
        image=image.astype(np.float32),
        centres=np.asarray(centres, dtype=np.float64).reshape(-1, 2),
        distractors=np.asarray(junk, dtype=np.float64).reshape(-1, 2),
    )
