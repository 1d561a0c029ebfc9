"""What the multimodal tokenizers (MM-RQ-VAE, MMQ) share: modality widths in SID order, input checks.

Modalities are always taken in sorted name order: the order of a config's
``modality_dims``, of the per-modality modules and of the SID positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tokenizer.fitting import LearnedTokenizer
from tokenizer.inputs import check_modalities
from tokenizer.settings import Settings


@dataclass(frozen=True)
class MultimodalConfig(Settings):
    """The modalities of a multimodal tokenizer.

    Args:
        modality_dims: modality name -> input width D_m; stored sorted by name,
            which is the SID order (codes of the first name come first).
    """

    modality_dims: dict[str, int]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.modality_dims:
            raise ValueError("modality_dims={}: expected at least one modality")
        object.__setattr__(self, "modality_dims", {str(k): int(v) for k, v in sorted(self.modality_dims.items())})
        if any(d < 1 for d in self.modality_dims.values()):
            raise ValueError(f"modality_dims={self.modality_dims}: widths must be >= 1")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in SID order (sorted)."""
        return tuple(self.modality_dims)

    def position_names(self) -> list[str]:
        """Human name of each SID position, in SID order (each method's config names them)."""
        raise NotImplementedError


class MultimodalTokenizer(LearnedTokenizer[Mapping[str, Tensor]]):
    """A learned tokenizer of the modalities taken separately, name -> [N, D_m].

    Args:
        cfg: the settings, modality widths included.
    """

    def __init__(self, cfg: MultimodalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dims = cfg.modality_dims

    def check_inputs(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The configured modalities of ``xs`` as float32 [N, D_m]; DataError when one is
        absent, has another width, or the modalities disagree on N."""
        return check_modalities(xs, self.dims)

    def position_names(self) -> list[str]:
        return self.cfg.position_names()

    def settings(self) -> dict[str, Any]:
        return self.cfg.to_dict()
