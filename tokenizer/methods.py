"""The tokenizer methods by name, and the config of one tokenizer run.

:data:`METHODS` maps each name to a :class:`Method`: how to build the
:class:`~tokenizer.interface.Tokenizer` from a :class:`TokenizerConfig`, how it
reads the modalities (each one separately, or side by side in sorted name
order) and which settings it ignores (they stay out of its version hash, so
changing them keeps the method's published versions).

``levels`` is P, the number of code positions of a SID, for every method:
RQ-KMeans and RQ-VAE use P residual levels on the concatenated modalities;
MM-RQ-VAE gives each of the M modalities P / M levels; MMQ needs
n_shared_experts x shared_levels + M x n_specific_experts x specific_levels = P.

Example:
    >>> cfg = TokenizerConfig(dataset=Path("."), method="mm_rqvae", levels=4, codebook_size=8)
    >>> build_tokenizer(cfg, {"tags": 8, "text": 32}).n_positions
    4
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from tokenizer.defaults import LEVELS
from tokenizer.inputs import Items
from tokenizer.interface import Tokenizer
from tokenizer.mm_rqvae import MMRQVAE, MMRQVAEConfig, MMRQVAELoss
from tokenizer.mmq import MMQ, MMQConfig, MMQExperts
from tokenizer.rqkmeans import RQKMeans
from tokenizer.rqvae import RQVAE
from tokenizer.settings import NetworkConfig, QuantizerConfig, Schedule, require_at_least

Builder = Callable[["TokenizerConfig", Mapping[str, int]], Tokenizer]


@dataclass(frozen=True)
class Method:
    """One tokenizer method as the training stage sees it.

    Attributes:
        build: (run config, modality widths name -> D_m) -> the unfitted tokenizer;
            ValueError when the code budget does not fit the modalities.
        multimodal: reads each modality separately (name -> [N, D_m]); else
            their concatenation [N, D] in sorted name order.
        ignores: settings of :class:`TokenizerConfig` this method never reads.
    """

    build: Builder
    multimodal: bool
    ignores: tuple[str, ...]

    def inputs(self, xs: Mapping[str, Tensor]) -> Items:
        """What this method reads, from the modalities ``xs`` (name -> [N, D_m])."""
        return dict(xs) if self.multimodal else torch.cat([xs[name] for name in sorted(xs)], dim=1)

    def per_modality(self, recon: Items, dims: Mapping[str, int]) -> dict[str, Tensor]:
        """A reconstruction in this method's form, split back into name -> [N, D_m]."""
        if self.multimodal:
            return dict(recon)
        names = sorted(dims)
        return dict(zip(names, cast(Tensor, recon).split([dims[name] for name in names], dim=1), strict=True))


def _rqkmeans(cfg: TokenizerConfig, dims: Mapping[str, int]) -> RQKMeans:
    return RQKMeans(sum(dims.values()), levels=cfg.levels, quantizer=cfg.part(QuantizerConfig))


def _rqvae(cfg: TokenizerConfig, dims: Mapping[str, int]) -> RQVAE:
    network, quantizer = cfg.part(NetworkConfig), cfg.part(QuantizerConfig)
    return RQVAE(sum(dims.values()), levels=cfg.levels, network=network, quantizer=quantizer)


def _mm_rqvae(cfg: TokenizerConfig, dims: Mapping[str, int]) -> MMRQVAE:
    if cfg.levels % len(dims):
        raise ValueError(
            f"levels={cfg.levels}: mm_rqvae splits the P={cfg.levels} code positions evenly over "
            f"{len(dims)} modalities {sorted(dims)}; pass --levels a multiple of {len(dims)}"
        )
    settings = cfg.values(QuantizerConfig, NetworkConfig, MMRQVAELoss)
    return MMRQVAE(MMRQVAEConfig(dict(dims), levels=cfg.levels // len(dims), **settings))


def _mmq(cfg: TokenizerConfig, dims: Mapping[str, int]) -> MMQ:
    mmq = MMQConfig(dict(dims), **cfg.values(QuantizerConfig, NetworkConfig, MMQExperts))
    if mmq.n_positions != cfg.levels:
        raise ValueError(
            f"levels={cfg.levels}: mmq with these experts has n_shared_experts x shared_levels + "
            f"{len(dims)} modalities x n_specific_experts x specific_levels = {cfg.n_shared_experts}x"
            f"{cfg.shared_levels} + {len(dims)}x{cfg.n_specific_experts}x{cfg.specific_levels} = "
            f"{mmq.n_positions} code positions; pass --levels {mmq.n_positions} or change the experts"
        )
    return MMQ(mmq)


MM_RQVAE_ONLY, MMQ_ONLY = MMRQVAELoss.names(), MMQExperts.names()
# RQ-KMeans trains nothing: no network, no schedule, no commitment or dead codes.
NOT_TRAINED = (*NetworkConfig.names(), *Schedule.names(), "beta", "dead_code_window")
METHODS: dict[str, Method] = {
    "rqvae": Method(_rqvae, multimodal=False, ignores=(*MM_RQVAE_ONLY, *MMQ_ONLY)),
    "rqkmeans": Method(_rqkmeans, multimodal=False, ignores=(*NOT_TRAINED, *MM_RQVAE_ONLY, *MMQ_ONLY)),
    "mm_rqvae": Method(_mm_rqvae, multimodal=True, ignores=MMQ_ONLY),
    "mmq": Method(_mmq, multimodal=True, ignores=MM_RQVAE_ONLY),
}


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig(QuantizerConfig, NetworkConfig, Schedule, MMRQVAELoss, MMQExperts):
    """What one tokenizer run does: the fields below plus those of every setting group
    (:class:`~tokenizer.settings.QuantizerConfig`, :class:`~tokenizer.settings.NetworkConfig`,
    :class:`~tokenizer.settings.Schedule`, :class:`~tokenizer.mm_rqvae.MMRQVAELoss`,
    :class:`~tokenizer.mmq.MMQExperts`), flat, one flag each.

    Args:
        dataset: dataset folder (sidrank.contract.DatasetPaths root).
        method: tokenizer method.
        modalities: modality names, used in sorted order; empty = all in the manifest.
        levels: P, code positions per SID (split over the modalities by
            mm_rqvae; the experts' levels must add up to it for mmq).
        seed: seed of the initial weights, the k-means initialisation and the batch order.
    """

    dataset: Path
    method: str = field(default="rqvae", metadata={"choices": tuple(METHODS)})
    modalities: tuple[str, ...] = ()
    levels: int = LEVELS
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "dataset", Path(self.dataset))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {tuple(METHODS)}")
        require_at_least(self, ("levels",), 1)

    def hashable(self) -> dict[str, Any]:
        """The settings that determine the result: not where the dataset lies, nor the
        settings the method ignores, so changing those keeps this method's version."""
        ignored = {"dataset", *METHODS[self.method].ignores}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in ignored}


def build_tokenizer(cfg: TokenizerConfig, dims: Mapping[str, int]) -> Tokenizer:
    """The configured, unfitted tokenizer for modality widths ``dims`` (name -> D_m)."""
    return METHODS[cfg.method].build(cfg, dims)
