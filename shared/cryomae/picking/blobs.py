"""Two generic cues beside the encoder's cosine score: a size-tuned blob detector and the local contrast (issue 24).

The cosine score ranks windows by how much they look like the mean of the 15 exemplars. Where that mean is a
poor template (some draws of 15 clicks make it a template of the micelle, or of one part of a large particle),
the ranking fails on a whole sample; and the map is smooth, so its peaks sit off the particles' centres. A
difference of Gaussians tuned to the particle's size (``cryomae.baselines.dog``) knows nothing of the exemplars
but peaks at the centre of every blob of that size. The score the picker cuts is

    score = cosine + spread(cosine) x (blob_weight x z(DoG) + contrast_weight x z(contrast))

on each micrograph: z(DoG) is the DoG response at the window's centre in robust standard deviations of the
micrograph's response (median, 1.4826 MAD), and spread(cosine) the same robust spread of the micrograph's cosine
map, so the weights (``PickConfig.blob_weight``, ``PickConfig.contrast_weight``) mean the same on every
micrograph and every sample. z(DoG) is capped at ``PickConfig.blob_z_cap`` times the exemplars' own median z:
junk that is a stronger blob than the particles (an aggregate, a speck of ice) earns no more than a particle
does. z(contrast) is the standard deviation of the micrograph, low-passed to a tenth of the particle's diameter,
over a particle-sized box around the window's centre, in the same robust units: a particle holds more contrast
than the ice around it whatever its shape or polarity, where the DoG favours round blobs of one sign.

The DoG's polarity (particles darker or lighter than their surround) is measured once, at training, on the
reference micrograph: the sign of the median response at the exemplars, kept in the model's manifest
(``blobs``) with that median in robust standard deviations and the share of the exemplars that stand out by more
than one (``exemplar_share``). Where that share is below ``PickConfig.blob_min_share`` the particles are not
blobs to the DoG (a long filament, whose centre is no brighter than the rest of the rod) and the cosine is used
alone, without either term (the contrast term put the filament's picks anywhere along its rods). A model
trained before the share was measured is gated as it was then, on the median (at least 1); a model trained
before the blob term existed has no ``blobs`` entry and is scored by the cosine alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from cryomae.baselines.dog import DOG_TARGET_PX, bin_image, dog_of_binned
from cryomae.config import PickConfig
from cryomae.preprocess import Geometry, robust_spread

if TYPE_CHECKING:  # the picker imports this module
    from cryomae.picking.picker import ScoreMap

__all__ = [
    "BLOBS_KEY",
    "Binned",
    "applies",
    "are_blobs",
    "binned",
    "blob_profile",
    "blob_z",
    "contrast_z",
    "with_blobs",
]

# in a model's manifest: {"polarity": "dark" | "light", "exemplar_z": median z at the exemplars, "exemplar_share":
# the share of exemplars with z > 1}
BLOBS_KEY = "blobs"
LEGACY_MIN_Z = 1.0  # the gate of models without ``exemplar_share``: their exemplars' median z at least this


def _robust_z(values: np.ndarray) -> np.ndarray:
    """Values in robust standard deviations (``robust_spread``) from their median (1 where the spread is 0)."""
    med = float(np.median(values))
    spread = robust_spread(values, med)
    return (values - med) / (spread if spread > 0 else 1.0)


@dataclasses.dataclass(frozen=True)
class Binned:
    """A micrograph binned to a particle of about ``DOG_TARGET_PX`` pixels and centred: what both terms read. The
    robust z of either term is the same at any offset and scale of the image, so the image is not normalised, and
    only the small binned image is converted to float64 (centred, its variance does not cancel a large mean)."""

    pixels: np.ndarray  # [H // factor, W // factor]
    factor: int


def binned(image: np.ndarray, diameter: float) -> Binned:
    """``image`` [H, W] binned for particles of ``diameter`` original pixels (``Binned``)."""
    factor = max(1, int(diameter // DOG_TARGET_PX))
    pixels = bin_image(np.asarray(image, dtype=np.float32), factor).astype(np.float64)
    return Binned(pixels - pixels.mean(), factor)


def _z_at(prepared: Binned, diameter: float, polarity: str, xy: np.ndarray) -> np.ndarray:
    """The DoG response in robust standard deviations, at original-pixel centres xy [N, 2]."""
    # the DoG baseline's filter through the Fourier transform: 2-4x faster on a 1024 x 1024 micrograph (binning
    # further to a 12-pixel particle was faster still, and lost GltPh's cutoff: F1 0.626 -> 0.581 over 5 draws)
    bright = dog_of_binned(prepared.pixels, diameter, prepared.factor, fast=True)
    return _sample(_robust_z(-bright if polarity == "dark" else bright), prepared.factor, xy)


def _sample(binned: np.ndarray, factor: int, xy: np.ndarray) -> np.ndarray:
    """Values of a map [h, w] binned by ``factor`` at original-pixel centres xy [N, 2]: [N]."""
    rows = np.clip((xy[:, 1] / factor).astype(int), 0, binned.shape[0] - 1)
    cols = np.clip((xy[:, 0] / factor).astype(int), 0, binned.shape[1] - 1)
    return np.asarray(binned[rows, cols])


def blob_profile(reference: np.ndarray, exemplars_xy: np.ndarray, diameter: float) -> dict[str, Any]:
    """The DoG's polarity on a project's reference micrograph [H, W] from its exemplars [m, 2] (original pixels):
    the manifest's ``blobs`` entry."""
    xy = np.asarray(exemplars_xy, dtype=np.float64).reshape(-1, 2)
    z = _z_at(binned(reference, diameter), diameter, "dark", xy)
    median = float(np.nanmedian(z)) if len(z) else 0.0
    polar = z if median >= 0 else -z  # the light polarity's response is the dark one's negated
    return {
        "polarity": "dark" if median >= 0 else "light",
        "exemplar_z": round(abs(median), 4),
        "exemplar_share": round(float(np.mean(polar > 1.0)), 4) if len(z) else 0.0,
    }


def are_blobs(profile: Mapping[str, Any], cfg: PickConfig) -> bool:
    """Whether a model's exemplars are blobs to the DoG (``blob_profile``): at least ``blob_min_share`` of them
    stand out by more than one robust standard deviation (an older profile: their median by ``LEGACY_MIN_Z``)."""
    share = profile.get("exemplar_share")
    return bool(share >= cfg.blob_min_share if share is not None else profile["exemplar_z"] >= LEGACY_MIN_Z)


def applies(smap: ScoreMap, manifest: Mapping[str, Any], cfg: PickConfig) -> bool:
    """Whether the blob and contrast terms are added: ``blob_weight`` or ``contrast_weight`` above 0, a model with
    a ``blobs`` entry whose exemplars are blobs to the DoG (``are_blobs``), and a map of cosines, not the
    particle head's logits."""
    profile = manifest.get(BLOBS_KEY)
    weighted = cfg.blob_weight > 0 or cfg.contrast_weight > 0
    return bool(weighted and profile and not smap.logits and are_blobs(profile, cfg))


def _cell_centres(smap: ScoreMap, geometry: Geometry) -> np.ndarray:
    """The original-pixel centre (x, y) of every cell of ``smap``, row by row: [Gy * Gx, 2]."""
    gy, gx = smap.scores.shape
    rc = np.stack(np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij"), axis=-1).reshape(-1, 2)
    return geometry.to_original(smap.centres(rc))


def blob_z(
    smap: ScoreMap, geometry: Geometry, polarity: str, image: np.ndarray, prepared: Binned | None = None
) -> np.ndarray:
    """The DoG response of ``image`` at the centre of each cell of ``smap``, in robust standard deviations of the
    micrograph's response: [Gy, Gx]. ``prepared``: ``binned(image, geometry.diameter)``, if already at hand."""
    prepared = binned(image, geometry.diameter) if prepared is None else prepared
    xy = _cell_centres(smap, geometry)
    return _z_at(prepared, geometry.diameter, polarity, xy).reshape(smap.scores.shape)


def contrast_z(smap: ScoreMap, geometry: Geometry, image: np.ndarray, prepared: Binned | None = None) -> np.ndarray:
    """The local contrast of ``image`` at the centre of each cell of ``smap``: the standard deviation of the
    micrograph low-passed to a tenth of the particle's diameter, over a box of the particle's size, in robust
    standard deviations of the micrograph's: [Gy, Gx]. A particle, whatever its polarity or shape, holds more
    contrast than the ice around it. ``prepared``: ``binned(image, geometry.diameter)``, if already at hand."""
    prepared = binned(image, geometry.diameter) if prepared is None else prepared
    size = geometry.diameter / prepared.factor
    low = ndimage.gaussian_filter(prepared.pixels, 0.1 * size)
    box = max(1, round(size))
    mean = ndimage.uniform_filter(low, box)
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(low * low, box) - mean * mean, 0.0))
    return _sample(_robust_z(spread), prepared.factor, _cell_centres(smap, geometry)).reshape(smap.scores.shape)


def with_blobs(
    smap: ScoreMap,
    geometry: Geometry,
    manifest: Mapping[str, Any],
    image: np.ndarray,
    cfg: PickConfig,
    z: np.ndarray | None = None,
    contrast: np.ndarray | None = None,
) -> ScoreMap:
    """The score map with the blob and contrast terms added (see the module's docstring), the same map where they
    do not apply (``applies``). ``z``, ``contrast``: ``blob_z`` and ``contrast_z`` of this map and micrograph, if
    already at hand."""
    if not applies(smap, manifest, cfg):
        return smap
    profile = manifest[BLOBS_KEY]
    cosine = smap.scores
    scored = cosine[np.isfinite(cosine)]  # cells a coarse-to-fine search left unscored are NaN
    spread = robust_spread(scored, float(np.median(scored))) if scored.size else 0.0
    term = np.zeros(cosine.shape)
    needed = (cfg.blob_weight > 0 and z is None) or (cfg.contrast_weight > 0 and contrast is None)
    prepared = binned(image, geometry.diameter) if needed else None  # binned once for both terms
    if cfg.blob_weight > 0:
        z = blob_z(smap, geometry, profile["polarity"], image, prepared) if z is None else z
        if cfg.blob_z_cap is not None:  # no more credit for being a blob than the particles themselves earn
            z = np.minimum(z, cfg.blob_z_cap * profile["exemplar_z"])
        term += cfg.blob_weight * z
    if cfg.contrast_weight > 0:
        term += cfg.contrast_weight * (contrast_z(smap, geometry, image, prepared) if contrast is None else contrast)
    scores = cosine + spread * term
    return dataclasses.replace(smap, scores=scores.astype(cosine.dtype, copy=False))
