"""Fusion of the item-id and SID embeddings (MME-SID, Wang et al. 2025): a submodule between the
sparse arch and the interaction, swapped at construction (``ModelConfig.fusion``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sidrank.schema import is_sid_code_column
from ranking.batches import DENSE_FEATURES
from ranking.tables import SparseTable

# The dense column the fusion gate reads: log1p of the item's causal event count.
FREQUENCY_FEATURE = "log_item_count"


class NoFusion(nn.Module):
    """The sparse embeddings as they are: [B, F, D] -> [B, F, D]."""

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return sparse


class FrequencyGate(nn.Module):
    """Frequency-aware fusion of the item-id and SID embeddings (MME-SID).

    The item-id slot of the sparse embeddings becomes
    ``g * e_id + (1 - g) * e_sid`` with ``e_sid`` the mean of the item's SID
    position embeddings and ``g = sigmoid(a * log1p(count) + b)`` per row:
    frequent items lean on their own id, rare and cold ones on the SID they
    share with similar items. ``a`` and ``b`` are learned with the dense
    parameters; initially g = 0.5 at ``pivot`` train events.

    Args:
        feature_names: the F sparse features in the sparse arch's order.
        item_feature: the item-id feature (its slot is replaced).
        sid_features: the SID position features averaged into ``e_sid``.
        count_column: column of the dense features holding log1p(item count).
        pivot: item count at which the initial gate is 0.5.

    Example::

        gate = FrequencyGate(["item_id", "sid_0", "sid_1"], "item_id", ["sid_0", "sid_1"], count_column=0)
        fused = gate(torch.randn(4, 3, 8), torch.rand(4, 7))  # [4, 3, 8]
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        item_feature: str,
        sid_features: Sequence[str],
        *,
        count_column: int,
        pivot: float = 5.0,
    ) -> None:
        super().__init__()
        names = list(feature_names)
        missing = [f for f in (item_feature, *sid_features) if f not in names]
        if missing or not sid_features:
            raise ValueError(
                f"fusion='freq' fuses the item-id and SID embeddings: features {missing or ['sid_*']} are not "
                f"among {names}; train with both --use-item-id and --use-sid, or --fusion none"
            )
        self.item_index = names.index(item_feature)
        self.register_buffer("sid_index", torch.tensor([names.index(f) for f in sid_features]), persistent=False)
        self.count_column = count_column
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(-math.log1p(pivot)))

    def gate(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, N] dense features -> [B, 1] weight of the item-id embedding."""
        return torch.sigmoid(self.a * dense[:, self.count_column : self.count_column + 1] + self.b)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[B, F, D] sparse embeddings, [B, N] dense features -> [B, F, D] with the item slot fused."""
        g = self.gate(dense)
        e_sid = sparse.index_select(1, self.sid_index).mean(dim=1)
        fused = g * sparse[:, self.item_index] + (1 - g) * e_sid
        i = self.item_index
        return torch.cat([sparse[:, :i], fused.unsqueeze(1), sparse[:, i + 1 :]], dim=1)


def build_fusion(tables: Sequence[SparseTable], fusion: str) -> nn.Module:
    """The fusion submodule named ``fusion`` (``none`` or ``freq``) for the pooled features of ``tables``."""
    if fusion == "none":
        return NoFusion()
    names = [f for t in tables if t.pooled for f in t.features]
    sid_features = [f for f in names if is_sid_code_column(f)]
    return FrequencyGate(names, "item_id", sid_features, count_column=DENSE_FEATURES.index(FREQUENCY_FEATURE))
