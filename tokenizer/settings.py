"""The setting groups the tokenizers share; each field is declared once, with its default and help.

A group is a frozen, keyword-only dataclass that validates its own fields.
A config that needs several groups inherits them, so its fields stay flat
(one ``--flag`` each, flat keys in a saved config.json) while every field
keeps a single declaration:
:class:`tokenizer.methods.TokenizerConfig` combines all of them,
:class:`tokenizer.mm_rqvae.MMRQVAEConfig` and :class:`tokenizer.mmq.MMQConfig`
the ones their models read. :meth:`Settings.part` cuts a group back out of
such a config: every residual quantizer is built from one
:class:`QuantizerConfig`, whatever the method.

Example:
    >>> quantizer = QuantizerConfig(codebook_size=8)
    >>> quantizer.codebook_size, quantizer.beta
    (8, 0.25)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from tokenizer.defaults import BATCH_SIZE, BETA, CODEBOOK_SIZE, DEAD_CODE_WINDOW, EPOCHS, HIDDEN_DIMS, KMEANS_ITERS
from tokenizer.defaults import LATENT_DIM, LR

S = TypeVar("S", bound="Settings")


def require_at_least(config: object, names: Iterable[str], minimum: float) -> None:
    """ValueError naming the first field of ``names`` whose value is below ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name}={getattr(config, name)}: expected >= {minimum}")


def require_positive(config: object, names: Iterable[str]) -> None:
    """ValueError naming the first field of ``names`` whose value is not > 0."""
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name}={getattr(config, name)}: expected > 0")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every setting group and of the configs combining them."""

    def __post_init__(self) -> None:
        # Each group calls super() and then checks its own fields: a config that
        # inherits several groups runs every group's checks exactly once.
        pass

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Field names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def values(self, *groups: type[Settings]) -> dict[str, Any]:
        """``name -> value`` of the fields of ``groups`` (setting groups this config inherits)."""
        return {name: getattr(self, name) for group in groups for name in group.names()}

    def part(self, group: type[S]) -> S:
        """The ``group`` settings of this config (a setting group it inherits)."""
        return group(**self.values(group))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """Build from a saved config, ignoring keys that are not fields."""
        known = cls.names()
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class QuantizerConfig(Settings):
    """Settings of a residual quantizer; its number of levels is each model's own.

    Args:
        codebook_size: K, codes per level (why 64: tokenizer/defaults.py).
        beta: commitment weight (VQ-VAE, van den Oord et al. 2017).
        kmeans_iters: Lloyd iterations per level of the k-means codebook
            initialisation (for RQ-KMeans the whole fit).
        dead_code_window: training steps between dead-code resets (0 = never).
        sinkhorn_last: balanced Sinkhorn assignment on the last level while
            training (MM-RQ-VAE: per modality; MMQ has none); encoding stays
            nearest-code, so an item's SID never depends on its batch.
    """

    codebook_size: int = CODEBOOK_SIZE
    beta: float = BETA
    kmeans_iters: int = KMEANS_ITERS
    dead_code_window: int = DEAD_CODE_WINDOW
    sinkhorn_last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("codebook_size", "kmeans_iters"), 1)
        require_at_least(self, ("beta", "dead_code_window"), 0)


@dataclass(frozen=True, kw_only=True)
class NetworkConfig(Settings):
    """MLP widths of the learned tokenizers.

    Args:
        latent_dim: Z, latent and codeword width of the learned tokenizers
            (RQ-KMeans codewords live in the input space).
        hidden_dims: encoder hidden widths; the decoders mirror them.
    """

    latent_dim: int = LATENT_DIM
    hidden_dims: tuple[int, ...] = HIDDEN_DIMS

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))  # lists from JSON
        require_at_least(self, ("latent_dim",), 1)
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims={self.hidden_dims}: every width must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Schedule(Settings):
    """Training schedule of the learned tokenizers (Adam, a fixed number of epochs).

    Args:
        epochs: passes over the fit items.
        batch_size: items per training step.
        lr: Adam learning rate.
    """

    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    lr: float = LR

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("epochs", "batch_size"), 1)
        require_positive(self, ("lr",))
