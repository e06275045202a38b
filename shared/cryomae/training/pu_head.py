"""Training the particle-probability head on the reference micrograph as a positive-unlabeled problem.

The operator labels about 15 particles and nothing else: the exemplars are labelled positives, every other
candidate of the reference micrograph (a peak of its cosine score map, as the picker finds them) is unlabeled,
a mixture of particles and background in an unknown proportion, the class prior pi.

1. **The prior, from the data** (mixture proportion estimation): for any similarity t, the share of unlabeled
   candidates at or above t is at least pi times the share of positives at or above t, since the unlabeled hold
   the positives in proportion pi; where the background no longer reaches t the two are equal. The estimate is
   the median of these ratios at the exemplars' similarities in their upper half, where the background is
   rarest (the least ratio is the textbook bound, but with 15 exemplars one high outlier drives it to 0). Each
   exemplar is seen as the picker sees a particle, at its nearest candidate (a score-map peak: an exemplar's
   own window scores lower than the peaks of true particles), and is scored against the bank without its own
   views, so that it is not compared with itself.
2. **The head**, p = sigmoid(scale * <z', direction> + bias) (``cryomae.model.head``), fitted by the unbiased
   PU risk with the logistic loss, a proper scoring rule, so that p estimates the class probability among the
   candidates. For the logistic loss the risk takes a convex form (du Plessis et al. 2015) whose optimum holds
   E_U[p] = pi. The non-negative correction of Kiryo et al. (2017) was tried first: with the logistic loss its
   clamp binds on the noise of the positives' term, and it moved the boundary a third of the way into the
   background on a mixture with a known answer (``tests/unit/test_particle_head.py``). ``direction`` starts at
   the bank's mean (the paper's cosine ranking) and may move from it under a penalty (``TrainConfig.head_shrink``);
   without that freedom the head only calibrates the cosine ranking.
3. **Labelled negatives** (an operator's corrections) enter the risk with their own term when given.

All in torch, full batch: a few thousand candidates and 15 positives fit in about a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryomae.config import PickConfig, TrainConfig
from cryomae.errors import InputError
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.head import ParticleHead
from cryomae.picking.picker import pick_micrograph, unit_features

PRIOR_RANGE = (0.01, 0.95)  # the estimate is clipped to this: a prior of 0 or 1 leaves nothing to learn
SCALE_PENALTY = 1e-3  # on the squared scale (in spreads of the similarity): keeps the risk bounded below


@dataclass(frozen=True)
class HeadFit:
    """Options of the head's fit (``TrainConfig.head_*``)."""

    shrink: float | None = None  # penalty on the direction's move from the bank mean; None: the direction stays
    steps: int = 1000
    lr: float = 0.05


def estimate_prior(unlabeled: np.ndarray, positive: np.ndarray) -> float:
    """The share of positives among the unlabeled, from their similarities [N] and the positives' [M].

    Upper bound of the mixture proportion at each of the positives' similarities t in their upper half:
    P_U(s >= t) / P_P(s >= t), with P_P(s >= t) counted as (k - 0.5) / M for the k-th highest positive (the
    half keeps the highest from counting as certain); the median of these, clipped to ``PRIOR_RANGE``."""
    u = np.sort(np.asarray(unlabeled, dtype=np.float64))
    p = np.sort(np.asarray(positive, dtype=np.float64))[::-1]  # descending
    if len(u) == 0 or len(p) == 0:
        raise ValueError("the prior needs unlabeled and positive similarities")
    m = len(p)
    ks = np.arange(1, m + 1)
    upper = ks <= max(1, math.ceil(m / 2))
    share_u = (len(u) - np.searchsorted(u, p[upper], side="left")) / len(u)
    share_p = (ks[upper] - 0.5) / m
    return float(np.clip(np.median(share_u / share_p), *PRIOR_RANGE))


def leave_one_out_similarity(positives: torch.Tensor, bank: torch.Tensor, owner: np.ndarray | None) -> torch.Tensor:
    """Each positive's similarity [M] to the bank's mean without the bank rows of that positive.

    positives [M, D] and bank [B, D]: unit-length standardised features; ``owner`` [B] gives each bank row's
    exemplar (None: rows are not per exemplar, e.g. the aligned bank, and the whole mean is used)."""
    total = bank.sum(dim=0)
    if owner is None:
        return positives @ F.normalize(total, dim=0)
    own = torch.as_tensor(owner, device=bank.device)
    sums = torch.zeros(len(positives), bank.shape[1], device=bank.device, dtype=bank.dtype).index_add_(0, own, bank)
    return (positives * F.normalize(total[None] - sums, dim=1)).sum(dim=1)


def fit_head(
    unlabeled: torch.Tensor,
    positive: torch.Tensor,
    start: torch.Tensor,
    prior: float,
    fit: HeadFit = HeadFit(),
    negative: torch.Tensor | None = None,
) -> ParticleHead:
    """Fit p = sigmoid(a <x, u> + b) by the PU risk with the logistic loss.

    unlabeled [N, D], positive [M, D], negative [K, D] (optional labelled negatives): unit-length standardised
    features; start [D]: the starting direction (the bank mean). With ``fit.shrink`` the direction first moves
    from ``start`` under that penalty, by the non-negative risk (the unbiased one is unbounded below once the
    direction can set the 15 positives apart); then scale and bias are fitted on the similarities to the
    direction by the convex unbiased risk, whose optimum is calibrated. Returns the head with its fit figures.
    """
    x_u, x_p = unlabeled.float(), positive.float()
    x_n = None if negative is None or len(negative) == 0 else negative.float()
    direction = F.normalize(start.float(), dim=0)
    if fit.shrink is not None:
        direction = _optimise(x_u, x_p, x_n, direction, prior, fit, non_negative=True)[0]
    s_u, s_p = (x_u @ direction)[:, None], (x_p @ direction)[:, None]
    s_n = None if x_n is None else (x_n @ direction)[:, None]
    calibration = HeadFit(shrink=None, steps=fit.steps, lr=fit.lr)
    _, scale, bias = _optimise(s_u, s_p, s_n, torch.ones(1), prior, calibration, non_negative=False)
    with torch.no_grad():
        p_u = torch.sigmoid(scale * s_u + bias)
        info = {
            "prior": round(prior, 4),
            "moved": round(float(1 - direction @ F.normalize(start.float(), dim=0)), 5),  # 1 - cosine to the start
            "expected_positives": round(float(p_u.sum()), 1),  # among the reference's candidates
            "candidates": len(x_u),
            "positives": len(x_p),
            "negatives": 0 if x_n is None else len(x_n),
        }
    return ParticleHead(direction=direction.detach(), scale=scale, bias=bias, info=info)


def _optimise(
    x_u: torch.Tensor,
    x_p: torch.Tensor,
    x_n: torch.Tensor | None,
    start: torch.Tensor,
    prior: float,
    fit: HeadFit,
    non_negative: bool,
) -> tuple[torch.Tensor, float, float]:
    """(unit direction, scale, bias) minimising the PU risk of f(x) = a <x, u> + b, u = normalise(start + delta).

    The PN risk pi E_P[l(f, +1)] + (1 - pi) E_N[l(f, -1)] is estimated from the positives and the unlabeled:
    (1 - pi) E_N[l(f, -1)] = E_U[l(f, -1)] - pi E_P[l(f, -1)]. For the logistic loss l(f, +1) - l(f, -1) = -f, so
    the risk is pi E_P[-f] + E_U[softplus(f)]: convex (du Plessis et al. 2015). ``non_negative`` keeps the
    negatives' part from falling below 0 by stepping back along it (Kiryo et al. 2017, beta = 0, gamma = 1).
    Labelled negatives add their own term. Similarities are measured from their centre in units of their
    spread, so that scale and bias start near their answers.
    """
    sims = torch.cat([x_u @ start, x_p @ start])
    centre, spread = float(sims.mean()), float(sims.std().clamp_min(1e-3))
    delta = torch.zeros_like(start, requires_grad=fit.shrink is not None)
    log_a = torch.tensor(math.log(2.0), requires_grad=True)
    b = torch.tensor(math.log(prior / (1 - prior)), requires_grad=True)
    opt = torch.optim.Adam([log_a, b] + ([delta] if fit.shrink is not None else []), lr=fit.lr)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return log_a.exp() * ((x @ F.normalize(start + delta, dim=0)) - centre) / spread + b

    for _ in range(fit.steps):
        opt.zero_grad()
        f_p, f_u = logits(x_p), logits(x_u)
        labelled = prior * F.softplus(-f_p).mean() + (F.softplus(logits(x_n)).mean() if x_n is not None else 0.0)
        negatives = F.softplus(f_u).mean() - prior * F.softplus(f_p).mean()
        if non_negative and negatives.item() < 0:
            loss = -negatives
        else:
            loss = labelled + negatives + SCALE_PENALTY * log_a.exp().square()
        if fit.shrink is not None:
            loss = loss + fit.shrink * delta.square().sum()
        loss.backward()
        opt.step()
    scale = float(log_a.detach().exp()) / spread
    direction = F.normalize(start + delta.detach(), dim=0)
    return direction, scale, float(b.detach()) - scale * centre


def bank_owners(n_exemplars: int, n_rows: int, kind: str) -> np.ndarray | None:
    """Each bank row's exemplar for the ``views`` bank (each exemplar's views in a run); None for ``aligned``."""
    if kind != "views" or n_rows % max(n_exemplars, 1):
        return None
    return np.repeat(np.arange(n_exemplars), n_rows // n_exemplars)


def train_head(
    trained: TrainedModel,
    reference: np.ndarray,
    exemplars_xy: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    negatives_xy: np.ndarray | None = None,
) -> ParticleHead:
    """The head of a freshly trained model (without one), from its reference micrograph [H, W], exemplars
    [m, 2] and optional labelled negatives [k, 2] (original pixels): see the module's docstring."""
    pick_cfg = PickConfig(scorer="cosine", device=str(device))
    found = pick_micrograph(trained, reference, pick_cfg, device)
    xy = np.concatenate(
        [found.candidates_xy, exemplars_xy, np.zeros((0, 2)) if negatives_xy is None else negatives_xy]
    ).reshape(-1, 2)
    feats, bank = unit_features(trained, reference, xy, pick_cfg, device)
    n_c, m = len(found.candidates_xy), len(exemplars_xy)
    if n_c == 0:
        raise InputError(None, "no candidate windows on the reference micrograph to train the particle head on")
    unlabeled, negative = feats[:n_c], feats[n_c + m :]
    # each exemplar as the picker will see a particle: the candidate (a score-map peak) nearest to it within half
    # a diameter, else its own window
    gap = np.linalg.norm(found.candidates_xy[None, :, :] - np.asarray(exemplars_xy)[:, None, :], axis=2)  # [m, C]
    nearest = torch.as_tensor(np.where(gap.min(axis=1) <= trained.geometry.diameter / 2, gap.argmin(axis=1), -1))
    positive = torch.where((nearest >= 0)[:, None], unlabeled[nearest.clamp_min(0)], feats[n_c : n_c + m])
    start = F.normalize(bank.mean(dim=0), dim=0)
    loo = leave_one_out_similarity(positive, bank, bank_owners(m, len(bank), cfg.bank))
    similarity = unlabeled @ start
    prior = cfg.head_prior or estimate_prior(similarity.cpu().numpy(), loo.cpu().numpy())
    if cfg.head_shrink is None:  # calibrate the cosine ranking: one dimension, the similarity to the bank mean
        one = fit_head(
            similarity[:, None],
            loo[:, None],
            torch.ones(1),
            prior,
            HeadFit(shrink=None),
            negative=(negative @ start)[:, None],
        )
        return ParticleHead(direction=start.cpu(), scale=one.scale, bias=one.bias, info=one.info)
    head = fit_head(unlabeled, positive, start, prior, HeadFit(shrink=cfg.head_shrink), negative=negative)
    head.direction = head.direction.cpu()
    return head
