"""The ingested-dataset core every source reader shares.

Every source reader (MovieLens, Amazon, synthetic) returns an
:class:`IngestedDataset` with dense ids; :func:`write_dataset` applies the
evaluation protocol (``temporal`` or ``item-cold``, see sidrank/protocol.py:
sort, ``row_id``, 80/10/10 split, held-out train rows removed), validates
everything and only then writes the dataset as one unit
(:func:`sidrank.io.publish_unit`: events, items, users and meta.json appear
together under a manifest written last; a killed or failing run leaves the
old unit or one every later stage refuses). Precomputed modalities are a
second unit in ``modalities/`` that records the dataset unit's digest.
Later stages' folders (``sids/``, ``features/``) are left in place: each
records the digest of the dataset unit it was built from, so after a
re-ingest that changes the data they are refused as stale until rebuilt.
The folder name carries the protocol (``ml-100k``, ``ml-100k-item-cold``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sidrank.io import publish_unit, write_json, write_npy, write_parquet
from sidrank.contract import DatasetPaths
from sidrank.protocol import POSITIVE_RATING, TEMPORAL, apply_protocol, cold_item_ids, dataset_folder_name
from sidrank.schema import SPLITS, DataError, require_utc_timestamps, validate_events, validate_modality

log = logging.getLogger(__name__)

EVENT_OUTPUT_COLUMNS = ("row_id", "user_id", "item_id", "label", "rating", "event_timestamp", "split")
ITEM_BASE_COLUMNS = ("item_id", "raw_item_id", "title", "tags", "year")
# Unix seconds after 2100-01-01 are almost surely milliseconds or microseconds.
MAX_UNIX_SECONDS = 4_102_444_800
# MovieLens and Amazon rate 1..5 stars; anything else (a typo, a sentinel, inf) is refused.
RATING_SCALE = (1.0, 5.0)
# Two events of one user on one item at one timestamp are one event logged twice.
EVENT_KEY = ("user_id", "item_id", "event_timestamp")


def sorted_vocabulary(raw_ids: pd.Series) -> pd.Index:
    """Unique raw ids in a deterministic order: numeric when all are digits, else lexicographic.

    Dense id = position + 1, so MovieLens ids 1..n map onto themselves and the
    mapping never depends on the order of lines in the input file.
    """
    unique = pd.Series(raw_ids.astype(str).unique())
    if len(unique) and unique.str.fullmatch(r"\d+").all():
        # The string breaks ties between "007" and "7", so line order never matters.
        return pd.Index(sorted(unique, key=lambda raw: (int(raw), raw)), dtype=object)
    return pd.Index(np.sort(unique.to_numpy()), dtype=object)


def dense_ids(raw_ids: pd.Series, vocabulary: pd.Index, source: str, column: str, vocabulary_file: str) -> np.ndarray:
    """Map raw ids to dense int64 ids 1..len(vocabulary); unknown ids are a DataError."""
    positions = vocabulary.get_indexer(raw_ids.astype(str))
    if (positions < 0).any():
        unknown = raw_ids[positions < 0].astype(str).unique()[:5].tolist()
        raise DataError(
            f"{source}: column '{column}' has ids {unknown} that are not in {vocabulary_file}; "
            f"pass files from the same dataset release"
        )
    return positions.astype(np.int64) + 1


def first_rows(mask: np.ndarray, count: int = 5) -> list[int]:
    """The first ``count`` row positions where ``mask`` holds, for an error message."""
    return np.flatnonzero(mask)[:count].tolist()


def numeric_column(values: pd.Series, source: str, column: str, what: str, fix: str) -> pd.Series:
    """``values`` as numbers; a missing or non-numeric one is a DataError naming ``what`` and the ``fix``."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna().to_numpy()
    if bad.any():
        rows = first_rows(bad)
        raise DataError(f"{source}: column '{column}' has missing or non-numeric {what} (rows {rows}); {fix}")
    return numbers


def parse_ratings(values: pd.Series, source: str, column: str) -> np.ndarray:
    """Ratings as float64 on RATING_SCALE; missing, non-numeric or off-scale values are a DataError."""
    ratings = numeric_column(values, source, column, "ratings", "drop those rows").to_numpy(dtype=np.float64)
    low, high = RATING_SCALE
    outside = ~((ratings >= low) & (ratings <= high))
    if outside.any():
        raise DataError(
            f"{source}: column '{column}' has ratings outside the scale {low:g}..{high:g} (rows {first_rows(outside)}, "
            f"e.g. {ratings[outside][0]!r}); fix or drop those rows"
        )
    return ratings


def drop_repeated_events(events: pd.DataFrame, source: str) -> tuple[pd.DataFrame, int]:
    """``events`` without rows that repeat an earlier row's (user, item, timestamp), and how many were dropped.

    A repeat is the same event logged twice; kept, it would count twice in
    every behaviour feature and appear in two splits. The first row is kept
    and a warning names the source and the count.
    """
    repeated = events.duplicated(list(EVENT_KEY), keep="first").to_numpy()
    dropped = int(repeated.sum())
    if dropped:
        log.warning(
            "%s: dropped %d events repeating an earlier event's (user, item, timestamp) (first at rows %s); "
            "deduplicate the file to silence this", source, dropped, first_rows(repeated),
        )  # fmt: skip
    return events.loc[~repeated].reset_index(drop=True), dropped


def parse_unix_seconds(values: pd.Series, source: str, column: str) -> pd.Series:
    """Unix seconds -> tz-aware UTC timestamps (datetime64[ns, UTC])."""
    seconds = numeric_column(values, source, column, "unix times", "fix or drop them")
    outside = ((seconds < 0) | (seconds >= MAX_UNIX_SECONDS)).to_numpy()
    if outside.any():
        raise DataError(
            f"{source}: column '{column}' has values outside 1970..2100 as unix seconds (rows {first_rows(outside)}); "
            f"convert milliseconds to seconds"
        )
    return pd.to_datetime(seconds, unit="s", utc=True).astype("datetime64[ns, UTC]")


def make_events(
    user_id: np.ndarray,
    item_id: np.ndarray,
    rating: np.ndarray,
    event_timestamp: pd.Series,
    label: np.ndarray | None = None,
) -> pd.DataFrame:
    """Event frame before the protocol; ``label`` defaults to rating >= POSITIVE_RATING."""
    if label is None:
        label = (rating >= POSITIVE_RATING).astype(np.int64)
    return pd.DataFrame(
        {
            "user_id": np.asarray(user_id, dtype=np.int64),
            "item_id": np.asarray(item_id, dtype=np.int64),
            "label": np.asarray(label, dtype=np.int64),
            "rating": np.asarray(rating, dtype=np.float64),
            "event_timestamp": pd.Series(event_timestamp).reset_index(drop=True),
        }
    )


@dataclass
class IngestedDataset:
    """What a source reader hands to :func:`write_dataset`.

    Args:
        name: dataset folder name under the output root.
        events: ``user_id``, ``item_id``, ``label``, ``rating``, ``event_timestamp`` (any order).
        items: ``item_id`` (dense 1..n), ``raw_item_id``, ``title``, ``tags``, ``year`` (+ extras).
        users: ``user_id`` (dense 1..n), ``raw_user_id`` and the profile columns (strings).
        profile_columns: the user profile column names.
        source: provenance for meta.json (``kind`` plus file names and sha256).
        events_file: the input file named in event errors.
        modalities: precomputed ``name -> float32[n_items + 1, d]`` (synthetic only).
    """

    name: str
    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    profile_columns: list[str]
    source: dict[str, Any]
    events_file: str
    modalities: dict[str, np.ndarray] = field(default_factory=dict)


def _check_tables(dataset: IngestedDataset) -> None:
    """Reader invariants: dense ids 1..n and the item / user columns of the contract."""
    for df, column in ((dataset.items, "item_id"), (dataset.users, "user_id")):
        ids = df[column].to_numpy()
        assert ids.dtype == np.int64 and np.array_equal(ids, np.arange(1, len(df) + 1)), f"{column} is not dense 1..n"
    assert set(ITEM_BASE_COLUMNS) <= set(dataset.items.columns), "items lack contract columns"
    assert set(dataset.profile_columns) <= set(dataset.users.columns), "users lack profile columns"


def _protocol_events(dataset: IngestedDataset, protocol: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Validate timestamps, apply ``protocol`` and check the events contract.

    Returns:
        The events to write and the protocol's meta.json entries (with the
        count of repeated events dropped, :func:`drop_repeated_events`).
    """
    source = dataset.events_file
    require_utc_timestamps(dataset.events, "event_timestamp", source)
    unique, dropped = drop_repeated_events(dataset.events, source)
    events, entries = apply_protocol(unique, len(dataset.items), protocol, source)
    entries = {**entries, "dropped_repeated_events": dropped}
    events["event_timestamp"] = events["event_timestamp"].astype("datetime64[ns, UTC]")
    validate_events(events, source)
    assert int(events["user_id"].max()) <= len(dataset.users), "event user outside the users table"
    assert int(events["item_id"].max()) <= len(dataset.items), "event item outside the items table"
    return events.loc[:, list(EVENT_OUTPUT_COLUMNS)], entries


def _meta(dataset: IngestedDataset, folder: str, events: pd.DataFrame, entries: dict[str, Any]) -> dict[str, Any]:
    split_rows = events["split"].value_counts()
    meta = {
        "dataset": folder,
        "n_users": len(dataset.users),
        "n_items": len(dataset.items),
        "n_events": len(events),
        "split_rows": {split: int(split_rows.get(split, 0)) for split in SPLITS},
        "positive_rate": float(events["label"].mean()),
        "user_profile_columns": list(dataset.profile_columns),
        "positive_rating": POSITIVE_RATING,
        "source": dataset.source,
        "precomputed_modalities": bool(dataset.modalities),
        **entries,
    }
    # The cold set through the same function every later stage asks, so the counts here are the evaluated ones.
    cold = np.isin(events["item_id"].to_numpy(), cold_item_ids(meta, events, f"{folder}/meta.json"))
    cold_rows = events.loc[cold, "split"].value_counts()
    meta["cold_items"] = {
        "n_items_with_rows": int(len(np.unique(events.loc[cold, "item_id"]))),
        "rows": {split: int(cold_rows.get(split, 0)) for split in SPLITS},
    }
    return meta


def write_dataset(dataset: IngestedDataset, out: str | Path, protocol: str = TEMPORAL) -> dict[str, Any]:
    """Apply the protocol, validate, and write the dataset folder as one unit.

    Nothing is written unless every check passes; the unit's manifest is
    written last, so only a complete dataset is ever accepted downstream.

    Args:
        dataset: what a source reader returned.
        out: output root.
        protocol: ``temporal`` or ``item-cold``; the folder is
            ``<out>/<dataset_folder_name(dataset.name, protocol)>``.

    Returns:
        The meta.json content.
    """
    folder = dataset_folder_name(dataset.name, protocol)
    paths = DatasetPaths(Path(out) / folder)
    _check_tables(dataset)
    events, entries = _protocol_events(dataset, protocol)
    for name, array in dataset.modalities.items():
        validate_modality(name, array, len(dataset.items), f"{dataset.name} modality '{name}'")
    meta = _meta(dataset, folder, events, entries)

    with publish_unit(paths.root) as staging:
        staged = DatasetPaths(staging)
        write_parquet(dataset.items, staged.items)
        write_parquet(dataset.users, staged.users)
        write_parquet(events, staged.events)
        write_json(meta, staged.meta)
    if dataset.modalities:
        with publish_unit(paths.modalities, built_from=paths.built_from_dataset()) as staging:
            for name, array in dataset.modalities.items():
                write_npy(array, staging / paths.modality(name).name)
            manifest = {
                "names": list(dataset.modalities),
                "dims": {name: int(array.shape[1]) for name, array in dataset.modalities.items()},
                "source": dataset.source["kind"],
            }
            write_json(manifest, staging / paths.modality_manifest.name)
    rows, cold = meta["split_rows"], meta["cold_items"]["rows"]
    held = meta.get("held_out")
    removed = f", {held['removed_train_rows']} train rows of {held['n_items']} held-out items removed" if held else ""
    print(
        f"{folder} ({meta['protocol']}): {meta['n_events']} events (train {rows['train']} / valid {rows['valid']} / "
        f"test {rows['test']}{removed}), cold rows valid {cold['valid']} / test {cold['test']}, "
        f"{meta['n_users']} users, {meta['n_items']} items, positive rate {meta['positive_rate']:.4f} -> {paths.root}"
    )
    return meta
