"""An operator's corrections in training: particles the picker missed and picks that were wrong, marked on any
micrograph of a session (the session page's ``corrections.star``, ``cryomae exemplars correct``).

The wrong picks become the model's negatives, whose mean the cosine score pushes away from
(``PickConfig.negative_weight``: score = cosine to the bank - weight x cosine to the negatives' mean, the
relevance feedback of Rocchio's classic rule). With ``TrainConfig.corrections_missed`` the missed particles join
the exemplar bank as the reference's exemplars are in it (off by default: it lowered F1 on most development
samples, docs/accuracy.md). Both are encoder features of the marked windows on their own micrographs, prepared
like the reference. The particle-probability head (``TrainConfig.head``) is fitted on the reference alone and
does not read them. The marks themselves are kept in the model's manifest and hold on their own micrographs
when the model picks them again (``cryomae.picking.marks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cryomae.config import TrainConfig
from cryomae.model.checkpoint import TrainedModel
from cryomae.preprocess import prepare
from cryomae.training.bank import exemplar_bank

__all__ = ["CorrectionMarks", "apply_corrections"]


@dataclass(frozen=True)
class CorrectionMarks:
    """The marks on one micrograph: its pixels [H, W] and the centres (original pixels, x = column) of the
    particles the picker missed and of its wrong picks; ``micrograph``, its resolved path, where the marks are to
    hold when the model picks it again (``cryomae.picking.marks``)."""

    image: np.ndarray
    missed: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [P, 2]
    wrong: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [N, 2]
    micrograph: str | None = None


def apply_corrections(
    trained: TrainedModel, marks: Sequence[CorrectionMarks], cfg: TrainConfig, device: torch.device
) -> dict[str, int]:
    """Add the marked wrong picks to ``trained``'s negatives and, with ``cfg.corrections_missed``, the marked missed
    particles to its bank (in place); returns the counts of marks used. One micrograph is prepared at a time."""
    missed: list[torch.Tensor] = []
    wrong: list[torch.Tensor] = []
    used = [(m.image, m.missed if cfg.corrections_missed else m.missed[:0], m.wrong) for m in marks]
    used = [(image, p, n) for image, p, n in used if len(p) or len(n)]
    for image, positives, negatives in used:
        prepared = prepare(image, trained.geometry, device)
        for xy, out in ((positives, missed), (negatives, wrong)):
            if len(xy):
                centres = trained.geometry.to_model(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
                out.append(exemplar_bank(trained.model, prepared, centres, device, kind="views", views=cfg.bank_views))
    if missed:
        trained.bank = torch.cat([trained.bank, *(f.to(trained.bank.device) for f in missed)])
    if wrong:
        kept = [] if trained.negatives is None else [trained.negatives]
        trained.negatives = torch.cat([*kept, *(f.to(trained.bank.device) for f in wrong)])
    return {
        "missed": sum(len(p) for _, p, _ in used),
        "wrong": sum(len(n) for _, _, n in used),
        "micrographs": len(used),
    }
