"""Unit tests of features/build.py: stamping, history, prefixes, vocabularies, bad input.

``random_events``, ``write_dataset`` and ``publish_copy`` build the small
datasets and Feast repositories that test_feast_roundtrip and test_leakage reuse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features import build as features, publish
from sidrank.io import write_json, write_parquet
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from sidrank.contract import DatasetPaths
from sidrank import contract

T0 = pd.Timestamp("2020-01-01", tz="UTC")
SID_VERSION = "test-v1"
FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"


def random_events(n_users: int, n_items: int, n_events: int, n_times: int, seed: int) -> pd.DataFrame:
    """Unsplit events on few distinct timestamps, so many share (user, time) and (item, time)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(1, n_users + 1, n_events),
            "item_id": rng.integers(1, n_items + 1, n_events),
            "rating": rng.integers(1, 6, n_events).astype(np.float64),
            "event_timestamp": T0 + pd.to_timedelta(rng.integers(0, n_times, n_events), unit="s"),
        }
    )
    frame["label"] = (frame["rating"] >= 4).astype(np.int64)
    return frame


def write_dataset(
    root: Path,
    events: pd.DataFrame,
    n_users: int,
    n_items: int,
    *,
    levels: int = 3,
    codebook_size: int = 4,
    seed: int = 0,
    profile_columns: tuple[str, ...] = ("age", "gender", "zip_code"),
) -> DatasetPaths:
    """Write events plus matching items, users (ML-style profile), meta.json and one SID version."""
    rng = np.random.default_rng(seed)
    paths = DatasetPaths(root)
    tag_pool = ["Action", "Comedy", "Drama", "Horror"]
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1),
            "title": [f"movie {i}" for i in range(1, n_items + 1)],
            "tags": [list(rng.choice(tag_pool, size=rng.integers(0, 3), replace=False)) for _ in range(n_items)],
            "year": rng.choice([0, 1971, 1994, 1995, 1999], size=n_items),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "raw_user_id": [str(u) for u in range(1, n_users + 1)],
            "age": rng.choice(["7", "24", "33", "61", ""], size=n_users),
            "gender": rng.choice(["M", "F"], size=n_users),
            "zip_code": rng.choice(["94110", "94705", "T8H1N"], size=n_users),
        }
    )
    write_parquet(events, paths.events)
    write_parquet(items, paths.items)
    write_parquet(users[["user_id", "raw_user_id", *profile_columns]], paths.users)
    write_json({"n_users": n_users, "n_items": n_items, "user_profile_columns": list(profile_columns)}, paths.meta)
    write_sid_version(paths, SID_VERSION, levels=levels, codebook_size=codebook_size, rng=rng)
    return paths


def write_sid_version(
    paths: DatasetPaths, version: str, *, levels: int, codebook_size: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Random SIDs of every item of ``paths`` as ``sids/<version>/``, valid from the first event; LATEST -> it."""
    n_items = int(json.loads(paths.meta.read_text())["n_items"])
    sids = pd.DataFrame({"item_id": np.arange(1, n_items + 1)})
    for level in range(levels):
        sids[f"sid_{level}"] = rng.integers(0, codebook_size, n_items)
    sids["sid_version"] = version
    sids["event_timestamp"] = pd.read_parquet(paths.events, columns=["event_timestamp"]).iloc[:, 0].min()
    sids["created"] = pd.Timestamp.now(tz="UTC")
    write_parquet(sids, paths.sid_dir(version) / "sids.parquet")
    write_json({"levels": levels, "codebook_size": codebook_size}, paths.sid_dir(version) / "config.json")
    (paths.root / "sids" / "LATEST").write_text(version + "\n")
    return sids


def build(paths: DatasetPaths) -> contract.FeatureMeta:
    return features.build_features(features.FeaturesConfig(dataset=paths.root))


def publish_copy(paths: DatasetPaths, repo: Path, *, materialize: bool) -> Path:
    """Build the features, copy feature_repo (without data) to ``repo`` and publish into it."""
    build(paths)
    shutil.copytree(FEATURE_REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    publish.main(["--dataset", str(paths.root), "--repo", str(repo)] + ([] if materialize else ["--no-materialize"]))
    return repo


def hand_events() -> pd.DataFrame:
    """User 1: three events at t0 (two positive), one at t1, one at t2; user 2 one event at t1."""
    t = [T0 + pd.Timedelta(seconds=s) for s in (0, 0, 0, 5, 5, 9)] + [T0] * 6
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


def _rewrite(path: Path, change) -> None:
    frame = pd.read_parquet(path)
    write_parquet(change(frame), path)


@pytest.fixture()
def hand_dataset(tmp_path: Path) -> DatasetPaths:
    return write_dataset(tmp_path / "hand", hand_events(), n_users=3, n_items=6)


def test_counts_are_stamped_one_microsecond_after_all_events_at_t(hand_dataset: DatasetPaths) -> None:
    build(hand_dataset)
    user = pd.read_parquet(hand_dataset.features / "user_behaviour.parquet")
    one = user[user["user_id"] == 1].reset_index(drop=True)
    micro = pd.Timedelta(microseconds=1)
    assert one["event_timestamp"].tolist() == [T0 + pd.Timedelta(seconds=s) + micro for s in (0, 5, 9)]
    assert one["user_count"].tolist() == [3, 4, 5]
    assert one["user_pos_count"].tolist() == [2, 3, 4]
    item = pd.read_parquet(hand_dataset.features / "item_behaviour.parquet")
    four = item[item["item_id"] == 4]
    # Two events of item 4 share t1: one row with both counted.
    assert four["item_count"].tolist() == [2] and four["item_pos_count"].tolist() == [2]
    assert len(user) == user[["user_id", "event_timestamp"]].drop_duplicates().shape[0]


def test_history_is_most_recent_first_with_prefix_codes(hand_dataset: DatasetPaths) -> None:
    meta = build(hand_dataset)
    user = pd.read_parquet(hand_dataset.features / "user_behaviour.parquet")
    assert not set(contract.HIST_SID_PREFIXES) & set(user.columns)  # they depend on the SID version
    one = user[user["user_id"] == 1].reset_index(drop=True)
    # Same-timestamp positives follow row_id order (item_id within a user), newest last.
    assert [list(h) for h in one[contract.HIST_ITEMS]] == [[3, 2], [4, 3, 2], [5, 4, 3, 2]]
    assert list(user.loc[user["user_id"] == 3, contract.HIST_ITEMS].iloc[0]) == []
    history = pd.read_parquet(hand_dataset.features / "user_sid_history.parquet")
    assert history[["user_id", "event_timestamp"]].equals(user[["user_id", "event_timestamp"]])
    one = one.join(history.loc[user["user_id"] == 1, list(contract.HIST_SID_PREFIXES)].reset_index(drop=True))
    sids = pd.read_parquet(hand_dataset.sid_dir(SID_VERSION) / "sids.parquet").set_index("item_id")
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
            "event_timestamp": T0 + pd.to_timedelta(np.arange(n), unit="s"),
        }
    )
    paths = write_dataset(tmp_path / "long", assign_protocol_split(frame, "long"), n_users=1, n_items=n)
    build(paths)
    user = pd.read_parquet(paths.features / "user_behaviour.parquet")
    assert [len(h) for h in user[contract.HIST_ITEMS]] == [min(i + 1, contract.HISTORY_LENGTH) for i in range(n)]
    assert list(user[contract.HIST_ITEMS].iloc[-1]) == list(range(n, n - contract.HISTORY_LENGTH, -1))


def test_static_tables_vocabularies_and_meta(hand_dataset: DatasetPaths) -> None:
    _rewrite(hand_dataset.items, lambda f: f.assign(year=[0, 1971, 1994, 1995, 1999, 0]))
    meta = build(hand_dataset)
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
    raw = pd.read_parquet(hand_dataset.sid_dir(SID_VERSION) / "sids.parquet")
    assert [list(c) for c in sids[contract.SID_CODES]] == raw[["sid_0", "sid_1", "sid_2"]].to_numpy().tolist()
    assert (sids[contract.SID_VERSION] == SID_VERSION).all() and meta.sid_version == SID_VERSION
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
        "sids": hand_dataset.sid_dir(SID_VERSION) / "sids.parquet",
        "events": hand_dataset.events,
        "users": hand_dataset.users,
        "items": hand_dataset.items,
    }[target]
    _rewrite(path, change)
    with pytest.raises(DataError, match=message) as caught:
        build(hand_dataset)
    assert path.name in str(caught.value)
    assert not (hand_dataset.features / contract.FEATURE_META_FILE).exists()


def test_missing_files_and_codebook_size(hand_dataset: DatasetPaths) -> None:
    (hand_dataset.sid_dir(SID_VERSION) / "config.json").unlink()
    with pytest.raises(DataError, match="--codebook-size"):
        build(hand_dataset)
    meta = features.build_features(features.FeaturesConfig(dataset=hand_dataset.root, codebook_size=4))
    assert meta.sid_levels == 3
    with pytest.raises(DataError, match="sids.parquet: file not found"):
        features.main(["--dataset", str(hand_dataset.root), "--sid-version", "nope"])
    hand_dataset.events.unlink()
    with pytest.raises(DataError, match="events.parquet: file not found"):
        build(hand_dataset)


def test_cli_rejects_unknown_arguments_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        features.main(["--dataset", str(tmp_path), "--bogus", "1"])
    with pytest.raises(ValueError, match="codebook_size=0"):
        features.FeaturesConfig(dataset=tmp_path, codebook_size=0)
