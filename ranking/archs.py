"""The ranker's small dense building blocks (no distribution inside; DMP shards only the tables).

Shape symbols: B rows, N numeric features, T bins, D embedding width,
H history length.

- :class:`PiecewiseLinearEmbedding`: numeric features as embeddings, so the
  interaction sees a count or a rate like a sparse feature (Gorishniy et al.
  2022, "On Embeddings for Numerical Features in Tabular Deep Learning").
- :class:`ItemVocabulary`: item ids to rows of the item table, rare items
  sharing the unknown row.
- :class:`TargetAttention`: DIN's activation unit (Zhou et al. 2018): the
  candidate queries the user's history, so the history vector depends on what
  is being ranked.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def quantile_bin_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """[N, T + 1] strictly increasing bin edges per column of ``values`` [R, N], from quantiles.

    Fit on train rows only. Columns with fewer distinct values than bins get
    their remaining edges just above the maximum, where they never fire.
    """
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"values must be a non-empty [rows, features] matrix, got shape {values.shape}")
    quantiles = np.linspace(0.0, 1.0, n_bins + 1)
    edges = []
    for column in values.T.astype(np.float64):
        found = np.unique(np.quantile(column, quantiles))
        pad = found[-1] + np.arange(1, n_bins + 2 - len(found)) * 1e-3 if len(found) < n_bins + 1 else []
        edges.append(np.concatenate([found, pad]))
    return np.stack(edges).astype(np.float32)


class PiecewiseLinearEmbedding(nn.Module):
    """Numeric features -> one D-vector each: piecewise-linear encoding, then a per-feature linear map.

    Feature n's encoding is ``e_t = clamp((x - lo_t) / (hi_t - lo_t), 0, 1)``
    over its T bins, so a value switches bins on fully below it and the
    current one partially; values beyond the train range saturate like a
    tree's last split instead of extrapolating. The edges are buffers, saved
    and loaded with the model.

    Args:
        edges: [N, T + 1] bin edges (:func:`quantile_bin_edges`).
        dim: D.

    Example::

        ple = PiecewiseLinearEmbedding(torch.tensor(quantile_bin_edges(np.random.rand(100, 3), 8)), dim=16)
        ple(torch.rand(4, 3)).shape  # [4, 3, 16]
    """

    def __init__(self, edges: torch.Tensor, dim: int) -> None:
        super().__init__()
        n_features, n_edges = edges.shape
        self.register_buffer("low", edges[:, :-1].clone())
        self.register_buffer("width", (edges[:, 1:] - edges[:, :-1]).clamp_min(1e-6))
        self.weight = nn.Parameter(torch.randn(n_features, n_edges - 1, dim) * (n_edges - 1) ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n_features, dim))

    def forward(self, numeric: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, N, D]."""
        encoded = ((numeric.unsqueeze(-1) - self.low) / self.width).clamp(0.0, 1.0)
        return torch.relu(torch.einsum("bnt,ntd->bnd", encoded, self.weight) + self.bias)


class TargetAttention(nn.Module):
    """DIN attention: a weight per history item from an MLP over (query, key, query - key, query * key).

    As in DIN, the weights are not normalised over the history (a sigmoid,
    not a softmax), so the result keeps how much of the history matches the
    candidate, not only which part does; padding gets weight 0.

    Args:
        dim: D of the query and the keys.
        hidden: width of the activation unit's hidden layer.

    Example::

        attend = TargetAttention(8)
        out = attend(torch.randn(2, 8), torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1] * 5]).bool())
        out.shape  # [2, 8]; a row with an empty history gets zeros
    """

    def __init__(self, dim: int, hidden: int = 36) -> None:
        super().__init__()
        self.unit = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, D], keys [B, H, D], mask [B, H] bool (True = a real history item) -> [B, D]."""
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.unit(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
        weights = torch.sigmoid(scores) * mask
        return torch.einsum("bh,bhd->bd", weights, keys)


def item_rows(train_counts: np.ndarray, min_train_rows: int) -> torch.Tensor:
    """[n_items + 1] row of each item id: itself, or 0 (unknown) below ``min_train_rows`` train rows."""
    rows = torch.arange(len(train_counts), dtype=torch.int64)
    rows[torch.from_numpy(np.asarray(train_counts) < min_train_rows)] = 0
    return rows


class ItemVocabulary(nn.Module):
    """Item ids -> rows of the item table, applied to the item features of a KJT.

    An item with few train rows would keep a nearly untrained vector (one with
    none keeps its random init), so such items share the unknown row 0, which
    all of them train, and their SID prefixes carry what is specific to each.
    The mapping is a buffer, saved with the model, so serving maps ids exactly
    as training did.

    Args:
        rows: [n_items + 1] table row of every item id (:func:`item_rows`).
        features: the KJT keys that hold item ids.

    Example::

        vocab = ItemVocabulary(item_rows(np.array([0, 9, 1]), 5), ["item_id"])
        vocab(KeyedJaggedTensor(["item_id"], torch.tensor([1, 2]), torch.tensor([1, 1]))).values()  # [1, 0]
    """

    def __init__(self, rows: torch.Tensor, features: list[str]) -> None:
        super().__init__()
        self.register_buffer("rows", rows.clone())
        self.features = list(features)

    def forward(self, features: KeyedJaggedTensor | None) -> KeyedJaggedTensor | None:
        if features is None or not set(self.features) & set(features.keys()):
            return features
        keys = features.keys()
        per_value_key = torch.repeat_interleave(
            torch.arange(len(keys)), torch.tensor(features.length_per_key()), output_size=len(features.values())
        )
        is_item = torch.isin(per_value_key, torch.tensor([i for i, k in enumerate(keys) if k in self.features]))
        values = features.values()
        mapped = self.rows[values.clamp(0, len(self.rows) - 1)]
        return KeyedJaggedTensor(keys=keys, values=torch.where(is_item, mapped, values), lengths=features.lengths())
