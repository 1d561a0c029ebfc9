"""Feast definitions of the SID ranker: entities, sources, feature views and the ranker's feature service.

Declarations only, so `feast plan` and `feast apply` work on a fresh checkout.
The parquet tables under data/ are written by
`python -m features.publish --dataset D --repo feature_repo`, which then runs
`feast apply` and `feast materialize`.

Source paths are relative to this folder: the project's offline store
(features/offline_store.py) and online store (features/online_store.py)
resolve them against the repository, so a copy of the folder works wherever
it lies and from any working directory (`feast -c <repo> ...`).
"""

from datetime import timedelta

import numpy as np
import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, Project, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Float64, Int64, String

# A ttl of 0 never expires a row, offline and online: counts and profiles stay
# valid until a newer row replaces them.
NEVER_EXPIRES = timedelta(0)

# The project; its name must match feature_store.yaml.
project = Project(name="sidrank", description="CTR ranking with multimodal semantic IDs")

# A user: join key of the user behaviour, profile and SID-history views.
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="Dense user id from 1, assigned by the ingest step",
)

# An item: join key of the item behaviour, content and SID views.
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="Dense item id from 1, assigned by the ingest step",
)

# A tokenizer version: the SID views hold every published version side by side
# and a request names the one it wants, so a new version never hides an older one.
sid_version = Entity(
    name="sid_version",
    join_keys=["sid_version"],
    value_type=ValueType.STRING,
    description="Semantic-ID tokenizer version, e.g. rqvae-822439f417 (see data/sid_versions.json)",
)

# Causal user state after all events <= t, stamped t + 1 us so an event never sees its own label.
user_behaviour_source = FileSource(
    name="user_behaviour_source",
    path="data/user_behaviour.parquet",
    timestamp_field="event_timestamp",
    description="User event counts and recent positive items, one row per user and event time",
)

# Causal item counts after all events <= t, stamped t + 1 us.
item_behaviour_source = FileSource(
    name="item_behaviour_source",
    path="data/item_behaviour.parquet",
    timestamp_field="event_timestamp",
    description="Item event counts, one row per item and event time",
)

# Static profile ids, stamped 1970-01-01; 0 where the dataset has no such column.
user_profile_source = FileSource(
    name="user_profile_source",
    path="data/user_profile.parquet",
    timestamp_field="event_timestamp",
    description="Vocabulary ids of the user profile columns, one row per user",
)

# Static tag ids and release-year buckets, stamped 1970-01-01.
item_content_source = FileSource(
    name="item_content_source",
    path="data/item_content.parquet",
    timestamp_field="event_timestamp",
    description="Tag ids and release-year bucket, one row per item",
)

# SID codes of every published tokenizer version, stamped when the version became valid.
item_sid_source = FileSource(
    name="item_sid_source",
    path="data/item_sids.parquet",
    timestamp_field="event_timestamp",
    description="Semantic-ID codes, one row per item and SID version",
)

# SID prefixes of the users' recent positive items, per version, stamped as user_behaviour.
user_sid_history_source = FileSource(
    name="user_sid_history_source",
    path="data/user_sid_history.parquet",
    timestamp_field="event_timestamp",
    description="SID prefixes of hist_items, one row per user, event time and SID version",
)

# Event and positive counts and the recent positive items of a user.
user_behaviour_fv = FeatureView(
    name="user_behaviour_fv",
    entities=[user],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="user_count", dtype=Int64, description="Events of the user before the row"),
        Field(name="user_pos_count", dtype=Int64, description="Positive events of the user before the row"),
        Field(name="hist_items", dtype=Array(Int64), description="Last 20 positive item ids, most recent first"),
    ],
    source=user_behaviour_source,
    description="Causal behaviour of a user: counts and recent positive items",
)

# Event and positive counts of an item.
item_behaviour_fv = FeatureView(
    name="item_behaviour_fv",
    entities=[item],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="item_id", dtype=Int64),
        Field(name="item_count", dtype=Int64, description="Events of the item before the row"),
        Field(name="item_pos_count", dtype=Int64, description="Positive events of the item before the row"),
    ],
    source=item_behaviour_source,
    description="Causal behaviour of an item: event and positive counts",
)

# Profile ids of a user (0 = unknown): the profile columns of every ingest source (MovieLens,
# synthetic; Amazon has none), 0 where a dataset lacks the column.
user_profile_fv = FeatureView(
    name="user_profile_fv",
    entities=[user],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="age_id", dtype=Int64, description="Age group id, 0 unknown"),
        Field(name="gender_id", dtype=Int64, description="Gender id, 0 unknown"),
        Field(name="occupation_id", dtype=Int64, description="Occupation id, 0 unknown"),
        Field(name="zip_code_id", dtype=Int64, description="Zip-code prefix id, 0 unknown"),
        Field(name="segment_id", dtype=Int64, description="Synthetic user segment id, 0 unknown"),
    ],
    source=user_profile_source,
    description="Static user profile ids; the ranker reads the columns its dataset has (feature meta)",
)

# Tag ids and release-year bucket of an item.
item_content_fv = FeatureView(
    name="item_content_fv",
    entities=[item],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="item_id", dtype=Int64),
        Field(name="tag_ids", dtype=Array(Int64), description="Tag ids from 1"),
        Field(name="year_bucket", dtype=Int64, description="5-year release bucket, 0 unknown"),
    ],
    source=item_content_source,
    description="Static item content: tags and release-year bucket",
)

# The semantic ID of an item under one tokenizer version.
item_sid_fv = FeatureView(
    name="item_sid_fv",
    entities=[item, sid_version],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="item_id", dtype=Int64),
        Field(name="sid_version", dtype=String),
        Field(name="sid_codes", dtype=Array(Int64), description="One code per level, each in [0, codebook size)"),
    ],
    source=item_sid_source,
    description="Semantic-ID codes of an item, keyed by item and SID version",
)

# The depth-1 and depth-2 SID prefixes of a user's recent positive items under one tokenizer version.
user_sid_history_fv = FeatureView(
    name="user_sid_history_fv",
    entities=[user, sid_version],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="sid_version", dtype=String),
        Field(name="hist_sid_p1", dtype=Array(Int64), description="Encoded depth-1 SID prefixes of hist_items"),
        Field(name="hist_sid_p2", dtype=Array(Int64), description="Encoded depth-2 SID prefixes of hist_items"),
    ],
    source=user_sid_history_source,
    description="SID prefixes of a user's recent positive items, keyed by user and SID version",
)

# Everything the ranker reads; requests name user_id, item_id and sid_version.
ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[
        user_behaviour_fv,
        item_behaviour_fv,
        user_profile_fv,
        item_content_fv,
        item_sid_fv,
        user_sid_history_fv,
    ],
    description="Features of the DLRM/DCN ranker, for any published SID version",
)


# The ranker's dense inputs (ranking.batches.DENSE_FEATURES) computed at read time from the raw
# counts, so a `feast serve` client gets model inputs; missing counts read as 0, as in the ranker.
# log_* = log1p(count), *_pos_rate = (pos + a) / (count + a + b), log_hist_len = log1p(len(hist_items)).
# The fields carry no description: Feast checks them against the ones it infers by running the function.
@on_demand_feature_view(
    sources=[user_behaviour_fv, item_behaviour_fv],
    schema=[
        Field(name="log_user_count", dtype=Float64),
        Field(name="log_user_pos_count", dtype=Float64),
        Field(name="log_item_count", dtype=Float64),
        Field(name="log_item_pos_count", dtype=Float64),
        Field(name="user_pos_rate", dtype=Float64),
        Field(name="item_pos_rate", dtype=Float64),
        Field(name="log_hist_len", dtype=Float64),
    ],
    mode="pandas",
    description="The ranker's dense inputs: log1p counts, smoothed positive rates, log1p history length",
)
def ranker_dense_inputs(features: pd.DataFrame) -> pd.DataFrame:
    # Feast runs this function from its source alone, without the module's globals. The priors
    # are the ranker's defaults (ranking.tables.FeatureConfig; tests/features/test_redis_store.py).
    rate_prior_pos, rate_prior_neg = 1.0, 1.0

    def count(name: str) -> pd.Series:
        return features[name].astype("float64").fillna(0)

    def rate(positives: pd.Series, events: pd.Series) -> pd.Series:
        return (positives + rate_prior_pos) / (events + rate_prior_pos + rate_prior_neg)

    user, user_pos, item, item_pos = (count(n) for n in ("user_count", "user_pos_count", "item_count", "item_pos_count"))
    # A missing history is None online and NaN offline.
    hist_len = features["hist_items"].map(lambda items: len(items) if isinstance(items, (list, np.ndarray)) else 0)
    return pd.DataFrame({
        "log_user_count": np.log1p(user),
        "log_user_pos_count": np.log1p(user_pos),
        "log_item_count": np.log1p(item),
        "log_item_pos_count": np.log1p(item_pos),
        "user_pos_rate": rate(user_pos, user),
        "item_pos_rate": rate(item_pos, item),
        "log_hist_len": np.log1p(hist_len.astype("float64")),
    })
