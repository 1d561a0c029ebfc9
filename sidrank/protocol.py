"""The evaluation protocol of ../shared/DESIGN.md section 5, in one place.

Rows are sorted by (timestamp, user_id, item_id), stable; ``row_id`` is the
position in that order; the first 80% are train, the next 10% valid, the last
10% test. Cold items are items with fewer than ``COLD_ITEM_MAX_TRAIN_ROWS``
train rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sidrank.schema import DataError

TRAIN_FRACTION = 0.8
VALID_FRACTION = 0.1
POSITIVE_RATING = 4
COLD_ITEM_MAX_TRAIN_ROWS = 5


def assign_protocol_split(events: pd.DataFrame, source: str) -> pd.DataFrame:
    """Sort by (event_timestamp, user_id, item_id), assign ``row_id`` and ``split``.

    Args:
        events: rows with ``user_id``, ``item_id``, ``event_timestamp`` (UTC).
        source: file name for error messages.

    Returns:
        A new frame in protocol order with ``row_id`` (0-based) and ``split``.
    """
    if len(events) < 10:
        raise DataError(f"{source}: {len(events)} events cannot fill train/valid/test splits; need at least 10")
    ordered = events.sort_values(["event_timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    n = len(ordered)
    n_train = int(round(n * TRAIN_FRACTION))
    n_valid = int(round(n * VALID_FRACTION))
    split = np.full(n, "test", dtype=object)
    split[:n_train] = "train"
    split[n_train : n_train + n_valid] = "valid"
    ordered.insert(0, "row_id", np.arange(n, dtype=np.int64))
    ordered["split"] = split
    return ordered


def train_item_counts(events: pd.DataFrame, n_items: int) -> np.ndarray:
    """Number of train rows per item id, shape [n_items + 1] (index 0 = padding)."""
    train = events.loc[events["split"] == "train", "item_id"].to_numpy()
    return np.bincount(train, minlength=n_items + 1)


def cold_item_mask(item_ids: np.ndarray, train_counts: np.ndarray) -> np.ndarray:
    """True where the row's item has fewer than COLD_ITEM_MAX_TRAIN_ROWS train rows."""
    return train_counts[item_ids] < COLD_ITEM_MAX_TRAIN_ROWS
