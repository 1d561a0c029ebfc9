"""RQ-VAE tokenizer, TIGER-style (Rajput et al. 2023).

MLP encoder on the concatenated modalities -> residual quantizer -> MLP
decoder. Loss = reconstruction (squared error SUMMED over dimensions, mean over
the batch: averaging over dimensions shrinks the reconstruction gradient next
to the quantization terms and collapses the codebooks) + commitment +
codebook losses. The quantizer is k-means initialised on the encoder outputs
before the first step (:class:`~tokenizer.fitting.LearnedTokenizer`). It is
also MM-RQ-VAE's per-modality branch.

Example:
    >>> model = RQVAE(16, levels=2, network=NetworkConfig(latent_dim=8, hidden_dims=(32,)),
    ...               quantizer=QuantizerConfig(codebook_size=8))
    >>> x = torch.randn(200, 16)
    >>> losses = model.fit(x, epochs=2, batch_size=64)
    >>> model.encode(x).shape, model.decode(model.encode(x)).shape
    (torch.Size([200, 2]), torch.Size([200, 16]))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from tokenizer.defaults import ENCODE_BATCH_SIZE, LEVELS
from tokenizer.encoder import QuantizedEncoder, decoder_mlp
from tokenizer.fitting import LearnedTokenizer
from tokenizer.inputs import check_matrix
from tokenizer.quantizer import ResidualQuantizer, sum_sq_error
from tokenizer.settings import NetworkConfig, QuantizerConfig


class Autoencoded(NamedTuple):
    """A batch through encoder, quantizer and decoder (:meth:`RQVAE.autoencode`).

    Attributes:
        recon: [B, D] reconstruction of the input.
        quantized: [B, Z] quantized latents (straight-through gradients to the encoder).
        codes: [B, L] int64 codes.
        commit_loss: scalar, beta-weighted commitment loss of the quantizer.
        codebook_loss: scalar, codebook loss of the quantizer.
    """

    recon: Tensor
    quantized: Tensor
    codes: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor


class RQVAEOutput(NamedTuple):
    """What :class:`RQVAE` returns.

    Attributes:
        recon: [B, D] reconstruction of the input.
        codes: [B, L] int64 codes.
        recon_loss: scalar, squared error summed over D, mean over B.
        commit_loss: scalar, beta-weighted commitment loss of the quantizer.
        codebook_loss: scalar, codebook loss of the quantizer.
        loss: scalar, recon_loss + commit_loss + codebook_loss.
    """

    recon: Tensor
    codes: Tensor
    recon_loss: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    loss: Tensor


class RQVAE(QuantizedEncoder, LearnedTokenizer[Tensor]):
    """Encoder -> residual quantizer -> decoder.

    Shapes: input x is B x D (concatenated modalities, or one modality inside
    MM-RQ-VAE), latent z is B x Z, codes are B x L.

    Args:
        in_dim: D.
        levels: L.
        network: Z and the encoder hidden widths; the decoder mirrors them.
        quantizer: settings of the quantizer.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        levels: int = LEVELS,
        network: NetworkConfig = NetworkConfig(),
        quantizer: QuantizerConfig = QuantizerConfig(),
    ) -> None:
        super().__init__(in_dim, levels=levels, network=network, quantizer=quantizer)
        self.network, self.quantizer = network, quantizer
        self.decoder = decoder_mlp(in_dim, network)

    def autoencode(self, x: Tensor) -> Autoencoded:
        """``x`` [B, D] through the encoder, the quantizer (tracking usage in training mode)
        and the decoder; the reconstruction's loss is the caller's (MM-RQ-VAE scores it its way)."""
        quantized, codes, commit_loss, codebook_loss = self.rq(self.encoder(x))
        return Autoencoded(self.decoder(quantized), quantized, codes, commit_loss, codebook_loss)

    def forward(self, x: Tensor) -> RQVAEOutput:
        """Reconstruct ``x`` [B, D] through the quantized latent."""
        recon, _, codes, commit_loss, codebook_loss = self.autoencode(x)
        recon_loss = sum_sq_error(recon, x)
        loss = recon_loss + commit_loss + codebook_loss
        return RQVAEOutput(recon, codes, recon_loss, commit_loss, codebook_loss, loss)

    def quantizers(self) -> list[ResidualQuantizer]:
        return [self.rq]

    def check_inputs(self, x: Tensor) -> Tensor:
        return check_matrix(x, self.in_dim)

    @torch.no_grad()
    def decode(self, codes: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Reconstruction [N, D] of codes [N, L], ``batch_size`` items at a time."""
        return torch.cat([self.decoder(self.rq.decode(part)) for part in codes.split(batch_size)])

    def settings(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "levels": self.rq.levels, **self.network.to_dict(), **self.quantizer.to_dict()}
