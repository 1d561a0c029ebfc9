"""tokenizer.losses: MMD against a hand-computed closed form, InfoNCE and orthogonality invariants."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizer.losses import gaussian_mmd, info_nce, mean_pairwise_sq_distance, orthogonality_loss

# x = {0, 1}, y = {0, 2} on a line, kernel exp(-d^2 / h):
#   mean k(x, x) = (1 + e^{-1/h}) / 2,  mean k(y, y) = (1 + e^{-4/h}) / 2,
#   mean k(x, y) = (1 + e^{-4/h} + 2 e^{-1/h}) / 4
#   => MMD^2 = (1 - e^{-1/h}) / 2.
X = torch.tensor([[0.0], [1.0]])
Y = torch.tensor([[0.0], [2.0]])


def test_mmd_matches_closed_form_fixed_bandwidth() -> None:
    for h in (0.5, 1.0, 3.0):
        expected = (1 - math.exp(-1 / h)) / 2
        assert gaussian_mmd(X, Y, bandwidth=h).item() == pytest.approx(expected, rel=1e-6)


def test_mmd_default_bandwidth_is_mean_pairwise_sq_distance() -> None:
    # pooled {0, 1, 0, 2}: unordered squared distances 1, 0, 4, 1, 1, 4 -> sum 11, mean over 6 pairs = 11/6.
    h = 11 / 6
    assert mean_pairwise_sq_distance(torch.cat([X, Y])).item() == pytest.approx(h)
    assert gaussian_mmd(X, Y).item() == pytest.approx((1 - math.exp(-1 / h)) / 2, rel=1e-6)


def test_mmd_zero_for_identical_positive_otherwise_and_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen)
    assert gaussian_mmd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    y = (torch.randn(50, 4, generator=gen) + 2.0).requires_grad_()
    mmd = gaussian_mmd(x, y)
    assert mmd.item() > 0.05
    mmd.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bandwidth"):
        gaussian_mmd(x, x, bandwidth=0.0)


def test_info_nce_lower_for_aligned_than_shuffled() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=gen)
    b = a + 0.1 * torch.randn(64, 16, generator=gen)
    aligned = info_nce(a, b).item()
    shuffled = info_nce(a, b[torch.randperm(64, generator=gen)]).item()
    assert aligned < 0.1 < math.log(64) / 2 < shuffled
    # symmetric in its arguments
    assert info_nce(b, a).item() == pytest.approx(aligned, rel=1e-5)


def test_orthogonality_zero_for_orthogonal_one_for_parallel() -> None:
    e = torch.eye(4)
    assert orthogonality_loss(e[:2], e[2:]).item() == pytest.approx(0.0, abs=1e-7)
    v = torch.randn(10, 5)
    assert orthogonality_loss(v, 3 * v).item() == pytest.approx(1.0, rel=1e-6)
    assert orthogonality_loss(v, -v).item() == pytest.approx(1.0, rel=1e-6)
    # 45 degrees -> cos^2 = 1/2
    assert orthogonality_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.5)
