"""MMQ stage 1: multimodal mixture-of-quantization (Xu et al. 2025; ../shared/DESIGN.md section 6).

Experts, each an MLP encoder with its OWN residual codebooks
(:class:`tokenizer.quantizer.ResidualQuantizer`):

* ``n_shared_experts`` shared experts read all modalities concatenated (sorted
  by name) and quantize with ``shared_levels`` levels each;
* ``n_specific_experts`` specific experts per modality read that modality only
  and quantize with ``specific_levels`` levels each.

For each modality ``m`` a gate (softmax over the shared experts and the
specific experts of ``m``, computed from the concatenated input) mixes the
quantized expert outputs, and a per-modality decoder reconstructs ``x_m``.

Loss = reconstruction + quantisation + ``ortho_weight`` x orthogonality:

* reconstruction: sum over modalities of the squared error summed over dims,
  averaged over the items that HAVE the modality;
* quantisation: commitment + codebook losses of every expert;
* orthogonality: mean over (shared expert, modality, specific expert of that
  modality) of the squared cosine between the two experts' encoder outputs
  (pre-quantisation latents), :func:`tokenizer.losses.orthogonality_loss`.

Missing modality: an all-zero row of ``x_m`` means the item lacks modality
``m``. Such rows are masked out of every per-modality term: ``m``'s
reconstruction, the quantisation loss, k-means init and dead-code statistics
of ``m``'s specific experts, and ``m``'s orthogonality pairs. They still enter
the shared experts and the gates as zeros (input, never a target). At encode
time the specific codes of a missing modality are those of the encoder's
output for a zero input, so all items lacking ``m`` share ``m``'s specific
codes. A configured modality absent from the input, or all zeros for every
item, is a :class:`DataError`.

SID layout (P code positions, one codebook [K, latent_dim] per position):
shared codes first, then specific codes; within each group experts in order
and, per expert, its levels in order; specific experts grouped by modality in
sorted name order. With the defaults (1 shared expert x 2 levels, 1 specific
expert x 1 level) and modalities ``tags``, ``text``::

    position  0          1          2            3
    code      shared0/0  shared0/1  tags.spec0/0 text.spec0/0

so P = n_shared x shared_levels + n_modalities x n_specific x specific_levels.

Example:
    >>> cfg = MMQConfig({"text": 16, "tags": 8}, latent_dim=8, hidden_dims=(32,), codebook_size=8)
    >>> model = MMQ(cfg)
    >>> xs = {"text": torch.randn(200, 16), "tags": torch.randn(200, 8)}
    >>> history = model.fit(xs, epochs=2, batch_size=64)
    >>> model.encode(xs).shape, [tuple(c.shape) for c in model.codebooks][:1]
    (torch.Size([200, 4]), [(8, 8)])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

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
from tokenizer.losses import orthogonality_loss, present_rows
from tokenizer.metrics import level_usage
from tokenizer.quantizer import ResidualQuantizer, sq_distances
from tokenizer.rqvae import mlp

logger = logging.getLogger(__name__)

# helpers


def masked_sq_error(x: Tensor, recon: Tensor, mask: Tensor) -> Tensor:
    """Squared error summed over dims, averaged over the rows where ``mask`` [N] holds (0 if none)."""
    error = (x - recon).pow(2).sum(1)
    return (error * mask).sum() / mask.sum().clamp_min(1)


def _index(xs: Mapping[str, Tensor], rows: Tensor | slice) -> dict[str, Tensor]:
    return {name: x[rows] for name, x in xs.items()}


@dataclass
class MMQConfig:
    """Architecture of an :class:`MMQ` tokenizer.

    Args:
        modality_dims: modality name -> input width d_m; stored sorted by name.
        latent_dim: Z, width of every expert's latent and codewords.
        hidden_dims: encoder hidden widths (decoders mirror them).
        n_shared_experts: experts over all modalities.
        n_specific_experts: experts per modality.
        shared_levels: residual levels of each shared expert.
        specific_levels: residual levels of each specific expert.
        codebook_size: K, codes per level (the same at every position).
        beta: commitment weight.
        ortho_weight: weight of the shared-vs-specific orthogonality loss.
        kmeans_iters: Lloyd iterations of the codebook initialisation.
        dead_code_window: training steps between dead-code resets (0 = never).
    """

    modality_dims: dict[str, int]
    latent_dim: int = LATENT_DIM
    hidden_dims: tuple[int, ...] = HIDDEN_DIMS
    n_shared_experts: int = 1
    n_specific_experts: int = 1
    shared_levels: int = 2
    specific_levels: int = 1
    codebook_size: int = CODEBOOK_SIZE
    beta: float = BETA
    ortho_weight: float = 1.0
    kmeans_iters: int = KMEANS_ITERS
    dead_code_window: int = DEAD_CODE_WINDOW

    def __post_init__(self) -> None:
        if not self.modality_dims:
            raise ValueError("modality_dims={}: expected at least one modality")
        self.modality_dims = {str(k): int(v) for k, v in sorted(self.modality_dims.items())}
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        bad = {k: v for k, v in self.modality_dims.items() if v < 1}
        if bad or any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"modality_dims={self.modality_dims}, hidden_dims={self.hidden_dims}: widths must be >= 1")
        positive = ("latent_dim", "n_shared_experts", "n_specific_experts", "shared_levels", "specific_levels")
        for name in (*positive, "codebook_size", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        for name in ("beta", "ortho_weight", "dead_code_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in the fixed (sorted) order of inputs, experts and SID positions."""
        return tuple(self.modality_dims)

    @property
    def n_positions(self) -> int:
        """P, code positions per SID."""
        shared = self.n_shared_experts * self.shared_levels
        return shared + len(self.modality_dims) * self.n_specific_experts * self.specific_levels

    def position_names(self) -> list[str]:
        """Human name of each SID position, in SID order (``shared0/1``, ``text.spec0/0``, ...)."""
        names = [f"shared{e}/{lv}" for e in range(self.n_shared_experts) for lv in range(self.shared_levels)]
        for m in self.modalities:
            names += [f"{m}.spec{e}/{lv}" for e in range(self.n_specific_experts) for lv in range(self.specific_levels)]
        return names

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MMQConfig:
        """Build from a saved config: ``data["mmq"]`` if present, else ``data`` itself;
        keys that are not fields (dataset, method, version, ...) are ignored."""
        source = data.get("mmq", data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in source.items() if k in known})


class MMQOutput(NamedTuple):
    """What :meth:`MMQ.forward` returns; the same fields whatever the options.

    Attributes:
        recon: modality name -> [B, d_m] reconstruction (rows of items lacking
            the modality are decoded too but never scored).
        codes: [B, P] int64 codes in SID order.
        recon_loss: scalar, sum over modalities of the masked per-item squared error.
        quant_loss: scalar, commitment + codebook losses of all experts.
        ortho_loss: scalar, mean squared cosine between shared and specific latents.
        loss: scalar, recon_loss + quant_loss + ortho_weight x ortho_loss.
    """

    recon: dict[str, Tensor]
    codes: Tensor
    recon_loss: Tensor
    quant_loss: Tensor
    ortho_loss: Tensor
    loss: Tensor


class ExpertLatents(NamedTuple):
    """Encoder outputs (pre-quantisation) of every expert.

    Attributes:
        shared: one [N, Z] tensor per shared expert.
        specific: modality -> one [N, Z] tensor per specific expert of it.
    """

    shared: list[Tensor]
    specific: dict[str, list[Tensor]]


class Expert(nn.Module):
    """MLP encoder ``d_in -> ... -> Z`` followed by its own residual quantizer."""

    def __init__(self, in_dim: int, cfg: MMQConfig, levels: int) -> None:
        super().__init__()
        self.encoder = mlp([in_dim, *cfg.hidden_dims, cfg.latent_dim])
        self.rq = ResidualQuantizer(
            cfg.latent_dim,
            levels=levels,
            codebook_size=cfg.codebook_size,
            beta=cfg.beta,
            kmeans_iters=cfg.kmeans_iters,
            dead_code_window=cfg.dead_code_window,
        )

    def soft_codes(self, z: Tensor, tau: float) -> list[Tensor]:
        """Per level [N, K] softmax(-||r_l - c_k||^2 / tau); residuals follow the hard codes."""
        probs, residual = [], z
        for level in range(self.rq.levels):
            dists = sq_distances(residual, self.rq.codebooks[level])
            probs.append(F.softmax(-dists / tau, dim=1))
            residual = residual - self.rq.codebooks[level][dists.argmin(1)]
        return probs


class MMQ(nn.Module):
    """Shared/specific mixture-of-quantization tokenizer (see the module docstring).

    Shapes: ``xs`` maps each modality name to [N, d_m]; latents are N x Z;
    codes N x P.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: MMQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims, n_spec = cfg.modality_dims, cfg.n_specific_experts
        self.in_dim = sum(dims.values())
        self.shared = nn.ModuleList(Expert(self.in_dim, cfg, cfg.shared_levels) for _ in range(cfg.n_shared_experts))
        self.specific = nn.ModuleDict(
            {m: nn.ModuleList(Expert(d, cfg, cfg.specific_levels) for _ in range(n_spec)) for m, d in dims.items()}
        )
        self.gates = nn.ModuleDict({m: nn.Linear(self.in_dim, cfg.n_shared_experts + n_spec) for m in dims})
        for gate in self.gates.values():  # start from the uniform mixture
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        self.decoders = nn.ModuleDict(
            {m: mlp([cfg.latent_dim, *reversed(cfg.hidden_dims), d]) for m, d in dims.items()}
        )

    @property
    def n_positions(self) -> int:
        """P, code positions per SID."""
        return self.cfg.n_positions

    @property
    def codebook_size(self) -> int:
        """K, codes per position."""
        return self.cfg.codebook_size

    # inputs

    def check_inputs(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The configured modalities of ``xs`` as float32, checked for presence and shape.

        Raises:
            DataError: a configured modality is absent (or all zeros for every
                item), has the wrong width, or the modalities disagree on N.
        """
        result, n_rows = {}, None
        for name, dim in self.cfg.modality_dims.items():
            if name not in xs:
                raise DataError(
                    f"modalities: configured modality '{name}' is absent (given: {sorted(xs)}); "
                    f"build it with `python -m tokenizer.modalities` or drop it from --modalities"
                )
            x = torch.as_tensor(xs[name]).float()
            if x.ndim != 2 or x.shape[1] != dim or (n_rows is not None and x.shape[0] != n_rows):
                raise DataError(
                    f"modalities: '{name}' has shape {tuple(x.shape)}, expected ({n_rows or 'N'}, {dim}); "
                    f"regenerate the modalities or retrain the tokenizer on these"
                )
            n_rows = x.shape[0]
            result[name] = x
        return result

    def _concat(self, xs: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([xs[m] for m in self.cfg.modalities], dim=1)

    def expert_latents(self, xs: Mapping[str, Tensor]) -> ExpertLatents:
        """Encoder outputs [N, Z] of every expert for ``xs`` (differentiable)."""
        xs = self.check_inputs(xs)
        x_all = self._concat(xs)
        shared = [expert.encoder(x_all) for expert in self.shared]
        specific = {m: [expert.encoder(xs[m]) for expert in experts] for m, experts in self.specific.items()}
        return ExpertLatents(shared, specific)

    # training objective

    def forward(self, xs: Mapping[str, Tensor]) -> MMQOutput:
        """Quantize, mix and reconstruct a batch; in training mode quantizers track usage."""
        xs = self.check_inputs(xs)
        x_all = self._concat(xs)
        latents = self.expert_latents(xs)
        masks = {m: present_rows(x) for m, x in xs.items()}
        quant_loss = x_all.new_zeros(())
        shared_q, shared_codes = [], []
        for expert, z in zip(self.shared, latents.shared, strict=True):
            out = expert.rq(z)
            shared_q.append(out.quantized)
            shared_codes.append(out.codes)
            quant_loss = quant_loss + out.commit_loss + out.codebook_loss
        recon, recon_loss, ortho_terms, specific_codes = {}, x_all.new_zeros(()), [], []
        for m in self.cfg.modalities:
            spec_q = []
            for expert, z in zip(self.specific[m], latents.specific[m], strict=True):
                q, codes, loss = self._quantize_present(expert, z, masks[m])
                spec_q.append(q)
                specific_codes.append(codes)
                quant_loss = quant_loss + loss
                ortho_terms += [orthogonality_loss(s[masks[m]], z[masks[m]]) for s in latents.shared]
            gate = F.softmax(self.gates[m](x_all), dim=1)  # [B, S + E]
            mixed = (gate.unsqueeze(-1) * torch.stack(shared_q + spec_q, dim=1)).sum(1)  # [B, Z]
            recon[m] = self.decoders[m](mixed)
            recon_loss = recon_loss + masked_sq_error(xs[m], recon[m], masks[m])
        ortho_loss = torch.stack(ortho_terms).mean()
        codes = torch.cat([*shared_codes, *specific_codes], dim=1)
        loss = recon_loss + quant_loss + self.cfg.ortho_weight * ortho_loss
        return MMQOutput(recon, codes, recon_loss, quant_loss, ortho_loss, loss)

    @staticmethod
    def _quantize_present(expert: Expert, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize only the rows that have the modality; others get a zero output (codes of
        missing rows from :meth:`ResidualQuantizer.encode`, never counted in usage or losses)."""
        codes = expert.rq.encode(z)
        if not bool(mask.any()):
            return torch.zeros_like(z), codes, z.new_zeros(())
        index = mask.nonzero().squeeze(1)
        out = expert.rq(z[index])
        codes = codes.index_put((index,), out.codes)
        quantized = torch.zeros_like(z).index_put((index,), out.quantized)
        return quantized, codes, out.commit_loss + out.codebook_loss

    def reconstruction_loss(self, xs: Mapping[str, Tensor]) -> Tensor:
        """Scalar multimodal reconstruction loss of ``xs`` (masked, summed over dims), differentiable."""
        return self(xs).recon_loss

    # codes

    def experts_in_sid_order(self) -> list[Expert]:
        """Shared experts, then each modality's specific experts (sorted modality names)."""
        return [*self.shared, *(expert for m in self.cfg.modalities for expert in self.specific[m])]

    def _sid_latents(self, xs: Mapping[str, Tensor]) -> list[Tensor]:
        latents = self.expert_latents(xs)
        return [*latents.shared, *(z for m in self.cfg.modalities for z in latents.specific[m])]

    @property
    def codebooks(self) -> list[Tensor]:
        """One [K, Z] codebook per SID position, in SID order (views of the parameters)."""
        return [e.rq.codebooks[level] for e in self.experts_in_sid_order() for level in range(e.rq.levels)]

    def soft_codes(self, xs: Mapping[str, Tensor], tau: float = 1.0) -> list[Tensor]:
        """Per SID position [N, K]: softmax over negative squared distances / ``tau``.

        Differentiable w.r.t. encoders and codebooks; level l's residual
        subtracts the HARD codewords of levels < l, so argmax of position p
        is exactly :meth:`encode`'s code p.
        """
        if tau <= 0:
            raise ValueError(f"tau={tau}: expected > 0")
        pairs = zip(self.experts_in_sid_order(), self._sid_latents(xs), strict=True)
        return [p for expert, z in pairs for p in expert.soft_codes(z, tau)]

    def hard_codes_st(self, xs: Mapping[str, Tensor], tau: float = 1.0) -> list[Tensor]:
        """Per SID position [N, K] one-hot of the hard code in the forward pass, with the
        gradient of :meth:`soft_codes` (straight-through estimator)."""
        result = []
        for p in self.soft_codes(xs, tau):
            hard = F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
            result.append(hard + (p - p.detach()))  # exactly one-hot forward: p - p == 0
        return result

    @torch.no_grad()
    def encode(self, xs: Mapping[str, Tensor], *, batch_size: int = ENCODE_BATCH_SIZE) -> Tensor:
        """Codes [N, P] int64 in SID order, ``batch_size`` items at a time."""
        xs = self.check_inputs(xs)
        n_rows, experts = next(iter(xs.values())).shape[0], self.experts_in_sid_order()
        parts = []
        for start in range(0, n_rows, batch_size):
            latents = self._sid_latents(_index(xs, slice(start, start + batch_size)))
            parts.append(torch.cat([e.rq.encode(z) for e, z in zip(experts, latents, strict=True)], dim=1))
        return torch.cat(parts) if parts else torch.zeros(0, self.cfg.n_positions, dtype=torch.long)

    @torch.no_grad()
    def reconstruct(self, xs: Mapping[str, Tensor], *, batch_size: int = ENCODE_BATCH_SIZE) -> dict[str, Tensor]:
        """Reconstruction [N, d_m] per modality through the hard codes (no usage tracking)."""
        xs = self.check_inputs(xs)
        n_rows = next(iter(xs.values())).shape[0]
        was_training = self.training
        self.eval()
        try:
            parts = [self(_index(xs, slice(s, s + batch_size))).recon for s in range(0, n_rows, batch_size)]
        finally:
            self.train(was_training)
        return {m: torch.cat([p[m] for p in parts]) for m in self.cfg.modalities}

    # training

    @torch.no_grad()
    def init_codebooks(self, xs: Mapping[str, Tensor], *, seed: int = 0) -> None:
        """k-means initialise every expert's codebooks on its latents of ``xs``
        (specific experts on the items that have their modality only)."""
        xs = self.check_inputs(xs)
        masks = [None] * len(self.shared)
        for m in self.cfg.modalities:
            if not bool(present_rows(xs[m]).any()):
                raise DataError(
                    f"modalities: '{m}' is all zeros for every fit item (absent entirely); "
                    f"rebuild it or drop it from --modalities"
                )
            masks += [present_rows(xs[m])] * len(self.specific[m])
        # encoder outputs batch by batch: the experts' hidden layers on a million items would not fit
        n_rows, step = next(iter(xs.values())).shape[0], ENCODE_BATCH_SIZE
        batches = [self._sid_latents(_index(xs, slice(s, s + step))) for s in range(0, n_rows, step)]
        latents = [torch.cat(parts) for parts in zip(*batches, strict=True)]
        pairs = zip(self.experts_in_sid_order(), latents, masks, strict=True)
        for i, (expert, z, mask) in enumerate(pairs):
            expert.rq.init_from(z if mask is None else z[mask], seed=seed + 100 * i)

    def train_epochs(
        self, xs: Mapping[str, Tensor], *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """Train on ``xs`` (modality -> [N, d_m]) with Adam from the current codebooks; returns
        the mean loss of each epoch."""
        xs = self.check_inputs(xs)
        n_rows = next(iter(xs.values())).shape[0]
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        log_every = max(1, epochs // 10)
        history: list[float] = []
        bar = tqdm(range(epochs), desc="mmq", unit="epoch")
        for epoch in bar:
            # one pass over the items in a fresh random order
            self.train()
            sums = torch.zeros(4)
            for batch in torch.randperm(n_rows, generator=gen).split(batch_size):
                out = self(_index(xs, batch))
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                parts = (out.loss, out.recon_loss, out.quant_loss, out.ortho_loss)
                sums += torch.stack([p.detach() for p in parts]) * len(batch)
            loss, recon, quant, ortho = (sums / n_rows).tolist()
            history.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", ortho=f"{ortho:.3f}")
            # progress: the components move differently (ortho falls fast, recon slowly)
            if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
                usage = level_usage(self.encode(xs).numpy(), self.cfg.codebook_size)
                logger.info(
                    "mmq epoch %d/%d loss %.4f recon %.4f quant %.4f ortho %.4f usage %s",
                    *(epoch + 1, epochs, loss, recon, quant, ortho),
                    "/".join(f"{u:.2f}" for u in usage),
                )
        self.eval()
        return history

    def fit(
        self, xs: Mapping[str, Tensor], *, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR, seed: int = 0
    ) -> list[float]:
        """:meth:`init_codebooks`, then :meth:`train_epochs`; returns the mean loss of each epoch."""
        self.init_codebooks(xs, seed=seed)
        return self.train_epochs(xs, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
