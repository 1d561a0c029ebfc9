"""Data contracts between stages (docs/architecture.md, "Contracts") and their checks.

Every check raises :class:`DataError` whose message names the file, the column
and the fix, so a user never has to read a traceback to learn what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")
EVENT_COLUMNS = ("row_id", "user_id", "item_id", "label", "event_timestamp", "split")
SID_META_COLUMNS = ("item_id", "sid_version", "event_timestamp", "created")


def is_sid_code_column(name: str) -> bool:
    """``sid_0``, ``sid_1``, ...: one code position of a SID table (not ``sid_version``)."""
    return re.fullmatch(r"sid_\d+", name) is not None


class DataError(ValueError):
    """Bad user input; the message says which file, which column and the fix."""


def require_file(path: str | Path, made_by: str) -> Path:
    """Return ``path`` if it exists, else raise naming the command that makes it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; create it with `{made_by}`")
    return path


def require_columns(df: "pd.DataFrame | Mapping[str, object]", columns: tuple[str, ...] | list[str],
                    source: str) -> None:
    """Raise if any of ``columns`` is absent from ``df`` (a DataFrame, or a mapping of columns)."""
    names = list(df.columns) if isinstance(df, pd.DataFrame) else list(df)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {names}. "
            f"Regenerate the file with the stage that writes it, or rename the columns."
        )


def require_int_ids(df: pd.DataFrame, column: str, source: str, *, low: int = 1) -> None:
    """Ids are integers, present and >= ``low`` (0 is reserved for padding)."""
    col = df[column]
    if col.isna().any():
        rows = df.index[col.isna()][:5].tolist()
        raise DataError(f"{source}: column '{column}' has missing values (rows {rows}); drop or fill them")
    if not pd.api.types.is_integer_dtype(col):
        raise DataError(
            f"{source}: column '{column}' has dtype {col.dtype}, expected int64; "
            f"map ids to dense integers starting at {low}"
        )
    if len(col) and int(col.min()) < low:
        raise DataError(f"{source}: column '{column}' has id {int(col.min())} < {low}; ids are dense from 1, 0 is padding")


def require_utc_timestamps(df: pd.DataFrame, column: str, source: str) -> None:
    """Timestamps must be tz-aware; naive ones are ambiguous for point-in-time joins."""
    col = df[column]
    if not pd.api.types.is_datetime64_any_dtype(col):
        raise DataError(f"{source}: column '{column}' has dtype {col.dtype}, expected a UTC datetime")
    if getattr(col.dt, "tz", None) is None:
        raise DataError(
            f"{source}: column '{column}' holds naive timestamps (no time zone); "
            f"localise them, e.g. df['{column}'] = df['{column}'].dt.tz_localize('UTC')"
        )
    if str(col.dt.tz) != "UTC":
        raise DataError(
            f"{source}: column '{column}' is in time zone {col.dt.tz}, the contract is UTC; "
            f"convert it, e.g. df['{column}'] = df['{column}'].dt.tz_convert('UTC')"
        )
    if col.isna().any():
        raise DataError(f"{source}: column '{column}' has missing timestamps; drop those rows")


def validate_events(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the events contract and that every split is non-empty."""
    require_columns(df, EVENT_COLUMNS, source)
    for column in ("user_id", "item_id"):
        require_int_ids(df, column, source)
    require_int_ids(df, "row_id", source, low=0)
    if df["row_id"].duplicated().any():
        dup = df.loc[df["row_id"].duplicated(), "row_id"].iloc[0]
        raise DataError(f"{source}: column 'row_id' is not unique (e.g. {dup}); reassign row ids")
    if not df["label"].isin([0, 1]).all():
        bad = df.loc[~df["label"].isin([0, 1]), "label"].iloc[0]
        raise DataError(f"{source}: column 'label' must be 0/1, found {bad!r}")
    require_utc_timestamps(df, "event_timestamp", source)
    unknown = set(df["split"].unique()) - set(SPLITS)
    if unknown:
        raise DataError(f"{source}: column 'split' has values {sorted(unknown)}, expected {SPLITS}")
    for split in SPLITS:
        if not (df["split"] == split).any():
            raise DataError(f"{source}: split '{split}' is empty; the dataset is too small for an 80/10/10 split")
    return df


def validate_modality(name: str, array: np.ndarray, n_items: int, source: str) -> np.ndarray:
    """Check a modality matrix: float32[n_items + 1, d], finite, row 0 padding, unit rows.

    All-zero rows are allowed and mean "modality missing for this item".
    """
    if array.ndim != 2 or array.shape[0] != n_items + 1:
        raise DataError(
            f"{source}: modality '{name}' has shape {array.shape}, expected ({n_items + 1}, d) "
            f"(row 0 padding + one row per item); re-run the embed stage"
        )
    if array.dtype != np.float32:
        raise DataError(f"{source}: modality '{name}' has dtype {array.dtype}, expected float32")
    if not np.isfinite(array).all():
        rows = np.where(~np.isfinite(array).all(axis=1))[0][:5].tolist()
        raise DataError(f"{source}: modality '{name}' has NaN/inf in rows {rows}; fix the encoder input")
    if np.abs(array[0]).max() > 0:
        raise DataError(f"{source}: modality '{name}' row 0 must be all zeros (padding)")
    norms = np.linalg.norm(array, axis=1)
    bad = np.where((norms > 0) & (np.abs(norms - 1) > 1e-3))[0]
    if len(bad):
        raise DataError(f"{source}: modality '{name}' rows {bad[:5].tolist()} are not L2-normalised")
    return array


def validate_sids(df: pd.DataFrame, codebook_size: int, source: str) -> list[str]:
    """Check a SID table; returns its code columns (``sid_0`` .. ``sid_{L-1}``)."""
    require_columns(df, SID_META_COLUMNS, source)
    require_int_ids(df, "item_id", source)
    code_columns = sorted((c for c in df.columns if is_sid_code_column(c)), key=lambda c: int(c[4:]))
    if not code_columns:
        raise DataError(f"{source}: no code columns 'sid_0'..; re-run `python -m tokenizer.train`")
    for column in code_columns:
        codes = df[column]
        if not pd.api.types.is_integer_dtype(codes):
            raise DataError(f"{source}: column '{column}' has dtype {codes.dtype}, expected int64")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
            raise DataError(
                f"{source}: column '{column}' has codes in [{int(codes.min())}, {int(codes.max())}], "
                f"outside the codebook [0, {codebook_size}); the SID table and codebooks disagree"
            )
    require_utc_timestamps(df, "event_timestamp", source)
    return code_columns


def check_ids_in_range(ids: np.ndarray, size: int, what: str) -> None:
    """Ids fed to an embedding table must lie in [0, size): TorchRec silently zeroes others."""
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise DataError(
            f"{what}: ids in [{int(ids.min())}, {int(ids.max())}] do not fit an embedding table of "
            f"{size} rows; rebuild the table sizes from the dataset's meta.json"
        )


_EPOCH = pd.Timestamp(0, tz="UTC")


def to_micros(timestamps: pd.Series) -> np.ndarray:
    """UTC timestamps -> int64 microseconds since the epoch, floored.

    Feast's duckdb offline store holds microseconds (and refuses entity
    timestamps with a sub-us part), so the features are computed at that
    precision too: two events inside one microsecond are simultaneous here
    exactly as they are in the join.
    """
    return ((timestamps - _EPOCH) // pd.Timedelta(microseconds=1)).to_numpy(dtype=np.int64)


def from_micros(micros: np.ndarray) -> pd.DatetimeIndex:
    """int64 microseconds since the epoch -> UTC timestamps."""
    return pd.to_datetime(micros, unit="us", utc=True)
