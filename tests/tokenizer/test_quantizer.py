"""Residual quantizer core: k-means, Sinkhorn, losses, straight-through, round trip, resets."""

from __future__ import annotations

import pytest
import torch

from tokenizer.quantizer import ResidualQuantizer, kmeans, nearest, sinkhorn_codes, sq_distances, sum_sq_error
from tokenizer.settings import QuantizerConfig


def blobs(
    n_per: int = 50, centres: int = 4, dim: int = 8, spread: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(centres, dim, generator=gen) * 3
    labels = torch.arange(centres).repeat_interleave(n_per)
    return centre[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_sq_distances_match_cdist() -> None:
    x, c = torch.randn(30, 5), torch.randn(7, 5)
    torch.testing.assert_close(sq_distances(x, c), torch.cdist(x, c) ** 2, atol=1e-4, rtol=1e-4)
    assert torch.equal(nearest(x, c, chunk_size=7), torch.cdist(x, c).argmin(1))  # chunked == whole


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_recovers_blobs_and_is_seeded(init: str) -> None:
    x, labels = blobs()
    centroids, assign = kmeans(x, 4, iters=20, seed=3, init=init)
    # each planted blob maps to exactly one centroid, and each centroid to one blob
    pairs = set(zip(labels.tolist(), assign.tolist(), strict=True))
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4
    again, _ = kmeans(x, 4, iters=20, seed=3, init=init)
    torch.testing.assert_close(centroids, again)


def test_kmeans_more_centres_than_distinct_points() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(5, 1)
    centroids, assign = kmeans(x, 4, iters=5, seed=0)
    assert centroids.shape == (4, 2) and torch.isfinite(centroids).all()
    torch.testing.assert_close(centroids[assign], x)


def test_kmeans_init_beats_random_codebook() -> None:
    x, _ = blobs(centres=8, dim=16, spread=0.3)
    rq = ResidualQuantizer(16, levels=2, quantizer=QuantizerConfig(codebook_size=8))
    random_error = sum_sq_error(rq.decode(rq.encode(x)), x)
    rq.init_from(x)
    init_error = sum_sq_error(rq.decode(rq.encode(x)), x)
    assert init_error < 0.1 * random_error


def test_losses_on_hand_example() -> None:
    rq = ResidualQuantizer(2, levels=2, quantizer=QuantizerConfig(codebook_size=2, beta=0.25))
    with torch.no_grad():
        rq.codebooks.copy_(torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.5]]]))
    x = torch.tensor([[0.1, 0.0], [1.0, 1.6]])
    out = rq(x)
    assert out.codes.tolist() == [[0, 0], [1, 1]]
    # level residuals: item 0: (0.1, 0) then (0.1, 0); item 1: (0, 0.6) then (0, 0.1)
    # per-level errors: item 0: 0.01 + 0.01; item 1: 0.36 + 0.01 -> mean over items 0.195
    torch.testing.assert_close(out.codebook_loss, torch.tensor(0.195))
    torch.testing.assert_close(out.commit_loss, torch.tensor(0.25 * 0.195))
    torch.testing.assert_close(out.quantized, torch.tensor([[0.0, 0.0], [1.0, 1.5]]))


def test_round_trip_decode_encode_equals_forward() -> None:
    x, _ = blobs(centres=6, dim=12, spread=0.5)
    for sinkhorn_last in (False, True):
        rq = ResidualQuantizer(12, levels=3, quantizer=QuantizerConfig(codebook_size=8, sinkhorn_last=sinkhorn_last))
        rq.init_from(x)
        rq.eval()
        out = rq(x)
        codes = rq.encode(x)
        assert codes.shape == (len(x), 3) and codes.dtype == torch.int64
        assert torch.equal(codes, out.codes)
        torch.testing.assert_close(rq.decode(codes), out.quantized, atol=1e-5, rtol=1e-5)


def test_straight_through_and_codebook_gradients() -> None:
    x = torch.randn(20, 4, requires_grad=True)
    rq = ResidualQuantizer(4, levels=2, quantizer=QuantizerConfig(codebook_size=4))
    out = rq(x)
    out.quantized.sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # identity gradient through the quantizer
    assert rq.codebooks.grad is None  # the codebook learns from its own loss only
    x.grad = None
    (out.codebook_loss + out.commit_loss).backward()
    assert rq.codebooks.grad is not None and rq.codebooks.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0  # commitment pulls the input towards its codes


def test_dead_codes_are_reset_onto_residuals() -> None:
    x, _ = blobs(centres=4, dim=8, spread=0.2)
    rq = ResidualQuantizer(8, levels=1, quantizer=QuantizerConfig(codebook_size=4, dead_code_window=2))
    rq.init_from(x)
    with torch.no_grad():
        rq.codebooks[0, 3] = 1e3  # a code nothing will ever choose
    rq.train()
    rq(x)
    assert rq.codebooks[0, 3, 0].item() == 1e3  # window not over yet
    rq(x)
    moved = rq.codebooks[0, 3].detach()
    assert (x == moved).all(1).any()  # now a data point (the level-0 residual is the input)
    assert rq.usage.sum() == 0  # a new window starts


def test_sinkhorn_balances_a_skewed_assignment() -> None:
    gen = torch.Generator().manual_seed(0)
    dists = torch.rand(64, 4, generator=gen)
    dists[:, 0] -= 1.0  # greedy assignment sends everything to code 0
    assert torch.bincount(dists.argmin(1), minlength=4).tolist() == [64, 0, 0, 0]
    counts = torch.bincount(sinkhorn_codes(dists), minlength=4)
    assert counts.max() <= 20 and counts.min() >= 12


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="codebook_size=0"):
        ResidualQuantizer(4, quantizer=QuantizerConfig(codebook_size=0))
    with pytest.raises(ValueError, match="init='best'"):
        kmeans(torch.randn(10, 2), 2, init="best")
