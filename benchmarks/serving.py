"""Online ranking latency: end-to-end HTTP p50/p99 for 100 candidates, its split, and baselines in the same run.

    make demo                                   # trains artifacts/demo and publishes feature_repo
    python -m benchmarks.serving                # 500 requests of 100 random candidates each
    python -m benchmarks.serving --run artifacts/demo --repo feature_repo --requests 1000

The server (``ranking.serve``) runs in a thread of this process on 127.0.0.1
and a client sends ``POST /rank`` over a new connection per request (the
server speaks HTTP/1.0), so end-to-end covers TCP, JSON, the Feast online
read, the tensors and the model. The server reports its own split per
request (Feast read, tensor build, forward). Baselines over the same
requests, measured in the same run: the model forward alone on pre-built
batches, and a direct SQL read of the same entity keys from the sqlite
online store (no protobuf decoding): the floor of any read through Feast.
Writes ``benchmarks/results/<name>.{json,md}``; the host is shared, so the
load average before and after is recorded too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.feature_store import sqlite_reader
from benchmarks.report import RESULTS_DIR, latency_stats, markdown_table, rerun_command, time_each, write_results
from ranking.serve import HOST, Ranker, ServeConfig, make_server

log = logging.getLogger("benchmarks.serving")

Request = tuple[int, list[int]]


@dataclass
class ServingBenchConfig:
    """What the benchmark measures.

    Args:
        run: run folder of ``ranking.train`` (``make demo`` writes artifacts/demo).
        repo: the published Feast repository the run was trained from.
        requests: timed requests per measurement.
        candidates: item ids per request, drawn without replacement from the model's items.
        warmup: untimed requests first.
        seed: draws users and candidates.
        target_p99_ms: the end-to-end p99 latency the benchmark checks against.
        name: results file stem.
        results_dir: where the JSON and Markdown go.
    """

    run: Path = Path("artifacts/demo")
    repo: Path = Path("feature_repo")
    requests: int = 500
    candidates: int = 100
    warmup: int = 20
    seed: int = 0
    target_p99_ms: float = 50.0
    name: str = "serving"
    results_dir: Path = RESULTS_DIR

    def __post_init__(self) -> None:
        self.run, self.repo, self.results_dir = Path(self.run), Path(self.repo), Path(self.results_dir)
        for name in ("requests", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def make_requests(n: int, candidates: int, n_users: int, n_items: int, seed: int) -> list[Request]:
    """``n`` (known user, distinct known items) requests."""
    if candidates > n_items:
        raise ValueError(f"candidates={candidates} exceeds the model's {n_items} items")
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(1, n_users + 1)), (rng.choice(n_items, candidates, replace=False) + 1).tolist())
            for _ in range(n)]


def http_latencies(ranker: Ranker, requests: list[Request], warmup: int) -> tuple[list[float], list[dict]]:
    """End-to-end seconds per request and the server's own timings (ms), against a server thread."""
    server = make_server(ranker, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server_timings = []

    def post(request: Request) -> None:
        conn = http.client.HTTPConnection(HOST, server.server_address[1], timeout=30)
        conn.request("POST", "/rank", body=json.dumps({"user_id": request[0], "item_ids": request[1]}))
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"POST /rank answered {response.status}: {body}")
        server_timings.append(body["timings_ms"])

    try:
        time_each(post, requests[:warmup])
        server_timings.clear()
        return time_each(post, requests[warmup:]), server_timings
    finally:
        server.shutdown()
        server.server_close()


def forward_latencies(ranker: Ranker, requests: list[Request]) -> list[float]:
    """The model forward alone on the requests' batches, built beforehand."""
    batches = [ranker.encode(ranker.read(user, items), user)[1] for user, items in requests]
    index = iter(range(len(batches)))
    return time_each(lambda _: ranker.score(batches[next(index)]), requests)


def summarise(e2e: list[float], server: list[dict], forward: list[float], sqlite: list[float]) -> dict:
    """Latency stats per measurement, keyed as in the table."""
    split = {key: latency_stats([t[key] / 1e3 for t in server]) for key in ("total", "feast", "tensors", "forward")}
    return {
        "end_to_end_http": latency_stats(e2e),
        "server_total": split["total"],
        "server_feast_read": split["feast"],
        "server_tensors": split["tensors"],
        "server_forward": split["forward"],
        "baseline_forward_alone": latency_stats(forward),
        "baseline_sqlite_read": latency_stats(sqlite),
    }


LABELS = {
    "end_to_end_http": "end to end: POST /rank, client side",
    "server_total": "server: rank() total",
    "server_feast_read": "server: Feast online read",
    "server_tensors": "server: rows -> tensors (build_split)",
    "server_forward": "server: model forward",
    "baseline_forward_alone": "baseline: model forward alone",
    "baseline_sqlite_read": "baseline: direct sqlite read, same keys",
}


def table(stats: dict) -> str:
    """Markdown: absolute latencies and p50 ratios against both same-run baselines."""
    forward, sqlite = stats["baseline_forward_alone"]["p50_ms"], stats["baseline_sqlite_read"]["p50_ms"]
    rows = [
        [LABELS[key], f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['mean_ms']:.2f}",
         f"{s['p50_ms'] / forward:.1f}x", f"{s['p50_ms'] / sqlite:.1f}x", str(s["n"])]
        for key, s in stats.items()
    ]
    header = ["measurement", "p50 ms", "p99 ms", "mean ms", "p50 / forward alone", "p50 / sqlite read", "requests"]
    return markdown_table(header, rows)


def run(cfg: ServingBenchConfig) -> dict:
    """Measure everything over the same requests; returns the payload written to JSON."""
    if not (cfg.run / "metrics.json").exists():
        raise SystemExit(f"{cfg.run}/metrics.json not found: run `make demo` first (it trains {cfg.run} "
                         f"and publishes {cfg.repo}), or pass --run and --repo")
    load_before = os.getloadavg()
    ranker = Ranker(ServeConfig(run=cfg.run, repo=cfg.repo))
    requests = make_requests(cfg.warmup + cfg.requests, cfg.candidates, ranker.meta.n_users, ranker.meta.n_items,
                             cfg.seed)
    e2e, server = http_latencies(ranker, requests, cfg.warmup)
    timed = requests[cfg.warmup:]
    forward = forward_latencies(ranker, timed)
    read_sqlite = sqlite_reader(ranker.online.store, ranker.online.service, ranker.online.sid_version)
    time_each(read_sqlite, requests[: cfg.warmup])
    stats = summarise(e2e, server, forward, time_each(read_sqlite, timed))
    p99 = stats["end_to_end_http"]["p99_ms"]
    return {
        "stats": stats,
        "target": {"p99_ms": cfg.target_p99_ms, "end_to_end_p99_ms": p99, "met": bool(p99 < cfg.target_p99_ms)},
        "sid_version": ranker.sid_version,
        "service": ranker.service,
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "torch_threads": ServeConfig.threads,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "samples_ms": {"end_to_end_http": [s * 1e3 for s in e2e], "server": server,
                       "baseline_forward_alone": [s * 1e3 for s in forward]},
    }


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    defaults = ServingBenchConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    cfg = ServingBenchConfig(**vars(parser.parse_args(argv)))
    payload = run(cfg)
    target = payload["target"]
    text = table(payload["stats"]) + (
        f"\n\n{cfg.candidates} candidates per request, {cfg.requests} timed requests after {cfg.warmup} warm-up, "
        f"run `{cfg.run}`, service `{payload['service']}`. End-to-end p99 {target['end_to_end_p99_ms']:.2f} ms "
        f"vs the {cfg.target_p99_ms:g} ms target: {'met' if target['met'] else 'NOT met'}. "
        f"1-min load average {payload['load_average_1m']['before']:.2f} before, "
        f"{payload['load_average_1m']['after']:.2f} after (shared host)."
    )
    command = rerun_command("benchmarks.serving", argv)
    write_results(cfg.name, payload, text, command, results_dir=cfg.results_dir)
    print(text)
    return payload


if __name__ == "__main__":
    main()
