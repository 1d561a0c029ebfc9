"""The evaluation protocols, in one place.

Both protocols label a rating ``>= POSITIVE_RATING`` as positive, sort the rows
by (timestamp, user_id, item_id), stable, take ``row_id`` = position in that
order and cut the first 80% as train, the next 10% as valid and the last 10%
as test.

``temporal``: every row is kept. Cold items are the items with fewer than
``COLD_ITEM_MAX_TRAIN_ROWS`` train rows (on MovieLens-100K a few hundred test
rows only, too few to measure cold-start quality).

``item-cold``: the same sort and cut, so valid and test rows keep the row ids
they have under ``temporal``; then a fixed ``HELD_OUT_FRACTION`` of the items
(the held-out items, see :func:`held_out_items`) lose all their train rows,
which are removed from the events. Their valid and test rows stay and are the
cold set. Row ids therefore have gaps where the removed train rows were.

:func:`cold_item_ids` is the one answer to "which items are cold in this
dataset" for every stage; ``meta.json`` carries the protocol so the answer
follows the dataset, not a flag of the stage that asks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from sidrank.schema import DataError

TRAIN_FRACTION = 0.8
VALID_FRACTION = 0.1
POSITIVE_RATING = 4
COLD_ITEM_MAX_TRAIN_ROWS = 5

TEMPORAL = "temporal"
ITEM_COLD = "item-cold"
PROTOCOLS = (TEMPORAL, ITEM_COLD)
# Share of the catalogue held out of train under item-cold, and the seed of its hash.
HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 0
# Recorded in meta.json so a reader can recompute the held-out set by hand.
HELD_OUT_RULE = (
    "the round(fraction * n_items) item ids i in 1..n_items with the smallest "
    "(blake2b(f'{seed}:{i}'.encode('ascii'), digest_size=8) as big-endian uint64, i)"
)


def check_protocol(protocol: str, where: str = "--protocol") -> str:
    """Return ``protocol`` if it is known, else raise naming ``where`` and the choices.

    Raises:
        ValueError: ``protocol`` is not one of :data:`PROTOCOLS`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"{where}={protocol!r}: unknown protocol; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def dataset_folder_name(name: str, protocol: str) -> str:
    """The dataset folder of ``name`` under ``protocol``: ``ml-100k`` or ``ml-100k-item-cold``.

    The protocol is part of the name so datasets of two protocols never
    overwrite each other; a name that already ends with the suffix keeps it once.
    """
    check_protocol(protocol)
    if protocol == TEMPORAL or name.endswith(f"-{protocol}"):
        return name
    return f"{name}-{protocol}"


def assign_protocol_split(events: pd.DataFrame, source: str) -> pd.DataFrame:
    """Sort by (event_timestamp, user_id, item_id), assign ``row_id`` and ``split`` (the temporal protocol).

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


def held_out_items(n_items: int, fraction: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """The item ids held out of train under ``item-cold`` (see :data:`HELD_OUT_RULE`), sorted.

    A keyed cryptographic hash of the dense item id (not Python's ``hash``,
    which is randomised per process, and not a random generator, whose draws
    depend on the order of calls) makes the set a function of (n_items,
    fraction, seed) alone: the same on every run, whatever the order of the
    input rows. Taking the lowest hashes instead of a threshold makes the
    share exact.

    Args:
        n_items: item ids are 1..n_items.
        fraction: share of the items to hold out, in [0, 1].
        seed: hash seed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: expected a share in [0, 1]")
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    hashes = np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode("ascii"), digest_size=8).digest(), "big") for i in ids),
        dtype=np.uint64,
        count=n_items,
    )
    n_held = int(round(fraction * n_items))
    chosen = ids[np.lexsort((ids, hashes))[:n_held]]
    return np.sort(chosen)


def ids_sha256(ids: np.ndarray) -> str:
    """sha256 of sorted item ids as little-endian int64 bytes (the fingerprint meta.json records)."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def apply_protocol(
    events: pd.DataFrame, n_items: int, protocol: str, source: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Sort, number and split the events under ``protocol``; drop held-out train rows under ``item-cold``.

    Args:
        events: rows with ``user_id``, ``item_id``, ``event_timestamp`` (UTC).
        n_items: item ids are 1..n_items (the catalogue the held-out share is taken of).
        protocol: one of :data:`PROTOCOLS`.
        source: the events file, named in errors.

    Returns:
        The events in protocol order (``row_id`` = position in the full order,
        ``split``) and the meta.json entries of the protocol: ``protocol`` and,
        for ``item-cold``, ``held_out`` (fraction, seed, rule, count, sha256,
        removed train rows).

    Raises:
        ValueError: unknown protocol.
        DataError: the item-cold split leaves no train rows, or no valid or
            test row of a held-out item (an empty cold set).
    """
    check_protocol(protocol, "protocol")
    ordered = assign_protocol_split(events, source)
    if protocol == TEMPORAL:
        return ordered, {"protocol": TEMPORAL}
    held = held_out_items(n_items)
    is_held = np.isin(ordered["item_id"].to_numpy(), held)
    split = ordered["split"].to_numpy()
    removed = is_held & (split == "train")
    kept = ordered.loc[~removed].reset_index(drop=True)
    fix = "use --protocol temporal, or ingest more events / items"
    n_train = int((kept["split"] == "train").sum())
    if n_train == 0:
        raise DataError(
            f"{source}: the item-cold protocol leaves no train rows ({len(held)} of {n_items} items held out); {fix}"
        )
    for name in ("valid", "test"):
        if not (is_held & (split == name)).any():
            raise DataError(
                f"{source}: no {name} row has one of the {len(held)} held-out items, so the item-cold {name} set "
                f"would be empty; {fix}"
            )
    entries = {
        "protocol": ITEM_COLD,
        "held_out": {
            "fraction": HELD_OUT_FRACTION,
            "seed": HELD_OUT_SEED,
            "rule": HELD_OUT_RULE,
            "n_items": len(held),
            "items_sha256": ids_sha256(held),
            "removed_train_rows": int(removed.sum()),
        },
    }
    return kept, entries


def protocol_of(meta: Mapping[str, Any], source: str = "meta.json") -> str:
    """The protocol a dataset was ingested with; datasets without the key are ``temporal``.

    Raises:
        DataError: the key names an unknown protocol.
    """
    protocol = meta.get("protocol", TEMPORAL)
    if protocol not in PROTOCOLS:
        raise DataError(f"{source}: key 'protocol' is {protocol!r}, expected one of {PROTOCOLS}; re-run ingest")
    return protocol


def train_item_counts(events: pd.DataFrame, n_items: int) -> np.ndarray:
    """Number of train rows per item id, shape [n_items + 1] (index 0 = padding)."""
    train = events.loc[events["split"] == "train", "item_id"].to_numpy()
    return np.bincount(train, minlength=n_items + 1)


def cold_item_mask(item_ids: np.ndarray, train_counts: np.ndarray) -> np.ndarray:
    """True where the row's item has fewer than COLD_ITEM_MAX_TRAIN_ROWS train rows (the temporal rule)."""
    return train_counts[item_ids] < COLD_ITEM_MAX_TRAIN_ROWS


def cold_item_ids(meta: Mapping[str, Any], events: pd.DataFrame, source: str = "meta.json") -> np.ndarray:
    """The cold items of a dataset, sorted: the one definition every stage uses.

    ``temporal``: items 1..n_items with fewer than ``COLD_ITEM_MAX_TRAIN_ROWS``
    train rows. ``item-cold``: the held-out items, recomputed from the
    fraction and seed in ``meta`` and checked against its recorded count and
    sha256 and against ``events`` (no held-out item may have a train row).

    Args:
        meta: the dataset's meta.json content (needs ``n_items``; ``protocol``
            and ``held_out`` where written).
        events: the dataset's events (``item_id``, ``split``).
        source: the meta.json path, named in errors.

    Returns:
        int64 item ids; a row is cold when its ``item_id`` is among them.

    Raises:
        DataError: meta.json lacks a key, or meta.json and the events disagree.
    """
    if "n_items" not in meta:
        raise DataError(f"{source}: missing key 'n_items'; re-run ingest")
    n_items = int(meta["n_items"])
    if protocol_of(meta, source) == TEMPORAL:
        counts = train_item_counts(events, n_items)
        return np.flatnonzero(counts[1:] < COLD_ITEM_MAX_TRAIN_ROWS).astype(np.int64) + 1
    recorded = meta.get("held_out")
    if not isinstance(recorded, Mapping) or not {"fraction", "seed", "n_items", "items_sha256"} <= set(recorded):
        raise DataError(f"{source}: key 'held_out' (fraction, seed, n_items, items_sha256) is missing; re-run ingest")
    held = held_out_items(n_items, float(recorded["fraction"]), int(recorded["seed"]))
    if len(held) != int(recorded["n_items"]) or ids_sha256(held) != recorded["items_sha256"]:
        raise DataError(
            f"{source}: key 'held_out' records {recorded['n_items']} items (sha256 {recorded['items_sha256'][:12]}..) "
            f"but the rule gives {len(held)} (sha256 {ids_sha256(held)[:12]}..); re-run ingest"
        )
    in_train = np.intersect1d(held, events.loc[events["split"] == "train", "item_id"].to_numpy())
    if len(in_train):
        raise DataError(
            f"{source}: held-out items {in_train[:5].tolist()} have train rows in the events; the events are not "
            f"this dataset's item-cold events; re-run ingest with --protocol item-cold"
        )
    return held
