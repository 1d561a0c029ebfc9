"""Pure loss functions shared by the multimodal tokenizers.

* :func:`gaussian_mmd`: squared maximum mean discrepancy with a Gaussian
  kernel, MM-RQ-VAE's reconstruction and cross-modal alignment loss (MME-SID).
* :func:`info_nce`: symmetric InfoNCE, the contrastive alignment option.
* :func:`orthogonality_loss`: squared cosine between paired rows, MMQ's
  shared-vs-specific expert regulariser.

All take and return tensors only (no modules, no state), so they can be
tested against hand-computed values.

Example:
    >>> x, y = torch.randn(64, 8), torch.randn(64, 8) + 1.0
    >>> bool(gaussian_mmd(x, y) > gaussian_mmd(x, x))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``||a_i - b_j||^2``, [N, D] x [M, D] -> [N, M]."""
    d = a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)
    return d.clamp_min(0)


def mean_pairwise_sq_distance(pooled: Tensor) -> Tensor:
    """Mean of ``||z_i - z_j||^2`` over the ordered pairs ``i != j`` of ``pooled`` [N, D].

    This is the bandwidth heuristic of the MMD code MME-SID builds on
    (``sum(L2_distance) / (n^2 - n)`` with ``L2_distance`` the squared
    distances of the pooled samples). Returns a 0-d tensor, detached: the
    bandwidth is a scale, not something to optimise.
    """
    n = pooled.shape[0]
    if n < 2:
        return pooled.new_tensor(1.0)
    d = pairwise_sq_distances(pooled, pooled)
    return (d.sum() / (n * n - n)).detach()


def gaussian_mmd(x: Tensor, y: Tensor, *, bandwidth: float | Tensor | None = None) -> Tensor:
    """Biased (V-statistic) squared MMD between samples ``x`` and ``y`` with a Gaussian kernel.

    With ``k(a, b) = exp(-||a - b||^2 / h)``::

        MMD^2 = 1/N^2 sum_ij k(x_i, x_j) + 1/M^2 sum_ij k(y_i, y_j) - 2/(N M) sum_ij k(x_i, y_j)

    where all sums include ``i == j`` (biased V-statistic, always >= 0, and
    exactly 0 when the two samples are identical). ``h`` is ``bandwidth`` when
    given, else the mean squared pairwise distance of the pooled sample
    ``[x; y]`` over its distinct pairs (:func:`mean_pairwise_sq_distance`),
    detached; a zero mean distance (all points equal) falls back to ``h = 1``.

    MMD compares the two *batch distributions*: it says nothing about whether
    reconstruction ``i`` matches input ``i`` (pair it with a per-item term for
    that).

    Args:
        x: first sample, [N, D].
        y: second sample, [M, D].
        bandwidth: kernel bandwidth ``h`` (> 0), or None for the heuristic.

    Returns:
        0-d tensor, differentiable w.r.t. ``x`` and ``y``.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"gaussian_mmd needs [N, D] and [M, D] tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        return x.new_zeros(())
    if bandwidth is None:
        h = mean_pairwise_sq_distance(torch.cat([x, y]))
        h = torch.where(h > 0, h, torch.ones_like(h))
    else:
        h = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device)
        if not bool(h > 0):
            raise ValueError(f"gaussian_mmd bandwidth must be > 0, got {float(h)}")
    k_xx = torch.exp(-pairwise_sq_distances(x, x) / h).mean()
    k_yy = torch.exp(-pairwise_sq_distances(y, y) / h).mean()
    k_xy = torch.exp(-pairwise_sq_distances(x, y) / h).mean()
    return (k_xx + k_yy - 2 * k_xy).clamp_min(0)


def info_nce(a: Tensor, b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (CLIP-style).

    Rows are L2-normalised; logits ``s_ij = cos(a_i, b_j) / temperature``;
    row ``i`` of ``a`` has row ``i`` of ``b`` as its positive and the other
    rows of ``b`` as negatives, and vice versa. The loss is the mean of the
    two cross-entropies (a->b and b->a), ``log N`` for unrelated rows and
    near 0 for well-separated aligned pairs.

    Args:
        a: [N, D].
        b: [N, D], row-aligned with ``a``.
        temperature: softmax temperature (> 0).

    Returns:
        0-d tensor.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"info_nce needs two [N, D] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce temperature must be > 0, got {temperature}")
    if a.shape[0] == 0:
        return a.new_zeros(())
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def orthogonality_loss(shared: Tensor, specific: Tensor) -> Tensor:
    """Mean squared cosine similarity between paired rows: ``mean_i cos(shared_i, specific_i)^2``.

    0 when every pair is orthogonal, 1 when every pair is parallel (or
    anti-parallel). Zero rows count as orthogonal (cosine 0).

    Args:
        shared: [N, D].
        specific: [N, D], row-aligned with ``shared``.

    Returns:
        0-d tensor in [0, 1].
    """
    if shared.shape != specific.shape or shared.ndim != 2:
        raise ValueError(
            f"orthogonality_loss needs two [N, D] tensors of the same shape, got {tuple(shared.shape)} and {tuple(specific.shape)}"
        )
    if shared.shape[0] == 0:
        return shared.new_zeros(())
    cos = F.cosine_similarity(shared, specific, dim=1, eps=1e-8)
    return cos.pow(2).mean()


def present_rows(x: Tensor) -> Tensor:
    """Bool [N]: rows of ``x`` [N, D] that are not all zeros (the modality is there for that item)."""
    return (x != 0).any(dim=1)
