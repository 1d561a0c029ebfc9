"""RQ-KMeans: residual k-means without an encoder (../shared/DESIGN.md section 6).

k-means on the concatenated modality embeddings gives level 0; k-means on
what is left (the residuals) gives level 1, and so on L times. It is exactly
:meth:`ResidualQuantizer.init_from`, wrapped with the tokenizer interface that
:mod:`tokenizer.train` expects (``fit``, ``encode``, ``decode``, ``rq``).

Example:
    >>> model = RQKMeans(16, levels=2, codebook_size=8)
    >>> x = torch.randn(200, 16)
    >>> error = model.fit(x)
    >>> model.encode(x).shape
    torch.Size([200, 2])
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from tokenizer.defaults import CODEBOOK_SIZE, ENCODE_BATCH_SIZE, KMEANS_ITERS, LEVELS
from tokenizer.quantizer import ResidualQuantizer, sum_sq_error

logger = logging.getLogger(__name__)


class RQKMeans(nn.Module):
    """Residual k-means tokenizer; codewords live in the input space.

    Args:
        dim: D, width of the concatenated modalities.
        levels: L.
        codebook_size: K.
        kmeans_iters: Lloyd iterations per level.
        sinkhorn_last: balanced assignment on the last level when encoding.
    """

    def __init__(
        self,
        dim: int,
        *,
        levels: int = LEVELS,
        codebook_size: int = CODEBOOK_SIZE,
        kmeans_iters: int = KMEANS_ITERS,
        sinkhorn_last: bool = False,
    ) -> None:
        super().__init__()
        self.rq = ResidualQuantizer(
            dim, levels=levels, codebook_size=codebook_size, kmeans_iters=kmeans_iters, sinkhorn_last=sinkhorn_last
        )

    def init_codebooks(self, x: Tensor, *, seed: int = 0) -> None:
        """k-means on ``x`` [N, D], then on the residuals, level by level: the whole fit."""
        self.rq.init_from(x, seed=seed)

    def fit(self, x: Tensor, *, seed: int = 0) -> float:
        """Fit the codebooks on ``x`` [N, D]; returns the reconstruction error
        (per item, summed over dims) of ``x``."""
        self.init_codebooks(x, seed=seed)
        # batch by batch: decoding a million wide items at once would be a second copy of x
        parts = x.split(ENCODE_BATCH_SIZE)
        error = sum(float(sum_sq_error(self.decode(self.encode(p)), p)) * len(p) for p in parts) / max(len(x), 1)
        logger.info(
            "rq-kmeans: %d items, %d levels x %d codes, recon error %.4f",
            len(x),
            self.rq.levels,
            self.rq.codebook_size,
            error,
        )
        return error

    def encode(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Codes [N, L] of ``x`` [N, D], ``batch_size`` items at a time."""
        return self.rq.encode(x, batch_size=batch_size)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [N, D] of codes [N, L] in the input space."""
        return self.rq.decode(codes)
