"""Training rows from the feature store, point-in-time correct (sidrank/contract.py).

One row per labelled event: Feast joins, for each (user_id, item_id,
sid_version, event_timestamp), the latest feature row of every view of the
feature service stamped at or before the event. Behaviour rows are stamped
1 us after the events they count, so a row never sees its own label
(features/build.py). The SID version is a key of the request, the same for
every row: the SID views hold every published version side by side. The
profile columns are those of the version's feature meta: the repository
declares more, 0 (unknown) for a dataset without them, and those are left out.

    rows = load_training_rows(Path("feature_repo"), events)                         # default SID version
    rows = load_training_rows(Path("feature_repo"), events, sid_version=version)    # any published version
    write_training_rows(Path("feature_repo"), events, Path("rows.parquet"))         # streamed, for 10M+ events
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sidrank.schema import from_micros, to_micros
from sidrank.io import atomic_path
from sidrank.schema import DataError, require_columns
from sidrank import contract

log = logging.getLogger(__name__)

# Entity rows per get_historical_features call: bounds the memory of one
# answer (the as-of join itself grows like n log n, features/offline_store.py).
MAX_ENTITY_ROWS = 2_000_000


def _feature_store(repo: Path):
    # Imported here: feast takes seconds to import and most ranker runs read cached rows.
    from feast import FeatureStore

    if not (Path(repo) / "feature_store.yaml").is_file():
        raise DataError(f"{repo}: no feature_store.yaml; pass the Feast repository (default feature_repo)")
    return FeatureStore(repo_path=str(repo))


def _feature_service(store, repo: Path, service: str):
    """The named service, or a DataError listing the repository's services."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(service)
    except FeatureServiceNotFoundException:
        known = sorted(s.name for s in store.list_feature_services())
        raise DataError(
            f"{repo}: no feature service '{service}' (applied: {known}); declare it in {repo}/definitions.py "
            f"and run `python -m features.publish --dataset D --repo {repo}`"
        ) from None


def row_chunks(row_ids: np.ndarray, max_rows: int = MAX_ENTITY_ROWS) -> list[np.ndarray]:
    """Positions of ``row_ids`` in ascending row id order, cut into consecutive ranges of at most ``max_rows``.

    Row ids ascend with time (sidrank/protocol.py), so a chunk is a time range too.
    """
    order = np.argsort(row_ids, kind="stable")
    return np.split(order, np.arange(max_rows, len(order), max_rows))


def _check_sids(rows: pa.Table, repo: Path, version: str) -> None:
    """Every row holds a SID: the version is published, so a missing one means an event before its stamp."""
    codes = rows.column(contract.SID_CODES)
    if codes.null_count:
        missing = rows.filter(codes.is_null()).column("row_id")
        raise DataError(
            f"{repo}: {len(missing)} rows (e.g. row_id {missing[0]}) got no SID of sid_version '{version}' from the "
            f"item SID view: their event_timestamp precedes the SID table's stamp; stamp the SID version at or "
            f"before the first event and re-run `python -m features.build` and `python -m features.publish`"
        )


def retrieve_rows(
    repo: Path,
    events: pd.DataFrame,
    *,
    service: str = contract.FEATURE_SERVICE,
    sid_version: str | None = None,
    max_rows_per_call: int = MAX_ENTITY_ROWS,
) -> Iterator[pa.Table]:
    """Join the feature service onto labelled events: checked Arrow chunks in ascending ``row_id``.

    Args:
        repo: the Feast repository, already published (``features.publish``).
        events: rows with ``contract.ENTITY_COLUMNS`` (row_id, user_id, item_id,
            event_timestamp, label); other columns are ignored.
        service: feature service name.
        sid_version: the published SID version whose SIDs are joined; None
            means the repository's default version.
        max_rows_per_call: entity rows per ``get_historical_features`` call
            and per chunk; Arrow keeps the list features compact.

    Yields:
        ``contract.ENTITY_COLUMNS``, ``sid_version`` and the service's
        features but the profile columns the dataset lacks, the caller's
        timestamps. Rows without an earlier behaviour row hold null counts
        and lists.

    Raises:
        DataError: missing columns, rows lost or duplicated by the store, an
            unpublished SID version or a row without SID.
    """
    require_columns(events, contract.ENTITY_COLUMNS, "events")
    if events.empty:
        raise DataError("events: no rows to retrieve features for; check the events file and its split")
    if events["row_id"].duplicated().any():
        repeated = events.loc[events["row_id"].duplicated(), "row_id"].iloc[0]
        raise DataError(f"events: column 'row_id' repeats {repeated}; row ids must be unique")
    store = _feature_store(repo)
    features = _feature_service(store, repo, service)
    meta = contract.RepoPaths(repo).feature_meta(sid_version)  # refuses an unpublished version
    version, profile = meta.sid_version, meta.user_profile
    absent = [c for c in contract.USER_PROFILE_FEATURES if c not in profile]
    entity_df = events[list(contract.ENTITY_COLUMNS)].reset_index(drop=True)
    entity_df[contract.SID_VERSION] = version
    # The duckdb store holds microseconds and refuses (ArrowInvalid) entity
    # timestamps with a sub-us part; the features were grouped floored too.
    entity_df["event_timestamp"] = from_micros(to_micros(entity_df["event_timestamp"]))
    chunks = row_chunks(entity_df["row_id"].to_numpy(), max_rows_per_call)
    for positions in tqdm(chunks, desc="feast rows", unit="chunk", disable=len(chunks) == 1):
        part = entity_df.iloc[positions]
        rows = store.get_historical_features(entity_df=part, features=features).to_arrow().sort_by("row_id")
        rows = rows.drop_columns([c for c in absent if c in rows.column_names])
        # The `file` offline store silently collapses rows sharing (key, timestamp): never trust the count.
        if len(rows) != len(part) or not np.array_equal(rows.column("row_id").to_numpy(), part["row_id"].to_numpy()):
            raise DataError(
                f"{repo}: the offline store returned {len(rows)} rows for {len(part)} events; use the as-of duckdb "
                f"offline store (feature_store.yaml) and unique row_id values"
            )
        _check_sids(rows, repo, version)
        # Hand back the caller's timestamps, not the floored ones.
        stamps = pa.array(events["event_timestamp"].iloc[positions], from_pandas=True)
        yield rows.set_column(rows.schema.get_field_index("event_timestamp"), "event_timestamp", stamps)
    log.info("%d training rows of SID version %s from service %s (%d calls)", len(entity_df), version, service,
             len(chunks))


def arrow_to_frame(rows: pa.Table) -> pd.DataFrame:
    """Arrow rows -> pandas, list columns kept as Arrow lists (a Python object per list costs ~10x)."""
    return rows.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)


def load_training_rows(repo: Path, events: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """All rows of :func:`retrieve_rows` (same arguments) in one DataFrame, sorted by ``row_id``."""
    return arrow_to_frame(pa.concat_tables(retrieve_rows(repo, events, **kwargs)))


def write_training_rows(repo: Path, events: pd.DataFrame, path: Path, **kwargs) -> int:
    """Stream :func:`retrieve_rows` (same arguments) into one parquet file, atomically; returns the row count."""
    n_rows, writer = 0, None
    with atomic_path(path) as tmp:
        try:
            for rows in retrieve_rows(repo, events, **kwargs):
                writer = writer or pq.ParquetWriter(tmp, rows.schema)
                writer.write_table(rows)
                n_rows += len(rows)
        finally:
            if writer is not None:
                writer.close()
    return n_rows


class OnlineTables(NamedTuple):
    """One batched online read: columns of the distinct users and of the distinct items asked for.

    Every column is a numpy array in the order of the ids read: int64 for
    integer features the store holds for every id, float64 with NaN where
    some ids have no row (as pandas reads Feast's None), object arrays of
    lists (None where absent) for list features, objects for strings, and
    an object array of None for a feature no id has.
    """

    users: dict[str, np.ndarray]  # column -> [U], "user_id" included
    items: dict[str, np.ndarray]  # column -> [I], "item_id" included


class StoreReadError(RuntimeError):
    """The online store failed to answer a read (connection, database, registry): worth a retry."""


# Feast value types whose online values _values/_column decode as Feast's own to_df does.
DECODED_VALUE_TYPES = frozenset({"INT32", "INT64", "FLOAT", "DOUBLE", "STRING", "BOOL",
                                 "INT32_LIST", "INT64_LIST", "FLOAT_LIST", "DOUBLE_LIST"})


def _values(vector) -> list:
    """Python values of one Feast feature vector: None where unset, a list for list values."""
    out = []
    for value in vector.values:
        kind = value.WhichOneof("val")
        if kind is None:
            out.append(None)
        elif kind.endswith("_list_val"):
            out.append(list(getattr(value, kind).val))
        else:
            out.append(getattr(value, kind))
    return out


def object_array(values: list) -> np.ndarray:
    """[N] object array of ``values`` (lists stay lists: ``np.array`` would stack equal-length ones into 2-D)."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def _column(values: list) -> np.ndarray:
    """A decoded feature column as the numpy array pandas would hold (see :class:`OnlineTables`)."""
    present = [v for v in values if v is not None]
    if not present or isinstance(present[0], (list, str)):
        return object_array(values)
    if len(present) == len(values):
        return np.array(values)
    if isinstance(present[0], bool):
        return np.array(values, dtype=object)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _decode(response) -> dict[str, np.ndarray]:
    """Feast's online response, column by column, straight from its protobuf.

    Feast's own ``to_df`` converts every value through a generic type switch
    and builds a DataFrame: about 60% of a 100-item read.
    """
    names, vectors = response.proto.metadata.feature_names.val, response.proto.results
    return {name: _column(_values(vector)) for name, vector in zip(names, vectors)}


class OnlineFeatures:
    """The serving read, with one FeatureStore and feature service for the process lifetime.

    Building a FeatureStore parses the repository and registry (seconds), so
    a server builds this once and reads a batch of requests at a time. The service's views
    are read in two Feast online reads: those keyed by the user (and the SID
    version) once per distinct user, those keyed by the item once per
    distinct item, however many (user, item) pairs a request joins.

    Args:
        repo: the Feast repository, published and materialized.
        service: feature service name.
        sid_version: the published SID version whose SIDs are read; None
            means the repository's default version.

    Raises:
        DataError: an unknown service, one with a view keyed by neither or
            both of user and item (an on-demand view included), a feature of
            a type :func:`_decode` does not handle, or two features of one name.
    """

    def __init__(self, repo: Path, service: str = contract.FEATURE_SERVICE, sid_version: str | None = None) -> None:
        self.store = _feature_store(repo)
        self.service = _feature_service(self.store, repo, service)
        self.sid_version = contract.RepoPaths(repo).published_sid_version(sid_version)
        self.references: dict[str, list[str]] = {"user_id": [], "item_id": []}
        views = {view.name: view for view in self.store.list_feature_views()}
        for projection in self.service.feature_view_projections:
            keys = set(views[projection.name].join_keys) if projection.name in views else set()
            sides = [key for key in self.references if key in keys]
            if len(sides) != 1 or not keys <= {sides[0], contract.SID_VERSION}:
                raise DataError(
                    f"{repo}: feature service '{service}' reads view '{projection.name}' keyed by "
                    f"{sorted(keys) or 'no entity'}; the ranking service reads views keyed by user_id or by item_id "
                    f"(and sid_version): declare the view so in {repo}/definitions.py"
                )
            unsupported = [f"{f.name} ({f.dtype})" for f in projection.features
                           if f.dtype.to_value_type().name not in DECODED_VALUE_TYPES]
            if unsupported:
                raise DataError(f"{repo}: view '{projection.name}' of service '{service}' has features {unsupported} "
                                f"of a type the ranking service does not decode; use {sorted(DECODED_VALUE_TYPES)}")
            self.references[sides[0]] += [f"{projection.name}:{feature.name}" for feature in projection.features]
        names = [[ref.split(":")[1] for ref in refs] for refs in self.references.values()]
        if set(names[0]) & set(names[1]) or any(len(set(n)) < len(n) for n in names):
            raise DataError(f"{repo}: feature service '{service}' has two features of one name; rename one in "
                            f"{repo}/definitions.py (the ranking service reads features by name)")

    def _read(self, key: str, ids: Sequence[int]) -> dict[str, np.ndarray]:
        if not self.references[key]:
            return {key: np.asarray(ids, dtype=np.int64)}
        rows = [{key: int(i), contract.SID_VERSION: self.sid_version} for i in ids]
        try:
            response = self.store.get_online_features(features=self.references[key], entity_rows=rows)
        except Exception as exc:  # sqlite, redis, a registry being rewritten: the store's failure, not ours
            raise StoreReadError(f"online read of {len(rows)} {key} rows failed: {type(exc).__name__}: {exc}") from exc
        columns = _decode(response)
        columns.pop(contract.SID_VERSION, None)
        return columns

    def read(self, user_ids: Sequence[int], item_ids: Sequence[int]) -> OnlineTables:
        """Latest materialized features of distinct users and of distinct items, in the given orders."""
        return OnlineTables(self._read("user_id", user_ids), self._read("item_id", item_ids))

    def __call__(self, user_id: int, item_ids: list[int]) -> pd.DataFrame:
        """Latest materialized features of one user against candidate items.

        Returns:
            One row per item id, in the given order, with ``user_id``,
            ``item_id``, ``sid_version`` and the service's features (None or
            NaN where the store has no row for the user or item).
        """
        tables = self.read([user_id], item_ids)
        zeros = np.zeros(len(item_ids), dtype=np.int64)
        users = {name: column.take(zeros) for name, column in tables.users.items()}
        return pd.DataFrame({**users, contract.SID_VERSION: self.sid_version, **tables.items})


def online_features(
    repo: Path, user_id: int, item_ids: list[int], *, service: str = contract.FEATURE_SERVICE,
    sid_version: str | None = None,
) -> pd.DataFrame:
    """One read through a fresh :class:`OnlineFeatures` (a server keeps one instead)."""
    return OnlineFeatures(repo, service, sid_version)(user_id, item_ids)
