"""The self-cross similarity loss of CryoMAE, plain (eqs. 1-3) and PU-adjusted (eqs. 4-6).

Sums of cosine similarities include every ordered pair, the i = j terms too, exactly as the paper's
double sums are written: S^ll over m*m pairs, S^lu over m*n pairs, S^uu over n*n pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SimilaritySums:
    """S^ll, S^lu, S^uu and the counts m, n they were summed over."""

    ll: torch.Tensor
    lu: torch.Tensor
    uu: torch.Tensor
    m: int
    n: int


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities: a [M, D], b [N, D] -> [M, N]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def standardize(feats: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Centre and scale features [N, D] per dimension by the mean and spread of ``reference`` [K, D].

    With the background (unlabeled regions, or all windows of a micrograph) as reference, the direction that
    every region shares is removed, so cosine similarities measure what sets a region apart.
    """
    mu = reference.mean(dim=0, keepdim=True)
    sd = reference.std(dim=0, keepdim=True).clamp_min(1e-6)
    return (feats - mu) / sd


def similarity_sums(f_l: torch.Tensor, f_u: torch.Tensor) -> SimilaritySums:
    """Sums of cosine similarities among exemplar features f_l [m, D] and unlabeled features f_u [n, D]."""
    return SimilaritySums(
        ll=cosine_matrix(f_l, f_l).sum(),
        lu=cosine_matrix(f_l, f_u).sum(),
        uu=cosine_matrix(f_u, f_u).sum(),
        m=f_l.shape[0],
        n=f_u.shape[0],
    )


def self_cross(s: SimilaritySums) -> tuple[torch.Tensor, torch.Tensor]:
    """Unadjusted similarities: S_self = S^ll / m^2 (eq. 1), S_cross = S^lu / (m n) (eq. 2)."""
    return s.ll / (s.m * s.m), s.lu / (s.m * s.n)


def self_cross_pu(s: SimilaritySums, pi_hat: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PU-adjusted similarities (eqs. 4 and 5), pi_hat = estimated fraction of unlabeled regions with a particle.

    S_self_hat  = [S^ll + 2 pi S^lu + pi^2 S^uu] / (m + n)^2
    S_cross_hat = [(1 - pi) S^lu + pi (1 - pi) S^uu] / ((m + n) n)
    """
    m, n, pi = s.m, s.n, pi_hat
    s_self = (s.ll + 2 * pi * s.lu + pi * pi * s.uu) / ((m + n) ** 2)
    s_cross = ((1 - pi) * s.lu + pi * (1 - pi) * s.uu) / ((m + n) * n)
    return s_self, s_cross


def self_cross_pu_weighted(s: SimilaritySums, pi_hat: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PU-adjusted similarities as weighted means (the same weights as eqs. 4 and 5).

    Each unlabeled region counts as a positive with weight pi and as a negative with weight 1 - pi, as in
    the paper; dividing by the total pair weight instead of (m + n)^2 and (m + n) n keeps both similarities
    in [-1, 1], so the exemplar-exemplar term is not shrunk by (m / (m + n))^2 when n >> m:
    S_self_w  = [S^ll + 2 pi S^lu + pi^2 S^uu] / (m + pi n)^2
    S_cross_w = [(1 - pi) S^lu + pi (1 - pi) S^uu] / ((m + pi n) (1 - pi) n)
    """
    m, n, pi = s.m, s.n, pi_hat
    pos = m + pi * n
    s_self = (s.ll + 2 * pi * s.lu + pi * pi * s.uu) / (pos * pos)
    s_cross = ((1 - pi) * s.lu + pi * (1 - pi) * s.uu) / (pos * (1 - pi) * n)
    return s_self, s_cross


def scs_loss(s_cross: torch.Tensor, s_self: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """L_SCS = max(tau, 1 + alpha * S_cross - (1 - alpha) * S_self) (eq. 3)."""
    return torch.clamp(1 + alpha * s_cross - (1 - alpha) * s_self, min=tau)


def scs_loss_from_features(
    f_l: torch.Tensor,
    f_u: torch.Tensor,
    alpha: float,
    tau: float,
    pi_hat: float | None,
    normalization: str = "paper",
) -> torch.Tensor:
    """L_SCS_hat from features f_l [m, D], f_u [n, D]: PU-adjusted, or plain L_SCS when pi_hat is None.

    ``normalization`` is "paper" (eqs. 4-5 as printed) or "weighted" (``self_cross_pu_weighted``).
    """
    sums = similarity_sums(f_l, f_u)
    if pi_hat is None:
        s_self, s_cross = self_cross(sums)
    elif normalization == "weighted":
        s_self, s_cross = self_cross_pu_weighted(sums, pi_hat)
    else:
        s_self, s_cross = self_cross_pu(sums, pi_hat)
    return scs_loss(s_cross, s_self, alpha, tau)


def total_loss(l_mse: torch.Tensor, l_scs: torch.Tensor, beta: float) -> torch.Tensor:
    """L_total = L_MSE + beta * L_SCS_hat (eq. 6)."""
    return l_mse + beta * l_scs
