"""Feast's duckdb offline store with an as-of point-in-time join.

Feast's own duckdb store (ibis) joins every entity row to *every* earlier
feature row of its key and keeps the latest with a window: a user or item
with n events costs ~n^2/2 joined rows, which at 10M events with popular
items means billions of rows. DuckDB's ``ASOF LEFT JOIN`` finds the latest
feature row per entity row by a sort-merge, so the join grows like
n log n. The feature views, their sources, ttl, field mappings and join-key
maps are read from Feast's registry as the stock store reads them.

Relative source paths are read against the repository (``repo_path``), here
and in ``feast materialize``: the stock duckdb store reads them against the
working directory, so a repository declaring ``data/x.parquet`` would only
work when run from its own folder. Everything else is Feast's duckdb store
unchanged.

Semantics equal the stock join (tests/test_offline_store.py compares them):
for each entity row, the feature row of the same join key with the greatest
timestamp <= the entity's event_timestamp (ties broken by the created
timestamp), or nulls when there is none or it is older than the view's ttl.

Selected in ``feature_repo/feature_store.yaml``::

    offline_store:
        type: features.offline_store.AsofDuckDBOfflineStore
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from feast import FeatureView, FileSource
from feast.data_source import DataSource
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig

from sidrank.schema import DataError

STORE_TYPE = "features.offline_store.AsofDuckDBOfflineStore"


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """The duckdb store's options plus bounds on the join's own duckdb session."""

    type: Literal["features.offline_store.AsofDuckDBOfflineStore"] = STORE_TYPE
    # The sort-merge spills past this instead of taking the host's memory.
    memory_limit: str = "8GB"
    max_temp_directory_size: str = "16GB"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def parquet_path(source: DataSource, repo_path: Path, what: str) -> str:
    """The file of a parquet FileSource, a relative path taken from the repository folder."""
    path = getattr(source, "path", None)
    if not isinstance(source, FileSource) or not path or not str(path).endswith(".parquet"):
        raise DataError(
            f"{what}: the as-of offline store reads parquet FileSources only, got {source!r}; "
            f"use a FileSource with a .parquet path or the stock 'duckdb' offline store"
        )
    return FileSource.get_uri_for_file_path(repo_path, str(path))


def in_repo(source: DataSource, config: RepoConfig) -> DataSource:
    """``source`` with its path resolved against the repository (a copy; the registry's object is left alone)."""
    resolved = copy.deepcopy(source)
    resolved.file_options.uri = parquet_path(source, Path(config.repo_path), f"data source '{source.name}'")
    return resolved


def _view_select(view: FeatureView, features: list[str], repo_path: Path, alias: str) -> tuple[str, list[str]]:
    """SQL of one view's rows (renamed to registry names, one row per key and time) and its join keys."""
    source = view.batch_source
    what = f"feature view '{view.name}'"
    # field_mapping maps source column -> feature name.
    to_source = {new: old for old, new in source.field_mapping.items()}
    keys = list((view.projection.join_key_map or {e.name: e.name for e in view.entity_columns}).keys())
    columns = [f"{_quote(to_source.get(c, c))} AS {_quote(c)}" for c in [*keys, *features]]
    ts = _quote(to_source.get(source.timestamp_field, source.timestamp_field))
    created = to_source.get(source.created_timestamp_column, source.created_timestamp_column)
    dedup = ""
    if created:
        # The as-of join keeps an arbitrary row among equal timestamps: keep the latest-created one first.
        partition = ", ".join(_quote(to_source.get(k, k)) for k in keys)
        dedup = f"QUALIFY row_number() OVER (PARTITION BY {partition}, {ts} ORDER BY {_quote(created)} DESC) = 1"
    sql = (
        f"{alias} AS (SELECT {', '.join(columns)}, CAST({ts} AS TIMESTAMPTZ) AS __ts "
        f"FROM read_parquet({_literal(parquet_path(source, repo_path, what))}) {dedup})"
    )
    return sql, keys


def historical_sql(
    views: list[FeatureView], feature_refs: list[str], entity_columns: list[str], timestamp_col: str,
    repo_path: Path, full_feature_names: bool,
) -> str:
    """One query: the entity table as-of joined to every view, in entity row order."""
    ctes = ["entity AS (SELECT * FROM entity_df)"]
    joins, outputs = [], []
    for i, view in enumerate(views):
        prefix = view.projection.name_to_use()
        features = [ref.split(":", 1)[1] for ref in feature_refs if ref.split(":", 1)[0] == prefix]
        if not features:
            continue
        alias = f"fv{i}"
        sql, keys = _view_select(view, features, repo_path, alias)
        ctes.append(sql)
        key_map = view.projection.join_key_map or {k: k for k in keys}
        on = [f"entity.{_quote(key_map[k])} = {alias}.{_quote(k)}" for k in keys]
        on.append(f"entity.{_quote(timestamp_col)} >= {alias}.__ts")
        joins.append(f"ASOF LEFT JOIN {alias} ON {' AND '.join(on)}")
        base = view.projection.name_alias or view.name
        fresh = "TRUE"
        if view.ttl and view.ttl.total_seconds() > 0:
            micros = int(view.ttl.total_seconds() * 1_000_000)
            fresh = f"{alias}.__ts >= entity.{_quote(timestamp_col)} - INTERVAL {micros} MICROSECONDS"
        for feature in features:
            name = f"{base}__{feature}" if full_feature_names else feature
            outputs.append(f"CASE WHEN {fresh} THEN {alias}.{_quote(feature)} END AS {_quote(name)}")
    select = ", ".join([*(f"entity.{_quote(c)}" for c in entity_columns), *outputs])
    return f"WITH {', '.join(ctes)} SELECT {select} FROM entity {' '.join(joins)} ORDER BY entity.__row"


class AsofRetrievalJob(RetrievalJob):
    """Runs the as-of query in its own duckdb session when the rows are asked for."""

    def __init__(
        self, sql: str, entity_df: pd.DataFrame, config: AsofDuckDBOfflineStoreConfig, full_feature_names: bool,
        on_demand_feature_views: list[OnDemandFeatureView], metadata: RetrievalMetadata,
    ) -> None:
        super().__init__()
        self.sql, self.entity_df, self.config = sql, entity_df, config
        self._full_feature_names = full_feature_names
        self._on_demand_feature_views = on_demand_feature_views
        self._metadata = metadata

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        # A spill folder per query: concurrent retrievals must not share (and delete) each other's spill files.
        spill = tempfile.mkdtemp(prefix="sidrank-duckdb-")
        try:
            with duckdb.connect() as con:
                con.execute("SET TimeZone = 'UTC'")
                con.execute(f"SET memory_limit = {_literal(self.config.memory_limit)}")
                con.execute(f"SET temp_directory = {_literal(spill)}")
                con.execute(f"SET max_temp_directory_size = {_literal(self.config.max_temp_directory_size)}")
                # The entity rows' own order, explicit: a window over the registered frame promises none.
                con.register("entity_df", self.entity_df.assign(__row=np.arange(len(self.entity_df))))
                return con.sql(self.sql).to_arrow_table()
        finally:
            shutil.rmtree(spill, ignore_errors=True)

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout).to_pandas(types_mapper=None)

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._on_demand_feature_views

    @property
    def metadata(self) -> RetrievalMetadata | None:
        return self._metadata

    def persist(self, storage, allow_overwrite: bool = False, timeout: int | None = None):
        raise NotImplementedError("the as-of offline store does not save datasets; call to_df() and write it")


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    """DuckDB offline store whose ``get_historical_features`` is an as-of join and whose paths are the repo's."""

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        return DuckDBOfflineStore.pull_latest_from_table_or_query(
            config, in_repo(data_source, config), join_key_columns, feature_name_columns, timestamp_field,
            created_timestamp_column, start_date, end_date,
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> RetrievalJob:
        return DuckDBOfflineStore.pull_all_from_table_or_query(
            config, in_repo(data_source, config), join_key_columns, feature_name_columns, timestamp_field,
            created_timestamp_column, start_date, end_date,
        )

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
        registry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        if not isinstance(entity_df, pd.DataFrame):
            raise DataError("the as-of offline store takes an entity DataFrame, not a SQL query; read it into pandas")
        if filter_by_created_timestamp:
            raise DataError("the as-of offline store does not filter by created timestamp; use the 'duckdb' store")
        timestamp_col = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes)))
        stamps = entity_df[timestamp_col]
        sql = historical_sql(
            feature_views, feature_refs, list(entity_df.columns), timestamp_col, Path(config.repo_path),
            full_feature_names,
        )
        odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
        metadata = RetrievalMetadata(
            features=feature_refs,
            keys=[c for c in entity_df.columns if c != timestamp_col],
            min_event_timestamp=stamps.min(),
            max_event_timestamp=stamps.max(),
        )
        return AsofRetrievalJob(sql, entity_df, config.offline_store, full_feature_names, odfvs, metadata)
