"""Causal behaviour features: what a user (item) has done before each moment, stamped just after it.

A behaviour row holds the state of its user (item) after *all* events at or
before time t and is stamped t + ``STAMP_DELAY_US``. Feast's point-in-time
join is inclusive (feature time <= event time), so an event at time t sees
only events strictly before t: never its own label, never a same-timestamp
sibling (docs/architecture.md, "Causal feature stamping"). Events of every
split are used, as a live system would: a valid or test row sees the earlier
valid and test events too, never a later one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from sidrank import contract
from sidrank.schema import from_micros, to_micros

STAMP_DELAY_US = 1
# Rows per list-building chunk: bounds the temporary index arrays to ~HISTORY_LENGTH x this.
HISTORY_CHUNK_ROWS = 1_000_000


def int_list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """An Arrow list<int64> array from [N + 1] offsets and the flat values."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))


def int_list_column(chunks: list[pa.Array]) -> pd.arrays.ArrowExtensionArray:
    """A pandas column of list<int64> over Arrow chunks (no Python object per list)."""
    return pd.arrays.ArrowExtensionArray(pa.chunked_array(chunks, type=pa.list_(pa.int64())))


class KeyTimeGroups(NamedTuple):
    """Events grouped by (key, timestamp), keys and times ascending.

    Attributes:
        order: event indices sorted by (key, time, row_id).
        last: sorted position of the last event of each group.
        key_first: sorted position of the first event of each group's key.
    """

    order: np.ndarray
    last: np.ndarray
    key_first: np.ndarray


def group_by_key_time(key: np.ndarray, micros: np.ndarray, row_id: np.ndarray) -> KeyTimeGroups:
    """Sort events by (key, time, row_id) and find the (key, time) group boundaries."""
    order = np.lexsort((row_id, micros, key))
    k, t = key[order], micros[order]
    n = len(order)
    last = np.r_[np.flatnonzero((k[1:] != k[:-1]) | (t[1:] != t[:-1])), n - 1]
    key_starts = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    key_first_of_event = np.repeat(key_starts, np.diff(np.r_[key_starts, n]))
    return KeyTimeGroups(order, last, key_first_of_event[last])


def behaviour_counts(events: pd.DataFrame, key: str) -> tuple[pd.DataFrame, KeyTimeGroups]:
    """Cumulative event and positive counts per (key, distinct timestamp).

    Returns:
        A frame with ``key``, ``event_timestamp`` (t + 1 us), ``count`` and
        ``pos_count`` (events with timestamp <= t), and the grouping it used.
    """
    micros = to_micros(events["event_timestamp"])
    groups = group_by_key_time(events[key].to_numpy(), micros, events["row_id"].to_numpy())
    labels = events["label"].to_numpy(dtype=np.int64)[groups.order]
    positives = np.cumsum(labels)
    before_key = positives[groups.key_first] - labels[groups.key_first]
    frame = pd.DataFrame(
        {
            key: events[key].to_numpy()[groups.order][groups.last],
            "event_timestamp": from_micros(micros[groups.order][groups.last] + STAMP_DELAY_US),
            "count": (groups.last - groups.key_first + 1).astype(np.int64),
            "pos_count": (positives[groups.last] - before_key).astype(np.int64),
        }
    )
    return frame, groups


def recent_positive_lists(
    items_sorted: np.ndarray,
    labels_sorted: np.ndarray,
    groups: KeyTimeGroups,
    lookups: dict[str, np.ndarray],
    length: int = contract.HISTORY_LENGTH,
) -> dict[str, pd.arrays.ArrowExtensionArray]:
    """Last ``length`` positive items of each group's key up to the group, most recent first.

    Args:
        items_sorted: item id per event, in ``groups.order``.
        labels_sorted: 0/1 label per event, in ``groups.order``.
        groups: user/time groups from :func:`group_by_key_time`.
        lookups: output column -> array mapping item id to the value stored
            (identity for item ids, SID prefix codes for the prefix columns).
        length: maximum list length.

    Returns:
        Output column -> list column with one entry per group.
    """
    positive_items = items_sorted[labels_sorted == 1]
    cum = np.cumsum(labels_sorted)
    # The key's positives up to group g are positive_items[start[g]:end[g]].
    end = cum[groups.last]
    start = cum[groups.key_first] - labels_sorted[groups.key_first]
    chunks: dict[str, list[pa.Array]] = {name: [] for name in lookups}
    n_groups = len(groups.last)
    quiet = n_groups < HISTORY_CHUNK_ROWS
    for lo in tqdm(range(0, n_groups, HISTORY_CHUNK_ROWS), desc="history", unit="chunk", disable=quiet):
        g_end = end[lo : lo + HISTORY_CHUNK_ROWS]
        lens = g_end - np.maximum(start[lo : lo + HISTORY_CHUNK_ROWS], g_end - length)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        # Element e of segment s is positive_items[end[s] - 1 - (e - offsets[s])]: newest first.
        index = np.repeat(g_end - 1 + offsets[:-1], lens) - np.arange(offsets[-1])
        items = positive_items[index]
        for name, lookup in lookups.items():
            chunks[name].append(int_list_array(offsets, lookup[items]))
    return {name: int_list_column(parts) for name, parts in chunks.items()}


def sid_prefix_lookups(
    sids: pd.DataFrame, code_columns: list[str], n_items: int, codebook_size: int
) -> dict[str, np.ndarray]:
    """Item id -> encoded SID prefix of depth 1 and 2 (``contract.encode_prefix``), index 0 unused."""
    codes = sids[code_columns].to_numpy(dtype=np.int64)
    lookups = {}
    for depth, name in enumerate(contract.HIST_SID_PREFIXES, start=1):
        table = np.zeros(n_items + 1, dtype=np.int64)
        table[sids["item_id"].to_numpy()] = [contract.encode_prefix(row[:depth], codebook_size) for row in codes]
        lookups[name] = table
    return lookups


def user_behaviour(
    events: pd.DataFrame, prefix_lookups: dict[str, np.ndarray], n_items: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Causal user state, one row per (user, distinct timestamp), in two tables with equal keys and stamps.

    Returns:
        (``user_behaviour``: counts and the recent positive items,
        ``user_sid_history``: the SID prefixes of those items, per SID version).
    """
    counts, groups = behaviour_counts(events, "user_id")
    items_sorted = events["item_id"].to_numpy()[groups.order]
    labels_sorted = events["label"].to_numpy(dtype=np.int64)[groups.order]
    lookups = {contract.HIST_ITEMS: np.arange(n_items + 1, dtype=np.int64), **prefix_lookups}
    lists = recent_positive_lists(items_sorted, labels_sorted, groups, lookups)
    frame = counts.rename(columns={"count": "user_count", "pos_count": "user_pos_count"})
    frame[contract.HIST_ITEMS] = lists[contract.HIST_ITEMS]
    history = counts[["user_id", "event_timestamp"]].copy()
    for name in contract.HIST_SID_PREFIXES:
        history[name] = lists[name]
    return frame, history


def item_behaviour(events: pd.DataFrame) -> pd.DataFrame:
    """Causal item counts, one row per (item, distinct timestamp)."""
    counts, _ = behaviour_counts(events, "item_id")
    return counts.rename(columns={"count": "item_count", "pos_count": "item_pos_count"})
