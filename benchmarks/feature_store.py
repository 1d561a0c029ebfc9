"""Feast against the limits of its own stores, measured in one run.

    python -m benchmarks.feature_store                    # 1M synthetic events
    python -m benchmarks.feature_store --events 100000

On a synthetic dataset (items = events / 10, users = events / 100) published
by the pipeline's own commands into its own Feast repository
(``artifacts/bench_feature_store``):

- **materialize**: ``FeatureStore.materialize`` over every stamp (what
  ``feast materialize`` runs) into the sqlite online store, rows/s, against
  writing the very rows it wrote straight into an empty sqlite table of the
  same schema (one ``executemany`` per table, one transaction): the store's
  limit. Then the same materialize into Redis (``feature_store.redis.yaml``,
  a redis-server started for the run and stopped after it,
  features/online_store.py), against sqlite's.
- **historical retrieval**: ``get_historical_features`` of the ranker's
  feature service for every event through the project's as-of offline store
  (features/offline_store.py), against the same point-in-time join done
  directly with pandas ``merge_asof`` per view, and (on a random sample of
  events, because it grows with the square of a key's events) Feast's stock
  duckdb store against the as-of store on that sample. Rows in = rows out
  is checked for every method, and the as-of rows are compared value for
  value with ``merge_asof``'s.
- **online**: ``get_online_features`` latency for one user and 100 candidate
  items, p50/p99 over many requests, against reading the same entity keys'
  rows straight from the sqlite tables (no protobuf decoding); and the same
  requests through Feast on Redis against Feast on sqlite, whose answers
  must be equal value for value.

Writes ``benchmarks/results/feature_store.{json,md}``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from benchmarks.report import latency_stats, markdown_table, rerun_command, time_each, write_results
from benchmarks.scale import ScaleConfig, size_commands
import demo
from features import online_store, publish
from sidrank import contract
from sidrank.cli import add_config_arguments, parse_config, parser_for, run_main
from sidrank.envvars import env_override
from sidrank.schema import from_micros, to_micros

PROG = "python -m benchmarks.feature_store"

WARMUP_REQUESTS = 10
# Online requests whose answers from Redis and sqlite are compared value for value.
COMPARED_REQUESTS = 50


@dataclass
class FeatureStoreBenchConfig:
    """What the feature store benchmark runs.

    Args:
        events: synthetic dataset size.
        stock_sample: events retrieved through Feast's stock duckdb store (and the as-of store, for the ratio).
        requests: online requests timed (after WARMUP_REQUESTS warm-up requests).
        candidates: items per online request.
        root: where the dataset and its Feast repository go (rebuilt when missing).
        name: results file name.
        seed: dataset and sampling seed.
    """

    events: int = 1_000_000
    stock_sample: int = 50_000
    requests: int = 300
    candidates: int = 100
    root: Path = Path("artifacts/bench_feature_store")
    name: str = "feature_store"
    seed: int = 0


def prepare(cfg: FeatureStoreBenchConfig) -> tuple[Path, Path]:
    """(dataset folder, Feast repository): ingest, tokenize, features and ``feast apply``, no materialize."""
    scale = ScaleConfig(events=(cfg.events,), root=cfg.root, seed=cfg.seed)
    folder = cfg.root / f"events_{cfg.events}"
    dataset, repo = folder / "artifacts" / "synthetic", folder / "feature_repo"
    if (repo / "data" / "registry.db").exists():
        return dataset, repo
    stages, _ = size_commands(scale, cfg.events)
    for name, argv in stages[:4]:
        demo.run_stage(name, [*argv, "--no-materialize"] if name == "feast" else argv)
    return dataset, repo


def feature_store(repo: Path, online: str = "sqlite", offline_type: str | None = None):
    """The repository's FeatureStore on the ``online`` store's yaml, optionally with another offline store type."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    repo = repo.resolve()
    # As Feast reads it: environment variables expanded (the Redis address).
    raw = yaml.safe_load(os.path.expandvars(online_store.store_yaml(repo, online).read_text()))
    # Relative paths in the yaml are the repository's; from a config object Feast takes them from the cwd.
    raw["registry"] = str(repo / raw["registry"])
    if "path" in raw["online_store"]:
        raw["online_store"]["path"] = str(repo / raw["online_store"]["path"])
    if offline_type is not None:
        raw["offline_store"] = {"type": offline_type}
    return FeatureStore(config=RepoConfig(**raw, repo_path=repo))


def online_tables(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as con:
        return dict(con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())


def _timed_materialize(store, repo: Path) -> float:
    start, end = publish.stamp_range(repo)
    began = time.perf_counter()
    store.materialize(start.to_pydatetime(), end.to_pydatetime())
    return time.perf_counter() - began


def bench_materialize(repo: Path) -> dict:
    """Feast's materialize into sqlite against direct sqlite writes of the same rows, then into Redis.

    Both stores start empty: the sqlite tables of an earlier run are emptied, the Redis server is new.
    """
    online = repo / "data" / "online_store.db"
    tables = online_tables(online)
    with sqlite3.connect(online) as con:
        for table in tables:
            con.execute(f'DELETE FROM "{table}"')
    feast_s = _timed_materialize(feature_store(repo), repo)
    with sqlite3.connect(online) as con:
        rows = {t: con.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}
        entities = sum(con.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{t}"').fetchone()[0] for t in tables)
    direct = online.with_name("direct_write.db")
    direct.unlink(missing_ok=True)
    with sqlite3.connect(direct) as con:
        for sql in tables.values():
            con.execute(sql)
        began = time.perf_counter()
        with con:
            for table, values in rows.items():
                marks = ", ".join("?" * len(values[0]))
                con.executemany(f'INSERT INTO "{table}" VALUES ({marks})', values)
        direct_s = time.perf_counter() - began
    direct.unlink()
    redis = feature_store(repo, "redis")
    redis_s = _timed_materialize(redis, repo)
    n = sum(len(v) for v in rows.values())
    return {
        "sqlite_rows": n, "entity_rows": entities, "views": len(tables),
        "feast_s": feast_s, "direct_s": direct_s,
        "feast_rows_per_s": n / feast_s, "direct_rows_per_s": n / direct_s,
        "feast_entity_rows_per_s": entities / feast_s,
        "redis_s": redis_s, "redis_entity_rows_per_s": entities / redis_s, "redis_keys": redis_keys(redis),
    }


def redis_keys(store) -> int:
    """Keys in the store's Redis database: one hash per entity key, shared by the views of that key."""
    from redis import Redis

    host, port = store.config.online_store.connection_string.split(",")[0].rsplit(":", 1)
    with Redis(host=host, port=int(port)) as client:
        return int(client.dbsize())


def entity_frame(dataset: Path, repo: Path) -> pd.DataFrame:
    """The events as entity rows of the repository's default SID version."""
    events = pd.read_parquet(dataset / "events.parquet", columns=list(contract.ENTITY_COLUMNS))
    events["event_timestamp"] = from_micros(to_micros(events["event_timestamp"]))
    events[contract.SID_VERSION] = contract.RepoPaths(repo).published_sid_version()
    return events


def service_views(store, service: str) -> list[tuple[str, list[str], str, list[str]]]:
    """(parquet path, join keys, timestamp column, features) of every view of a feature service."""
    views = []
    for projection in store.get_feature_service(service).feature_view_projections:
        view = store.get_feature_view(projection.name)
        keys = [e.name for e in view.entity_columns]
        path = Path(store.config.repo_path) / view.batch_source.path
        views.append((str(path), keys, view.batch_source.timestamp_field, [f.name for f in projection.features]))
    return views


def merge_asof_join(entity: pd.DataFrame, views: list[tuple[str, list[str], str, list[str]]]) -> pd.DataFrame:
    """The point-in-time join with pandas: one ``merge_asof`` per view, on time, by join key."""
    joined = entity.sort_values("event_timestamp", kind="stable")
    for path, keys, ts, features in views:
        table = pd.read_parquet(path, columns=[*keys, ts, *features]).rename(columns={ts: "__ts"})
        table["__ts"] = table["__ts"].astype(joined["event_timestamp"].dtype)
        table = table.sort_values("__ts", kind="stable")
        joined = pd.merge_asof(joined, table, left_on="event_timestamp", right_on="__ts", by=keys,
                               direction="backward", allow_exact_matches=True).drop(columns="__ts")
    return joined.sort_values("row_id", ignore_index=True)


def _timed_retrieval(store, entity: pd.DataFrame, service) -> tuple[float, pa.Table]:
    began = time.perf_counter()
    rows = store.get_historical_features(entity_df=entity, features=service).to_arrow()
    return time.perf_counter() - began, rows.sort_by("row_id")


def _same_values(asof: pa.Table, pandas_rows: pd.DataFrame, features: list[str]) -> bool:
    """Every feature value of the as-of rows equals merge_asof's (nulls and NaN alike)."""
    for column in features:
        left = asof.column(column).to_pylist()
        right = pandas_rows[column].tolist()
        norm = [None if v is None or (isinstance(v, float) and np.isnan(v)) else
                (list(v) if isinstance(v, (list, np.ndarray)) else v) for v in right]
        if left != norm:
            return False
    return True


def bench_historical(cfg: FeatureStoreBenchConfig, dataset: Path, repo: Path) -> dict:
    entity = entity_frame(dataset, repo)
    asof_store = feature_store(repo)
    service = asof_store.get_feature_service(contract.FEATURE_SERVICE)
    views = service_views(asof_store, contract.FEATURE_SERVICE)
    features = [f for *_, fs in views for f in fs]
    asof_s, asof_rows = _timed_retrieval(asof_store, entity, service)
    began = time.perf_counter()
    pandas_rows = merge_asof_join(entity, views)
    pandas_s = time.perf_counter() - began
    equal = len(asof_rows) == len(pandas_rows) == len(entity) and _same_values(asof_rows, pandas_rows, features)
    sample = entity.sample(n=min(cfg.stock_sample, len(entity)), random_state=cfg.seed)
    sample_asof_s, sample_asof = _timed_retrieval(asof_store, sample, service)
    stock = feature_store(repo, offline_type="duckdb")
    # The stock duckdb store reads relative source paths from the working directory.
    with contextlib.chdir(repo.resolve()):
        stock_s, stock_rows = _timed_retrieval(stock, sample, service)
    return {
        "entity_rows": len(entity), "features": len(features),
        "asof_s": asof_s, "asof_rows_out": len(asof_rows), "pandas_s": pandas_s, "pandas_rows_out": len(pandas_rows),
        "asof_equals_merge_asof": bool(equal),
        "sample_rows": len(sample), "sample_asof_s": sample_asof_s, "stock_s": stock_s,
        "stock_rows_out": len(stock_rows), "sample_asof_rows_out": len(sample_asof),
    }


def sqlite_reader(store, service, sid_version: str) -> Callable[[tuple[int, list[int]]], None]:
    """Read (user id, item ids)'s rows of every view of ``service`` straight from the sqlite online store.

    The same keys and tables Feast's online read touches, one SELECT per view,
    without decoding the values: the limit of the store.
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    path = Path(store.config.online_store.path)
    conn = sqlite3.connect(path if path.is_absolute() else Path(store.repo_path) / path, check_same_thread=False)
    version = store.config.entity_key_serialization_version
    views = []
    for projection in service.feature_view_projections:
        join_keys = store.get_feature_view(projection.name).join_keys
        views.append((f'"{store.project}_{projection.name}"', join_keys))

    def key(join_keys: list[str], value: int) -> bytes:
        # The id key first; the SID views are also keyed by sid_version.
        values = [Value(int64_val=value)] + [Value(string_val=sid_version)] * (len(join_keys) - 1)
        entity = EntityKey(join_keys=join_keys, entity_values=values)
        return serialize_entity_key(entity, entity_key_serialization_version=version)

    def read(request: tuple[int, list[int]]) -> None:
        user, items = request
        for table, join_keys in views:
            keys = [key(join_keys, user)] if join_keys[0] == "user_id" else [key(join_keys, i) for i in items]
            sql = f"SELECT entity_key, feature_name, value, event_ts FROM {table} WHERE entity_key IN "
            conn.execute(sql + f"({','.join('?' * len(keys))})", keys).fetchall()

    return read


def bench_online(cfg: FeatureStoreBenchConfig, repo: Path) -> dict:
    """The same 1 user x ``candidates`` requests through Feast on sqlite and on Redis, and direct from sqlite."""
    stores = {name: feature_store(repo, name) for name in online_store.STORE_FILES}
    service = stores["sqlite"].get_feature_service(contract.FEATURE_SERVICE)
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items = cfg.events // 100, cfg.events // 10
    requests = [(int(rng.integers(1, n_users + 1)), rng.integers(1, n_items + 1, cfg.candidates).tolist())
                for _ in range(cfg.requests + WARMUP_REQUESTS)]

    version = contract.RepoPaths(repo).published_sid_version()

    def reader(store) -> Callable[[tuple[int, list[int]]], pd.DataFrame]:
        def read(request: tuple[int, list[int]]) -> pd.DataFrame:
            user, items = request
            rows = [{"user_id": user, "item_id": i, contract.SID_VERSION: version} for i in items]
            return store.get_online_features(features=service, entity_rows=rows).to_df()
        return read

    readers = {name: reader(store) for name, store in stores.items()}
    readers["direct_sqlite"] = sqlite_reader(stores["sqlite"], service, version)
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    # Interleaved, request by request, so a change in the shared machine's load hits every reader alike.
    for request in requests:
        for name, read in readers.items():
            seconds[name] += time_each(read, [request])
    sample = requests[:COMPARED_REQUESTS]
    answers = {name: [reader(store)(r) for r in sample] for name, store in stores.items()}
    equal = all(_cells(a).equals(_cells(b)) for a, b in zip(answers["sqlite"], answers["redis"]))
    return {"requests": cfg.requests, "candidates": cfg.candidates,
            "feast": latency_stats(seconds["sqlite"][WARMUP_REQUESTS:]),
            "redis": latency_stats(seconds["redis"][WARMUP_REQUESTS:]),
            "direct_sqlite": latency_stats(seconds["direct_sqlite"][WARMUP_REQUESTS:]),
            "compared_requests": len(sample), "redis_equals_sqlite": bool(equal)}


def _cells(frame: pd.DataFrame) -> pd.DataFrame:
    """List cells as tuples, so two answers compare with ``equals`` (which takes NaN == NaN)."""
    return frame.map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)


def table(result: dict) -> str:
    m, h, o = result["materialize"], result["historical"], result["online"]
    rows = [
        ["materialize (sqlite online store)", f"{m['feast_rows_per_s']:,.0f} rows/s ({m['feast_s']:.1f} s)",
         "direct sqlite executemany, same rows", f"{m['direct_rows_per_s']:,.0f} rows/s ({m['direct_s']:.1f} s)",
         f"{m['feast_rows_per_s'] / m['direct_rows_per_s']:.3f}x",
         f"{m['sqlite_rows']:,} feature rows of {m['entity_rows']:,} entity rows, {m['views']} views"],
        ["get_historical_features, as-of store", f"{h['entity_rows'] / h['asof_s']:,.0f} rows/s ({h['asof_s']:.1f} s)",
         "pandas merge_asof per view", f"{h['entity_rows'] / h['pandas_s']:,.0f} rows/s ({h['pandas_s']:.1f} s)",
         f"{h['pandas_s'] / h['asof_s']:.2f}x",
         f"{h['entity_rows']:,} rows in, {h['asof_rows_out']:,} / {h['pandas_rows_out']:,} out; "
         f"values equal: {h['asof_equals_merge_asof']}"],
        ["get_historical_features, Feast's stock duckdb store",
         f"{h['sample_rows'] / h['stock_s']:,.0f} rows/s ({h['stock_s']:.1f} s)",
         "as-of store, same sample", f"{h['sample_rows'] / h['sample_asof_s']:,.0f} rows/s ({h['sample_asof_s']:.1f} s)",
         f"{h['sample_asof_s'] / h['stock_s']:.3f}x",
         f"random sample of {h['sample_rows']:,} events; {h['stock_rows_out']:,} / {h['sample_asof_rows_out']:,} out"],
        ["get_online_features, 1 user x {0} items".format(o["candidates"]),
         f"p50 {o['feast']['p50_ms']:.1f} ms, p99 {o['feast']['p99_ms']:.1f} ms",
         "direct sqlite SELECT of the same keys",
         f"p50 {o['direct_sqlite']['p50_ms']:.2f} ms, p99 {o['direct_sqlite']['p99_ms']:.2f} ms",
         f"{o['feast']['p50_ms'] / o['direct_sqlite']['p50_ms']:.1f}x slower (p50)",
         f"{o['requests']} requests"],
        ["materialize, Redis online store", f"{m['redis_entity_rows_per_s']:,.0f} rows/s ({m['redis_s']:.1f} s)",
         "Feast into sqlite, same rows", f"{m['feast_entity_rows_per_s']:,.0f} rows/s ({m['feast_s']:.1f} s)",
         f"{m['feast_s'] / m['redis_s']:.2f}x",
         f"{m['entity_rows']:,} entity rows, {m['views']} views, {m['redis_keys']:,} Redis keys"],
        ["get_online_features on Redis, 1 user x {0} items".format(o["candidates"]),
         f"p50 {o['redis']['p50_ms']:.1f} ms, p99 {o['redis']['p99_ms']:.1f} ms",
         "Feast on sqlite, same requests",
         f"p50 {o['feast']['p50_ms']:.1f} ms, p99 {o['feast']['p99_ms']:.1f} ms",
         f"{o['feast']['p50_ms'] / o['redis']['p50_ms']:.2f}x (p50), {o['feast']['p99_ms'] / o['redis']['p99_ms']:.2f}x (p99)",
         f"{o['requests']} requests; answers equal to sqlite's: {o['redis_equals_sqlite']} "
         f"({o['compared_requests']} compared)"],
    ]
    header = ["operation", "measured", "baseline (same run)", "baseline", "speed vs baseline", "rows"]
    return markdown_table(header, rows)


def load_note(load: dict) -> str:
    """The machine's load around the measurements: other jobs inflate every time, not the same-run ratios."""
    before, after = (", ".join(f"{v:.1f}" for v in load[k]) for k in ("before", "after"))
    return (f"Load average (1, 5, 15 min) before {before}, after {after}: the machine may be shared, which "
            f"slows every operation; the ratios compare stores in the same run (online requests interleaved).")


def run(cfg: FeatureStoreBenchConfig, command: str) -> dict:
    """Prepare, start a redis-server for the run, measure, write the results; the server is stopped after."""
    dataset, repo = prepare(cfg)
    load_before = os.getloadavg()
    with (
        online_store.redis_server(cfg.root / "redis") as server,
        env_override({online_store.REDIS_ENV: server.connection_string}),
    ):
        result = {"events": cfg.events, "materialize": bench_materialize(repo)}
        result["historical"] = bench_historical(cfg, dataset, repo)
        result["online"] = bench_online(cfg, repo)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    text = table(result) + "\n\n" + load_note(result["load_average"])
    write_results(cfg.name, {**result, "config": {k: str(v) for k, v in vars(cfg).items()}}, text, command)
    print(text)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = parser_for(PROG, __doc__.splitlines()[0])
    add_config_arguments(parser, FeatureStoreBenchConfig)
    cfg = parse_config(parser, FeatureStoreBenchConfig, argv)
    return run(cfg, rerun_command("benchmarks.feature_store", argv))


if __name__ == "__main__":
    run_main(main, PROG)
