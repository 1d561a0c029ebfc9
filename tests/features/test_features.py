"""Unit tests of features/build.py: stamping, history, prefixes, vocabularies, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import EVENTS_START, TEST_SID_VERSION, build_features, reseal_dataset_units, write_feature_dataset

from features import build as features
from sidrank.io import write_parquet
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from sidrank.contract import DatasetPaths
from sidrank import contract


def hand_events() -> pd.DataFrame:
    """User 1: three events at t0 (two positive), one at t1, one at t2; user 2 one event at t1."""
    t = [EVENTS_START + pd.Timedelta(seconds=s) for s in (0, 0, 0, 5, 5, 9)] + [EVENTS_START] * 6
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 1] + [3] * 6,
            "item_id": [3, 1, 2, 4, 4, 5] + [6] * 6,
            "label": [1, 0, 1, 1, 1, 1] + [0] * 6,
            "rating": 3.0,
            "event_timestamp": t,
        }
    )
    return assign_protocol_split(frame, "hand events")


def _rewrite(paths: DatasetPaths, path: Path, change) -> None:
    frame = pd.read_parquet(path)
    write_parquet(change(frame), path)
    reseal_dataset_units(paths)


@pytest.fixture()
def hand_dataset(tmp_path: Path) -> DatasetPaths:
    return write_feature_dataset(tmp_path / "hand", hand_events(), n_users=3, n_items=6)


def test_counts_are_stamped_one_microsecond_after_all_events_at_t(hand_dataset: DatasetPaths) -> None:
    build_features(hand_dataset)
    user = pd.read_parquet(hand_dataset.features / "user_behaviour.parquet")
    one = user[user["user_id"] == 1].reset_index(drop=True)
    micro = pd.Timedelta(microseconds=1)
    assert one["event_timestamp"].tolist() == [EVENTS_START + pd.Timedelta(seconds=s) + micro for s in (0, 5, 9)]
    assert one["user_count"].tolist() == [3, 4, 5]
    assert one["user_pos_count"].tolist() == [2, 3, 4]
    item = pd.read_parquet(hand_dataset.features / "item_behaviour.parquet")
    four = item[item["item_id"] == 4]
    # Two events of item 4 share t1: one row with both counted.
    assert four["item_count"].tolist() == [2] and four["item_pos_count"].tolist() == [2]
    assert len(user) == user[["user_id", "event_timestamp"]].drop_duplicates().shape[0]


def test_history_is_most_recent_first_with_prefix_codes(hand_dataset: DatasetPaths) -> None:
    meta = build_features(hand_dataset)
    user = pd.read_parquet(hand_dataset.features / "user_behaviour.parquet")
    assert not set(contract.HIST_SID_PREFIXES) & set(user.columns)  # they depend on the SID version
    one = user[user["user_id"] == 1].reset_index(drop=True)
    # Same-timestamp positives follow row_id order (item_id within a user), newest last.
    assert [list(h) for h in one[contract.HIST_ITEMS]] == [[3, 2], [4, 3, 2], [5, 4, 3, 2]]
    assert list(user.loc[user["user_id"] == 3, contract.HIST_ITEMS].iloc[0]) == []
    history = pd.read_parquet(hand_dataset.features / "user_sid_history.parquet")
    assert history[["user_id", "event_timestamp"]].equals(user[["user_id", "event_timestamp"]])
    one = one.join(history.loc[user["user_id"] == 1, list(contract.HIST_SID_PREFIXES)].reset_index(drop=True))
    sids = pd.read_parquet(hand_dataset.sid_dir(TEST_SID_VERSION) / "sids.parquet").set_index("item_id")
    k = meta.sid_codebook_size
    for items, p1, p2 in zip(one[contract.HIST_ITEMS], one["hist_sid_p1"], one["hist_sid_p2"]):
        assert list(p1) == [contract.encode_prefix([sids.at[i, "sid_0"]], k) for i in items]
        assert list(p2) == [contract.encode_prefix([sids.at[i, "sid_0"], sids.at[i, "sid_1"]], k) for i in items]


def test_history_keeps_only_the_last_twenty_positives(tmp_path: Path) -> None:
    n = contract.HISTORY_LENGTH + 7
    frame = pd.DataFrame(
        {
            "user_id": 1,
            "item_id": np.arange(1, n + 1),
            "label": 1,
            "rating": 5.0,
            "event_timestamp": EVENTS_START + pd.to_timedelta(np.arange(n), unit="s"),
        }
    )
    paths = write_feature_dataset(tmp_path / "long", assign_protocol_split(frame, "long"), n_users=1, n_items=n)
    build_features(paths)
    user = pd.read_parquet(paths.features / "user_behaviour.parquet")
    assert [len(h) for h in user[contract.HIST_ITEMS]] == [min(i + 1, contract.HISTORY_LENGTH) for i in range(n)]
    assert list(user[contract.HIST_ITEMS].iloc[-1]) == list(range(n, n - contract.HISTORY_LENGTH, -1))


def test_static_tables_vocabularies_and_meta(hand_dataset: DatasetPaths) -> None:
    _rewrite(hand_dataset, hand_dataset.items, lambda f: f.assign(year=[0, 1971, 1994, 1995, 1999, 0]))
    meta = build_features(hand_dataset)
    saved = json.loads((hand_dataset.features / contract.FEATURE_META_FILE).read_text())
    vocab = saved["vocabularies"]
    users = pd.read_parquet(hand_dataset.users)
    profile = pd.read_parquet(hand_dataset.features / "user_profile.parquet")
    assert set(profile.columns) == {"user_id", "event_timestamp", "age_id", "gender_id", "zip_code_id"}
    assert (profile["event_timestamp"] == features.STATIC_TIMESTAMP).all()
    ages = dict(zip(users["age"], profile["age_id"]))
    assert ages.get("", 0) == 0 and vocab["age_id"] == [n for n in features.AGE_BUCKET_NAMES if n in vocab["age_id"]]
    for age, bucket in (("7", "<18"), ("24", "18-24"), ("33", "25-34"), ("61", "56+")):
        if age in ages:
            assert vocab["age_id"][ages[age] - 1] == bucket
    assert set(vocab["zip_code_id"]) <= {"941", "947", "T8H"}
    assert meta.user_profile == {name: len(vocab[name]) + 1 for name in ("age_id", "gender_id", "zip_code_id")}

    items = pd.read_parquet(hand_dataset.items)
    content = pd.read_parquet(hand_dataset.features / "item_content.parquet")
    for tags, ids in zip(items["tags"], content[contract.ITEM_TAGS]):
        assert [vocab[contract.ITEM_TAGS][i - 1] for i in ids] == list(tags)
    assert content["year_bucket"].tolist() == [0, 1, 5, 6, 6, 0]  # 5-year buckets from 1970
    assert saved["vocabularies"]["year_bucket"] == [1970, 1975, 1980, 1985, 1990, 1995]
    assert meta.n_year_buckets == content["year_bucket"].max() + 1 and meta.n_tags == len(vocab[contract.ITEM_TAGS])

    sids = pd.read_parquet(hand_dataset.features / "item_sids.parquet")
    raw = pd.read_parquet(hand_dataset.sid_dir(TEST_SID_VERSION) / "sids.parquet")
    assert [list(c) for c in sids[contract.SID_CODES]] == raw[["sid_0", "sid_1", "sid_2"]].to_numpy().tolist()
    assert (sids[contract.SID_VERSION] == TEST_SID_VERSION).all() and meta.sid_version == TEST_SID_VERSION
    assert (meta.sid_levels, meta.sid_codebook_size, meta.n_items, meta.n_users) == (3, 4, 6, 3)


def test_sub_microsecond_times_are_floored_before_grouping() -> None:
    stamps = pd.Series(pd.to_datetime([1_000, 1_999, 2_000], unit="ns", utc=True))
    assert features.to_micros(stamps).tolist() == [1, 1, 2]
    assert features.from_micros(np.array([1])).tolist() == [pd.Timestamp(1_000, unit="ns", tz="UTC")]


@pytest.mark.parametrize(
    ("target", "change", "message"),
    [
        ("sids", lambda f: f[f["item_id"] != 2], "have no SID"),
        ("sids", lambda f: f.assign(sid_1=f["sid_1"] + 4), "outside the codebook"),
        ("sids", lambda f: f.drop(columns="sid_version"), "sid_version"),
        ("events", lambda f: f.drop(columns="label"), "'label'"),
        ("events", lambda f: f.assign(item_id=f["item_id"].where(f.index > 0, 99)), "absent from"),
        ("users", lambda f: f.drop(columns="gender"), "'gender'"),
        ("items", lambda f: f.drop(columns="year"), "'year'"),
    ],
)
def test_bad_input_raises_data_error_naming_the_problem(
    hand_dataset: DatasetPaths, target: str, change, message: str
) -> None:
    path = {
        "sids": hand_dataset.sid_dir(TEST_SID_VERSION) / "sids.parquet",
        "events": hand_dataset.events,
        "users": hand_dataset.users,
        "items": hand_dataset.items,
    }[target]
    _rewrite(hand_dataset, path, change)
    with pytest.raises(DataError, match=message) as caught:
        build_features(hand_dataset)
    assert path.name in str(caught.value)
    assert not (hand_dataset.features / contract.FEATURE_META_FILE).exists()


def test_missing_files_and_codebook_size(hand_dataset: DatasetPaths) -> None:
    (hand_dataset.sid_dir(TEST_SID_VERSION) / "config.json").unlink()
    reseal_dataset_units(hand_dataset)
    with pytest.raises(DataError, match="--codebook-size"):
        build_features(hand_dataset)
    meta = features.build_features(features.FeaturesConfig(dataset=hand_dataset.root, codebook_size=4))
    assert meta.sid_levels == 3
    with pytest.raises(DataError, match="sids/nope: incomplete or missing"):
        features.main(["--dataset", str(hand_dataset.root), "--sid-version", "nope"])
    hand_dataset.events.unlink()
    with pytest.raises(DataError, match="events.parquet: missing or changed.*python -m ingest"):
        build_features(hand_dataset)


def test_cli_rejects_unknown_arguments_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        features.main(["--dataset", str(tmp_path), "--bogus", "1"])
    with pytest.raises(ValueError, match="codebook_size=0"):
        features.FeaturesConfig(dataset=tmp_path, codebook_size=0)
