"""Feast objects of the SID ranker: entities, sources, feature views, services.

Declarative only: `python -m pipelines.publish` writes the tables into data/
and runs `feast apply`; the ranker asks for the `ranker_v1` service by name.
Sources use absolute paths beside this file because the duckdb offline store
reads a relative path from the working directory, not from the repo.
"""

import json
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, Project, ValueType
from feast.types import Array, Int64, String

DATA = Path(__file__).resolve().parent / "data"

# A ttl of 0 never expires a row, offline (the ibis/duckdb join skips the
# expiry filter when `not ttl`) and online; None is stored as 0 by the registry.
NEVER_EXPIRES = timedelta(0)


def _profile_columns() -> list[str]:
    # Profile columns differ per dataset (none for Amazon); the feature pipeline records them.
    meta = DATA / "feature_meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: not found; run `python -m pipelines.publish --dataset D`, not `feast apply`")
    return sorted(json.loads(meta.read_text())["user_profile"])


PROFILE_COLUMNS = _profile_columns()

# The project; its name must match feature_store.yaml.
project = Project(name="sidrank", description="CTR ranking with multimodal semantic IDs")

# A user; join key of the user behaviour and profile views.
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="dense user id from 1")

# An item; join key of the item behaviour, content and SID views.
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="dense item id from 1")

# Causal user state after all events <= t, stamped t + 1 us.
user_behaviour_source = FileSource(
    name="user_behaviour_source",
    path=str(DATA / "user_behaviour.parquet"),
    timestamp_field="event_timestamp",
)

# Causal item counts after all events <= t, stamped t + 1 us.
item_behaviour_source = FileSource(
    name="item_behaviour_source",
    path=str(DATA / "item_behaviour.parquet"),
    timestamp_field="event_timestamp",
)

# Static profile ids, stamped 1970-01-01.
user_profile_source = FileSource(
    name="user_profile_source",
    path=str(DATA / "user_profile.parquet"),
    timestamp_field="event_timestamp",
)

# Static tag ids and release-year buckets, stamped 1970-01-01.
item_content_source = FileSource(
    name="item_content_source",
    path=str(DATA / "item_content.parquet"),
    timestamp_field="event_timestamp",
)

# One SID version, stamped when it becomes valid.
item_sids_source = FileSource(
    name="item_sids_source",
    path=str(DATA / "item_sids.parquet"),
    timestamp_field="event_timestamp",
)

# Event and positive counts and the last 20 positive items (and their SID prefixes) of a user.
user_behaviour_fv = FeatureView(
    name="user_behaviour_fv",
    entities=[user],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="user_count", dtype=Int64),
        Field(name="user_pos_count", dtype=Int64),
        Field(name="hist_items", dtype=Array(Int64)),
        Field(name="hist_sid_p1", dtype=Array(Int64)),
        Field(name="hist_sid_p2", dtype=Array(Int64)),
    ],
    source=user_behaviour_source,
)

# Event and positive counts of an item.
item_behaviour_fv = FeatureView(
    name="item_behaviour_fv",
    entities=[item],
    ttl=NEVER_EXPIRES,
    schema=[Field(name="item_count", dtype=Int64), Field(name="item_pos_count", dtype=Int64)],
    source=item_behaviour_source,
)

# Vocabulary ids of the user profile columns (`<col>_id`); absent when the dataset has none.
user_profile_fv = (
    FeatureView(
        name="user_profile_fv",
        entities=[user],
        ttl=NEVER_EXPIRES,
        schema=[Field(name=column, dtype=Int64) for column in PROFILE_COLUMNS],
        source=user_profile_source,
    )
    if PROFILE_COLUMNS
    else None
)

# Tag ids and release-year bucket of an item.
item_content_fv = FeatureView(
    name="item_content_fv",
    entities=[item],
    ttl=NEVER_EXPIRES,
    schema=[Field(name="tag_ids", dtype=Array(Int64)), Field(name="year_bucket", dtype=Int64)],
    source=item_content_source,
)

# The L semantic-ID codes of an item and the tokenizer version that produced them.
item_sid_fv = FeatureView(
    name="item_sid_fv",
    entities=[item],
    ttl=NEVER_EXPIRES,
    schema=[Field(name="sid_codes", dtype=Array(Int64)), Field(name="tokenizer_version", dtype=String)],
    source=item_sids_source,
)

# Everything the first ranker configuration reads.
ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[
        view
        for view in (user_behaviour_fv, item_behaviour_fv, user_profile_fv, item_content_fv, item_sid_fv)
        if view is not None
    ],
)
