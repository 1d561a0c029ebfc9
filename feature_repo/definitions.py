"""Feast objects of the SID ranker: entities, sources, feature views, services.

Declarative only: `python -m features.publish` writes the tables into data/
and runs `feast apply`; the ranker asks for a feature service by name.
Sources use absolute paths beside this file because the duckdb offline store
reads a relative path from the working directory, not from the repo.

SID versions: data/sid_versions.json (written by the publish step) lists every
published tokenizer version V with its Feast-safe name N. Each gets its own
sources (data/item_sids/N.parquet, data/user_sid_history/N.parquet), views
(`item_sid_N_fv`, `user_sid_history_N_fv`) and service `ranker_N`, so
publishing a new version never removes an older one; `ranker_v1` serves the
default version.
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


def _published(name: str) -> dict:
    # Written by the publish step; `feast apply` alone has nothing to declare.
    path = DATA / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run `python -m features.publish --dataset D`, not `feast apply`")
    return json.loads(path.read_text())


# Profile columns differ per dataset (none for Amazon); the feature pipeline records them.
PROFILE_COLUMNS = sorted(_published("feature_meta.json")["user_profile"])
SID_VERSIONS = _published("sid_versions.json")

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

# Event and positive counts and the last 20 positive items of a user.
user_behaviour_fv = FeatureView(
    name="user_behaviour_fv",
    entities=[user],
    ttl=NEVER_EXPIRES,
    schema=[
        Field(name="user_count", dtype=Int64),
        Field(name="user_pos_count", dtype=Int64),
        Field(name="hist_items", dtype=Array(Int64)),
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

# The views every service shares.
SHARED_VIEWS = [
    view for view in (user_behaviour_fv, item_behaviour_fv, user_profile_fv, item_content_fv) if view is not None
]


def _sid_version_objects(version: str, name: str) -> dict[str, object]:
    """Sources, views and service of one SID version, keyed by their names."""
    tags = {"sid_version": version}
    # The P semantic-ID codes of an item and the tokenizer version that produced them, stamped when valid.
    item_sid_source = FileSource(
        name=f"item_sid_{name}_source", path=str(DATA / "item_sids" / f"{name}.parquet"),
        timestamp_field="event_timestamp", tags=tags,
    )
    item_sid_fv = FeatureView(
        name=f"item_sid_{name}_fv",
        entities=[item],
        ttl=NEVER_EXPIRES,
        schema=[Field(name="sid_codes", dtype=Array(Int64)), Field(name="sid_version", dtype=String)],
        source=item_sid_source,
        tags=tags,
    )
    # The depth-1 and depth-2 SID prefixes of a user's recent positive items, stamped as user_behaviour.
    history_source = FileSource(
        name=f"user_sid_history_{name}_source", path=str(DATA / "user_sid_history" / f"{name}.parquet"),
        timestamp_field="event_timestamp", tags=tags,
    )
    history_fv = FeatureView(
        name=f"user_sid_history_{name}_fv",
        entities=[user],
        ttl=NEVER_EXPIRES,
        schema=[Field(name="hist_sid_p1", dtype=Array(Int64)), Field(name="hist_sid_p2", dtype=Array(Int64))],
        source=history_source,
        tags=tags,
    )
    # Everything a ranker trained on this SID version reads.
    service = FeatureService(name=f"ranker_{name}", features=[*SHARED_VIEWS, item_sid_fv, history_fv], tags=tags)
    return {obj.name: obj for obj in (item_sid_source, item_sid_fv, history_source, history_fv, service)}


SID_OBJECTS = {
    version: _sid_version_objects(version, entry["name"]) for version, entry in SID_VERSIONS["versions"].items()
}
# Feast collects module attributes only: one attribute per object, named as the object.
globals().update({name: obj for objects in SID_OBJECTS.values() for name, obj in objects.items()})
_DEFAULT = SID_OBJECTS[SID_VERSIONS["default"]]

# Everything the default ranker configuration reads: the default SID version.
ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[*SHARED_VIEWS, *(obj for obj in _DEFAULT.values() if isinstance(obj, FeatureView))],
    tags={"sid_version": SID_VERSIONS["default"]},
)
