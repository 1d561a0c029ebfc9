"""The as-of offline store returns exactly what Feast's stock duckdb store returns.

A small Feast repository built in code: two views on one entity, one with a
ttl, a field mapping and a created-timestamp column with tied event
timestamps; entity rows before, between, on and after feature rows, unknown
keys and repeated (key, timestamp) rows. Both stores answer the same
``get_historical_features`` call; the frames must be equal.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.repo_config import RepoConfig
from feast.types import Array, Int64

from features.offline_store import STORE_TYPE

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def _store(root: Path, offline_type: str) -> FeatureStore:
    config = RepoConfig(
        project="asoftest",
        provider="local",
        registry=str(root / "registry.db"),
        offline_store={"type": offline_type},
        online_store={"type": "sqlite", "path": str(root / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(root),
    )
    return FeatureStore(config=config)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FeatureView], pd.DataFrame]:
    root = tmp_path_factory.mktemp("asof")
    rng = np.random.default_rng(0)
    n = 400
    stamps = T0 + pd.to_timedelta(rng.integers(0, 30, n), unit="D") + pd.to_timedelta(rng.integers(0, 3, n), unit="h")
    counts = pd.DataFrame({
        "user_id": rng.integers(1, 12, n),
        "event_timestamp": stamps.astype("datetime64[us, UTC]"),
        # Ties on (user, time) are broken by the created stamp, as Feast does.
        "created": (T0 + pd.to_timedelta(rng.permutation(n), unit="s")).astype("datetime64[us, UTC]"),
        "count": rng.integers(0, 100, n),
        "src_total": rng.integers(0, 1000, n),
        "recent": [list(rng.integers(0, 9, rng.integers(0, 4))) for _ in range(n)],
    })
    counts.to_parquet(root / "counts.parquet")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    source = FileSource(
        name="counts", path=str(root / "counts.parquet"), timestamp_field="event_timestamp",
        created_timestamp_column="created", field_mapping={"src_total": "total"},
    )
    fresh = FeatureView(
        name="fresh", entities=[user], ttl=timedelta(days=3), source=source,
        schema=[Field(name="count", dtype=Int64), Field(name="recent", dtype=Array(Int64))],
    )
    forever = FeatureView(
        name="forever", entities=[user], ttl=timedelta(0), source=source, schema=[Field(name="total", dtype=Int64)],
    )
    _store(root, "duckdb").apply([user, fresh, forever])
    m = 300
    entity = pd.DataFrame({
        "row_id": np.arange(m),
        "user_id": rng.integers(0, 14, m),  # 0, 12, 13: no feature rows
        "event_timestamp": (T0 + pd.to_timedelta(rng.integers(-2, 34, m), unit="D")).astype("datetime64[us, UTC]"),
    })
    # Some entity rows exactly on feature stamps: the join is inclusive.
    entity.loc[:40, "event_timestamp"] = counts["event_timestamp"].iloc[:41].to_numpy()
    entity.loc[:40, "user_id"] = counts["user_id"].iloc[:41].to_numpy()
    return root, [fresh, forever], entity


def _rows(store: FeatureStore, entity: pd.DataFrame, full_names: bool) -> pd.DataFrame:
    features = ["fresh:count", "fresh:recent", "forever:total"]
    rows = store.get_historical_features(entity_df=entity, features=features, full_feature_names=full_names).to_df()
    rows = rows.sort_values("row_id", ignore_index=True)
    for column in [c for c in rows.columns if c.endswith("recent")]:
        rows[column] = [tuple(int(v) for v in x) if x is not None and not np.isscalar(x) else None for x in rows[column]]
    for column in [c for c in rows.columns if c.endswith(("count", "total"))]:
        rows[column] = rows[column].astype("Float64")
    return rows[sorted(rows.columns)]


@pytest.mark.parametrize("full_names", [False, True])
def test_asof_join_equals_the_stock_duckdb_join(repo, full_names: bool) -> None:
    root, _, entity = repo
    stock = _rows(_store(root, "duckdb"), entity, full_names)
    asof = _rows(_store(root, STORE_TYPE), entity, full_names)
    assert len(asof) == len(entity)
    pd.testing.assert_frame_equal(asof, stock)
    prefix = "fresh__" if full_names else ""
    # The case mix really happened: expired by ttl, kept forever, unknown users.
    assert asof[f"{prefix}count"].isna().sum() > asof[f"{'forever__' if full_names else ''}total"].isna().sum() > 0

