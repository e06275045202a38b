"""Equations 1-6 of the CryoMAE paper against values worked out by hand."""

import math

import pytest
import torch

from cryomae.training.losses import (
    cosine_matrix,
    scs_loss,
    scs_loss_from_features,
    self_cross,
    self_cross_pu,
    self_cross_pu_weighted,
    similarity_sums,
    total_loss,
)

# Two exemplars and two unlabeled regions in 2-D feature space:
# l1 = (1, 0), l2 = (0, 1); u1 = (1, 0), u2 = (-1, 0).
F_L = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # the length of l2 must not matter (cosine)
F_U = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])


def test_similarity_sums_by_hand():
    s = similarity_sums(F_L, F_U)
    # S^ll: cos(l1,l1)=1, cos(l1,l2)=0, cos(l2,l1)=0, cos(l2,l2)=1 -> 2
    assert float(s.ll) == pytest.approx(2.0)
    # S^lu: cos(l1,u1)=1, cos(l1,u2)=-1, cos(l2,u1)=0, cos(l2,u2)=0 -> 0
    assert float(s.lu) == pytest.approx(0.0)
    # S^uu: 1 + (-1) + (-1) + 1 = 0
    assert float(s.uu) == pytest.approx(0.0)
    assert (s.m, s.n) == (2, 2)


def test_eq1_eq2_plain_self_and_cross():
    # Exemplars l1=(1,0), l2=(1,1): S^ll = 1 + 1/sqrt2 + 1/sqrt2 + 1
    f_l = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    f_u = torch.tensor([[0.0, 1.0]])  # S^lu = cos(l1,u)=0 + cos(l2,u)=1/sqrt2
    s_self, s_cross = self_cross(similarity_sums(f_l, f_u))
    assert float(s_self) == pytest.approx((2 + 2 / math.sqrt(2)) / 4)  # eq. 1, m^2 = 4
    assert float(s_cross) == pytest.approx((1 / math.sqrt(2)) / 2)  # eq. 2, m n = 2


def test_eq3_scs_loss_and_floor():
    # 1 + 0.5 * 0.2 - 0.5 * 0.8 = 0.7
    assert float(scs_loss(torch.tensor(0.2), torch.tensor(0.8), alpha=0.5, tau=0.0)) == pytest.approx(0.7)
    # alpha = 0.25: 1 + 0.25 * 0.2 - 0.75 * 0.8 = 0.45
    assert float(scs_loss(torch.tensor(0.2), torch.tensor(0.8), alpha=0.25, tau=0.0)) == pytest.approx(0.45)
    # the floor tau takes over once the features are separated enough
    assert float(scs_loss(torch.tensor(-1.0), torch.tensor(1.0), alpha=0.5, tau=0.1)) == pytest.approx(0.1)


def test_eq4_eq5_pu_adjusted_by_hand():
    # S^ll = 2, S^lu = 0, S^uu = 0 for F_L/F_U would hide the pi terms, so use u1=(1,0), u2=(1,0):
    f_u = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    s = similarity_sums(F_L, f_u)
    assert (float(s.ll), float(s.lu), float(s.uu)) == pytest.approx((2.0, 2.0, 4.0))
    pi = 0.25
    s_self, s_cross = self_cross_pu(s, pi)
    # eq. 4: [2 + 2*0.25*2 + 0.0625*4] / (2+2)^2 = (2 + 1 + 0.25) / 16 = 0.203125
    assert float(s_self) == pytest.approx(3.25 / 16)
    # eq. 5: [(0.75)*2 + 0.25*0.75*4] / ((2+2)*2) = (1.5 + 0.75) / 8 = 0.28125
    assert float(s_cross) == pytest.approx(2.25 / 8)
    # weighted means: positives weigh m + pi n = 2.5
    w_self, w_cross = self_cross_pu_weighted(s, pi)
    assert float(w_self) == pytest.approx(3.25 / 6.25)
    assert float(w_cross) == pytest.approx(2.25 / (2.5 * 0.75 * 2))


def test_pu_with_zero_prior_reduces_to_the_sums():
    s = similarity_sums(F_L, F_U)
    s_self, s_cross = self_cross_pu(s, 0.0)
    assert float(s_self) == pytest.approx(float(s.ll) / 16)
    assert float(s_cross) == pytest.approx(float(s.lu) / 8)


def test_eq6_total_and_gradient_direction():
    assert float(total_loss(torch.tensor(0.5), torch.tensor(0.9), beta=2.0)) == pytest.approx(2.3)
    # Minimising L_SCS must pull exemplars together and push them from the unlabeled regions.
    f_l = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.5]], requires_grad=True)
    f_u = torch.tensor([[0.3, 0.3, 1.0], [0.1, 0.2, 0.9]])  # fixed background features
    before = cosine_matrix(f_l, f_l)[0, 1].item(), cosine_matrix(f_l, f_u).mean().item()
    opt = torch.optim.SGD([f_l], lr=0.5)
    for _ in range(50):
        loss = scs_loss_from_features(f_l, f_u, alpha=0.5, tau=-10.0, pi_hat=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = cosine_matrix(f_l, f_l)[0, 1].item(), cosine_matrix(f_l, f_u).mean().item()
    assert after[0] > before[0]
    assert after[1] < before[1]
