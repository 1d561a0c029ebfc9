"""MMQ stage 1: multimodal mixture-of-quantization (Xu et al. 2025).

Experts, each an MLP encoder with its OWN residual codebooks
(:class:`tokenizer.encoder.QuantizedEncoder`):

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
codes. A configured modality absent from the input, or present for fewer fit
items than the codebook size, is a :class:`DataError`.

Decoding: the gates read the item's content, so :meth:`MMQ.reconstruct`
(items through their codes) is the faithful reconstruction; :meth:`MMQ.decode`
of codes alone gates as for an item without content (a zero input).

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.defaults import ENCODE_BATCH_SIZE
from tokenizer.encoder import QuantizedEncoder, decoder_mlp
from tokenizer.inputs import fit_rows, n_rows, take
from tokenizer.losses import orthogonality_loss, present_rows
from tokenizer.multimodal import MultimodalConfig, MultimodalTokenizer
from tokenizer.quantizer import ResidualQuantizer, sq_distances
from tokenizer.settings import NetworkConfig, QuantizerConfig, Settings, require_at_least

# helpers


def masked_sq_error(x: Tensor, recon: Tensor, mask: Tensor) -> Tensor:
    """Squared error summed over dims, averaged over the rows where ``mask`` [N] holds (0 if none)."""
    error = (x - recon).pow(2).sum(1)
    return (error * mask).sum() / mask.sum().clamp_min(1)


@dataclass(frozen=True, kw_only=True)
class MMQExperts(Settings):
    """MMQ's experts and their regulariser.

    Args:
        n_shared_experts: MMQ experts over all modalities.
        n_specific_experts: MMQ experts per modality.
        shared_levels: MMQ residual levels of each shared expert.
        specific_levels: MMQ residual levels of each specific expert.
        ortho_weight: MMQ weight of the shared-vs-specific orthogonality loss.
    """

    n_shared_experts: int = 1
    n_specific_experts: int = 1
    shared_levels: int = 2
    specific_levels: int = 1
    ortho_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("n_shared_experts", "n_specific_experts", "shared_levels", "specific_levels"), 1)
        require_at_least(self, ("ortho_weight",), 0)


@dataclass(frozen=True)
class MMQConfig(MultimodalConfig, QuantizerConfig, NetworkConfig, MMQExperts):
    """Architecture of an :class:`MMQ` tokenizer: its modalities and the fields of
    :class:`~tokenizer.settings.QuantizerConfig`, :class:`~tokenizer.settings.NetworkConfig`
    and :class:`MMQExperts` (every expert has its own quantizer with these settings).

    Args:
        modality_dims: modality name -> input width d_m; stored sorted by name.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinkhorn_last:
            raise ValueError("sinkhorn_last=True: method 'mmq' has no Sinkhorn assignment; drop --sinkhorn-last")

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MMQConfig:
        """Build from a saved config: ``data["mmq"]`` if present, else ``data`` itself;
        keys that are not fields (dataset, method, version, ...) are ignored."""
        return super().from_dict(data.get("mmq", data))


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


class Expert(QuantizedEncoder):
    """An MMQ expert: MLP encoder ``d_in -> ... -> Z`` and its own residual quantizer."""

    def soft_codes(self, z: Tensor, tau: float) -> list[Tensor]:
        """Per level [N, K] softmax(-||r_l - c_k||^2 / tau); residuals follow the hard codes."""
        probs, residual = [], z
        for level in range(self.rq.levels):
            dists = sq_distances(residual, self.rq.codebooks[level])
            probs.append(F.softmax(-dists / tau, dim=1))
            residual = residual - self.rq.codebooks[level][dists.argmin(1)]
        return probs


class MMQ(MultimodalTokenizer):
    """Shared/specific mixture-of-quantization tokenizer (see the module docstring).

    Shapes: ``xs`` maps each modality name to [N, d_m]; latents are N x Z;
    codes N x P.

    Args:
        cfg: the architecture.
    """

    cfg: MMQConfig

    def __init__(self, cfg: MMQConfig) -> None:
        super().__init__(cfg)
        dims, n_spec = cfg.modality_dims, cfg.n_specific_experts
        network, quantizer = cfg.part(NetworkConfig), cfg.part(QuantizerConfig)
        self.in_dim = sum(dims.values())
        self.shared = nn.ModuleList(
            Expert(self.in_dim, levels=cfg.shared_levels, network=network, quantizer=quantizer)
            for _ in range(cfg.n_shared_experts)
        )
        self.specific = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    Expert(d, levels=cfg.specific_levels, network=network, quantizer=quantizer) for _ in range(n_spec)
                )
                for m, d in dims.items()
            }
        )
        self.gates = nn.ModuleDict({m: nn.Linear(self.in_dim, cfg.n_shared_experts + n_spec) for m in dims})
        for gate in self.gates.values():  # start from the uniform mixture
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        self.decoders = nn.ModuleDict({m: decoder_mlp(d, network) for m, d in dims.items()})

    def _concat(self, xs: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([xs[m] for m in self.cfg.modalities], dim=1)

    def expert_latents(self, xs: Mapping[str, Tensor]) -> ExpertLatents:
        """Encoder outputs [N, Z] of every expert for ``xs`` (differentiable)."""
        xs = self.check_inputs(xs)
        x_all = self._concat(xs)
        shared = [expert.encoder(x_all) for expert in self.shared]
        specific = {m: [expert.encoder(xs[m]) for expert in experts] for m, experts in self.specific.items()}
        return ExpertLatents(shared, specific)

    def _mix(self, m: str, x_all: Tensor, quantized: list[Tensor]) -> Tensor:
        """Reconstruction [B, d_m] of modality ``m``: its gate, read from the input ``x_all``
        [B, D], mixes the quantized outputs [B, Z] of the shared then ``m``'s specific experts."""
        gate = F.softmax(self.gates[m](x_all), dim=1)  # [B, S + E]
        mixed = (gate.unsqueeze(-1) * torch.stack(quantized, dim=1)).sum(1)  # [B, Z]
        return self.decoders[m](mixed)

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
            recon[m] = self._mix(m, x_all, shared_q + spec_q)
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

    # codes

    def experts_in_sid_order(self) -> list[Expert]:
        """Shared experts, then each modality's specific experts (sorted modality names)."""
        return [*self.shared, *(expert for m in self.cfg.modalities for expert in self.specific[m])]

    def quantizers(self) -> list[ResidualQuantizer]:
        return [expert.rq for expert in self.experts_in_sid_order()]

    def _sid_latents(self, xs: Mapping[str, Tensor]) -> list[Tensor]:
        latents = self.expert_latents(xs)
        return [*latents.shared, *(z for m in self.cfg.modalities for z in latents.specific[m])]

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
        experts, parts = self.experts_in_sid_order(), []
        for start in range(0, n_rows(xs), batch_size):
            latents = self._sid_latents(take(xs, slice(start, start + batch_size)))
            parts.append(torch.cat([e.rq.encode(z) for e, z in zip(experts, latents, strict=True)], dim=1))
        return torch.cat(parts) if parts else torch.zeros(0, self.n_positions, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> dict[str, Tensor]:
        """Reconstruction [N, d_m] per modality of SIDs ``codes`` [N, P] alone: every gate as
        for an item without content (see the module docstring; :meth:`reconstruct` reads it)."""
        return self._decode(codes, None)

    @torch.no_grad()
    def reconstruct(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Reconstruction [N, d_m] per modality of ``xs`` through its codes, gated by its content;
        a modality an item lacks adds nothing from its specific experts, as in training."""
        xs = self.check_inputs(xs)
        return self._decode(self.encode(xs), xs)

    def _decode(self, codes: Tensor, xs: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """Per modality [N, d_m] from codes [N, P], ``ENCODE_BATCH_SIZE`` items at a time; ``xs``
        are the coded items (the gates' input), or None for a zero input."""
        if len(codes) == 0:
            return {m: torch.zeros(0, d) for m, d in self.dims.items()}
        parts = []
        for start in range(0, len(codes), ENCODE_BATCH_SIZE):
            rows = slice(start, start + ENCODE_BATCH_SIZE)
            parts.append(self._decode_batch(codes[rows], None if xs is None else take(xs, rows)))
        return {m: torch.cat([part[m] for part in parts]) for m in self.cfg.modalities}

    def _decode_batch(self, codes: Tensor, xs: dict[str, Tensor] | None) -> dict[str, Tensor]:
        experts, n_shared, n_spec = self.experts_in_sid_order(), len(self.shared), self.cfg.n_specific_experts
        # each expert's quantized output [B, Z]: the sum of its codewords at its positions
        ends = np.cumsum([expert.rq.levels for expert in experts])
        outputs = [e.rq.decode(codes[:, end - e.rq.levels : end]) for e, end in zip(experts, ends, strict=True)]
        x_all = codes.new_zeros(len(codes), self.in_dim, dtype=torch.float) if xs is None else self._concat(xs)
        recon = {}
        for i, m in enumerate(self.cfg.modalities):
            specific = outputs[n_shared + i * n_spec : n_shared + (i + 1) * n_spec]
            if xs is not None:  # as in training, a modality an item lacks adds nothing of its own
                present = present_rows(xs[m]).unsqueeze(1)
                specific = [torch.where(present, q, torch.zeros_like(q)) for q in specific]
            recon[m] = self._mix(m, x_all, outputs[:n_shared] + specific)
        return recon

    # training

    @torch.no_grad()
    def init_codebooks(self, xs: Mapping[str, Tensor], *, seed: int = 0) -> None:
        """k-means initialise every expert's codebooks on its latents of ``xs``
        (specific experts on the items that have their modality only)."""
        xs = self.check_inputs(xs)
        masks: list[Tensor | None] = [None] * len(self.shared)
        for m in self.cfg.modalities:
            masks += [fit_rows(xs[m], m, self.codebook_size)] * len(self.specific[m])
        # encoder outputs batch by batch: the experts' hidden layers on a million items would not fit
        n, step = n_rows(xs), ENCODE_BATCH_SIZE
        batches = [self._sid_latents(take(xs, slice(s, s + step))) for s in range(0, n, step)]
        latents = [torch.cat(parts) for parts in zip(*batches, strict=True)]
        pairs = zip(self.experts_in_sid_order(), latents, masks, strict=True)
        for i, (expert, z, mask) in enumerate(pairs):
            expert.rq.init_from(z if mask is None else z[mask], seed=seed + 100 * i)
