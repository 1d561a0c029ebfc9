"""The ranker's embedding tables: which sparse features it reads, and which table each one looks up.

Sparse features and their tables (ids are validated when encoded, since
TorchRec silently zeroes ids outside a table):

- ``user_id`` -> ``t_user`` (n_users + 1) (``use_user_id``)
- ``item_id`` and ``hist_items`` -> one shared ``t_item`` (n_items + 1), so a
  history item and a candidate item are the same vector (``use_item_id``)
- each user-profile column in use -> its own table of the vocabulary size
- ``tag_ids`` bag -> ``t_tag`` (n_tags + 1); ``year_bucket`` -> ``t_year``
  (``use_item_content``)
- SIDs (``use_sid``): ``sid_<l>`` per code position (K + 1, code + 1, 0 =
  unknown); prefix n-grams ``sid_prefix_<d>`` and the history prefixes
  ``hist_sid_p1`` / ``hist_sid_p2``, hashed by :func:`prefix_bucket` into
  ``t_sid_prefix``, so an item's prefix and the same prefix in a user's
  history share one embedding.

``history="pooled"`` sums every list into one vector per row
(EmbeddingBagCollection); ``history="attention"`` keeps the candidate's item
id and prefixes and the history's unpooled (EmbeddingCollection) for target
attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from sidrank import contract
from sidrank.schema import DataError

HISTORY_MODES = ("pooled", "attention")
MIN_PREFIX_BUCKETS = 4096
PREFIX_BUCKETS_PER_ITEM = 4

# splitmix64 constants (Steele et al. 2014): a fixed integer hash, identical on
# every rank and run, unlike Python's salted hash().
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


class SparseTable(NamedTuple):
    """One embedding table: its name, row count, the features that look it up, and how.

    ``pooled`` tables sum each feature's ids into one vector per row
    (EmbeddingBagCollection); the others return every id's vector
    (EmbeddingCollection), which target attention needs for the history.
    """

    name: str
    num_embeddings: int
    features: tuple[str, ...]
    pooled: bool = True


@dataclass
class FeatureConfig:
    """Which sparse features the ranker sees and how dense ones are smoothed.

    Args:
        use_user_id: the user id table (under the global time split most
            test users have no train rows, docs/architecture.md).
        use_item_id: item id and history item bag (one shared table).
        use_sid: SID code positions, hashed prefixes and history prefix bags.
        use_item_content: the item's tag (genre) bag and release-year bucket;
            off, a cold item is known to the model only through its SID
            (if any) and its behaviour counts.
        prefix_buckets: rows of the hashed prefix table; None means
            ``max(MIN_PREFIX_BUCKETS, PREFIX_BUCKETS_PER_ITEM * n_items)``.
        rate_prior_pos: pseudo-positives ``a`` of the smoothed rates.
        rate_prior_neg: pseudo-negatives ``b`` of the smoothed rates.
        history: ``pooled`` sums the history items (and their SID prefixes)
            into bags; ``attention`` looks them up one by one, in the tables
            the candidate item and its prefixes use, for target attention.
        profile_columns: user-profile columns to use; None means all of the
            feature meta's.
    """

    use_user_id: bool = True
    use_item_id: bool = True
    use_sid: bool = True
    use_item_content: bool = True
    prefix_buckets: int | None = None
    rate_prior_pos: float = 1.0
    rate_prior_neg: float = 1.0
    history: str = field(default="pooled", metadata={"choices": HISTORY_MODES})
    profile_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {HISTORY_MODES}, got {self.history!r}")
        if self.profile_columns is not None:
            self.profile_columns = tuple(self.profile_columns)
        if self.prefix_buckets is not None and self.prefix_buckets < 1:
            raise ValueError(f"prefix_buckets must be >= 1 or None, got {self.prefix_buckets}")
        for name in ("rate_prior_pos", "rate_prior_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def n_prefix_buckets(self, meta: contract.FeatureMeta) -> int:
        """Rows of the hashed SID prefix table for this dataset."""
        if self.prefix_buckets is not None:
            return self.prefix_buckets
        return max(MIN_PREFIX_BUCKETS, PREFIX_BUCKETS_PER_ITEM * meta.n_items)


def prefix_bucket(values: np.ndarray, depth: int, buckets: int) -> np.ndarray:
    """Hash encoded SID prefixes of one depth into ``[0, buckets)``.

    Args:
        values: [N] non-negative ``contract.encode_prefix`` integers.
        depth: prefix length; mixed in so equal integers of different depths
            land in unrelated buckets.
        buckets: table rows.

    Returns:
        [N] int64 bucket ids.
    """
    # Python ints for the scalar product: numpy warns on scalar uint64 overflow.
    x = np.asarray(values, dtype=np.uint64) + np.uint64(depth * _GOLDEN % 2**64)
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(buckets)).astype(np.int64)


def item_prefix_buckets(codes: np.ndarray, codebook_size: int, buckets: int) -> list[np.ndarray]:
    """[N, L] SID codes -> L arrays [N]: the bucket of each item's depth-d prefix, d = 1..L."""
    out, prefix = [], np.zeros(len(codes), np.int64)
    for depth in range(1, codes.shape[1] + 1):
        prefix = prefix * codebook_size + codes[:, depth - 1]  # mixed radix, as contract.encode_prefix
        out.append(prefix_bucket(prefix, depth, buckets))
    return out


def profile_columns(meta: contract.FeatureMeta, cfg: FeatureConfig) -> dict[str, int]:
    """The user-profile feature columns in use -> vocabulary size."""
    if cfg.profile_columns is None:
        return dict(meta.user_profile)
    unknown = sorted(set(cfg.profile_columns) - set(meta.user_profile))
    if unknown:
        raise DataError(f"profile_columns {unknown}: not in the feature meta's {sorted(meta.user_profile)}")
    return {column: meta.user_profile[column] for column in cfg.profile_columns}


def history_depths(meta: contract.FeatureMeta) -> int:
    """SID prefix depths the feature store keeps for history items (1..this)."""
    return len(contract.HIST_SID_PREFIXES[: meta.sid_levels])


def sparse_tables(meta: contract.FeatureMeta, cfg: FeatureConfig) -> list[SparseTable]:
    """The embedding tables of a feature selection, in KJT key order (pooled tables first).

    Under ``history="attention"`` the candidate's item id and its SID
    prefixes of depth 1..``history_depths`` share unpooled tables with the
    same features of every history item, so one row learns from both roles;
    deeper candidate prefixes stay pooled.
    """
    attention = cfg.history == "attention"
    tables = [SparseTable("t_user", meta.n_users + 1, ("user_id",))] if cfg.use_user_id else []
    if cfg.use_item_id:
        tables.append(SparseTable("t_item", meta.n_items + 1, ("item_id", contract.HIST_ITEMS), pooled=not attention))
    tables += [SparseTable(f"t_{col}", size, (col,)) for col, size in profile_columns(meta, cfg).items()]
    if cfg.use_item_content:
        tables.append(SparseTable("t_tag", meta.n_tags + 1, (contract.ITEM_TAGS,)))
        tables.append(SparseTable("t_year", meta.n_year_buckets, ("year_bucket",)))
    if cfg.use_sid:
        L, K, buckets = meta.sid_levels, meta.sid_codebook_size, cfg.n_prefix_buckets(meta)
        tables += [SparseTable(f"t_sid_{lvl}", K + 1, (f"sid_{lvl}",)) for lvl in range(L)]
        history = contract.HIST_SID_PREFIXES[:L]
        if attention:
            shared = tuple(f"sid_prefix_{d}" for d in range(1, history_depths(meta) + 1))
            tables.append(SparseTable("t_sid_prefix", buckets, shared + history, pooled=False))
            deep = tuple(f"sid_prefix_{d}" for d in range(history_depths(meta) + 1, L + 1))
            tables += [SparseTable("t_sid_prefix_deep", buckets, deep)] if deep else []
        else:
            prefixes = tuple(f"sid_prefix_{d}" for d in range(2, L + 1))
            tables.append(SparseTable("t_sid_prefix", buckets, prefixes + history))
    return sorted(tables, key=lambda table: not table.pooled)
