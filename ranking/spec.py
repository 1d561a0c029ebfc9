"""The training-row contract between the feature store and the ranker.

Training rows are what ``get_historical_features`` returns for the feature
service (one row per labelled event, re-sorted by ``row_id``). The feature
pipeline writes ``features/feature_meta.json`` (table sizes); the ranker reads
it and never imports ``feature_repo``.

Missing values after the point-in-time join are legitimate (a user or item
with no earlier events has no behaviour row yet): counts read as 0 and lists
as empty. A missing SID is an error (every item has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FEATURE_SERVICE = "ranker_v1"
FEATURE_META_FILE = "feature_meta.json"

# Columns carried from the entity dataframe.
ENTITY_COLUMNS = ("row_id", "user_id", "item_id", "event_timestamp", "label")

# Causal behaviour counts (events strictly before the row), log1p-scaled by the ranker.
USER_COUNT_COLUMNS = ("user_count", "user_pos_count")
ITEM_COUNT_COLUMNS = ("item_count", "item_pos_count")

# Scalar categorical ids from the item content view (0 = unknown).
ITEM_SCALAR_COLUMNS = ("year_bucket",)

# int64 list features.
ITEM_TAGS = "tag_ids"  # 1..n_tags
SID_CODES = "sid_codes"  # L codes in [0, K)
HIST_ITEMS = "hist_items"  # last HISTORY_LENGTH positive item ids, most recent first
HIST_SID_PREFIXES = ("hist_sid_p1", "hist_sid_p2")  # encoded SID prefixes of hist_items, depth 1 and 2
HISTORY_LENGTH = 20

TOKENIZER_VERSION = "tokenizer_version"


def encode_prefix(codes: "list[int] | tuple[int, ...]", codebook_size: int) -> int:
    """Mixed-radix integer of a SID prefix: (c0, c1, ..) -> c0 * K + c1 ...

    The depth is carried by the feature name, so equal integers at different
    depths never meet in one table without the depth being hashed in too.
    """
    value = 0
    for code in codes:
        value = value * codebook_size + int(code)
    return value


@dataclass
class FeatureMeta:
    """Table sizes the ranker needs, written by the feature pipeline.

    Args:
        n_users: user ids are 1..n_users.
        n_items: item ids are 1..n_items.
        n_tags: tag ids are 1..n_tags.
        n_year_buckets: year_bucket ids are 0..n_year_buckets - 1.
        sid_levels: number of code positions L.
        sid_codebook_size: codes per position K.
        tokenizer_version: the SID version the features were built from.
        user_profile: feature column (``<profile column>_id``) -> vocabulary
            size (ids 0..V-1, 0 unknown).
        events_sha256: sha256 of the events.parquet the features were built
            from, so a ranker pointed at another dataset's events refuses to train.
    """

    n_users: int
    n_items: int
    n_tags: int
    n_year_buckets: int
    sid_levels: int
    sid_codebook_size: int
    tokenizer_version: str
    user_profile: dict[str, int] = field(default_factory=dict)
    events_sha256: str = ""
