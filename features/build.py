"""Causal behaviour features and static item/user tables for the feature store.

    python -m features.build --dataset artifacts/ml-100k [--sid-version LATEST]

Reads the dataset folder (events, items, users, meta.json and one SID version)
and writes ``<dataset>/features/``:

- ``user_behaviour.parquet``: user_id, event_timestamp, user_count,
  user_pos_count, hist_items.
- ``item_behaviour.parquet``: item_id, event_timestamp, item_count, item_pos_count.
- ``user_profile.parquet``: user_id, event_timestamp, one ``<col>_id`` per profile column.
- ``item_content.parquet``: item_id, event_timestamp, tag_ids, year_bucket.
- ``item_sids.parquet``: item_id, event_timestamp, sid_codes, sid_version.
- ``user_sid_history.parquet``: user_id, event_timestamp (the stamps of
  user_behaviour), hist_sid_p1, hist_sid_p2: the SID prefixes of hist_items.
- ``feature_meta.json``: :class:`sidrank.contract.FeatureMeta` plus ``vocabularies``
  (feature column -> values; the value at index i has id i + 1).

The folder is one unit (:func:`sidrank.io.publish_unit`) recording the
dataset unit and the SID version unit it was built from; ``features.publish``
refuses it when incomplete or stale (:meth:`DatasetPaths.require_features`).

The behaviour tables come from ``features.behaviour`` (causal counts and
histories, stamped just after the events they count).

The last two tables depend on the SID version; ``features.publish`` stores
them per version (``sidrank.contract.SID_VERSION_TABLES``) so publishing a new
version keeps the older ones retrievable. The other four are shared.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sidrank.cli import add_config_arguments, parse_config, parser_for, run_main
from sidrank.io import atomic_path, file_sha256, publish_unit, read_json, write_json
from sidrank.schema import (
    DataError,
    from_micros,
    require_columns,
    require_int_ids,
    to_micros,
    validate_events,
    validate_sids,
)
from sidrank.contract import DatasetPaths
from sidrank import contract
from features.behaviour import int_list_array, int_list_column, item_behaviour, sid_prefix_lookups, user_behaviour

log = logging.getLogger(__name__)

PROG = "python -m features.build"
STATIC_TIMESTAMP = pd.Timestamp("1970-01-01", tz="UTC")
AGE_BUCKET_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
AGE_BUCKET_NAMES = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
YEAR_BUCKET_WIDTH = 5
ZIP_PREFIX_CHARS = 3
SHARED_TABLES = ("user_behaviour", "item_behaviour", "user_profile", "item_content")
TABLES = SHARED_TABLES + contract.SID_VERSION_TABLES


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to parquet atomically: microsecond timestamps, no pandas metadata.

    duckdb reads nanosecond UTC parquet timestamps as TIMESTAMPTZ_NS, which
    Feast's materialize cannot cast to TIMESTAMP. pandas stores Arrow list
    dtypes in its metadata under a name its own reader cannot parse; without
    the metadata, list columns read back as numpy arrays.
    """
    df = df.assign(**{c: df[c].dt.as_unit("us") for c in df.columns if pd.api.types.is_datetime64_any_dtype(df[c])})
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _vocab_ids(values: pd.Series, vocab: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Dense ids from 1 over ``vocab`` (default: sorted distinct non-empty values); else 0."""
    values = values.astype("string").str.strip().replace("", pd.NA)
    if vocab is None:
        vocab = sorted(values.dropna().unique())
    codes = pd.Categorical(values, categories=vocab).codes.astype(np.int64)
    return codes + 1, list(vocab)


def _profile_ids(column: str, values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Profile column -> ids; ages are bucketed and zip codes cut to their region prefix."""
    if column == "age":
        ages = pd.to_numeric(values, errors="coerce")
        buckets = np.searchsorted(AGE_BUCKET_EDGES, ages.fillna(-1).to_numpy(), side="right")
        names = pd.Series(np.asarray(AGE_BUCKET_NAMES, dtype=object)[buckets], index=values.index).where(ages.notna())
        present = set(names.dropna())
        # Keep the buckets in age order, not alphabetical.
        return _vocab_ids(names, [name for name in AGE_BUCKET_NAMES if name in present])
    if column == "zip_code":
        return _vocab_ids(values.astype("string").str.strip().str[:ZIP_PREFIX_CHARS])
    return _vocab_ids(values)


def user_profile(users: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Static user profile ids (``<col>_id``, 0 unknown) and their vocabularies."""
    frame = pd.DataFrame({"user_id": users["user_id"].to_numpy(), "event_timestamp": STATIC_TIMESTAMP})
    vocabularies = {}
    for column in columns:
        ids, vocab = _profile_ids(column, users[column])
        frame[f"{column}_id"] = ids
        vocabularies[f"{column}_id"] = vocab
    return frame, vocabularies


def item_content(items: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list]]:
    """Static item tag ids (vocabulary from 1, first occurrence kept) and 5-year buckets (0 unknown)."""
    tags = items["tags"].reset_index(drop=True).explode().dropna().astype(str)
    tags = tags[tags != ""]
    tags = tags[~pd.MultiIndex.from_arrays([tags.index, tags.to_numpy()]).duplicated()]
    tag_ids, vocab = _vocab_ids(tags)
    lengths = np.bincount(tags.index.to_numpy(dtype=np.int64), minlength=len(items))
    offsets = np.r_[0, np.cumsum(lengths)]
    years = items["year"].to_numpy(dtype=np.int64)
    known = years > 0
    base = int(years[known].min()) // YEAR_BUCKET_WIDTH * YEAR_BUCKET_WIDTH if known.any() else 0
    buckets = np.where(known, (years - base) // YEAR_BUCKET_WIDTH + 1, 0).astype(np.int64)
    frame = pd.DataFrame(
        {
            "item_id": items["item_id"].to_numpy(),
            "event_timestamp": STATIC_TIMESTAMP,
            contract.ITEM_TAGS: int_list_column([int_list_array(offsets, tag_ids)]),
            "year_bucket": buckets,
        }
    )
    starts = [base + YEAR_BUCKET_WIDTH * b for b in range(int(buckets.max(initial=0)))]
    return frame, {contract.ITEM_TAGS: vocab, "year_bucket": starts}


def item_sids(sids: pd.DataFrame, code_columns: list[str]) -> pd.DataFrame:
    """One row per item: its L codes as a list, stamped when the SID version became valid."""
    codes = sids[code_columns].to_numpy(dtype=np.int64)
    levels = len(code_columns)
    offsets = np.arange(0, codes.size + 1, levels, dtype=np.int64)
    return pd.DataFrame(
        {
            "item_id": sids["item_id"].to_numpy(),
            "event_timestamp": from_micros(to_micros(sids["event_timestamp"])),
            contract.SID_CODES: int_list_column([int_list_array(offsets, codes.ravel())]),
            contract.SID_VERSION: sids["sid_version"].astype(str).to_numpy(),
        }
    )


@dataclass
class FeaturesConfig:
    """Configuration of the feature pipeline.

    Args:
        dataset: dataset folder written by ``python -m ingest`` (sidrank.contract.DatasetPaths root).
        sid_version: SID version under ``<dataset>/sids/``, or ``LATEST`` (the one the tokenizer wrote last).
        codebook_size: codes per SID position K; only needed when the SID
            version's ``config.json`` does not record ``codebook_size``.
    """

    dataset: Path
    sid_version: str = contract.LATEST
    codebook_size: int | None = None

    def __post_init__(self) -> None:
        self.dataset = Path(self.dataset)
        if not self.sid_version.strip() or "/" in self.sid_version:
            raise ValueError(f"sid_version={self.sid_version!r}: expected a version name or LATEST")
        if self.codebook_size is not None and self.codebook_size < 1:
            raise ValueError(f"codebook_size={self.codebook_size}: must be >= 1")


class SidTable(NamedTuple):
    """A validated SID version: rows, code columns sid_0..sid_{L-1}, codebook size K."""

    frame: pd.DataFrame
    code_columns: list[str]
    codebook_size: int


def _sid_config_value(config: dict, key: str) -> int | None:
    # The tokenizer may record its settings at the top level or under "config".
    value = config.get(key, config.get("config", {}).get(key))
    return None if value is None else int(value)


def load_sids(paths: DatasetPaths, version: str, item_ids: np.ndarray, codebook_size: int | None) -> SidTable:
    """Read and check one SID version: every item has exactly one SID, codes inside the codebook.

    The caller checks the version's unit first (:meth:`DatasetPaths.built_from_sids`).
    """
    sid_dir = paths.sid_dir(version)
    source = sid_dir / "sids.parquet"
    config_path = sid_dir / "config.json"
    config = read_json(config_path) if config_path.exists() else {}
    levels, recorded = _sid_config_value(config, "levels"), _sid_config_value(config, "codebook_size")
    if recorded is not None and codebook_size is not None and recorded != codebook_size:
        raise DataError(f"{config_path}: codebook_size={recorded} but --codebook-size {codebook_size}; drop the flag")
    size = recorded if recorded is not None else codebook_size
    if size is None:
        raise DataError(f"{config_path}: no 'codebook_size' recorded; pass --codebook-size K")
    sids = pd.read_parquet(source)
    code_columns = validate_sids(sids, size, str(source))
    expected_columns = [f"sid_{i}" for i in range(levels if levels is not None else len(code_columns))]
    if code_columns != expected_columns:
        raise DataError(f"{source}: code columns {code_columns} do not match levels={levels} in {config_path}")
    if sids["item_id"].duplicated().any():
        repeated = sids.loc[sids["item_id"].duplicated(), "item_id"].iloc[0]
        raise DataError(f"{source}: column 'item_id' repeats {repeated}; one SID per item")
    missing = np.setdiff1d(item_ids, sids["item_id"].to_numpy())
    if len(missing):
        raise DataError(
            f"{source}: items {missing[:5].tolist()} ({len(missing)} in all) have no SID; "
            f"re-run the tokenizer on all items"
        )
    unknown = np.setdiff1d(sids["item_id"].to_numpy(), item_ids)
    if len(unknown):
        raise DataError(
            f"{source}: column 'item_id' has ids {unknown[:5].tolist()} absent from items.parquet; "
            f"the SIDs belong to another dataset"
        )
    versions = sids["sid_version"].astype(str).unique()
    if len(versions) != 1:
        raise DataError(f"{source}: column 'sid_version' has values {versions[:3].tolist()}; one per table")
    return SidTable(sids.sort_values("item_id", ignore_index=True), code_columns, size)


def _load_dataset(paths: DatasetPaths) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Read events, items, users and meta.json and check that they agree (the caller checks the unit first)."""
    meta_path = paths.meta
    meta = read_json(meta_path)
    absent_keys = [key for key in ("n_users", "n_items", "user_profile_columns") if key not in meta]
    if absent_keys:
        raise DataError(f"{meta_path}: missing key(s) {absent_keys}; re-run ingest")
    events = validate_events(pd.read_parquet(paths.events), str(paths.events))
    items = pd.read_parquet(paths.items)
    users = pd.read_parquet(paths.users)
    require_columns(items, ["item_id", "tags", "year"], str(paths.items))
    require_columns(users, ["user_id", *meta["user_profile_columns"]], str(paths.users))
    for frame, column, source, size in (
        (items, "item_id", paths.items, meta["n_items"]),
        (users, "user_id", paths.users, meta["n_users"]),
    ):
        require_int_ids(frame, column, str(source))
        if frame[column].duplicated().any() or int(frame[column].max()) > size:
            raise DataError(f"{source}: column '{column}' must hold unique ids 1..{size} (meta.json); re-run ingest")
    for column, known, source in (("item_id", items, paths.items), ("user_id", users, paths.users)):
        absent = np.setdiff1d(events[column].to_numpy(), known[column].to_numpy())
        if len(absent):
            raise DataError(
                f"{paths.events}: column '{column}' has ids {absent[:5].tolist()} absent from {source}; re-run ingest"
            )
    items, users = items.sort_values("item_id", ignore_index=True), users.sort_values("user_id", ignore_index=True)
    return events, items, users, meta


def build_features(config: FeaturesConfig) -> contract.FeatureMeta:
    """Compute every feature table of one dataset and write them to ``<dataset>/features/``.

    Returns:
        The :class:`sidrank.contract.FeatureMeta` also written to ``feature_meta.json``.
    """
    paths = DatasetPaths(config.dataset)
    # Each upstream unit is hashed once, before its files are read; the digests recorded are of what was read.
    built_from_dataset = paths.built_from_dataset()
    events, items, users, meta = _load_dataset(paths)
    version = paths.resolve_sid_version(config.sid_version)
    built_from = paths.built_from_sids(version, built_from_dataset)
    sids = load_sids(paths, version, items["item_id"].to_numpy(), config.codebook_size)
    n_items, n_users = int(meta["n_items"]), int(meta["n_users"])
    log.info("events %d (positive rate %.3f), users %d, items %d, SID %s (L=%d, K=%d)", len(events),
             events["label"].mean(), n_users, n_items, version, len(sids.code_columns), sids.codebook_size)

    early = int((events["event_timestamp"] < sids.frame["event_timestamp"].min()).sum())
    if early:
        log.warning("%d events precede the SID stamp of %s: their training rows will have no SID", early, version)
    lookups = sid_prefix_lookups(sids.frame, sids.code_columns, n_items, sids.codebook_size)
    profile, profile_vocab = user_profile(users, list(meta["user_profile_columns"]))
    content, content_vocab = item_content(items)
    behaviour, sid_history = user_behaviour(events, lookups, n_items)
    tables = {
        "user_behaviour": behaviour,
        "item_behaviour": item_behaviour(events),
        "user_profile": profile,
        "item_content": content,
        "item_sids": item_sids(sids.frame, sids.code_columns),
        "user_sid_history": sid_history,
    }
    assert set(tables) == set(TABLES)

    feature_meta = contract.FeatureMeta(
        n_users=n_users,
        n_items=n_items,
        n_tags=len(content_vocab[contract.ITEM_TAGS]),
        n_year_buckets=len(content_vocab["year_bucket"]) + 1,
        sid_levels=len(sids.code_columns),
        sid_codebook_size=sids.codebook_size,
        sid_version=str(sids.frame["sid_version"].iloc[0]),
        user_profile={name: len(vocab) + 1 for name, vocab in profile_vocab.items()},
        events_sha256=file_sha256(paths.events),
    )
    with publish_unit(paths.features, built_from=built_from) as staging:
        for name, frame in tables.items():
            write_table(frame, staging / f"{name}.parquet")
            log.info("%s: %d rows", name, len(frame))
        write_json(
            {**dataclasses.asdict(feature_meta), "sid_version": version, "history_length": contract.HISTORY_LENGTH,
             "vocabularies": {**content_vocab, **profile_vocab}},
            staging / contract.FEATURE_META_FILE,
        )
    return feature_meta


def main(argv: list[str] | None = None) -> contract.FeatureMeta:
    """CLI entry: ``python -m features.build --dataset D [--sid-version V]``."""
    parser = parser_for(PROG, __doc__.splitlines()[0])
    add_config_arguments(parser, FeaturesConfig)
    config = parse_config(parser, FeaturesConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.info("config %s", dataclasses.asdict(config))
    return build_features(config)


if __name__ == "__main__":
    run_main(main, PROG)
