"""MM-RQ-VAE, the multimodal tokenizer of MME-SID (Wang et al. 2025).

One :class:`~tokenizer.rqvae.RQVAE` per modality (MLP encoder -> residual
quantizer with L levels -> MLP decoder); an item's SID is the concatenation
of its per-modality codes in modality order, so P = n_modalities x L code
positions. Loss::

    recon_weight x sum_m MMD(recon_m, x_m)            Gaussian-kernel MMD^2, batch distributions
  + mse_weight   x sum_m ||recon_m - x_m||^2           per item, summed over dims (0 = off)
  + sum_m (commitment_m + codebook_m)                  the quantizer's losses
  + align_weight x mean over modality pairs (a, b) of
        MMD(q_a, q_b)          (align="mmd", the paper's code)  or
        InfoNCE(q_a, q_b)      (align="infonce", the paper's text: contrastive)

with ``q_m`` the quantised latents. MMD only matches the batch distributions of
reconstructions and inputs, never reconstruction i to input i; the per-item
MSE term is there to pin that down, and both are reported.

**Missing modalities.** A row of all zeros in ``xs[m]`` means modality m is
missing for that item. Such rows are masked out of every loss of m (they are
neither encoded during training nor fitted as zeros, and they do not move m's
codebooks or usage counters); InfoNCE pairs only items that have both
modalities. At :meth:`MMRQVAE.encode` time a missing modality is encoded from
its all-zero input like any other row, so every such item gets the same codes
at m's positions and the remaining modalities tell them apart. A modality the
model was built for that is absent from ``xs`` altogether raises
:class:`~sidrank.schema.DataError`.

Example:
    >>> cfg = MMRQVAEConfig({"tags": 8, "text": 32}, latent_dim=8, hidden_dims=(16,), levels=2, codebook_size=8)
    >>> model = MMRQVAE(cfg)
    >>> xs = {"tags": torch.randn(200, 8), "text": torch.randn(200, 32)}
    >>> history = model.fit(xs, epochs=2, batch_size=64)
    >>> model.encode(xs).shape, [tuple(c.shape) for c in model.codebooks][:1]
    (torch.Size([200, 4]), [(8, 8)])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from tokenizer.defaults import ENCODE_BATCH_SIZE
from tokenizer.inputs import fit_rows
from tokenizer.losses import gaussian_mmd, info_nce, present_rows
from tokenizer.multimodal import MultimodalConfig, MultimodalTokenizer
from tokenizer.quantizer import ResidualQuantizer, sum_sq_error
from tokenizer.rqvae import RQVAE
from tokenizer.settings import NetworkConfig, QuantizerConfig, Settings, require_at_least, require_positive

ALIGN_KINDS = ("mmd", "infonce", "none")


@dataclass(frozen=True, kw_only=True)
class MMRQVAELoss(Settings):
    """MM-RQ-VAE's loss weights.

    Args:
        recon_weight: MM-RQ-VAE weight of the MMD reconstruction loss.
        mse_weight: MM-RQ-VAE weight of the per-item squared error (summed over
            dims); 0 is the paper's MMD-only loss. On by default: with MMD alone
            the per-item reconstruction error on MovieLens-100K was 19.6 +- 7.1
            vs 1.09 +- 0.02 with it, and 32 vs 3 percent of items collided
            (P=4, K=64, 3 seeds; benchmarks/results/tokenizers.md).
        align: MM-RQ-VAE cross-modal alignment of the quantised latents:
            mmd (the paper's code), infonce (the paper's text) or none.
        align_weight: MM-RQ-VAE weight of the alignment loss.
        temperature: MM-RQ-VAE InfoNCE temperature.
        mmd_bandwidth: MM-RQ-VAE fixed Gaussian-kernel bandwidth; None = mean
            pairwise squared distance of the batch.
    """

    recon_weight: float = 1.0
    mse_weight: float = 1.0
    align: str = field(default="mmd", metadata={"choices": ALIGN_KINDS})
    align_weight: float = 0.1
    temperature: float = 0.1
    mmd_bandwidth: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("recon_weight", "mse_weight", "align_weight"), 0)
        if self.recon_weight == 0 and self.mse_weight == 0:
            raise ValueError("recon_weight=0 and mse_weight=0: nothing would train the decoders")
        if self.align not in ALIGN_KINDS:
            raise ValueError(f"align={self.align!r}: expected one of {ALIGN_KINDS}")
        require_positive(self, ("temperature",))
        if self.mmd_bandwidth is not None:
            require_positive(self, ("mmd_bandwidth",))


@dataclass(frozen=True)
class MMRQVAEConfig(MultimodalConfig, QuantizerConfig, NetworkConfig, MMRQVAELoss):
    """Settings of :class:`MMRQVAE`: its modalities, L, and the quantizer, network and loss
    settings (the same for every modality; fields of :class:`~tokenizer.settings.QuantizerConfig`,
    :class:`~tokenizer.settings.NetworkConfig` and :class:`MMRQVAELoss`).

    Args:
        modality_dims: modality name -> input width D_m; stored sorted by name,
            which is the SID order (codes of the first name come first).
        levels: L, code levels per modality.
    """

    levels: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("levels",), 1)

    @property
    def n_positions(self) -> int:
        """P, code positions per SID: n_modalities x L."""
        return len(self.modality_dims) * self.levels

    def position_names(self) -> list[str]:
        """Human name of each SID position in SID order (``tags/0``, ``tags/1``, ``text/0``, ...)."""
        return [f"{m}/{level}" for m in self.modalities for level in range(self.levels)]


class MMRQVAEOutput(NamedTuple):
    """What :meth:`MMRQVAE.forward` returns; the same fields whatever the options.

    Per-modality tensors cover only the rows where that modality is present
    (``present[m]``), so their first dim is B_m <= B.

    Attributes:
        recons: modality -> [B_m, D_m] reconstruction of the present rows.
        quantized: modality -> [B_m, Z] quantised latents (straight-through).
        present: modality -> bool [B] rows where the modality is present.
        recon_mmd: scalar, sum over modalities of MMD(recon_m, x_m).
        recon_mse: scalar, sum over modalities of the per-item squared error (summed over dims).
        quant_loss: scalar, sum over modalities of commitment + codebook losses.
        align_loss: scalar, mean over modality pairs of the alignment loss (0 for align="none").
        loss: scalar, the weighted total that is optimised.
    """

    recons: dict[str, Tensor]
    quantized: dict[str, Tensor]
    present: dict[str, Tensor]
    recon_mmd: Tensor
    recon_mse: Tensor
    quant_loss: Tensor
    align_loss: Tensor
    loss: Tensor


class MMRQVAE(MultimodalTokenizer):
    """One RQ-VAE per modality; SID = the concatenated per-modality codes.

    Shapes: ``xs`` maps each modality name to [N, D_m]; latents are N x Z;
    codes N x P with P = n_modalities x L.

    Args:
        cfg: the settings, modality widths included.
    """

    cfg: MMRQVAEConfig

    def __init__(self, cfg: MMRQVAEConfig) -> None:
        super().__init__(cfg)
        network, quantizer = cfg.part(NetworkConfig), cfg.part(QuantizerConfig)
        self.branches = nn.ModuleDict(
            {name: RQVAE(d, levels=cfg.levels, network=network, quantizer=quantizer) for name, d in self.dims.items()}
        )

    def branch(self, name: str) -> RQVAE:
        """The RQ-VAE of modality ``name``."""
        return cast(RQVAE, self.branches[name])

    def quantizers(self) -> list[ResidualQuantizer]:
        return [self.branch(name).rq for name in self.dims]

    def forward(self, xs: Mapping[str, Tensor]) -> MMRQVAEOutput:
        """Losses of one batch ``xs`` (modality -> [B, D_m]); missing rows are masked."""
        xs = self.check_inputs(xs)
        zero = next(self.parameters()).new_zeros(())
        recons, quantized, present = {}, {}, {}
        recon_mmd, recon_mse, quant_loss = zero, zero, zero
        for name in self.dims:
            present[name] = present_rows(xs[name])
            x = xs[name][present[name]]
            if len(x) == 0:  # nothing of this modality in the batch: no loss, no codebook update
                recons[name], quantized[name] = x, x.new_zeros(0, self.cfg.latent_dim)
                continue
            out = self.branch(name).autoencode(x)
            recons[name], quantized[name] = out.recon, out.quantized
            # MMD, then the per-item error: this order fixes how autograd sums their
            # gradients into the reconstruction, and so the trained codes at a seed
            recon_mmd = recon_mmd + gaussian_mmd(out.recon, x, bandwidth=self.cfg.mmd_bandwidth)
            recon_mse = recon_mse + sum_sq_error(out.recon, x)
            quant_loss = quant_loss + out.commit_loss + out.codebook_loss
        align_loss = self._align(quantized, present, zero)
        loss = (
            self.cfg.recon_weight * recon_mmd
            + self.cfg.mse_weight * recon_mse
            + quant_loss
            + self.cfg.align_weight * align_loss
        )
        return MMRQVAEOutput(recons, quantized, present, recon_mmd, recon_mse, quant_loss, align_loss, loss)

    def _align(self, quantized: dict[str, Tensor], present: dict[str, Tensor], zero: Tensor) -> Tensor:
        pairs = list(combinations(self.dims, 2))
        if self.cfg.align == "none" or not pairs:
            return zero
        total = zero
        for a, b in pairs:
            if self.cfg.align == "mmd":  # distributions: each modality's present rows
                if len(quantized[a]) and len(quantized[b]):
                    total = total + gaussian_mmd(quantized[a], quantized[b], bandwidth=self.cfg.mmd_bandwidth)
                continue
            # InfoNCE pairs item i's latents across modalities: only items with both.
            both = present[a] & present[b]
            if int(both.sum()) >= 2:
                qa = quantized[a][both[present[a]]]
                qb = quantized[b][both[present[b]]]
                total = total + info_nce(qa, qb, temperature=self.cfg.temperature)
        return total / len(pairs)

    @torch.no_grad()
    def encode(self, xs: Mapping[str, Tensor], *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """SIDs [N, P] int64 of ``xs`` (modality -> [N, D_m]), ``batch_size`` items at a time."""
        xs = self.check_inputs(xs)
        return torch.cat([self.branch(name).encode(xs[name], batch_size=batch_size) for name in self.dims], dim=1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> dict[str, Tensor]:
        """Reconstructions (modality -> [N, D_m]) of SIDs ``codes`` [N, P]."""
        levels = self.cfg.levels
        return {
            name: self.branch(name).decode(codes[:, i * levels : (i + 1) * levels])
            for i, name in enumerate(self.dims)
        }

    def init_codebooks(self, xs: Mapping[str, Tensor], *, seed: int = 0) -> None:
        """k-means initialise each modality's codebooks on the encoder outputs of its present rows."""
        xs = self.check_inputs(xs)
        for name in self.dims:
            present = fit_rows(xs[name], name, self.codebook_size)
            self.branch(name).init_codebooks(xs[name], seed=seed, rows=present)
