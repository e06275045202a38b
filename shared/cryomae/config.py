"""The engine's options: training, picking, the facility encoder and watching, as validated pydantic models with
the measured defaults.

A library call takes one of these. A process reads them as sections of its ``Settings``
(``cryomae.settings``: ``CRYOMAE_TRAIN__*``, ``CRYOMAE_PICK__*``, ``CRYOMAE_WATCH__*``); the offline CLI from
``--set`` and ``--config``. Every default was chosen by measurement on the development data
(docs/accuracy-study.md, docs/ablations.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cryomae.model.presets import PRESETS
from cryomae.picking.threshold import ThresholdRule


class TrainConfig(BaseModel):
    """Hyperparameters of pre-training and self-cross similarity training."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("fast", description="model preset (cryomae.model.presets): paper, base, small, fast, test")
    feature: Literal["mean", "cls", "flat"] | None = Field(
        None, description="override the preset's latent feature (see cryomae.model.presets)"
    )
    feature_layer: int | None = Field(None, description="override the preset's feature layer")
    box_factor: float = Field(1.0, gt=0.5, le=6.0, description="region side / particle diameter")
    highpass: float | None = Field(
        2.0, gt=0.0, description="flatten the background at this width in region sides (None: off)"
    )
    lowpass: float | None = Field(1.0, gt=0.0, description="Gaussian low-pass sigma in model pixels (None: off)")
    ice_z: float | None = Field(
        3.0,
        gt=0.0,
        description="flatten the background over the ice alone, with carbon and contamination (local level more "
        "than this many robust standard deviations from the typical ice) set to zero; None flattens over all",
    )
    # pre-training: reconstruction only, on random regions of the reference (and extra) micrographs
    pretrain_regions: int = Field(4096, ge=0, description="random regions drawn for pre-training")
    pretrain_epochs: int = Field(
        0,
        ge=0,
        description="passes over the pre-training regions (0, the default: none; pre-training lowered F1 at the "
        "picker's feature layer on every exemplar draw measured, docs/accuracy-study.md)",
    )
    pretrain_lr: float = Field(1e-3, gt=0, description="peak learning rate of pre-training")
    # SCS training: exemplars plus n unlabeled regions of the reference micrograph
    n_unlabeled: int = Field(512, ge=1, description="unlabeled regions of the reference micrograph (n)")
    unlabeled_per_step: int = Field(128, ge=1, description="unlabeled regions in each step with all exemplars")
    epochs: int = Field(30, ge=0, description="passes over the unlabeled regions in SCS training")
    lr: float = Field(3e-4, gt=0, description="peak learning rate of SCS training (AdamW, warm-up then cosine)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of S_cross against S_self (eq. 3)")
    tau: float = Field(0.0, description="floor of L_SCS (eq. 3)")
    beta: float = Field(1.0, ge=0.0, description="weight of L_SCS in the total loss (eq. 6)")
    pi_hat: float | None = Field(0.1, ge=0.0, lt=1.0, description="PU prior; None = unadjusted SCS")
    scs_normalization: Literal["paper", "weighted"] = Field(
        "weighted", description="eqs. 4-5 as printed, or as weighted means in [-1, 1]"
    )
    scs_view: Literal["masked", "full"] = Field(
        "full", description="SCS on features of the masked input (paper) or of the whole region"
    )
    scs_standardize: bool = Field(
        True,
        description="standardise features by the unlabeled regions' mean and spread before L_SCS, as the "
        "picker standardises window features by the micrograph's",
    )
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of patches masked for reconstruction")
    batch_size: int = Field(128, ge=2, description="regions per pre-training step")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay")
    rotate: bool = Field(True, description="augment regions with random in-plane rotations")
    flip: bool = Field(True, description="augment regions with random mirror flips")
    bank: Literal["views", "aligned"] = Field(
        "views",
        description="exemplar bank: each exemplar in bank_views views (the paper's), or the average of the exemplars "
        "aligned in the plane, at bank_rotations angles each also mirrored (cryomae.training.bank; pick it with "
        "score mean_max, docs/accuracy-study.md)",
    )
    bank_views: Literal[1, 8] = Field(8, description="bank views: 1 view or the 8 dihedral views of each exemplar")
    bank_rotations: int = Field(16, ge=1, le=90, description="bank aligned: in-plane angles of the aligned average")
    corrections_missed: bool = Field(
        False,
        description="training on an operator's corrections: also add the particles marked missed to the exemplar "
        "bank (off: measured to lower F1 on most development samples, docs/accuracy.md; the wrong picks are used "
        "either way, as negatives)",
    )
    head: bool = Field(
        False,
        description="train the particle-probability head on the reference micrograph as a positive-unlabeled "
        "problem (cryomae.training.pu_head); the picker uses it where PickConfig.scorer allows",
    )
    head_shrink: float | None = Field(
        None,
        ge=0.0,
        description="penalty on the head's direction moving away from the bank mean; None: it stays there and the "
        "head only calibrates the cosine score (letting it move on 15 positives lost ranking: docs/accuracy-study.md)",
    )
    head_prior: float | None = Field(
        None, gt=0.0, lt=1.0, description="share of the reference's candidates that are particles; None: estimated"
    )
    seed: int = Field(0, description="seed of every random draw of training (deterministic on one machine)")
    device: str = "auto"
    encoder: str | None = Field(
        None,
        description="start from this facility encoder (`cryomae encoder pretrain`): an encoder directory, or a "
        "folder of versions v0001, v0002, ... (the newest is used); None starts from random weights",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return self

    def planned_steps(self) -> dict[str, int]:
        """The optimizer steps of each stage, in the order they run (the trainer's estimate of the time left)."""
        return {
            "pretrain": stage_steps(self.pretrain_regions, self.batch_size, self.pretrain_epochs),
            "scs_train": stage_steps(self.n_unlabeled, min(self.unlabeled_per_step, self.n_unlabeled), self.epochs),
        }


def stage_steps(n: int, per_step: int, epochs: int) -> int:
    """Steps of a training stage: ``epochs`` passes over ``n`` items, ``per_step`` items a step (the last one
    shorter)."""
    return math.ceil(n / per_step) * epochs if n else 0


class PickConfig(BaseModel):
    """Options of sliding-window picking."""

    model_config = ConfigDict(extra="forbid")

    stride_fraction: float = Field(0.125, gt=0.0, le=1.0, description="stride / window side (paper: 1/8)")
    scorer: Literal["auto", "cosine"] = Field(
        "auto",
        description="what scores a window: the model's particle-probability head where the model has one (auto; "
        "TrainConfig.head), else the cosine similarity to the exemplar bank (cosine: always, the paper's)",
    )
    probability_min: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="the cut where windows are scored by the head (threshold auto): the least particle probability "
        "of a pick",
    )
    score: Literal["max", "mean", "mean_max"] = Field(
        "mean",
        description="a window's score from its cosines to the bank: their mean, their max, or mean_max: "
        "(1 - max_weight) x mean + max_weight x max (the rotational average plus the best orientation's match)",
    )
    max_weight: float = Field(0.4, ge=0.0, le=1.0, description="mean_max: the weight of the max")
    blob_weight: float = Field(
        0.6,
        ge=0.0,
        le=4.0,
        description="add this times the cosine map's spread times the size-tuned DoG response (robust z) to each "
        "window's score, the DoG's polarity measured on the exemplars at training (cryomae.picking.blobs; 0: the "
        "cosine alone; chosen leaving one sample out over five exemplar draws, docs/accuracy-study.md)",
    )
    contrast_weight: float = Field(
        0.2,
        ge=0.0,
        le=4.0,
        description="add this times the cosine map's spread times the local contrast (robust z of the standard "
        "deviation of the low-passed micrograph over a particle-sized box) to each window's score, with the DoG "
        "term and under its gate (cryomae.picking.blobs; 0: off; chosen leaving one sample out over five "
        "exemplar draws, docs/accuracy-study.md)",
    )
    blob_min_share: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="the DoG term only where the particles are blobs to it: at least this share of the exemplars "
        "stand out of the reference's DoG response by more than one robust standard deviation (measured at "
        "training; a long filament's rods do not; chosen leaving one sample out, docs/accuracy-study.md)",
    )
    blob_z_cap: float | None = Field(
        None,
        gt=0.0,
        description="the DoG response counts up to this times its median at the exemplars, no more: junk that is a "
        "stronger blob than the particles earns no more than they do (None: no cap; 1.0 lost 0.016 F1 left one "
        "sample out, docs/accuracy-study.md)",
    )
    negative_weight: float = Field(
        0.0,
        ge=0.0,
        le=4.0,
        description="a model trained with an operator's corrections: the cosine score less this times the window's "
        "cosine to the marked wrong picks (negative_rule; 0: the negatives are kept with the model but not used; "
        "0 chosen leaving one sample out with a simulated operator, docs/accuracy.md; the marks hold on their own "
        "micrographs either way)",
    )
    negative_rule: Literal["max", "mean", "orthogonal", "nearest"] = Field(
        "mean",
        description="the cosine to the marked wrong picks: to the nearest one (max), to their mean (mean), or to "
        "what their mean does not share with the particles' prototype (orthogonal), or by how much the nearest "
        "one is nearer than the nearest exemplar (nearest)",
    )
    feature_norm: Literal["none", "center", "standardize"] = Field(
        "standardize",
        description="before the cosine: subtract the micrograph's mean window feature (center), and also divide "
        "each dimension by its spread over the micrograph (standardize)",
    )
    threshold: ThresholdRule | float = Field(
        "auto",
        description="per-micrograph cutoff rule (see cryomae.picking.threshold) or a fixed score; auto follows "
        "the session: where a micrograph's scores are not clearly bimodal it takes the session's usual cut",
    )
    gmm_posterior: float = Field(
        0.35,
        gt=0.0,
        lt=1.0,
        description="gmm cutoff: least posterior of the particle mode for a pick (the "
        "F1-optimal cut for calibrated posteriors is half the achievable F1, about 0.7 / 2 here)",
    )
    gmm_min_separation: float = Field(
        2.0, ge=0.0, description="auto: least Ashman's D between the mixture's modes to trust the mixture"
    )
    gmm_min_weight: float = Field(
        0.05, ge=0.0, lt=1.0, description="auto: least share of candidates in the particle mode to trust it"
    )
    gmm_max_weight: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="auto: most share of candidates in the particle mode to trust it (particles are a minority "
        "of the candidates; a larger upper mode is background split in two, e.g. by carbon or thick ice)",
    )
    robust_z: float = Field(1.0, description="robust cut: robust standard deviations above the median candidate score")
    knn_k: int = Field(5, ge=1, description="knn cutoff: neighbours in score space (the paper's k)")
    knn_smooth: int = Field(0, ge=0, description="knn cutoff: moving-average width over the ranked distances (0: off)")
    nms: bool = Field(True, description="keep only local maxima of the score map (nms_distance apart)")
    nms_distance: float = Field(0.5, gt=0.0, description="minimum distance between picks / particle diameter")
    refine: bool = Field(True, description="refine peaks to sub-window precision with a parabola fit")
    edge_margin: float = Field(
        0.5,
        ge=0.0,
        description="no picks closer than this many particle diameters to the image edge or to a padded border "
        "band (0.5: the whole particle lies inside the micrograph; extraction drops boxes that overflow it)",
    )
    outlier_z: float | None = Field(
        3.0,
        gt=0.0,
        description="no picks where the local mean level lies more than this many robust standard "
        "deviations from the micrograph's typical ice (carbon, contamination); None keeps them",
    )
    outlier_margin: float = Field(
        0.5,
        ge=0.0,
        le=2.0,
        description="also no picks within this many particle diameters of those regions (the edge of a carbon film "
        "or of contamination, where the flattened image still rings; chosen leaving one sample out, "
        "docs/accuracy-study.md)",
    )
    search: Literal["full", "coarse_to_fine"] = Field(
        "full",
        description="window-by-window scoring: every window at the stride (full), or every coarse_factor-th "
        "window and then the fine windows around the coarse peaks (coarse_to_fine)",
    )
    coarse_factor: int = Field(2, ge=1, le=8, description="coarse stride / stride in the coarse_to_fine search")
    shared_tokens: bool = Field(
        True,
        description="score windows from one convolution of the whole micrograph with the patch embedding when "
        "the feature is taken at layer 0 (same scores, far less work); False embeds every window separately",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="windows per encoder batch when windows are embedded one by one; None: on a GPU as many as "
        "fit a quarter of its free memory (cryomae.picking.picker.window_batch_size), 2048 on the CPU",
    )
    device: str = "auto"


class EncoderConfig(BaseModel):
    """Pre-training a facility encoder: masked reconstruction on regions of many micrographs of any samples.

    A project's training later starts from it (``TrainConfig.encoder``). The regions are prepared as a project's
    are (the same high-pass, low-pass and ice flattening, from ``TrainConfig``'s defaults) at particle sizes drawn
    log-uniformly from ``min_diameter`` to ``max_diameter`` original pixels, since an archive mixes samples.
    """

    model_config = ConfigDict(extra="forbid")

    preset: str = "fast"
    min_diameter: float = Field(24.0, gt=0, description="smallest particle diameter drawn, original pixels")
    max_diameter: float = Field(160.0, gt=0, description="largest particle diameter drawn, original pixels")
    scales_per_micrograph: int = Field(2, ge=1, le=16, description="particle sizes drawn per micrograph per epoch")
    regions_per_micrograph: int = Field(256, ge=1, description="regions cut per micrograph and size per epoch")
    micrographs_per_chunk: int = Field(
        8, ge=1, description="micrographs prepared at once; their regions are shuffled together (bounds memory)"
    )
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=2)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.05, ge=0.0)
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.max_diameter < self.min_diameter:
            raise ValueError(f"max_diameter {self.max_diameter} is below min_diameter {self.min_diameter}")
        return self


# ---------------------------------------------------------------------------------------------- watching

WatchMode = Literal["auto", "inotify", "poll"]


class WatchTuning(BaseModel):
    """How the watcher finds and judges micrographs (the service settings' ``watch`` section).

    ``mode``: ``inotify`` asks the kernel for events (immediate, cheap, blind to changes made by other machines
    on network filesystems); ``poll`` lists the session folder every ``poll_interval`` seconds (works everywhere);
    ``auto`` polls on network and FUSE filesystems and uses inotify elsewhere. In every mode a session falls back
    to polling when its inotify watch cannot be created (e.g. the watch limit is reached).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: WatchMode = Field(
        "auto", description="inotify, poll (NFS, CIFS), or auto (polls on network and FUSE filesystems)"
    )
    settle_seconds: float = Field(2.0, ge=0, description="size and mtime unchanged this long before a file counts")
    give_up_seconds: float = Field(
        600.0,
        gt=0,
        description="a settled file that still fails its completeness check and may still grow (an MRC shorter "
        "than its header declares, an empty file) is published anyway after this long unchanged, so that the "
        "picker dead-letters it with the reason; one that never can (an invalid MRC header, not an MRC, longer "
        "than its header declares, a symlink out of the data roots) is published at once",
    )
    poll_interval: float = Field(5.0, gt=0, description="seconds between folder listings in poll mode")
    rescan_interval: float = Field(
        600.0, ge=0, description="seconds between safety listings in inotify mode (lost events); 0: never"
    )
    check_interval: float = Field(0.5, gt=0, description="seconds between completeness checks of pending files")

    @model_validator(mode="after")
    def _give_up_after_settle(self) -> WatchTuning:
        if self.give_up_seconds < self.settle_seconds:
            raise ValueError(
                f"give_up_seconds ({self.give_up_seconds}) must not be shorter than settle_seconds "
                f"({self.settle_seconds})"
            )
        return self


class WatchSettings(WatchTuning):
    """The tuning plus where the watcher may look (one instance, built in ``main()`` and passed down)."""

    data_roots: list[Path] = Field(
        min_length=1, description="absolute folders; a session folder must lie under one of them"
    )
    max_pixels: int | None = Field(
        None,
        gt=0,
        description="the picker's pixel limit (CRYOMAE_MAX_MICROGRAPH_PIXELS): an MRC whose header declares more is "
        "published at once, to be refused, instead of waiting to become complete",
    )

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        relative = [str(r) for r in roots if not r.is_absolute()]
        if relative:
            raise ValueError(f"data roots must be absolute paths: {', '.join(relative)}")
        return roots
