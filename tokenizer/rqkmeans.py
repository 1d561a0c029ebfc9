"""RQ-KMeans: residual k-means without an encoder.

k-means on the concatenated modality embeddings gives level 0; k-means on
what is left (the residuals) gives level 1, and so on L times. It is exactly
:meth:`ResidualQuantizer.init_from` behind the :class:`~tokenizer.interface.Tokenizer`
interface; codewords live in the input space, so decoding is the sum of the
chosen codewords.

Example:
    >>> model = RQKMeans(16, levels=2, quantizer=QuantizerConfig(codebook_size=8))
    >>> x = torch.randn(200, 16)
    >>> [error] = model.fit(x)
    >>> model.encode(x).shape
    torch.Size([200, 2])
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tokenizer.defaults import BATCH_SIZE, ENCODE_BATCH_SIZE, EPOCHS, LEVELS, LR
from tokenizer.inputs import check_matrix
from tokenizer.interface import Tokenizer
from tokenizer.quantizer import ResidualQuantizer, sum_sq_error
from tokenizer.settings import QuantizerConfig

logger = logging.getLogger(__name__)


class RQKMeansOutput(NamedTuple):
    """What :meth:`RQKMeans.forward` returns.

    Attributes:
        recon: [B, D] sum of the chosen codewords.
        codes: [B, L] int64 codes.
        loss: scalar, reconstruction error (squared error summed over D, mean over B).
    """

    recon: Tensor
    codes: Tensor
    loss: Tensor


class RQKMeans(Tokenizer[Tensor]):
    """Residual k-means tokenizer; codewords live in the input space.

    Shapes: input x [N, D], codes [N, L], codebooks L x [K, D].

    Args:
        dim: D, width of the concatenated modalities.
        levels: L.
        quantizer: settings of the quantizer (beta and the dead-code window
            are unused: nothing is trained).
    """

    def __init__(self, dim: int, *, levels: int = LEVELS, quantizer: QuantizerConfig = QuantizerConfig()) -> None:
        super().__init__()
        self.dim, self.quantizer = dim, quantizer
        self.rq = ResidualQuantizer(dim, levels=levels, quantizer=quantizer)

    def quantizers(self) -> list[ResidualQuantizer]:
        return [self.rq]

    def check_inputs(self, x: Tensor) -> Tensor:
        return check_matrix(x, self.dim)

    def init_codebooks(self, x: Tensor, *, seed: int = 0) -> None:
        """k-means on ``x`` [N, D], then on the residuals, level by level: the whole fit."""
        self.rq.init_from(x, seed=seed)

    def fit(
        self, x: Tensor, *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """Fit the codebooks on ``x`` [N, D] (only ``seed`` matters: k-means has no epochs);
        returns ``[reconstruction error of x]`` (per item, summed over dims)."""
        self.init_codebooks(x, seed=seed)
        error = self.metrics(x)["loss"]
        logger.info(
            "rq-kmeans: %d items, %d levels x %d codes, recon error %.4f", len(x), self.rq.levels, self.codebook_size, error
        )
        return [error]

    def forward(self, x: Tensor) -> RQKMeansOutput:
        """Codes, their reconstruction and its error for a batch ``x`` [B, D]."""
        codes = self.rq.encode(x)
        recon = self.rq.decode(codes)
        return RQKMeansOutput(recon, codes, sum_sq_error(recon, x))

    def encode(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Codes [N, L] of ``x`` [N, D], ``batch_size`` items at a time."""
        return self.rq.encode(x, batch_size=batch_size)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [N, D] of codes [N, L] in the input space."""
        return self.rq.decode(codes)

    def settings(self) -> dict[str, Any]:
        return {"dim": self.dim, "levels": self.rq.levels, **self.quantizer.to_dict()}
