"""No retrieved feature may see its own row's label, a same-time sibling or a later event.

Every row of a random event log with timestamp ties (and some sub-microsecond
offsets) is checked against counts and histories recomputed by brute force
from the events strictly before it, at the microsecond precision the feature
store keeps. A trap block makes a leak visible: a user whose first events all
share one timestamp, mostly positive. The dataset has no user profile (like
Amazon), so the repository must publish without user_profile_fv.

Every check runs under both protocols: under item-cold the held-out items'
train rows are gone from events.parquet, so the brute force (which reads the
written events) also proves that no feature counts a removed row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from builders import (
    EVENTS_START,
    comparable_rows,
    publish_to_repo_copy,
    random_tied_events,
    reseal_dataset_units,
    write_feature_dataset,
)

from features.build import to_micros
from ranking.rows import load_training_rows
from sidrank import contract
from sidrank.io import read_json, write_json
from sidrank.protocol import ITEM_COLD, PROTOCOLS, apply_protocol, cold_item_ids

N_USERS, N_ITEMS = 10, 12
TRAP_USER, TRAP_ITEMS, TRAP_LABELS = N_USERS, [1, 2, 3, 4], [1, 1, 0, 1]
TRAP_TIME = EVENTS_START + pd.Timedelta(seconds=100)


class Retrieved(NamedTuple):
    protocol: str
    events: pd.DataFrame
    rows: pd.DataFrame
    meta: dict


def trap_events() -> pd.DataFrame:
    """The trap user's four events at TRAP_TIME, then one a second later; item 1 also liked by others then."""
    frame = pd.DataFrame(
        {
            "user_id": [TRAP_USER] * 5 + [1, 2],
            "item_id": TRAP_ITEMS + [5, 1, 1],
            "label": TRAP_LABELS + [1, 1, 1],
            "event_timestamp": [TRAP_TIME] * 4 + [TRAP_TIME + pd.Timedelta(seconds=1), TRAP_TIME, TRAP_TIME],
        }
    )
    return frame.assign(rating=frame["label"] * 4.0 + 1.0)


@pytest.fixture(scope="module", params=PROTOCOLS)
def retrieved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Retrieved:
    protocol = request.param
    root = tmp_path_factory.mktemp(f"leakage-{protocol}")
    rng = np.random.default_rng(3)
    # The trap user has no other events; random users are 1..N_USERS-1.
    frame = random_tied_events(N_USERS - 1, N_ITEMS, n_events=220, n_times=12, seed=2)
    # A few sub-microsecond offsets: the store compares microseconds, so these tie with their second.
    jitter = np.where(rng.random(len(frame)) < 0.2, rng.integers(1, 1000, len(frame)), 0)
    frame["event_timestamp"] += pd.to_timedelta(jitter, unit="ns")
    events, entries = apply_protocol(
        pd.concat([frame, trap_events()], ignore_index=True), N_ITEMS, protocol, "leakage events"
    )
    paths = write_feature_dataset(root / "data", events, N_USERS, N_ITEMS, profile_columns=())
    meta = {**read_json(paths.meta), **entries}
    write_json(meta, paths.meta)
    reseal_dataset_units(paths)
    repo = publish_to_repo_copy(paths, root / "repo", materialize=False)
    return Retrieved(protocol, events, comparable_rows(load_training_rows(repo, events)), meta)


def brute_force(events: pd.DataFrame, row: pd.Series, *, strict: bool = True) -> dict:
    """Features of ``row`` recomputed from the events before it (strictly, unless ``strict`` is False)."""
    micros = to_micros(events["event_timestamp"])
    now = to_micros(pd.Series([row["event_timestamp"]]))[0]
    seen = events[micros < now] if strict else events[micros <= now]
    user, item = seen[seen["user_id"] == row["user_id"]], seen[seen["item_id"] == row["item_id"]]
    liked = user[user["label"] == 1].assign(us=to_micros(user.loc[user["label"] == 1, "event_timestamp"]))
    history = liked.sort_values(["us", "row_id"], ascending=False)["item_id"].head(contract.HISTORY_LENGTH)
    return {
        "user_count": len(user),
        "user_pos_count": int(user["label"].sum()),
        "item_count": len(item),
        "item_pos_count": int(item["label"].sum()),
        contract.HIST_ITEMS: tuple(int(i) for i in history),
    }


def test_every_row_sees_exactly_the_events_strictly_before_it(retrieved: Retrieved) -> None:
    events, rows = retrieved.events, retrieved.rows
    assert events.duplicated(["user_id", "event_timestamp"]).sum() >= 50  # ties are exercised
    assert len(rows) == len(events)
    for _, row in rows.iterrows():
        expected = brute_force(events, row)
        actual = {name: row[name] for name in expected}
        assert actual == expected, f"row_id {row['row_id']}"


def test_dataset_without_profile_serves_no_profile_features(retrieved: Retrieved) -> None:
    assert not [c for c in retrieved.rows.columns if c.endswith("_id") and c not in ("row_id", "user_id", "item_id")]
    assert retrieved.rows[contract.SID_CODES].map(len).eq(3).all()


def test_history_holds_own_item_only_if_liked_strictly_earlier(retrieved: Retrieved) -> None:
    events, rows = retrieved.events, retrieved.rows
    micros = to_micros(events["event_timestamp"])
    liked_before = 0
    for _, row in rows.iterrows():
        if row["item_id"] not in row[contract.HIST_ITEMS]:
            continue
        now = to_micros(pd.Series([row["event_timestamp"]]))[0]
        earlier = events[(micros < now) & (events["user_id"] == row["user_id"]) & (events["item_id"] == row["item_id"])]
        assert (earlier["label"] == 1).any(), f"row_id {row['row_id']} sees its own item"
        liked_before += 1
    assert liked_before > 0  # the random log has repeat interactions, so the check ran


def test_same_timestamp_trap_shows_no_leak(retrieved: Retrieved) -> None:
    events, rows = retrieved.events, retrieved.rows
    trap = rows[rows["user_id"] == TRAP_USER].sort_values("row_id")
    first, later = trap[trap["event_timestamp"] == TRAP_TIME], trap[trap["event_timestamp"] > TRAP_TIME]
    assert len(first) == 4 and len(later) == 1
    # Nothing of the trap user exists before TRAP_TIME, so its four rows see nothing.
    assert (first[["user_count", "user_pos_count"]] == 0).all().all()
    assert all(history == () for history in first[contract.HIST_ITEMS])
    # Item 1's three positives at TRAP_TIME (trap user + users 1, 2) stay invisible at TRAP_TIME.
    item_one = rows[(rows["item_id"] == 1) & (rows["event_timestamp"] == TRAP_TIME)]
    assert len(item_one) == 3
    assert all(row["item_pos_count"] == brute_force(events, row)["item_pos_count"] for _, row in item_one.iterrows())
    # A leak would be visible: with an inclusive cut-off the same rows would count the trap's labels.
    leaky = [brute_force(events, row, strict=False) for _, row in first.iterrows()]
    assert all(f["user_pos_count"] == sum(TRAP_LABELS) for f in leaky)
    # One second later the whole block is visible, newest (highest row_id) first.
    after = later.iloc[0]
    assert (after["user_count"], after["user_pos_count"]) == (4, 3)
    assert after[contract.HIST_ITEMS] == (4, 2, 1)


def test_held_out_items_never_see_their_removed_train_rows(retrieved: Retrieved) -> None:
    if retrieved.protocol != ITEM_COLD:
        pytest.skip("only item-cold removes train rows")
    events, rows = retrieved.events, retrieved.rows
    held = cold_item_ids(retrieved.meta, events)
    assert len(held) and not events.loc[events["split"] == "train", "item_id"].isin(held).any()
    cold_rows = rows[rows["item_id"].isin(held)]
    assert len(cold_rows) > 0
    assert set(events.loc[events["row_id"].isin(cold_rows["row_id"]), "split"]) <= {"valid", "test"}
    micros = to_micros(events["event_timestamp"])
    for _, row in cold_rows.iterrows():
        # Only the item's own valid/test rows strictly earlier exist to be counted.
        now = to_micros(pd.Series([row["event_timestamp"]]))[0]
        earlier = events[(micros < now) & (events["item_id"] == row["item_id"])]
        assert row["item_count"] == len(earlier) and set(earlier["split"]) <= {"valid", "test"}
