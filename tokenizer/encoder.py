"""An MLP encoder followed by its own residual quantizer: the unit every learned tokenizer is built of.

RQ-VAE is one with a decoder; MM-RQ-VAE one RQ-VAE per modality; an MMQ
expert one without a decoder (MMQ decodes the gated mixture of its experts).

Example:
    >>> unit = QuantizedEncoder(16, levels=2, network=NetworkConfig(latent_dim=4, hidden_dims=(8,)),
    ...                         quantizer=QuantizerConfig(codebook_size=4))
    >>> x = torch.randn(50, 16)
    >>> unit.init_codebooks(x)
    >>> unit.latents(x).shape, unit.encode(x).shape
    (torch.Size([50, 4]), torch.Size([50, 2]))
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from tokenizer.defaults import ENCODE_BATCH_SIZE, LEVELS
from tokenizer.quantizer import ResidualQuantizer
from tokenizer.settings import NetworkConfig, QuantizerConfig


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def decoder_mlp(out_dim: int, network: NetworkConfig) -> nn.Sequential:
    """The decoder mirroring :class:`QuantizedEncoder`'s encoder: Z -> reversed hidden widths -> ``out_dim``."""
    return mlp([network.latent_dim, *reversed(network.hidden_dims), out_dim])


class QuantizedEncoder(nn.Module):
    """MLP encoder D -> Z, then an L-level residual quantizer of the latents.

    Shapes: input x [N, D], latents [N, Z], codes [N, L].

    Args:
        in_dim: D.
        levels: L.
        network: Z and the hidden widths.
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
        super().__init__()
        # Built in this order (encoder, quantizer, then any decoder of a subclass): the
        # global RNG draws of the initial weights, and so a seeded model, follow it.
        self.in_dim = in_dim
        self.encoder = mlp([in_dim, *network.hidden_dims, network.latent_dim])
        self.rq = ResidualQuantizer(network.latent_dim, levels=levels, quantizer=quantizer)

    @torch.no_grad()
    def latents(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Encoder outputs [N, Z] of ``x`` [N, D], ``batch_size`` items at a time."""
        return torch.cat([self.encoder(part) for part in x.split(batch_size)])

    @torch.no_grad()
    def encode(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Codes [N, L] of ``x`` [N, D], ``batch_size`` items at a time (encoder and quantizer
        per batch, so memory stays at batch_size x the widest layer)."""
        if len(x) == 0:
            return torch.zeros(0, self.rq.levels, dtype=torch.long)
        return torch.cat([self.rq.encode(self.encoder(part)) for part in x.split(batch_size)])

    def init_codebooks(self, x: Tensor, *, seed: int = 0, rows: Tensor | None = None) -> None:
        """k-means initialise the quantizer on the encoder outputs of ``x`` [N, D], only of
        the items ``rows`` (bool [N]) when given."""
        # mask the latents, not the inputs: no copy of the [N, D] matrix
        z = self.latents(x)
        self.rq.init_from(z if rows is None else z[rows], seed=seed)
