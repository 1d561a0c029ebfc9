"""The training-row contract between the feature store and the ranker.

Training rows are what ``get_historical_features`` returns for the feature
service (one row per labelled event, re-sorted by ``row_id``). The feature
pipeline writes ``features/feature_meta.json`` (table sizes); the ranker reads
it and never imports ``feature_repo``.

SID versions (../shared/DESIGN.md section 8): every published tokenizer
version keeps its own feature views and service ``ranker_<name>`` (see
:func:`sid_version_name`), so rows of an older version stay retrievable;
``ranker_v1`` serves the default version. The SID codes and the users'
history prefixes (``hist_sid_p1`` / ``hist_sid_p2``, which depend on the
codes) live in the per-version views; counts, profile and content are shared.

Missing values after the point-in-time join are legitimate (a user or item
with no earlier events has no behaviour row yet): counts read as 0 and lists
as empty. A missing SID is an error (every item has one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# The default service: the SID version published last (or with --set-default).
FEATURE_SERVICE = "ranker_v1"
# The default version's table sizes; every published version also has FEATURE_META_DIR/<name>.json.
FEATURE_META_FILE = "feature_meta.json"
FEATURE_META_DIR = "feature_meta"
# Published SID versions (see sid_registry_entry), read by feature_repo/definitions.py.
SID_VERSIONS_FILE = "sid_versions.json"
# Per-version tables: <repo>/data/<table>/<name>.parquet, one Feast source and view each.
SID_VERSION_TABLES = ("item_sids", "user_sid_history")

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


def sid_version_name(version: str) -> str:
    """Feast-safe name of a tokenizer version: ``rqvae-822439f417`` -> ``rqvae_822439f417``.

    Used in the per-version source, view and service names
    (``item_sid_<name>_fv``, ``user_sid_history_<name>_fv``, ``ranker_<name>``)
    and file names, so two versions that differ only in punctuation would
    collide; the publish step refuses that.
    """
    name = re.sub(r"[^0-9A-Za-z_]", "_", version.strip())
    if not name:
        raise ValueError(f"version={version!r}: expected a non-empty tokenizer version")
    return name


def sid_service(version: str) -> str:
    """The feature service that serves SID version ``version`` (shared views plus its SID views)."""
    return f"ranker_{sid_version_name(version)}"


def rows_cache_path(dataset: Path, version: str, service: str | None = None) -> Path:
    """Where ``ranking.train`` caches the Feast rows of SID ``version`` read through ``service``.

    ``<dataset>/rows/<version name>/<service>.parquet``, the service defaulting
    to the version's own (:func:`sid_service`); rows of different versions
    never share a file.
    """
    return Path(dataset) / "rows" / sid_version_name(version) / f"{service or sid_service(version)}.parquet"


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
