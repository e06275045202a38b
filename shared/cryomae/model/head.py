"""The particle-probability head: a logistic model on a window's standardised encoder feature.

A window's feature z is standardised by its micrograph's windows (mean and spread per dimension, as the cosine
score is) and scaled to unit length, z'. The head gives the probability that the window is centred on a
particle:

    p = sigmoid(scale * <z', direction> + bias)

``direction`` (unit length) starts as the mean of the exemplar bank, the paper's cosine score, and is moved
by training on the reference micrograph as a positive-unlabeled problem (``cryomae.training.pu_head``);
``scale`` and ``bias`` turn the similarity into a probability. Because the feature is standardised per
micrograph and the output is a class probability, one cut (``PickConfig.probability_min``) means the same on
every micrograph: it needs neither bimodal scores nor a session's history.

The head is stored with the model (``cryomae.model.checkpoint``) as three tensors; its class prior and fit
figures go to the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

HEAD_PREFIX = "pu_head."


@dataclass
class ParticleHead:
    """p = sigmoid(scale * <z', direction> + bias) for a unit-length standardised window feature z'."""

    direction: torch.Tensor  # [D], unit length, in the standardised feature space
    scale: float
    bias: float
    info: dict[str, Any] = field(default_factory=dict)  # prior, fit figures: for the manifest

    def logit(self, similarity: torch.Tensor) -> torch.Tensor:
        """Logits from similarities <z', direction> (any shape)."""
        return similarity * self.scale + self.bias

    def probability(self, similarity: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(similarity))

    def similarity_at(self, probability: float) -> float:
        """The similarity whose probability is ``probability`` (0 < p < 1): the cut in similarity units."""
        return (math.log(probability / (1 - probability)) - self.bias) / self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head as named float32 tensors, for the weights file."""
        return {
            HEAD_PREFIX + "direction": self.direction.detach().float().cpu().contiguous(),
            HEAD_PREFIX + "scale": torch.tensor([self.scale], dtype=torch.float32),
            HEAD_PREFIX + "bias": torch.tensor([self.bias], dtype=torch.float32),
        }

    @classmethod
    def pop_from(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None) -> ParticleHead | None:
        """Take the head's tensors out of a weights file's tensors (None when it has none)."""
        names = [HEAD_PREFIX + k for k in ("direction", "scale", "bias")]
        if not any(n in tensors for n in names):
            return None
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"incomplete particle head: no {', '.join(missing)}")
        d, s, b = (tensors.pop(n) for n in names)
        return cls(direction=d.float(), scale=float(s.reshape(-1)[0]), bias=float(b.reshape(-1)[0]), info=info or {})
