"""Serving under concurrent load: throughput and p50/p99 at 1..8 clients, beside the bare Feast read and forward.

    make demo                                   # trains artifacts/demo and publishes feature_repo
    python -m benchmarks.serving                # 2 workers, 1/2/4/8 clients, 100 candidates per request
    python -m benchmarks.serving --repo feature_repo --workers 2 --requests 800
    python -m benchmarks.serving --stores sqlite redis   # the same against a Redis online store too

The service runs as its own command, ``python -m ranking.serve http --workers
N`` on 127.0.0.1, in a child process (its workers are processes too), so
clients and server do not share an interpreter. Each client is a thread with
one keep-alive connection sending ``POST /rank`` back to back (a closed loop);
every level sends the same requests. Baselines over the same requests, in
this process while the server idles: the bare Feast online read
(``ranking.rows.OnlineFeatures``) and the bare model forward on pre-built
batches. The service's own overhead is what a 1-client request costs beyond
its Feast read and its forward, as the server timed them for that request
(HTTP, JSON, validation, building the tensors, ranking).

Targets, checked in the same run: throughput at the most clients at least
``min_speedup`` times that of 1 client; p99 at the most clients within
``max_p99_ratio`` times the 1-client p50; overhead under ``max_overhead`` of
a 1-client request; each checked per online store. ``--stores`` picks the
stores: sqlite is the repository's own; for Redis a redis-server is started
for the run (``features.online_store.redis_server``), the repository's
published tables are materialized into it, and Feast's yaml switch
(``features.online_store.redis_environment``) points this process and the
server at it. Writes ``benchmarks/results/<name>.{json,md}``; the host is
shared, so the load average before and after is recorded too.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import psutil

from feast.constants import FEAST_FS_YAML_FILE_PATH_ENV_NAME

from benchmarks.report import RESULTS_DIR, latency_stats, markdown_table, rerun_command, time_each, write_results
from sidrank.envvars import env_override
from sidrank.net import free_port
from features import online_store, publish
from ranking.serve import HOST, Query, Ranker, ServeConfig, distinct_ids
from ranking.service import freeze_heap

log = logging.getLogger("benchmarks.serving")


@dataclass
class ServingBenchConfig:
    """What the benchmark measures.

    Args:
        run: run folder of ``ranking.train`` (``make demo`` writes artifacts/demo).
        repo: the published Feast repository the run was trained from.
        stores: online stores to serve from, one after the other (``features.online_store.STORE_FILES``).
        workers: server worker processes.
        clients: concurrent clients per level.
        requests: timed requests per level, shared by its clients.
        candidates: item ids per request, drawn without replacement from the model's items.
        warmup: untimed requests per client before each level.
        seed: draws users and candidates.
        min_speedup: target: throughput at the most clients over that at 1 client.
        max_p99_ratio: target: p99 at the most clients over the 1-client p50.
        max_overhead: target: share of a 1-client request beyond the bare Feast read and forward.
        start_timeout: seconds the server may take to answer /health.
        name: results file stem.
        results_dir: where the JSON and Markdown go.
    """

    run: Path = Path("artifacts/demo")
    repo: Path = Path("feature_repo")
    stores: tuple[str, ...] = ("sqlite",)
    workers: int = 2
    clients: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 400
    candidates: int = 100
    warmup: int = 5
    seed: int = 0
    min_speedup: float = 1.8
    max_p99_ratio: float = 4.0
    max_overhead: float = 0.25
    start_timeout: float = 300.0
    name: str = "serving"
    results_dir: Path = RESULTS_DIR

    def __post_init__(self) -> None:
        self.run, self.repo, self.results_dir = Path(self.run), Path(self.repo), Path(self.results_dir)
        self.clients = tuple(sorted(set(self.clients)))
        self.stores = tuple(dict.fromkeys(self.stores))
        unknown = sorted(set(self.stores) - set(online_store.STORE_FILES))
        if unknown:
            raise ValueError(f"stores {unknown}: expected some of {sorted(online_store.STORE_FILES)}")
        for name in ("requests", "candidates", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clients[0] != 1:
            raise ValueError(f"clients must start at 1 (the speedup's base), got {self.clients}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def make_requests(n: int, candidates: int, n_users: int, n_items: int, seed: int) -> list[Query]:
    """``n`` (known user, distinct known items) requests."""
    if candidates > n_items:
        raise ValueError(f"candidates={candidates} exceeds the model's {n_items} items")
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(1, n_users + 1)), (rng.choice(n_items, candidates, replace=False) + 1).tolist())
            for _ in range(n)]


class Server(NamedTuple):
    """A running ``ranking.serve http``: where it listens and its process (the parent of the workers)."""

    port: int
    pid: int


def cpu_seconds(pid: int, children: bool) -> float:
    """User + system CPU seconds of ``pid``, with its living children (the ranking workers) or without."""
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *(root.children(recursive=True) if children else [])])


class Client:
    """One keep-alive connection to the service."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)

    def get(self, path: str) -> tuple[int, dict]:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def rank(self, request: Query) -> dict:
        body = json.dumps({"user_id": request[0], "item_ids": request[1]})
        self.conn.request("POST", "/rank", body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"POST /rank answered {response.status}: {answer}")
        return answer

    def close(self) -> None:
        self.conn.close()


@contextmanager
def serving_from(store: str, repo: Path, folder: Path) -> Iterator[None]:
    """Feast reads ``repo``'s online features from ``store`` inside the block, here and in child processes.

    Redis: a fresh redis-server, filled by materializing the repository's published tables.
    """
    if store != "redis":
        with env_override({FEAST_FS_YAML_FILE_PATH_ENV_NAME: str(online_store.store_yaml(repo, store).resolve())}):
            yield
        return
    from feast import FeatureStore

    with online_store.redis_server(folder) as redis, env_override(online_store.redis_environment(repo, redis)):
        start, end = publish.stamp_range(repo)
        began = time.perf_counter()
        FeatureStore(repo_path=str(repo)).materialize(start.to_pydatetime(), end.to_pydatetime())
        log.info("materialized %s into redis in %.1fs", repo, time.perf_counter() - began)
        yield


@contextmanager
def server(cfg: ServingBenchConfig) -> Iterator[Server]:
    """``python -m ranking.serve http`` in a child process, yielded once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "ranking.serve", "http", "--run", str(cfg.run), "--repo", str(cfg.repo),
               "--port", str(port), "--workers", str(cfg.workers), "--max-candidates", str(max(cfg.candidates, ServeConfig.max_candidates))]
    with tempfile.TemporaryFile() as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_healthy(child, port, cfg.start_timeout, output)
            yield Server(port, child.pid)
        finally:
            child.terminate()  # uvicorn shuts the app down on SIGTERM, and the app stops its workers
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_healthy(child: subprocess.Popen, port: int, timeout: float, output) -> None:
    """Poll /health until it answers 200; the server's output in the error if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            break
        try:
            client = Client(port)
            try:
                if client.get("/health")[0] == 200:
                    return
            finally:
                client.close()
        except OSError:
            pass
        time.sleep(0.5)
    output.seek(0)
    tail = output.read().decode(errors="replace")[-3000:]
    raise RuntimeError(f"the server on port {port} did not become healthy (exit {child.poll()}):\n{tail}")


def load_level(served: Server, requests: list[Query], clients: int, warmup: int) -> dict:
    """``clients`` threads send ``requests`` between them.

    Returns per request (seconds, the server's timings in ms), the wall seconds,
    and the CPU seconds the server's processes and this process spent meanwhile.
    """
    connections = [Client(served.port) for _ in range(clients)]
    for client in connections:
        for request in requests[:warmup]:
            client.rank(request)
    samples: list[tuple[float, dict]] = []
    next_index = itertools.count()  # next() on a count is atomic under the GIL
    start_line = threading.Barrier(clients + 1)
    errors: list[Exception] = []

    def work(client: Client) -> None:
        start_line.wait()
        try:
            while (i := next(next_index)) < len(requests):
                t0 = time.perf_counter()
                answer = client.rank(requests[i])
                samples.append((time.perf_counter() - t0, {**answer["timings_ms"], "batch": answer["batch"]["requests"]}))
        except Exception as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(client,)) for client in connections]
    for thread in threads:
        thread.start()
    # The client alone: the server is a child of this process.
    server_cpu, client_cpu = cpu_seconds(served.pid, children=True), cpu_seconds(os.getpid(), children=False)
    start_line.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    server_cpu = cpu_seconds(served.pid, children=True) - server_cpu
    client_cpu = cpu_seconds(os.getpid(), children=False) - client_cpu
    for client in connections:
        client.close()
    if errors:
        raise errors[0]
    return {"samples": samples, "wall_s": wall, "server_cpu_s": server_cpu, "client_cpu_s": client_cpu}


def baselines(ranker: Ranker, requests: list[Query], warmup: int) -> dict:
    """Seconds per request of the bare Feast online read and of the bare forward on pre-built batches."""
    read = lambda request: ranker.online.read(*distinct_ids([request]))  # noqa: E731
    time_each(read, requests[:warmup])
    feast = time_each(read, requests)
    batches = [ranker.encode(read(request), [request])[1] for request in requests]
    forward = time_each(ranker.score, batches)
    return {"feast_read": feast, "forward": forward}


def overhead_share(samples: list[tuple[float, dict]]) -> float:
    """p50 over requests of what each cost beyond its own Feast read and forward, over the p50 request.

    Paired per request, so load that comes and goes on a shared host shifts both sides alike.
    """
    beyond = [seconds * 1e3 - t["feast"] - t["forward"] for seconds, t in samples]
    return float(np.median(beyond) / np.median([seconds * 1e3 for seconds, _ in samples]))


def evaluate(levels: dict[int, dict], overhead: float, cfg: ServingBenchConfig) -> dict:
    """The three targets, each with its measured value, threshold and pass/fail."""
    one, most = levels[1], levels[max(levels)]
    speedup = most["throughput_rps"] / one["throughput_rps"]
    p99_ratio = most["p99_ms"] / one["p50_ms"]
    return {
        "speedup": {"value": speedup, "target": f">= {cfg.min_speedup}", "pass": speedup >= cfg.min_speedup},
        "p99_ratio": {"value": p99_ratio, "target": f"<= {cfg.max_p99_ratio}", "pass": p99_ratio <= cfg.max_p99_ratio},
        "overhead": {"value": overhead, "target": f"< {cfg.max_overhead}", "pass": overhead < cfg.max_overhead},
    }


def measure_store(cfg: ServingBenchConfig) -> dict:
    """Every client level against a fresh server, then the baselines, on the store selected now."""
    ranker = Ranker(ServeConfig(run=cfg.run, repo=cfg.repo))
    requests = make_requests(cfg.requests, cfg.candidates, ranker.meta.n_users, ranker.meta.n_items, cfg.seed)
    # This process holds torch and Feast for the baselines: its full garbage collections
    # (hundreds of ms) would otherwise be counted as the server's latency.
    freeze_heap()
    levels = {}
    with server(cfg) as served:
        for clients in cfg.clients:
            measured = load_level(served, requests, clients, cfg.warmup)
            levels[clients] = {**latency_stats([seconds for seconds, _ in measured["samples"]]), "clients": clients,
                               "throughput_rps": len(requests) / measured["wall_s"], "wall_s": measured["wall_s"],
                               "requests_per_batch": float(np.mean([t["batch"] for _, t in measured["samples"]])),
                               "queue_p50_ms": float(np.median([t["queue"] for _, t in measured["samples"]])),
                               "server_cpu_ms_per_request": measured["server_cpu_s"] / len(requests) * 1e3,
                               "client_cpu_ms_per_request": measured["client_cpu_s"] / len(requests) * 1e3}
            if clients == 1:
                alone = measured["samples"]
    split = {key: latency_stats([t[key] / 1e3 for _, t in alone]) for key in ("total", "feast", "tensors", "forward")}
    bare = {key: latency_stats(seconds) for key, seconds in baselines(ranker, requests, cfg.warmup).items()}
    return {
        "levels": {str(k): v for k, v in levels.items()},
        "server_split_1_client": split,
        "baselines": bare,
        "targets": evaluate(levels, overhead_share(alone), cfg),
        "store_type": ranker.online.store.config.online_store.type,
        "sid_version": ranker.sid_version,
        "service": ranker.service,
    }


def run(cfg: ServingBenchConfig) -> dict:
    """Measure each store in turn over the same requests; returns the payload written to JSON."""
    if not (cfg.run / "metrics.json").exists():
        raise SystemExit(f"{cfg.run}/metrics.json not found: run `make demo` first (it trains {cfg.run} "
                         f"and publishes {cfg.repo}), or pass --run and --repo")
    load_before = os.getloadavg()
    stores = {}
    with tempfile.TemporaryDirectory() as folder:
        for store in cfg.stores:
            with serving_from(store, cfg.repo, Path(folder) / store):
                stores[store] = measure_store(cfg)
    return {
        "stores": stores,
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "cpus": os.cpu_count(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }


def store_rows(store: str, measured: dict) -> list[list[str]]:
    """Table rows of one store: a row per client level, the server's split at 1 client, the baselines."""
    one = measured["levels"]["1"]
    rows = [[store, f"POST /rank, {level['clients']} client(s)", f"{level['throughput_rps']:.1f}",
             f"{level['throughput_rps'] / one['throughput_rps']:.2f}x", f"{level['p50_ms']:.2f}",
             f"{level['p99_ms']:.2f}", f"{level['mean_ms']:.2f}", f"{level['requests_per_batch']:.2f}",
             f"{level['queue_p50_ms']:.2f}", f"{level['server_cpu_ms_per_request']:.1f}",
             f"{level['client_cpu_ms_per_request']:.1f}", str(level["n"])]
            for level in measured["levels"].values()]
    split = {"feast": "server: Feast online read (1 client)", "tensors": "server: rows -> tensors (1 client)",
             "forward": "server: model forward (1 client)", "total": "server: rank() total (1 client)"}
    bare = {"feast_read": "baseline: bare Feast online read", "forward": "baseline: bare model forward"}
    stats = [(label, measured["server_split_1_client"][k]) for k, label in split.items()]
    stats += [(label, measured["baselines"][k]) for k, label in bare.items()]
    rows += [[store, label, "", "", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['mean_ms']:.2f}", "", "", "",
              "", str(s["n"])]
             for label, s in stats]
    return rows


def report(payload: dict, cfg: ServingBenchConfig) -> str:
    """Markdown: the rows of every store, then the targets per store."""
    header = ["store", "measurement", "requests/s", "vs 1 client", "p50 ms", "p99 ms", "mean ms",
              "batch size seen by a request (mean)", "queue p50 ms", "server CPU ms/req", "client CPU ms/req", "requests"]
    rows = [row for store, measured in payload["stores"].items() for row in store_rows(store, measured)]
    names = {"speedup": f"throughput at {max(cfg.clients)} clients / 1 client",
             "p99_ratio": f"p99 at {max(cfg.clients)} clients / 1-client p50",
             "overhead": "service overhead beyond the request's Feast read + forward, share of a 1-client p50"}
    targets = [f"- {store}: {names[k]}: {t['value']:.2f} (target {t['target']}): {'PASS' if t['pass'] else 'FAIL'}"
               for store, measured in payload["stores"].items() for k, t in measured["targets"].items()]
    load = payload["load_average_1m"]
    service = next(iter(payload["stores"].values()))["service"]
    return (
        markdown_table(header, rows) + "\n\n" + "\n".join(targets) + "\n\n"
        f"{cfg.candidates} candidates per request, {cfg.requests} timed requests per level "
        f"({cfg.warmup} warm-up per client), {cfg.workers} server workers, run `{cfg.run}`, service `{service}`. "
        f"Clients and server share the machine's {payload['cpus']} CPUs; 1-min load average "
        f"{load['before']:.2f} before, {load['after']:.2f} after (shared host). CPU ms/req: CPU time of the "
        f"server's processes (all workers) and of the client process over a level, per request; with the "
        f"host to itself, {payload['cpus']} CPUs bound the throughput near {payload['cpus']} s / (server + "
        f"client CPU per request)."
    )


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    defaults = ServingBenchConfig()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    cfg = ServingBenchConfig(**vars(parser.parse_args(argv)))
    payload = run(cfg)
    text = report(payload, cfg)
    write_results(cfg.name, payload, text, rerun_command("benchmarks.serving", argv), results_dir=cfg.results_dir)
    print(text)
    return payload


if __name__ == "__main__":
    main()
