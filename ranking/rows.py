"""Training rows from the feature store, point-in-time correct (ranking/spec.py).

One row per labelled event: Feast joins, for each (user_id, item_id,
event_timestamp), the latest feature row of every view of the feature service
stamped at or before the event. Behaviour rows are stamped 1 us after the
events they count, so a row never sees its own label (pipelines/features.py).

    rows = load_training_rows(Path("feature_repo"), events)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipelines.features import from_micros, to_micros
from pipelines.schema import DataError, require_columns
from ranking import spec

log = logging.getLogger(__name__)

# Entity rows per get_historical_features call; the duckdb join holds each
# chunk with all feature rows stamped before it, so chunks bound memory.
MAX_ENTITY_ROWS = 2_000_000


def _feature_store(repo: Path):
    # Imported here: feast takes seconds to import and most ranker runs read cached rows.
    from feast import FeatureStore

    if not (Path(repo) / "feature_store.yaml").is_file():
        raise DataError(f"{repo}: no feature_store.yaml; pass the Feast repository (default feature_repo)")
    return FeatureStore(repo_path=str(repo))


def time_chunks(timestamps: pd.Series, max_rows: int = MAX_ENTITY_ROWS) -> list[np.ndarray]:
    """Row positions split into consecutive time ranges of at most ``max_rows`` rows."""
    order = np.argsort(timestamps.to_numpy(), kind="stable")
    return np.array_split(order, max(1, math.ceil(len(order) / max_rows)))


def _check_versions(rows: pd.DataFrame, repo: Path, expected: str | None) -> None:
    versions = rows[spec.TOKENIZER_VERSION]
    if versions.isna().any():
        missing = rows.loc[versions.isna(), "row_id"]
        raise DataError(
            f"{repo}: {len(missing)} rows (e.g. row_id {missing.iloc[0]}) got no SID from item_sid_fv: their "
            f"event_timestamp precedes the SID table's stamp; stamp the SID version at or before the first event "
            f"and re-run `python -m pipelines.features` and `python -m pipelines.publish`"
        )
    found = sorted(versions.unique())
    if expected is not None and found != [expected]:
        raise DataError(
            f"{repo}: the feature store serves SIDs of tokenizer_version {found}, expected '{expected}'; "
            f"re-run `python -m pipelines.features --sid-version {expected}` and `python -m pipelines.publish`"
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
        raise DataError(f"events: column 'row_id' repeats {events.loc[events['row_id'].duplicated(), 'row_id'].iloc[0]}; row ids must be unique")
    entity_df = events[list(spec.ENTITY_COLUMNS)].reset_index(drop=True)
    # The duckdb store holds microseconds and refuses (ArrowInvalid) entity
    # timestamps with a sub-us part; the features were grouped floored too.
    entity_df["event_timestamp"] = from_micros(to_micros(entity_df["event_timestamp"]))
    store = _feature_store(repo)
    features = store.get_feature_service(service)
    chunks = time_chunks(entity_df["event_timestamp"], max_rows_per_call)
    parts = []
    for positions in tqdm(chunks, desc="feast rows", unit="chunk", disable=len(chunks) == 1):
        part = entity_df.iloc[np.sort(positions)]
        parts.append(store.get_historical_features(entity_df=part, features=features).to_df())
    rows = pd.concat(parts, ignore_index=True).sort_values("row_id", ignore_index=True)
    # The `file` offline store silently collapses rows sharing (key, timestamp): never trust the count.
    if len(rows) != len(entity_df) or not np.array_equal(rows["row_id"].to_numpy(), np.sort(entity_df["row_id"].to_numpy())):
        raise DataError(
            f"{repo}: the offline store returned {len(rows)} rows for {len(entity_df)} events; use the duckdb "
            f"offline store (feature_store.yaml) and unique row_id values"
        )
    rows["event_timestamp"] = events.set_index("row_id").loc[rows["row_id"], "event_timestamp"].to_numpy()
    _check_versions(rows, repo, expected_tokenizer_version)
    log.info("%d training rows from service %s (%d calls)", len(rows), service, len(chunks))
    return rows


def online_features(repo: Path, user_id: int, item_ids: list[int], *, service: str = spec.FEATURE_SERVICE) -> pd.DataFrame:
    """Latest materialized features of one user against candidate items (serving path).

    Returns:
        One row per item id, in the given order, with ``user_id``, ``item_id``
        and the service's features.
    """
    store = _feature_store(repo)
    entity_rows = [{"user_id": int(user_id), "item_id": int(item)} for item in item_ids]
    return store.get_online_features(features=store.get_feature_service(service), entity_rows=entity_rows).to_df()
