"""Publish a small dataset into a tmp copy of feature_repo and read it back with real Feast.

Offline store duckdb, online store sqlite, the real `feast` CLI for apply and
materialize (features/publish.py), ranking/rows.py for retrieval. Two SID
versions with different code lengths are published into the same repository:
the first stays the default, both stay retrievable through the one service
``ranker_v1`` with the version as a key, offline and online.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from builders import (
    EVENTS_START,
    TEST_SID_VERSION,
    build_features,
    comparable_rows,
    publish_to_repo_copy,
    random_tied_events,
    write_feature_dataset,
    write_random_sid_version,
)

from feast import FeatureStore

from features import publish
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from sidrank.contract import DatasetPaths
from sidrank import contract
from ranking.rows import load_training_rows, online_features, row_chunks

N_USERS, N_ITEMS = 8, 10
# The second version: other codes, other length (P) and codebook size (K).
SID_VERSION_2, LEVELS_2, CODES_2 = "test-v2", 2, 6


class Published(NamedTuple):
    paths: DatasetPaths
    repo: Path
    events: pd.DataFrame
    rows: pd.DataFrame  # the default version, TEST_SID_VERSION
    rows_2: pd.DataFrame  # SID_VERSION_2, asked for by name


def feature_table(repo: Path, name: str, version: str = TEST_SID_VERSION) -> pd.DataFrame:
    """A published table; of a SID-version table, the rows of ``version`` without the key column."""
    table = pd.read_parquet(contract.RepoPaths(repo).table(name))
    if name in contract.SID_VERSION_TABLES:
        table = table[table[contract.SID_VERSION] == version].drop(columns=contract.SID_VERSION)
    return table.reset_index(drop=True)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    root = tmp_path_factory.mktemp("roundtrip")
    frame = random_tied_events(N_USERS, N_ITEMS, n_events=150, n_times=10, seed=1)
    # Exact (user, item, timestamp) repeats with other labels: distinct events, one join key.
    repeats = frame.iloc[:20].assign(label=lambda f: 1 - f["label"])
    events = assign_protocol_split(pd.concat([frame, repeats], ignore_index=True), "roundtrip events")
    paths = write_feature_dataset(root / "data", events, N_USERS, N_ITEMS)
    repo = publish_to_repo_copy(paths, root / "repo", materialize=True)
    write_random_sid_version(paths, SID_VERSION_2, levels=LEVELS_2, codebook_size=CODES_2, rng=np.random.default_rng(7))
    build_features(paths)
    publish.main(["--dataset", str(paths.root), "--repo", str(repo), "--no-set-default", "--no-materialize"])
    # Feast's own materialize, in-process: the CLI would add a ~10 s interpreter start.
    start, end = publish.stamp_range(repo)
    FeatureStore(repo_path=str(repo)).materialize(start.to_pydatetime(), end.to_pydatetime())
    rows_2 = load_training_rows(repo, events, sid_version=SID_VERSION_2)
    return Published(paths, repo, events, load_training_rows(repo, events), rows_2)


def test_every_entity_row_comes_back_in_row_id_order(published: Published) -> None:
    events, rows = published.events, published.rows
    # The `file` offline store would collapse these: many rows share (user_id, event_timestamp).
    assert events.duplicated(["user_id", "event_timestamp"]).sum() >= 50
    assert events.duplicated(["user_id", "item_id", "event_timestamp"]).sum() >= 20
    assert len(rows) == len(events)
    assert rows["row_id"].tolist() == sorted(events["row_id"])
    assert rows[list(contract.ENTITY_COLUMNS)].dtypes.equals(events[list(contract.ENTITY_COLUMNS)].dtypes)
    merged = rows.merge(events, on="row_id", suffixes=("", "_event"))
    for column in ("user_id", "item_id", "label", "event_timestamp"):
        assert (merged[column] == merged[f"{column}_event"]).all(), column


@pytest.mark.parametrize("version", [TEST_SID_VERSION, SID_VERSION_2])
def test_values_equal_the_source_tables_as_of_each_row(published: Published, version: str) -> None:
    rows = comparable_rows(published.rows if version == TEST_SID_VERSION else published.rows_2)
    expected = rows[["row_id", "user_id", "item_id", "event_timestamp"]].sort_values("event_timestamp")
    for name, key in (("user_behaviour", "user_id"), ("item_behaviour", "item_id"), ("user_profile", "user_id"),
                      ("item_content", "item_id"), ("item_sids", "item_id"), ("user_sid_history", "user_id")):
        table = feature_table(published.repo, name, version).sort_values("event_timestamp")
        table["event_timestamp"] = table["event_timestamp"].dt.as_unit("ns")
        # Point-in-time semantics re-implemented with pandas: latest stamp <= the row's time.
        expected = pd.merge_asof(expected, table, on="event_timestamp", by=key, allow_exact_matches=True)
    expected = comparable_rows(expected.sort_values("row_id", ignore_index=True))
    for column in [c for c in rows.columns if c not in (*contract.ENTITY_COLUMNS, contract.SID_VERSION)]:
        assert rows[column].tolist() == expected[column].tolist(), column
    assert (rows[contract.SID_VERSION] == version).all()
    assert rows["age_id"].notna().all() and rows["year_bucket"].notna().all()  # 1970 stamps never expire
    # Declared by the repository, published as 0, absent from this dataset's feature meta: not in its rows.
    assert "occupation_id" not in rows and (feature_table(published.repo, "user_profile")["occupation_id"] == 0).all()


def test_two_sid_versions_come_back_intact_and_different(published: Published) -> None:
    v1, v2 = comparable_rows(published.rows), comparable_rows(published.rows_2)
    assert v1["row_id"].tolist() == v2["row_id"].tolist() == sorted(published.events["row_id"])
    assert {len(c) for c in v1[contract.SID_CODES]} == {3} and {len(c) for c in v2[contract.SID_CODES]} == {LEVELS_2}
    assert max(max(c) for c in v2[contract.SID_CODES]) >= 4  # K = 6: codes beyond the first version's K = 4
    assert (v1[contract.HIST_SID_PREFIXES[0]] != v2[contract.HIST_SID_PREFIXES[0]]).any()
    shared = [c for c in v1.columns if c not in (contract.SID_CODES, contract.SID_VERSION, *contract.HIST_SID_PREFIXES)]
    assert v1[shared].equals(v2[shared])
    paths = contract.RepoPaths(published.repo)
    registry = paths.read_sid_registry()
    assert registry["default"] == TEST_SID_VERSION and sorted(registry["versions"]) == [TEST_SID_VERSION, SID_VERSION_2]
    metas = {v: json.loads(paths.feature_meta_path(v).read_text()) for v in (TEST_SID_VERSION, SID_VERSION_2)}
    assert [(m["sid_levels"], m["sid_codebook_size"]) for m in metas.values()] == [(3, 4), (LEVELS_2, CODES_2)]
    assert json.loads(paths.default_feature_meta_path.read_text()) == metas[TEST_SID_VERSION]  # --no-set-default
    # One table per SID view holds both versions, every item once per version.
    sids = pd.read_parquet(paths.table("item_sids"))
    assert sids.groupby(contract.SID_VERSION)["item_id"].apply(sorted).to_dict() == {
        v: list(range(1, N_ITEMS + 1)) for v in (TEST_SID_VERSION, SID_VERSION_2)
    }
    published_versions = f"'{TEST_SID_VERSION}', '{SID_VERSION_2}'"
    with pytest.raises(DataError, match=f"SID version 'test-v3' is not published .*{published_versions}"):
        load_training_rows(published.repo, published.events.iloc[:5], sid_version="test-v3")
    with pytest.raises(DataError, match=r"no feature service 'ranker_v2' \(applied: \['ranker_v1'\]\)"):
        load_training_rows(published.repo, published.events.iloc[:5], service="ranker_v2")


def test_registry_adds_versions_drops_other_events_and_refuses_name_clashes(tmp_path: Path) -> None:
    meta = {"sid_version": "a-1", "sid_levels": 3, "sid_codebook_size": 8, "events_sha256": "e1"}
    empty = contract.RepoPaths(tmp_path).read_sid_registry()
    registry = publish.updated_registry(empty, meta, tmp_path, set_default=False)
    assert registry["default"] == "a-1" and registry["versions"]["a-1"]["name"] == "a_1"
    registry = publish.updated_registry(registry, {**meta, "sid_version": "b"}, tmp_path, set_default=False)
    assert registry["default"] == "a-1" and sorted(registry["versions"]) == ["a-1", "b"]
    registry = publish.updated_registry(registry, {**meta, "sid_version": "c"}, tmp_path, set_default=True)
    assert registry["default"] == "c" and sorted(registry["versions"]) == ["a-1", "b", "c"]
    with pytest.raises(DataError, match="'a.1' has the file name 'a_1' of the published version 'a-1'"):
        publish.updated_registry(registry, {**meta, "sid_version": "a.1"}, tmp_path, set_default=True)
    other_events = publish.updated_registry(registry, {**meta, "events_sha256": "e2"}, tmp_path, set_default=False)
    assert other_events == {"default": "a-1", "versions": {"a-1": other_events["versions"]["a-1"]}}


def test_microsecond_stamps_are_kept(published: Published) -> None:
    behaviour = feature_table(published.repo, "user_behaviour")
    n = len(behaviour)
    micro = pd.Timedelta(microseconds=1)
    stamps = behaviour["event_timestamp"]
    probes = pd.DataFrame(
        {
            "row_id": np.arange(2 * n),
            "user_id": np.tile(behaviour["user_id"].to_numpy(), 2),
            "item_id": 1,
            # At the stamp the row is visible; 1 us earlier (the events' own time) it is not.
            "event_timestamp": pd.concat([stamps, stamps - micro], ignore_index=True),
            "label": 0,
        }
    )
    rows = comparable_rows(load_training_rows(published.repo, probes))
    previous = behaviour.groupby("user_id")["user_count"].shift(1).fillna(0).astype(np.int64)
    assert rows["user_count"].iloc[:n].tolist() == behaviour["user_count"].tolist()
    assert rows["user_count"].iloc[n:].tolist() == previous.tolist()


def test_chunked_retrieval_returns_the_same_rows(published: Published) -> None:
    chunked = load_training_rows(published.repo, published.events.sample(frac=1, random_state=0), max_rows_per_call=40)
    left, right = comparable_rows(chunked), comparable_rows(published.rows)
    assert left.drop(columns="event_timestamp").equals(right.drop(columns="event_timestamp"))
    assert (left["event_timestamp"] == right["event_timestamp"]).all()


def test_sid_version_and_missing_sid_are_errors(published: Published) -> None:
    with pytest.raises(DataError, match=f"SID version 'other' is not published .*\\['{TEST_SID_VERSION}'"):
        load_training_rows(published.repo, published.events.iloc[:5], sid_version="other")
    early = published.events.iloc[:3].assign(event_timestamp=EVENTS_START - pd.Timedelta(days=1))
    with pytest.raises(DataError, match=f"3 rows .* got no SID of sid_version '{TEST_SID_VERSION}'"):
        load_training_rows(published.repo, early)
    with pytest.raises(DataError, match="row_id"):
        load_training_rows(published.repo, pd.concat([published.events.iloc[:2]] * 2))


def test_online_store_serves_the_latest_values(published: Published) -> None:
    user_id, item_ids = 1, [2, 5, 7]
    online = online_features(published.repo, user_id, item_ids)
    assert online["item_id"].tolist() == item_ids
    user_last = feature_table(published.repo, "user_behaviour").groupby("user_id").last().loc[user_id]
    assert (online["user_count"] == user_last["user_count"]).all()
    assert [list(h) for h in online[contract.HIST_ITEMS]] == [list(user_last[contract.HIST_ITEMS])] * len(item_ids)
    item_last = feature_table(published.repo, "item_behaviour").groupby("item_id").last()
    assert online["item_pos_count"].tolist() == item_last.loc[item_ids, "item_pos_count"].tolist()
    assert (online[contract.SID_VERSION] == TEST_SID_VERSION).all()
    # Both versions side by side: each request gets the codes of the version it names.
    for version in (TEST_SID_VERSION, SID_VERSION_2):
        online = online_features(published.repo, user_id, item_ids, sid_version=version)
        sids = feature_table(published.repo, "item_sids", version).set_index("item_id")
        assert [list(c) for c in online[contract.SID_CODES]] == [list(sids.at[i, contract.SID_CODES]) for i in item_ids]
        history = feature_table(published.repo, "user_sid_history", version).groupby("user_id").last().loc[user_id]
        assert [list(h) for h in online["hist_sid_p2"]] == [list(history["hist_sid_p2"])] * len(item_ids)


def test_registered_views_never_expire(published: Published) -> None:
    store = FeatureStore(repo_path=str(published.repo))
    assert [service.name for service in store.list_feature_services()] == [contract.FEATURE_SERVICE]
    views = sorted(view.name for view in store.list_feature_views())
    service = store.get_feature_service(contract.FEATURE_SERVICE)
    assert sorted(p.name for p in service.feature_view_projections) == views
    assert views == ["item_behaviour_fv", "item_content_fv", "item_sid_fv", "user_behaviour_fv", "user_profile_fv",
                     "user_sid_history_fv"]
    assert all(store.get_feature_view(name).ttl == timedelta(0) for name in views)


def test_failing_feast_command_raises_with_its_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `/bin/sh -c <repo> apply` fails like a broken CLI would, without paying Feast's start-up.
    monkeypatch.setattr(publish, "feast_executable", lambda: "/bin/sh")
    with pytest.raises(RuntimeError, match="exit code 127:\n.*not found"):
        publish.run_feast(tmp_path / "no-such-repo", "apply")
    with pytest.raises(ValueError, match="no feature_store.yaml"):
        publish.PublishConfig(dataset=tmp_path, repo=tmp_path)


def test_row_chunks_are_consecutive_row_id_ranges_within_the_row_bound() -> None:
    row_ids = np.array([9, 3, 7, 0, 1, 8, 2, 6, 5, 4])
    chunks = row_chunks(row_ids, max_rows=3)
    assert [row_ids[c].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
