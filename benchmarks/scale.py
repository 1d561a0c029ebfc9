"""The whole pipeline at growing scale: wall time, peak memory and rows/s per stage.

    python -m benchmarks.scale                       # 100k, 1M and 10M events
    python -m benchmarks.scale --events 100000 1000000

Each size is a synthetic dataset with items = events / 10 and users =
events / 100 (so 10M events have 1M items and 100k users), run through the
same stage commands as ``make demo`` (demo/__init__.py): ingest, tokenize
(RQ-KMeans by default, at the demo's code budget), behaviour features, Feast
apply + materialize, then the ranker under ``torchrun`` (2 ranks), whose
first step is Feast's ``get_historical_features`` for every event. Each size
gets its own artifacts folder and copy of ``feature_repo``.

Per stage: wall seconds, peak resident memory of the stage's whole process
tree (sampled every 0.2 s, so a spike shorter than that can be missed),
events/s, and the growth exponent of the wall time between consecutive sizes
(1 = linear in events). The ranker stage's own timings (rows, tensors,
training) are split out from its metrics.json. Writes
``benchmarks/results/scale.{json,md}``.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.report import markdown_table, rerun_command, write_results
import demo
from sidrank.cli import parser_for
from sidrank.io import read_json

REPO = Path(__file__).resolve().parents[1] / "feature_repo"
SAMPLE_SECONDS = 0.2
RANKER_TIMINGS = ("rows_s", "batches_s", "shard_s", "train_s", "eval_s")


@dataclass
class ScaleConfig:
    """What the scale benchmark runs.

    Args:
        events: dataset sizes in events; items = events / 10, users = events / 100.
        method: tokenizer method.
        nproc: ranker ranks.
        ranker_args: extra ``ranking.train`` arguments (one epoch at batch 4096 by default).
        root: where every size's artifacts and Feast repository go.
        name: results file name.
    """

    events: tuple[int, ...] = (100_000, 1_000_000, 10_000_000)
    method: str = "rqkmeans"
    nproc: int = 2
    ranker_args: tuple[str, ...] = ("--epochs", "1", "--batch-size", "4096")
    root: Path = Path("artifacts/scale")
    name: str = "scale"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.events or min(self.events) < 10_000:
            raise ValueError(f"events must be sizes >= 10000, got {self.events}")
        self.events, self.root = tuple(sorted(self.events)), Path(self.root)


def run_measured(argv: list[str]) -> dict:
    """Run a command; its wall seconds and the peak summed RSS of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"scale: exit {proc.returncode}: {shlex.join(argv)}")
    return {"seconds": seconds, "peak_rss_gb": peak / 2**30}


def size_commands(cfg: ScaleConfig, n_events: int) -> tuple[list[tuple[str, list[str]]], Path]:
    """The demo's stage commands for one synthetic size, in its own folders."""
    folder = cfg.root / f"events_{n_events}"
    repo = folder / "feature_repo"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    run_cfg = demo.DemoConfig(
        dataset="synthetic", method=cfg.method, artifacts=folder / "artifacts", repo=repo, out=folder / "run",
        nproc=cfg.nproc, seed=cfg.seed, ranker_args=list(cfg.ranker_args),
    )
    stages = demo.stage_commands(run_cfg)
    size = ["--items", str(n_events // 10), "--events", str(n_events), "--users", str(n_events // 100)]
    name, ingest = stages[0]
    at = ingest.index("synthetic") + 1
    ingest = [*ingest[:at], *size, "--seed", str(cfg.seed), *ingest[ingest.index("--out"):]]
    return [(name, ingest), *stages[1:]], run_cfg.out


def run_size(cfg: ScaleConfig, n_events: int) -> dict:
    stages, out = size_commands(cfg, n_events)
    result = {"events": n_events, "items": n_events // 10, "users": n_events // 100, "stages": {}}
    for name, argv in stages:
        print(f"\n=== {n_events} events, {name}: {shlex.join(argv)}", flush=True)
        measured = run_measured(argv)
        measured["events_per_s"] = n_events / measured["seconds"]
        result["stages"][name] = measured
        print(f"=== {name}: {measured['seconds']:.1f}s, peak {measured['peak_rss_gb']:.2f} GiB", flush=True)
    metrics = read_json(out / "metrics.json")
    result["ranker"] = {k: metrics["timings"].get(k) for k in RANKER_TIMINGS}
    result["ranker"].update(test_auc=metrics["test_auc"], samples_per_s=metrics["samples_per_s"],
                            train_rows=metrics["train_rows"])
    result["total_seconds"] = sum(s["seconds"] for s in result["stages"].values())
    result["peak_rss_gb"] = max(s["peak_rss_gb"] for s in result["stages"].values())
    return result


def growth(small: float, large: float, n_small: int, n_large: int) -> float:
    """Exponent b of cost ~ events^b between two sizes."""
    return math.log(large / small) / math.log(n_large / n_small)


def tables(results: list[dict]) -> str:
    stage_names = list(results[0]["stages"])
    header = ["stage", *(f"{r['events']:,} events" for r in results), "growth exponent (per step)"]
    rows = []
    for name in [*stage_names, "total"]:
        cells = []
        for r in results:
            if name == "total":
                cells.append(f"{r['total_seconds']:.0f} s, {r['peak_rss_gb']:.1f} GiB")
                continue
            s = r["stages"][name]
            cells.append(f"{s['seconds']:.1f} s, {s['peak_rss_gb']:.1f} GiB, {s['events_per_s']:,.0f} ev/s")
        seconds = [r["total_seconds"] if name == "total" else r["stages"][name]["seconds"] for r in results]
        exps = [growth(a, b, ra["events"], rb["events"])
                for a, b, ra, rb in zip(seconds, seconds[1:], results, results[1:])]
        rows.append([name, *cells, ", ".join(f"{e:.2f}" for e in exps) or "-"])
    main = markdown_table(header, rows)
    ranker_header = ["ranker part", *(f"{r['events']:,} events" for r in results)]
    ranker_rows = [[k, *(f"{r['ranker'][k]:.1f} s" if r["ranker"].get(k) is not None else "-" for r in results)]
                   for k in RANKER_TIMINGS]
    ranker_rows.append(["train samples/s", *(f"{r['ranker']['samples_per_s']:,.0f}" for r in results)])
    ranker_rows.append(["test AUC (1 epoch)", *(f"{r['ranker']['test_auc']:.4f}" for r in results)])
    return f"{main}\n\n{markdown_table(ranker_header, ranker_rows)}"


def main(argv: list[str] | None = None) -> dict:
    defaults = ScaleConfig()
    parser = parser_for("python -m benchmarks.scale", __doc__.splitlines()[0] + " Other flags go to ranking.train.")
    parser.add_argument("--events", type=int, nargs="+", default=list(defaults.events),
                        help="dataset sizes in events; items = events / 10, users = events / 100")
    parser.add_argument("--method", default=defaults.method, help="tokenizer method")
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="ranker ranks")
    parser.add_argument("--root", type=Path, default=defaults.root,
                        help="where every size's artifacts and Feast repository go")
    parser.add_argument("--name", default=defaults.name, help="results file name")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="dataset, tokenizer and ranker seed")
    args, ranker_args = parser.parse_known_args(argv)
    cfg = ScaleConfig(**{**vars(args), "events": tuple(args.events)},
                      ranker_args=tuple(ranker_args) or defaults.ranker_args)
    results = [run_size(cfg, n) for n in cfg.events]
    text = tables(results)
    config = {"events": list(cfg.events), "method": cfg.method, "nproc": cfg.nproc,
              "ranker_args": list(cfg.ranker_args), "code_budget": list(demo.CODE_BUDGET)}
    command = rerun_command("benchmarks.scale", argv)
    write_results(cfg.name, {"sizes": results, "config": config}, text, command)
    print(text)
    return {"sizes": results}


if __name__ == "__main__":
    main()
