"""RQ-VAE tokenizer, TIGER-style (Rajput et al. 2023; ../shared/DESIGN.md section 6).

MLP encoder on the concatenated modalities -> residual quantizer -> MLP
decoder. Loss = reconstruction (squared error SUMMED over dimensions, mean over
the batch: averaging over dimensions shrinks the reconstruction gradient next
to the quantization terms and collapses the codebooks) + commitment +
codebook losses. The quantizer is k-means initialised on the encoder outputs
before the first step.

Example:
    >>> model = RQVAE(16, latent_dim=8, hidden_dims=(32,), levels=2, codebook_size=8)
    >>> x = torch.randn(200, 16)
    >>> losses = model.fit(x, epochs=2, batch_size=64)
    >>> model.encode(x).shape, model.decode(model.encode(x)).shape
    (torch.Size([200, 2]), torch.Size([200, 16]))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tokenizer.defaults import (
    BATCH_SIZE,
    BETA,
    CODEBOOK_SIZE,
    DEAD_CODE_WINDOW,
    ENCODE_BATCH_SIZE,
    EPOCHS,
    HIDDEN_DIMS,
    KMEANS_ITERS,
    LATENT_DIM,
    LEVELS,
    LR,
)
from tokenizer.metrics import level_usage
from tokenizer.quantizer import ResidualQuantizer, sum_sq_error

logger = logging.getLogger(__name__)


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


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


class RQVAE(nn.Module):
    """Encoder -> residual quantizer -> decoder.

    Shapes: input x is B x D (concatenated modalities), latent z is B x Z,
    codes are B x L.

    Args:
        in_dim: D.
        latent_dim: Z, width of the quantized latent (and of the codewords).
        hidden_dims: encoder hidden widths; the decoder mirrors them.
        levels: L.
        codebook_size: K.
        beta: commitment weight.
        kmeans_iters: Lloyd iterations of the codebook initialisation.
        dead_code_window: training steps between dead-code resets (0 = never).
        sinkhorn_last: balanced assignment on the last level.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        latent_dim: int = LATENT_DIM,
        hidden_dims: Sequence[int] = HIDDEN_DIMS,
        levels: int = LEVELS,
        codebook_size: int = CODEBOOK_SIZE,
        beta: float = BETA,
        kmeans_iters: int = KMEANS_ITERS,
        dead_code_window: int = DEAD_CODE_WINDOW,
        sinkhorn_last: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = mlp([in_dim, *hidden_dims, latent_dim])
        self.rq = ResidualQuantizer(
            latent_dim,
            levels=levels,
            codebook_size=codebook_size,
            beta=beta,
            kmeans_iters=kmeans_iters,
            dead_code_window=dead_code_window,
            sinkhorn_last=sinkhorn_last,
        )
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), in_dim])

    def forward(self, x: Tensor) -> RQVAEOutput:
        """Reconstruct ``x`` [B, D] through the quantized latent."""
        quantized, codes, commit_loss, codebook_loss = self.rq(self.encoder(x))
        recon = self.decoder(quantized)
        recon_loss = sum_sq_error(recon, x)
        return RQVAEOutput(
            recon, codes, recon_loss, commit_loss, codebook_loss, recon_loss + commit_loss + codebook_loss
        )

    @torch.no_grad()
    def latents(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Encoder outputs [N, Z] of ``x`` [N, D], ``batch_size`` items at a time."""
        return torch.cat([self.encoder(part) for part in x.split(batch_size)])

    @torch.no_grad()
    def encode(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Codes [N, L] of ``x`` [N, D], ``batch_size`` items at a time (encoder and quantizer
        per batch, so memory stays at batch_size x the widest layer)."""
        return torch.cat([self.rq.encode(self.encoder(part)) for part in x.split(batch_size)])

    @torch.no_grad()
    def decode(self, codes: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Reconstruction [N, D] of codes [N, L], ``batch_size`` items at a time."""
        return torch.cat([self.decoder(self.rq.decode(part)) for part in codes.split(batch_size)])

    def init_codebooks(self, x: Tensor, *, seed: int = 0) -> None:
        """k-means initialise the quantizer on the encoder outputs of ``x`` [N, D]."""
        self.rq.init_from(self.latents(x), seed=seed)

    def train_epochs(
        self, x: Tensor, *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """Train on ``x`` [N, D] with Adam from the current codebooks; returns the mean loss of each epoch."""
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        log_every = max(1, epochs // 10)
        history: list[float] = []
        bar = tqdm(range(epochs), desc="rq-vae", unit="epoch")
        for epoch in bar:
            # one pass over the items in a fresh random order
            self.train()
            total = recon = 0.0
            for batch in torch.randperm(len(x), generator=gen).split(batch_size):
                out = self(x[batch])
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                total += out.loss.item() * len(batch)
                recon += out.recon_loss.item() * len(batch)
            history.append(total / len(x))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            # progress: the quantization terms grow with the latent's spread while
            # reconstruction keeps falling, so log both, and the codebook usage
            if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
                usage = level_usage(self.encode(x).cpu().numpy(), self.rq.codebook_size)
                logger.info(
                    "rq-vae epoch %d/%d loss %.4f recon %.4f usage %s",
                    epoch + 1,
                    epochs,
                    history[-1],
                    recon / len(x),
                    "/".join(f"{u:.2f}" for u in usage),
                )
        self.eval()
        return history

    def fit(
        self, x: Tensor, *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """k-means initialise the codebooks, then train on ``x`` [N, D]; returns the mean loss of each epoch."""
        self.init_codebooks(x, seed=seed)
        return self.train_epochs(x, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
