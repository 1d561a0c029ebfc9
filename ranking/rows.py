"""Training rows from the feature store, point-in-time correct (ranking/spec.py).

One row per labelled event: Feast joins, for each (user_id, item_id,
event_timestamp), the latest feature row of every view of the feature service
stamped at or before the event. Behaviour rows are stamped 1 us after the
events they count, so a row never sees its own label (pipelines/features.py).

    rows = load_training_rows(Path("feature_repo"), events)                      # default SID version
    rows = load_training_rows(Path("feature_repo"), events, service=spec.sid_service(version),
                              expected_tokenizer_version=version)             # any published version
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipelines.features import from_micros, to_micros
from pipelines.schema import DataError, require_columns
from ranking import spec

log = logging.getLogger(__name__)

# Entity rows per get_historical_features call: bounds the memory of one
# answer (the as-of join itself grows like n log n, pipelines/offline_store.py).
MAX_ENTITY_ROWS = 2_000_000


def _feature_store(repo: Path):
    # Imported here: feast takes seconds to import and most ranker runs read cached rows.
    from feast import FeatureStore

    if not (Path(repo) / "feature_store.yaml").is_file():
        raise DataError(f"{repo}: no feature_store.yaml; pass the Feast repository (default feature_repo)")
    return FeatureStore(repo_path=str(repo))


def _feature_service(store, repo: Path, service: str):
    """The named service, or a DataError listing the services (one per published SID version)."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(service)
    except FeatureServiceNotFoundException:
        known = sorted(s.name for s in store.list_feature_services())
        raise DataError(
            f"{repo}: no feature service '{service}' (published: {known}); publish its SID version with "
            f"`python -m pipelines.features --sid-version V` and `python -m pipelines.publish`"
        ) from None


def time_chunks(entity_df: pd.DataFrame, max_rows: int = MAX_ENTITY_ROWS) -> list[np.ndarray]:
    """Row positions in time order, cut into consecutive ranges of at most ``max_rows``."""
    order = np.argsort(entity_df["event_timestamp"].to_numpy(), kind="stable")
    return np.split(order, np.arange(max_rows, len(order), max_rows))


def _check_versions(rows: pd.DataFrame, repo: Path, service: str, expected: str | None) -> None:
    versions = rows[spec.TOKENIZER_VERSION]
    if versions.isna().any():
        missing = rows.loc[versions.isna(), "row_id"]
        raise DataError(
            f"{repo}: {len(missing)} rows (e.g. row_id {missing.iloc[0]}) got no SID from the item SID view: their "
            f"event_timestamp precedes the SID table's stamp; stamp the SID version at or before the first event "
            f"and re-run `python -m pipelines.features` and `python -m pipelines.publish`"
        )
    found = sorted(versions.unique())
    if expected is not None and found != [expected]:
        raise DataError(
            f"{repo}: feature service '{service}' serves SIDs of tokenizer_version {found}, expected '{expected}'; "
            f"ask for service '{spec.sid_service(expected)}', or publish that version with "
            f"`python -m pipelines.features --sid-version {expected}` and `python -m pipelines.publish`"
        )


def load_training_rows(
    repo: Path,
    events: pd.DataFrame,
    *,
    service: str = spec.FEATURE_SERVICE,
    expected_tokenizer_version: str | None = None,
    max_rows_per_call: int = MAX_ENTITY_ROWS,
) -> pd.DataFrame:
    """Join the feature service onto labelled events, one row per event, sorted by ``row_id``.

    Args:
        repo: the Feast repository, already published (``pipelines.publish``).
        events: rows with ``spec.ENTITY_COLUMNS`` (row_id, user_id, item_id,
            event_timestamp, label); other columns are ignored.
        service: feature service name.
        expected_tokenizer_version: if given, every row's SID must come from it.
        max_rows_per_call: entity rows per retrieval; larger inputs go in time chunks.

    Returns:
        ``spec.ENTITY_COLUMNS`` plus the service's features. Rows without an
        earlier behaviour row hold NaN counts and None lists.

    Raises:
        DataError: missing columns, rows lost or duplicated by the store, a
            row without SID, or a tokenizer version other than the expected one.
    """
    require_columns(events, spec.ENTITY_COLUMNS, "events")
    if events["row_id"].duplicated().any():
        repeated = events.loc[events["row_id"].duplicated(), "row_id"].iloc[0]
        raise DataError(f"events: column 'row_id' repeats {repeated}; row ids must be unique")
    entity_df = events[list(spec.ENTITY_COLUMNS)].reset_index(drop=True)
    # The duckdb store holds microseconds and refuses (ArrowInvalid) entity
    # timestamps with a sub-us part; the features were grouped floored too.
    entity_df["event_timestamp"] = from_micros(to_micros(entity_df["event_timestamp"]))
    store = _feature_store(repo)
    features = _feature_service(store, repo, service)
    chunks = time_chunks(entity_df, max_rows_per_call)
    parts = []
    for positions in tqdm(chunks, desc="feast rows", unit="chunk", disable=len(chunks) == 1):
        part = entity_df.iloc[np.sort(positions)]
        parts.append(store.get_historical_features(entity_df=part, features=features).to_df())
    rows = pd.concat(parts, ignore_index=True).sort_values("row_id", ignore_index=True)
    # The `file` offline store silently collapses rows sharing (key, timestamp): never trust the count.
    expected_ids = np.sort(entity_df["row_id"].to_numpy())
    if len(rows) != len(entity_df) or not np.array_equal(rows["row_id"].to_numpy(), expected_ids):
        raise DataError(
            f"{repo}: the offline store returned {len(rows)} rows for {len(entity_df)} events; use the duckdb "
            f"offline store (feature_store.yaml) and unique row_id values"
        )
    # Hand back the caller's timestamps, not the floored ones.
    rows["event_timestamp"] = events.set_index("row_id")["event_timestamp"].loc[rows["row_id"]].reset_index(drop=True)
    _check_versions(rows, repo, service, expected_tokenizer_version)
    log.info("%d training rows from service %s (%d calls)", len(rows), service, len(chunks))
    return rows


def online_features(
    repo: Path, user_id: int, item_ids: list[int], *, service: str = spec.FEATURE_SERVICE
) -> pd.DataFrame:
    """Latest materialized features of one user against candidate items (serving path).

    Returns:
        One row per item id, in the given order, with ``user_id``, ``item_id``
        and the service's features.
    """
    store = _feature_store(repo)
    entity_rows = [{"user_id": int(user_id), "item_id": int(item)} for item in item_ids]
    return store.get_online_features(features=_feature_service(store, repo, service), entity_rows=entity_rows).to_df()
