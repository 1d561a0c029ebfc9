"""Residual vector quantizer shared by every tokenizer.

L levels of K codes each: level l quantizes the residual left by levels < l,
so an item's semantic ID is the tuple of its L code indices and its quantized
vector is the sum of the chosen codewords. The module is written once and
reused by RQ-KMeans (codebooks from :meth:`ResidualQuantizer.init_from` only),
RQ-VAE, MM-RQ-VAE (one per modality) and MMQ (one per expert), each built
from a :class:`~tokenizer.settings.QuantizerConfig` and its number of levels.

Layout follows lucidrains' ``residual_vq.py``: pure helpers first, then the
module; its forward returns an :class:`RQOutput` whose fields never depend on
options. Losses are summed over dimensions and averaged over the batch, like
the reconstruction loss they are added to (averaging over dims collapses
codebooks).

Example:
    >>> rq = ResidualQuantizer(8, levels=2, quantizer=QuantizerConfig(codebook_size=4))
    >>> x = torch.randn(100, 8)
    >>> rq.init_from(x)
    >>> out = rq(x)
    >>> out.codes.shape, out.quantized.shape
    (torch.Size([100, 2]), torch.Size([100, 8]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from tokenizer.defaults import ENCODE_BATCH_SIZE, KMEANS_ITERS, LEVELS
from tokenizer.settings import QuantizerConfig

# Sinkhorn temperature and normalisation rounds of the balanced last level: fixed,
# so they never enter a version's settings.
SINKHORN_EPS = 0.05
SINKHORN_ITERS = 50

# helpers


def sq_distances(x: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distances, [N, D] x [K, D] -> [N, K], one matmul."""
    dists = x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(1)
    return dists.clamp_min(0)


def nearest(x: Tensor, codebook: Tensor, *, chunk_size: int = 65536) -> Tensor:
    """Index [N] of the closest codeword for each row of ``x`` [N, D].

    ``||x||^2`` is the same for every code, so the argmin needs only
    ``||c||^2 - 2 x.c``: one fused matmul per chunk, no [N, D] temporary.
    Distances are computed ``chunk_size`` rows at a time, so memory stays at
    chunk_size x K floats however many items there are.
    """
    code_sq = codebook.pow(2).sum(1)
    return torch.cat([torch.addmm(code_sq, chunk, codebook.T, alpha=-2).argmin(1) for chunk in x.split(chunk_size)])


def sum_sq_error(a: Tensor, b: Tensor) -> Tensor:
    """Squared error summed over the last dim, averaged over the rest (a scalar)."""
    return (a - b).pow(2).sum(-1).mean()


def _kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability ~ squared distance."""
    # once, a slice at a time (no [N, D] temporary): each new centre then costs one matrix-vector product
    x_sq = torch.cat([part.pow(2).sum(1) for part in x.split(ENCODE_BATCH_SIZE)])

    def sq_distances_to(centre: Tensor) -> Tensor:  # [N] for centre [D]
        return (x_sq - 2 * (x @ centre) + centre.pow(2).sum()).clamp_min(0)

    first = torch.randint(len(x), (1,), generator=gen, device=x.device)
    centroids = [x[first]]
    closest = sq_distances_to(centroids[0][0])
    for _ in range(1, k):
        # Fewer distinct points than k leaves all distances at 0: fall back to uniform.
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        nxt = x[torch.multinomial(weights, 1, generator=gen)]
        centroids.append(nxt)
        closest = torch.minimum(closest, sq_distances_to(nxt[0]))
    return torch.cat(centroids)


def kmeans(
    x: Tensor, k: int, *, iters: int = KMEANS_ITERS, seed: int = 0, init: str = "kmeans++"
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means, vectorised over points and centres, seeded.

    Empty clusters are re-seeded with random points so that all ``k`` centres
    stay in use.

    Args:
        x: points, [N, D].
        k: number of centres.
        iters: Lloyd iterations (fixed, no tolerance, so runs are reproducible).
        seed: seed of the initialisation and of the re-seeding.
        init: ``"kmeans++"`` or ``"random"`` (k distinct random points when N >= k).

    Returns:
        ``(centroids [k, D], assignment [N] int64)``.
    """
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init={init!r}: expected 'kmeans++' or 'random'")
    x = x.detach().float()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if init == "kmeans++":
        centroids = _kmeans_plus_plus(x, k, gen)
    else:
        pick = torch.randperm(len(x), generator=gen, device=x.device)[:k]
        extra = torch.randint(len(x), (k - len(pick),), generator=gen, device=x.device)
        centroids = x[torch.cat([pick, extra])]
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = sums / counts.clamp_min(1).unsqueeze(1)
        empty = counts == 0
        if empty.any():
            centroids[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=gen, device=x.device)]
    return centroids, nearest(x, centroids)


def sinkhorn_codes(dists: Tensor, *, eps: float = SINKHORN_EPS, iters: int = SINKHORN_ITERS) -> Tensor:
    """Balanced assignment: argmax of the entropic optimal transport plan.

    Rows (items) and columns (codes) are alternately normalised so that every
    code receives about N/K items; on the last level this splits the crowded
    codes where full-code collisions happen (LC-Rec, Zheng et al. 2024).
    Distances are standardised first so ``eps`` does not depend on their scale.

    Args:
        dists: [N, K] item-to-code distances.
        eps: entropic temperature; smaller is closer to a hard assignment.
        iters: normalisation rounds.

    Returns:
        codes [N] int64.
    """
    scaled = (dists - dists.mean()) / (dists.std() + 1e-8)
    log_plan = -scaled / eps
    for _ in range(iters):
        log_plan = log_plan - log_plan.logsumexp(0, keepdim=True)
        log_plan = log_plan - log_plan.logsumexp(1, keepdim=True)
    return log_plan.argmax(1)


# module


class RQOutput(NamedTuple):
    """What :class:`ResidualQuantizer` returns; the same fields whatever the options.

    Attributes:
        quantized: [N, D] sum of the chosen codewords, with straight-through
            gradients to the input.
        codes: [N, L] int64 code per level.
        commit_loss: scalar, beta x sum over levels of ||r_l - sg(q_l)||^2
            (r_l: residual entering level l; norms summed over D, mean over N).
        codebook_loss: scalar, sum over levels of ||sg(r_l) - q_l||^2.
    """

    quantized: Tensor
    codes: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor


class ResidualQuantizer(nn.Module):
    """L-level residual quantizer with K codes per level.

    Shapes: input x is N x D, codes N x L, codebooks L x K x D.

    Args:
        dim: D, width of the vectors to quantize.
        levels: L.
        quantizer: codebook size K, commitment weight, k-means iterations of
            :meth:`init_from`, dead-code window (every this many training
            forwards, codes that no batch in the window used are replaced by
            random residuals of the current batch; 0 disables the reset) and
            whether the last level is assigned by balanced Sinkhorn assignment
            while training (:meth:`encode` stays nearest-code, so an item's
            codes never depend on the other items of its batch).
    """

    usage: Tensor  # [L, K] times each code was chosen in the current reset window

    def __init__(self, dim: int, *, levels: int = LEVELS, quantizer: QuantizerConfig = QuantizerConfig()) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("levels", levels)):
            if value < 1:
                raise ValueError(f"{name}={value}: expected >= 1")
        self.levels, self.codebook_size, self.beta = levels, quantizer.codebook_size, quantizer.beta
        self.kmeans_iters, self.dead_code_window = quantizer.kmeans_iters, quantizer.dead_code_window
        self.sinkhorn_last = quantizer.sinkhorn_last
        self.codebooks = nn.Parameter(torch.randn(levels, self.codebook_size, dim) / dim**0.5)
        self.register_buffer("usage", torch.zeros(levels, self.codebook_size, dtype=torch.long), persistent=False)
        self._steps = 0

    @torch.no_grad()
    def init_from(self, data: Tensor, *, seed: int = 0) -> None:
        """Set each level's codebook by k-means on the residuals of ``data`` [N, D].

        This alone is RQ-KMeans; for learned tokenizers it is the initialisation.
        """
        residual = data.detach().to(self.codebooks.dtype, copy=True)
        for level in range(self.levels):
            centroids, assign = kmeans(residual, self.codebook_size, iters=self.kmeans_iters, seed=seed + level)
            self.codebooks[level] = centroids
            # in place, a slice at a time: no second [N, D] copy of a million items
            for rows, codes in zip(residual.split(ENCODE_BATCH_SIZE), assign.split(ENCODE_BATCH_SIZE), strict=True):
                rows -= centroids[codes]
        self.usage.zero_()
        self._steps = 0

    def forward(self, x: Tensor) -> RQOutput:
        """Quantize ``x`` [N, D]; in training mode also track usage and reset dead codes."""
        codes = self._descend(x.detach(), track=self.training)
        chosen = self.codebooks[torch.arange(self.levels, device=x.device), codes]  # [N, L, D]
        partial = chosen.detach().cumsum(1)  # [N, L, D] sum of levels <= l
        residuals = x.unsqueeze(1) - (partial - chosen.detach())  # [N, L, D] r_l = x - sum_{j<l} q_j
        codebook_loss = sum_sq_error(chosen, residuals.detach()) * self.levels
        commit_loss = self.beta * sum_sq_error(residuals, chosen.detach()) * self.levels
        quantized = x + (partial[:, -1] - x).detach()  # straight-through estimator
        return RQOutput(quantized, codes, commit_loss, codebook_loss)

    @torch.no_grad()
    def encode(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Codes [N, L] int64 of ``x`` [N, D], vectorised within batches of ``batch_size`` rows
        (each batch descends all levels while its residuals are still in cache)."""
        return torch.cat([self._descend(chunk, track=False) for chunk in x.split(batch_size)])

    def decode(self, codes: Tensor) -> Tensor:
        """Quantized vectors [N, D] of ``codes`` [N, L]: the sum of the chosen codewords
        (level by level, never an [N, L, D] gather)."""
        quantized = self.codebooks[0][codes[:, 0]]
        for level in range(1, self.levels):
            quantized += self.codebooks[level][codes[:, level]]
        return quantized

    def _descend(self, x: Tensor, *, track: bool) -> Tensor:
        residual, codes = x.detach(), []
        reset_due = track and self.dead_code_window > 0 and (self._steps + 1) % self.dead_code_window == 0
        for level in range(self.levels):
            codebook = self.codebooks[level].detach()
            # Balanced assignment only while training: encoding stays per item, so an
            # item's SID never depends on which other items are encoded with it.
            if self.sinkhorn_last and track and level == self.levels - 1:
                dists = sq_distances(residual, codebook)
                code = sinkhorn_codes(dists)
            else:
                code = nearest(residual, codebook)
            if track:
                self.usage[level] += torch.bincount(code, minlength=self.codebook_size)
                if reset_due:
                    self._reset_dead_codes(level, residual)
            residual = residual - codebook[code]
            codes.append(code)
        if track:
            self._steps += 1
            if reset_due:
                self.usage.zero_()
        return torch.stack(codes, 1)

    @torch.no_grad()
    def _reset_dead_codes(self, level: int, residual: Tensor) -> None:
        # Codes chosen by no batch in the window will never win again on their
        # own; moving them onto current residuals gives them data to fit.
        dead = (self.usage[level] == 0).nonzero().squeeze(1)
        if len(dead):
            pick = torch.randint(len(residual), (len(dead),), device=residual.device)
            self.codebooks[level, dead] = residual[pick]
