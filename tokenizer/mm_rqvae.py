"""MM-RQ-VAE, the multimodal tokenizer of MME-SID (Wang et al. 2025; ../shared/DESIGN.md section 6).

One RQ-VAE per modality (MLP encoder -> :class:`ResidualQuantizer` with L
levels -> MLP decoder); an item's SID is the concatenation of its per-modality
codes in modality order, so P = n_modalities x L code positions. Loss::

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

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from sidrank.schema import DataError
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
    LR,
)
from tokenizer.losses import gaussian_mmd, info_nce, present_rows
from tokenizer.metrics import level_usage
from tokenizer.quantizer import ResidualQuantizer, sum_sq_error
from tokenizer.rqvae import mlp

logger = logging.getLogger(__name__)

ALIGN_KINDS = ("mmd", "infonce", "none")


# helpers


def check_inputs(xs: Mapping[str, Tensor], dims: Mapping[str, int]) -> int:
    """Raise :class:`DataError` unless ``xs`` holds every modality of ``dims`` at its width
    with one common row count; returns that row count N."""
    missing = [name for name in dims if name not in xs]
    if missing:
        raise DataError(
            f"modalities {missing} are configured but absent from the inputs (got {sorted(xs)}); "
            f"build them with `python -m tokenizer.modalities --dataset <D>` or drop them from --modalities"
        )
    rows = {name: xs[name].shape[0] for name in dims}
    if len(set(rows.values())) != 1:
        raise DataError(f"modalities have different row counts {rows}; every modality needs one row per item")
    for name, dim in dims.items():
        x = xs[name]
        if x.ndim != 2 or x.shape[1] != dim:
            raise DataError(f"modality '{name}' has shape {tuple(x.shape)}, expected (N, {dim}) as when built")
    return next(iter(rows.values()))


# building blocks


@dataclass
class MMRQVAEConfig:
    """Settings of :class:`MMRQVAE` (the same for every modality).

    Args:
        modality_dims: modality name -> input width D_m; stored sorted by name,
            which is the SID order (codes of the first name come first).
        latent_dim: Z, latent and codeword width of every modality.
        hidden_dims: encoder hidden widths; decoders mirror them.
        levels: L, code levels per modality.
        codebook_size: K, codes per level.
        beta: commitment weight.
        kmeans_iters: Lloyd iterations of the k-means codebook initialisation.
        dead_code_window: training steps between dead-code resets (0 = never).
        sinkhorn_last: balanced Sinkhorn assignment on each modality's last level (training only).
        recon_weight: weight of the MMD reconstruction loss.
        mse_weight: weight of the per-item squared error (summed over dims); 0 is the
            paper's MMD-only loss. On by default: with MMD alone the per-item
            reconstruction error on MovieLens-100K was 19.6 +- 7.1 vs 1.09 +- 0.02
            with it, and 32% vs 3% of items collided (P=4, K=64, 3 seeds;
            benchmarks/results/tokenizers.md).
        align: cross-modal alignment of the quantised latents: ``mmd``, ``infonce`` or ``none``.
        align_weight: weight of the alignment loss.
        temperature: InfoNCE temperature.
        mmd_bandwidth: fixed Gaussian-kernel bandwidth; None = mean pairwise squared distance.
    """

    modality_dims: dict[str, int]
    latent_dim: int = LATENT_DIM
    hidden_dims: tuple[int, ...] = HIDDEN_DIMS
    levels: int = 2
    codebook_size: int = CODEBOOK_SIZE
    beta: float = BETA
    kmeans_iters: int = KMEANS_ITERS
    dead_code_window: int = DEAD_CODE_WINDOW
    sinkhorn_last: bool = False
    recon_weight: float = 1.0
    mse_weight: float = 1.0
    align: str = "mmd"
    align_weight: float = 0.1
    temperature: float = 0.1
    mmd_bandwidth: float | None = None

    def __post_init__(self) -> None:
        if not self.modality_dims:
            raise ValueError("modality_dims={}: expected at least one modality")
        self.modality_dims = {str(k): int(v) for k, v in sorted(self.modality_dims.items())}
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if any(d < 1 for d in self.modality_dims.values()):
            raise ValueError(f"modality_dims={self.modality_dims}: widths must be >= 1")
        for name in ("latent_dim", "levels", "codebook_size", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims={self.hidden_dims}: every width must be >= 1")
        for name in ("beta", "dead_code_window", "recon_weight", "mse_weight", "align_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.recon_weight == 0 and self.mse_weight == 0:
            raise ValueError("recon_weight=0 and mse_weight=0: nothing would train the decoders")
        if self.align not in ALIGN_KINDS:
            raise ValueError(f"align={self.align!r}: expected one of {ALIGN_KINDS}")
        if self.temperature <= 0 or (self.mmd_bandwidth is not None and self.mmd_bandwidth <= 0):
            raise ValueError(f"temperature={self.temperature}, mmd_bandwidth={self.mmd_bandwidth}: expected > 0")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in SID order (sorted)."""
        return tuple(self.modality_dims)

    @property
    def n_positions(self) -> int:
        """P, code positions per SID: n_modalities x L."""
        return len(self.modality_dims) * self.levels

    def position_names(self) -> list[str]:
        """Human name of each SID position in SID order (``tags/0``, ``tags/1``, ``text/0``, ...)."""
        return [f"{m}/{level}" for m in self.modalities for level in range(self.levels)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MMRQVAEConfig:
        """Build from a saved config, ignoring keys that are not fields."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class ModalityRQVAE(nn.Module):
    """Encoder -> residual quantizer -> decoder of one modality (D_m -> Z -> D_m)."""

    def __init__(self, in_dim: int, cfg: MMRQVAEConfig) -> None:
        super().__init__()
        self.encoder = mlp([in_dim, *cfg.hidden_dims, cfg.latent_dim])
        self.rq = ResidualQuantizer(
            cfg.latent_dim,
            levels=cfg.levels,
            codebook_size=cfg.codebook_size,
            beta=cfg.beta,
            kmeans_iters=cfg.kmeans_iters,
            dead_code_window=cfg.dead_code_window,
            sinkhorn_last=cfg.sinkhorn_last,
        )
        self.decoder = mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), in_dim])

    @torch.no_grad()
    def latents(self, x: Tensor, *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Encoder outputs [N, Z] of ``x`` [N, D_m], ``batch_size`` items at a time."""
        return torch.cat([self.encoder(part) for part in x.split(batch_size)])

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Codes [N, L] of ``x`` [N, D_m] (one batch: :meth:`MMRQVAE.encode` splits)."""
        return self.rq.encode(self.encoder(x))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [N, D_m] of codes [N, L]."""
        return self.decoder(self.rq.decode(codes))


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


# public class


class MMRQVAE(nn.Module):
    """One RQ-VAE per modality; SID = the concatenated per-modality codes.

    Shapes: ``xs`` maps each modality name to [N, D_m]; latents are N x Z;
    codes N x P with P = n_modalities x L.

    Args:
        cfg: the settings, modality widths included.
    """

    def __init__(self, cfg: MMRQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dims = cfg.modality_dims
        self.branches = nn.ModuleDict({name: ModalityRQVAE(d, self.cfg) for name, d in self.dims.items()})
        self.history: list[dict[str, float]] = []  # per-epoch mean of each loss term, filled by fit

    @property
    def n_positions(self) -> int:
        """P, code positions per SID: n_modalities x L."""
        return self.cfg.n_positions

    @property
    def codebook_size(self) -> int:
        """K, codes per position."""
        return self.cfg.codebook_size

    @property
    def codebooks(self) -> list[Tensor]:
        """One [K, Z] codebook per code position, in SID order (modality-major, then level)."""
        return [self.branch(name).rq.codebooks[level].detach() for name in self.dims for level in range(self.cfg.levels)]

    def branch(self, name: str) -> ModalityRQVAE:
        """The RQ-VAE of modality ``name``."""
        return cast(ModalityRQVAE, self.branches[name])

    def forward(self, xs: Mapping[str, Tensor]) -> MMRQVAEOutput:
        """Losses of one batch ``xs`` (modality -> [B, D_m]); missing rows are masked."""
        check_inputs(xs, self.dims)
        zero = next(self.parameters()).new_zeros(())
        recons, quantized, present = {}, {}, {}
        recon_mmd, recon_mse, quant_loss = zero, zero, zero
        for name in self.dims:
            branch = self.branch(name)
            present[name] = present_rows(xs[name])
            x = xs[name][present[name]]
            if len(x) == 0:  # nothing of this modality in the batch: no loss, no codebook update
                recons[name], quantized[name] = x, x.new_zeros(0, self.cfg.latent_dim)
                continue
            q, _, commit, codebook = branch.rq(branch.encoder(x))
            recon = branch.decoder(q)
            recons[name], quantized[name] = recon, q
            recon_mmd = recon_mmd + gaussian_mmd(recon, x, bandwidth=self.cfg.mmd_bandwidth)
            recon_mse = recon_mse + sum_sq_error(recon, x)
            quant_loss = quant_loss + commit + codebook
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
        n = check_inputs(xs, self.dims)
        codes = []
        for start in range(0, max(n, 1), batch_size):
            rows = slice(start, start + batch_size)
            codes.append(torch.cat([self.branch(name).encode(xs[name][rows]) for name in self.dims], dim=1))
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> dict[str, Tensor]:
        """Reconstructions (modality -> [N, D_m]) of SIDs ``codes`` [N, P]."""
        levels = self.cfg.levels
        return {
            name: self.branch(name).decode(codes[:, i * levels : (i + 1) * levels])
            for i, name in enumerate(self.dims)
        }

    @torch.no_grad()
    def reconstruct(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Reconstructions (modality -> [N, D_m]) of ``xs`` through their codes."""
        return self.decode(self.encode(xs))

    def init_codebooks(self, xs: Mapping[str, Tensor], *, seed: int = 0) -> None:
        """k-means initialise each modality's codebooks on the encoder outputs of its present rows."""
        check_inputs(xs, self.dims)
        for name in self.dims:
            present = present_rows(xs[name])
            n_present = int(present.sum())
            if n_present < self.cfg.codebook_size:
                what = "all zeros for every fit item (absent entirely)" if n_present == 0 else f"present for {n_present} fit items only"
                raise DataError(
                    f"modality '{name}' is {what}, fewer than codebook_size={self.cfg.codebook_size}; "
                    f"rebuild it, lower --codebook-size or drop it from --modalities"
                )
            # mask the latents, not the inputs: no copy of the [N, D_m] matrix
            self.branch(name).rq.init_from(self.branch(name).latents(xs[name])[present], seed=seed)

    def train_epochs(
        self, xs: Mapping[str, Tensor], *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """Train on ``xs`` (modality -> [N, D_m]) with Adam from the current codebooks; returns
        the mean loss of each epoch. Per-epoch means of every loss term are kept in :attr:`history`."""
        n = check_inputs(xs, self.dims)
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        log_every = max(1, epochs // 10)
        self.history = []
        for epoch in range(epochs):
            # one pass over the items in a fresh random order
            self.train()
            sums = dict.fromkeys(("loss", "recon_mmd", "recon_mse", "quant_loss", "align_loss"), 0.0)
            for batch in torch.randperm(n, generator=gen).split(batch_size):
                out = self({name: x[batch] for name, x in xs.items()})
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                for key in sums:
                    sums[key] += getattr(out, key).item() * len(batch)
            self.history.append({key: value / n for key, value in sums.items()})
            if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
                usage = level_usage(self.encode(xs).cpu().numpy(), self.cfg.codebook_size)
                logger.info(
                    "mm-rq-vae epoch %d/%d %s usage %s",
                    epoch + 1,
                    epochs,
                    " ".join(f"{k} {v:.4f}" for k, v in self.history[-1].items()),
                    "/".join(f"{u:.2f}" for u in usage),
                )
        self.eval()
        return [h["loss"] for h in self.history]

    def fit(
        self, xs: Mapping[str, Tensor], *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """:meth:`init_codebooks`, then :meth:`train_epochs`; returns the mean loss of each epoch."""
        self.init_codebooks(xs, seed=seed)
        return self.train_epochs(xs, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
