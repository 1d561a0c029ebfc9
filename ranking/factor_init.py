"""User and item tables initialised from co-occurrence factors of the train rows.

A GBDT on counts and rates cannot tell how close a candidate is to the items a
user liked before; the DLRM can (the dot product of the candidate's row with
the pooled history bag), but rows learned from scratch on the CTR loss mostly
learn each item's bias. Starting ``t_item`` and ``t_user`` from a truncated SVD
of the train user x item matrix (who rated what, labels unused, so the init
cannot carry any row's label) gives those dot products co-watching geometry
from the first step, the model-side form of an item-factor similarity feature.

Only train rows enter the factors (the protocol's train split), so valid and
test events and the cold items' held-out rows never do; ids without a train
row start at zero. The factor rows' scale is ``scale`` times TorchRec's
default init std (``--factor-scale``, chosen on valid AUC).

    weights = cowatch_weights(train_events, tables, dim=16, seed=0)
    load_table_weights(dmp, weights)  # every rank, after DistributedModelParallel
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import svds

from sidrank import contract
from sidrank.schema import is_sid_code_column
from ranking.sid_init import default_init_std
from ranking.tables import SparseTable, item_prefix_buckets

log = logging.getLogger(__name__)

def cowatch_factors(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, dim: int, seed: int):
    """Rank-``dim`` SVD of the binary user x item matrix of the given events.

    Returns:
        (user factors [n_users, dim], item factors [n_items, dim]), each side
        U sqrt(S) / V sqrt(S), rows L2-normalised so the dot products are
        cosines; rows of ids without an event are zero.
    """
    matrix = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=(n_users, n_items))
    matrix.data[:] = 1.0  # repeated (user, item) pairs count once
    k = min(dim, min(matrix.shape) - 1)
    if k < 1:
        raise ValueError(f"co-watch factors need at least 2 users and 2 items, got {matrix.shape}")
    v0 = np.random.default_rng(seed).standard_normal(min(matrix.shape))
    u, s, vt = svds(matrix, k=k, v0=v0)
    order = np.argsort(-s)
    u, s, vt = u[:, order], s[order], vt[order]
    # The sign of each singular pair is arbitrary: fix it so the result is reproducible.
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    u, vt = u * signs, vt * signs[:, None]
    sides = []
    # An id without an event has a numerically-zero SVD row: zero it rather than normalise noise.
    for factors, events in ((u * np.sqrt(s), matrix.getnnz(axis=1)), (vt.T * np.sqrt(s), matrix.getnnz(axis=0))):
        norms = np.linalg.norm(factors, axis=1, keepdims=True)
        usable = (events[:, None] > 0) & (norms > 0)
        sides.append(np.divide(factors, norms, out=np.zeros_like(factors), where=usable))
    return sides[0], sides[1]


def unit_rows_to_table(factors: np.ndarray, rows: int, dim: int, std: float) -> torch.Tensor:
    """[rows, D] table: the rows with a non-zero factor from it, at entry std ``std``; the others zero.

    An id the train rows never saw (a user or item new in valid or test, the
    unknown row) starts at zero, so it adds nothing to the interaction until
    trained instead of a random vector the factor scale would magnify.
    """
    table = torch.zeros(rows, dim)
    norms = np.linalg.norm(factors, axis=1)
    seen = np.flatnonzero(norms > 0)
    block = torch.zeros(len(seen), dim)
    block[:, : factors.shape[1]] = torch.from_numpy(factors[seen] / norms[seen, None]).float()
    # Unit rows have entry std 1/sqrt(D).
    table[torch.from_numpy(seen)] = block * (std * math.sqrt(dim))
    return table


def sum_factor_rows(factors: np.ndarray, keys: np.ndarray, rows: int) -> np.ndarray:
    """[rows, k] sum of the item factors that share each key (row); direction only matters."""
    out = np.zeros((rows, factors.shape[1]))
    np.add.at(out, keys, factors)
    return out


def sid_factor_rows(
    item_factors: np.ndarray, sids: pd.DataFrame, tables: Sequence[SparseTable], codebook_size: int
) -> dict[str, np.ndarray]:
    """SID table rows as the mean co-watch factor of the train items holding each code or prefix.

    A held-out (cold) item has no factor of its own, but its SID prefixes
    start where the train items of similar content sit, so a cold candidate
    is close to a history of items like it from the first step.

    Args:
        item_factors: [n_items + 1, k] (zero rows for items without train events).
        sids: one SID version's ``item_id`` and ``sid_0..sid_{L-1}`` columns.
        tables: the model's tables; ``t_sid_<l>`` and every table of
            ``sid_prefix_<d>`` / ``hist_sid_p<d>`` features get rows.
        codebook_size: K.

    Returns:
        table name -> [num_embeddings, k] summed factors (zero rows: no train item).
    """
    positions = sorted((c for c in sids.columns if is_sid_code_column(c)), key=lambda c: int(c[4:]))
    codes = sids[positions].to_numpy(np.int64)
    factors = item_factors[sids["item_id"].to_numpy()]
    depth_of = {f"sid_prefix_{d}": d for d in range(1, len(positions) + 1)}
    depth_of.update({name: d for d, name in enumerate(contract.HIST_SID_PREFIXES, start=1)})
    out = {}
    for table in tables:
        if table.name.startswith("t_sid_") and table.features == (f"sid_{table.name[6:]}",):
            out[table.name] = sum_factor_rows(factors, codes[:, int(table.name[6:])] + 1, table.num_embeddings)
            continue
        depths = sorted({depth_of[f] for f in table.features if f in depth_of})
        if depths:
            by_depth = item_prefix_buckets(codes[:, : max(depths)], codebook_size, table.num_embeddings)
            keys = np.concatenate([by_depth[d - 1] for d in depths])
            out[table.name] = sum_factor_rows(np.tile(factors, (len(depths), 1)), keys, table.num_embeddings)
    return out


def cowatch_weights(
    train_events: pd.DataFrame,
    tables: Sequence[SparseTable],
    dim: int,
    n_users: int,
    n_items: int,
    *,
    seed: int,
    scale: float = 1.0,
    sids: pd.DataFrame | None = None,
    codebook_size: int = 0,
) -> dict[str, torch.Tensor]:
    """Initial weights of ``t_user`` / ``t_item`` (and, given ``sids``, the SID tables) from co-watch factors.

    Args:
        train_events: the protocol's train rows (``user_id``, ``item_id``).
        tables: the model's tables (``ranking.tables.sparse_tables``).
        dim: D, the table width.
        n_users: the feature meta's user count (ids 1..n_users).
        n_items: the feature meta's item count: every item a SID row may name, cold ones too.
        seed: seeds the SVD start vector.
        scale: entry std of the factor rows as a multiple of TorchRec's default init std.
        sids: the SID version's item codes; None leaves the SID tables to their own init.
        codebook_size: K of ``sids``.

    Returns:
        table name -> [num_embeddings, D] float32, identical on every rank.
    """
    sizes = {t.name: t.num_embeddings for t in tables}
    user_f, item_f = cowatch_factors(
        train_events["user_id"].to_numpy(), train_events["item_id"].to_numpy(), n_users + 1, n_items + 1, dim, seed
    )
    rows = {name: f for name, f in (("t_user", user_f), ("t_item", item_f)) if name in sizes}
    if sids is not None:
        rows.update(sid_factor_rows(item_f, sids, tables, codebook_size))
    weights = {}
    for name, factors in rows.items():
        std = default_init_std(sizes[name]) * scale
        weights[name] = unit_rows_to_table(factors, sizes[name], dim, std)
        seen = int((np.abs(factors).sum(axis=1) > 0).sum())
        log.info("%s: %d of %d rows from co-watch factors (rank %d)", name, seen, sizes[name], factors.shape[1])
    return weights
