"""Ranker training throughput: TorchRec DLRM under torchrun vs plain PyTorch, 1 vs 2 ranks.

    python -m benchmarks.throughput                      # 400k rows, 1M items, 100k users (a few minutes on 2 cores)
    python -m benchmarks.throughput --rows 20000 --items 5000 --users 1000 --steps 5 --copy-gib 0.25

The driver measures this machine's memory bandwidth (best copy of a
``--copy-gib`` float32 tensor, bytes/s = 2 x nbytes / t, with 1 thread and with
every core), then launches benchmarks/throughput_worker.py under
``torchrun --standalone`` three times: 1 rank x 1 thread, 1 rank x 2 threads
(the fair compute comparison on 2 cores) and 2 ranks x 1 thread. Each launch
builds the same seeded synthetic rows (popular items and users drawn from a
power law, full histories, P x K SIDs), encodes each rank's shard once
("encode", not timed as data loading) and trains the TorchRec DLRM of
ranking/train.py and the plain-PyTorch baseline on the same batches at the
same global batch.

A step is timed per phase with ``perf_counter``: data loading
(``split.batch``, plus KJT -> per-feature bags for plain), input distribution
(TorchRec's KJT all-to-all, probed around ``input_dist``), forward (without
input distribution), backward (which includes TorchRec's fused table update
and DDP's gradient all-reduce), optimizer (dense Adam, zero_grad; the table
SGD for plain). A few more steps run under ``torch.profiler``; the top ops by
self CPU time explain any missed target. Writes
``benchmarks/results/throughput.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR, markdown_table, rerun_command, write_results
from sidrank.cli import add_config_arguments, parse_config, parser_for
from sidrank.io import read_json, write_json
from sidrank import contract

PHASES = ("data", "input_dist", "forward", "backward", "optimizer")
IMPLS = ("torchrec", "plain")
TARGET_VS_PLAIN, TARGET_TWO_RANKS, MAX_DATA_SHARE = 1.5, 1.6, 0.2


@dataclass
class ThroughputConfig:
    """What the benchmark runs.

    Args:
        rows: synthetic training rows (each worker builds them, seeded).
        items: item ids 1..items (``t_item``; the prefix table gets 4 x items buckets).
        users: user ids 1..users.
        history: history bag length of every row (hist items and both prefix bags).
        sid_levels: P code positions.
        sid_codebook_size: K codes per position.
        tags: tag ids 1..tags, 1-3 per row.
        zipf: power-law exponent in [0, 1) of item and user popularity (0 = uniform).
        batch_sizes: global batches; the largest one is the one the targets are judged at.
        warmup: untimed steps before the timed ones.
        steps: timed steps per implementation and batch size.
        profile_steps: steps under torch.profiler, after the timed ones.
        seed: rows, init and batch order.
        plain_ddp: also run the plain model on 2 ranks with DDP.
        two_threads: also run 1 rank with 2 threads.
        copy_gib: size of the bandwidth-probe tensor.
        copy_repeats: bandwidth copies (the best counts).
        name: results file stem.
        results_dir: results folder.
    """

    rows: int = 400_000
    items: int = 1_000_000
    users: int = 100_000
    history: int = contract.HISTORY_LENGTH
    sid_levels: int = 4
    sid_codebook_size: int = 64
    tags: int = 20
    zipf: float = 0.8
    batch_sizes: tuple[int, ...] = (4096, 1024)
    warmup: int = 5
    steps: int = 50
    profile_steps: int = 3
    seed: int = 0
    plain_ddp: bool = True
    two_threads: bool = True
    copy_gib: float = 1.0
    copy_repeats: int = 5
    name: str = "throughput"
    results_dir: Path = RESULTS_DIR

    def __post_init__(self) -> None:
        self.batch_sizes, self.results_dir = tuple(self.batch_sizes), Path(self.results_dir)
        for name in ("rows", "items", "users", "tags", "sid_codebook_size", "steps", "profile_steps", "copy_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sid_levels < 2 or self.history < 0 or self.warmup < 0:
            raise ValueError(f"need sid_levels >= 2, history >= 0, warmup >= 0; got {self.sid_levels}, "
                             f"{self.history}, {self.warmup}")
        if not 0 <= self.zipf < 1:
            raise ValueError(f"zipf must be in [0, 1), got {self.zipf}")
        if not self.batch_sizes or min(self.batch_sizes) < 2 or any(b % 2 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be even (2 ranks split them) and >= 2, got {self.batch_sizes}")
        if self.rows < max(self.batch_sizes):
            raise ValueError(f"rows {self.rows} < the largest batch {max(self.batch_sizes)}; raise --rows")
        if not self.copy_gib > 0:
            raise ValueError(f"copy_gib must be > 0, got {self.copy_gib}")


def copy_bandwidth(gib: float, repeats: int, threads: int) -> float:
    """Best bytes/s (read + write) of copying a ``gib`` GiB float32 tensor with ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(int(gib * 2**30) // 4)
        dst = torch.empty_like(src)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * src.nbytes / best


def launches(cfg: ThroughputConfig) -> list[tuple[int, int, tuple[str, ...]]]:
    """(ranks, threads per rank, implementations) of each torchrun launch."""
    plan = [(1, 1, IMPLS)] + ([(1, 2, IMPLS)] if cfg.two_threads else [])
    return plan + [(2, 1, IMPLS if cfg.plain_ddp else ("torchrec",))]


def launch(cfg: ThroughputConfig, ranks: int, threads: int, impls: tuple[str, ...], tmp: Path) -> dict:
    """Run the worker under ``torchrun --standalone --nproc_per_node ranks``; rank 0's results."""
    label = f"{ranks}x{threads}"
    job, out = tmp / f"job_{label}.json", tmp / f"result_{label}.json"
    config = {**dataclasses.asdict(cfg), "results_dir": str(cfg.results_dir)}
    write_json({"config": config, "threads": threads, "impls": list(impls), "out": str(out), "label": label}, job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "benchmarks.throughput_worker", str(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    if subprocess.run(cmd, env=env).returncode:
        raise RuntimeError(f"the {ranks}-rank x {threads}-thread worker failed; its log is above")
    result = read_json(out)
    for run in result["runs"]:
        run.update(ranks=ranks, threads=threads)
    return result


def _label(run: dict) -> str:
    ranks, threads = run["ranks"], run["threads"]
    return f"{run['impl']} {ranks} rank{'s' * (ranks > 1)} x {threads} thread{'s' * (threads > 1)}"


def rank_loads(run: dict, tables: list[dict]) -> list[float]:
    """Share of the global batch's lookups each rank serves under the run's sharding plan.

    A table-wise table is served by its one rank; column-wise shards split
    each lookup's columns evenly over their ranks.
    """
    loads = [0.0] * run["ranks"]
    for table in tables:
        ranks = run["plan"][table["name"]]
        for rank in ranks:
            loads[rank] += sum(run["lookups_per_key"][f] for f in table["features"]) / len(ranks)
    return [load / sum(loads) for load in loads]


def derive(runs: list[dict], bandwidth: float, emb_dim: int, tables: list[dict]) -> None:
    """Add ratios, data share, the lookup rate (see the Markdown notes) and TorchRec's per-rank load to every run."""
    by_key = {(r["impl"], r["ranks"], r["threads"], r["batch"]): r for r in runs}
    for run in runs:
        if "plan" in run:
            run["lookup_share_per_rank"] = rank_loads(run, tables)
        plain = by_key.get(("plain", run["ranks"], run["threads"], run["batch"]))
        one = by_key.get((run["impl"], 1, 1, run["batch"]))
        run["vs_plain"] = run["samples_per_s"] / plain["samples_per_s"] if plain and run["impl"] != "plain" else None
        run["vs_one_rank"] = run["samples_per_s"] / one["samples_per_s"] if one and one is not run else None
        run["data_share"] = run["phases_ms"]["data"] / run["step_ms"]
        run["lookup_bytes_per_s"] = 2 * run["lookups_per_step"] * emb_dim * 4 / (run["step_ms"] / 1e3)
        run["bandwidth_fraction"] = run["lookup_bytes_per_s"] / bandwidth


def _check(target: str, value: float, measured: str, passed: bool | None, explain: list[dict]) -> dict:
    verdict = "context" if passed is None else "PASS" if passed else "MISS"
    return {"target": target, "value": value, "measured": measured, "verdict": verdict, "explain": explain}


def targets(runs: list[dict], batch: int) -> list[dict]:
    """PASS/MISS of the TARGET_* / MAX_DATA_SHARE checks at ``batch`` (plus context lines) and the runs behind a miss."""
    at = {(r["impl"], r["ranks"], r["threads"]): r for r in runs if r["batch"] == batch}
    out = []
    for (impl, ranks, threads), run in at.items():
        if impl == "torchrec" and run["vs_plain"] is not None:
            out.append(_check(f"{_label(run)} >= {TARGET_VS_PLAIN}x plain, B={batch}", run["vs_plain"],
                              _ratio(run["vs_plain"]), run["vs_plain"] >= TARGET_VS_PLAIN,
                              [run, at[("plain", ranks, threads)]]))
    two, one = at.get(("torchrec", 2, 1)), at.get(("torchrec", 1, 1))
    if two and one:
        out.append(_check(f"torchrec 2 ranks >= {TARGET_TWO_RANKS}x 1 rank (1 thread each), B={batch}",
                          two["vs_one_rank"], _ratio(two["vs_one_rank"]), two["vs_one_rank"] >= TARGET_TWO_RANKS,
                          [two, one]))
    if two and ("torchrec", 1, 2) in at:
        ratio = two["samples_per_s"] / at[("torchrec", 1, 2)]["samples_per_s"]
        out.append(_check(f"torchrec 2 ranks x 1 thread vs 1 rank x 2 threads (same cores), B={batch}", ratio,
                          _ratio(ratio), None, []))
    worst = max(runs, key=lambda r: r["data_share"])
    out.append(_check(f"data loading < {MAX_DATA_SHARE:.0%} of step time, every run (worst: {_label(worst)}, "
                      f"B={worst['batch']})", worst["data_share"], f"{worst['data_share']:.1%}",
                      worst["data_share"] < MAX_DATA_SHARE, [worst]))
    return out


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def report(cfg: ThroughputConfig, runs: list[dict], checks: list[dict], bandwidth: dict, context: dict) -> str:
    """The Markdown: runs, targets, bandwidth, notes and the profiles behind any miss."""
    header = ["run", "batch", "samples/s", "vs plain (same ranks x threads)", "vs 1 rank x 1 thread", "step ms",
              "data ms", "input dist ms", "forward ms", "backward ms (incl. fused table update)", "optimizer ms",
              "data share", "lookups GB/s", "of copy bandwidth"]
    rows = [[_label(r), str(r["batch"]), f"{r['samples_per_s']:,.0f}", _ratio(r["vs_plain"]), _ratio(r["vs_one_rank"]),
             f"{r['step_ms']:.1f}", *(f"{r['phases_ms'][p]:.1f}" for p in PHASES), f"{r['data_share']:.1%}",
             f"{r['lookup_bytes_per_s'] / 1e9:.2f}", f"{r['bandwidth_fraction']:.1%}"] for r in runs]
    target_rows = [[c["target"], c["measured"], c["verdict"]] for c in checks]
    text = [
        f"### Ranker training throughput (synthetic rows: {cfg.rows:,} rows, {cfg.items:,} items, {cfg.users:,} users, "
        f"history {cfg.history}, P={cfg.sid_levels} K={cfg.sid_codebook_size}, D={context['emb_dim']}, "
        f"{context['features']} features in {context['tables']} tables; {cfg.steps} timed steps)",
        "", markdown_table(header, rows), "", markdown_table(["target", "measured", "verdict"], target_rows), "",
        f"Copy bandwidth (best of {cfg.copy_repeats} copies of {cfg.copy_gib:g} GiB, bytes = 2 x size): "
        f"{bandwidth['one_thread'] / 1e9:.1f} GB/s with 1 thread, {bandwidth['all_threads'] / 1e9:.1f} GB/s with "
        f"{bandwidth['threads']} threads; the higher one is the reference of the last column.",
        "",
        "- lookups GB/s = 2 x lookups per step x D x 4 bytes / step time: the forward gather of every id in the "
        "global batch's KJT plus the same again for the backward / table update.",
        "- TorchRec applies the tables' SGD inside backward (`apply_optimizer_in_backward`, fused kernel), so its "
        "table update is in the backward column and its optimizer column is dense Adam + zero_grad only; the plain "
        "model's optimizer column holds the sparse SGD of the tables too. Backward also holds DDP's gradient "
        "all-reduce on 2 ranks (TorchRec: the dense part; plain: everything, tables as sparse gradients).",
        "- input dist = TorchRec's KJT all-to-all including the wait (probe around `input_dist`); forward excludes it.",
        "- data = `split.batch` (index gather + KJT; plus KJT -> per-feature bags for plain) on the rank's shard "
        "(every world-th row, as ranking/train.py). Encoding the rows once per process (`build_split`, not in the "
        f"step): {context['encode_s']:.1f} s for {cfg.rows:,} rows on 1 rank.",
        "- Threads per rank set with `torch.set_num_threads` and OMP_NUM_THREADS; 2 ranks x 1 thread and "
        "1 rank x 2 threads both use the 2 cores of this machine.",
    ]
    for run in runs:
        if run["impl"] == "torchrec" and run["ranks"] > 1 and run["batch"] == max(cfg.batch_sizes):
            held = [", ".join(t for t, ranks in run["plan"].items() if r in ranks) for r in range(run["ranks"])]
            text.append(f"- {_label(run)} plan ({', '.join(sorted(set(run['sharding'].values())))}): "
                        + "; ".join(f"rank {r} serves {share:.0%} of the lookups ({held[r]})"
                                    for r, share in enumerate(run["lookup_share_per_rank"])) + ".")
    explained: dict[int, tuple[dict, list[str]]] = {}
    for check in (c for c in checks if c["verdict"] == "MISS"):
        for run in check["explain"]:
            explained.setdefault(id(run), (run, []))[1].append(check["target"])
    for run, misses in explained.values():
        ops = [[f"`{o['op']}`", f"{o['self_cpu_ms_per_step']:.1f}", f"{o['share']:.1%}", f"{o['calls_per_step']:g}"]
               for o in run["profile_top_ops"]]
        text += ["", f"Profile of {_label(run)}, B={run['batch']} (top ops by self CPU time, rank 0, "
                 f"{cfg.profile_steps} steps), behind the miss: {'; '.join(misses)}", "",
                 markdown_table(["op", "self CPU ms/step", "share", "calls/step"], ops)]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> dict:
    """Run every launch, write the JSON and Markdown, return the payload."""
    parser = parser_for("python -m benchmarks.throughput", __doc__.splitlines()[0])
    add_config_arguments(parser, ThroughputConfig)
    cfg = parse_config(parser, ThroughputConfig, argv)
    threads = os.cpu_count() or 1
    bandwidth = {"one_thread": copy_bandwidth(cfg.copy_gib, cfg.copy_repeats, 1), "threads": threads,
                 "all_threads": copy_bandwidth(cfg.copy_gib, cfg.copy_repeats, threads)}
    bandwidth["reference"] = max(bandwidth["one_thread"], bandwidth["all_threads"])
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        results = [launch(cfg, ranks, t, impls, Path(tmp)) for ranks, t, impls in launches(cfg)]
    runs = [run for result in results for run in result["runs"]]
    emb_dim, tables = results[0]["emb_dim"], results[0]["tables"]
    derive(runs, bandwidth["reference"], emb_dim, tables)
    checks = targets(runs, max(cfg.batch_sizes))
    context = {"emb_dim": emb_dim, "tables": len(tables), "features": sum(len(t["features"]) for t in tables),
               "encode_s": results[0]["encode_s"]}
    table = report(cfg, runs, checks, bandwidth, context)
    payload = {
        "config": {**dataclasses.asdict(cfg), "results_dir": str(cfg.results_dir)},
        "bandwidth_bytes_per_s": bandwidth, "runs": runs, "tables": tables, "emb_dim": emb_dim,
        "targets": [{k: v for k, v in c.items() if k != "explain"} for c in checks],
        "launches": [{k: r[k] for k in ("rows_s", "encode_s")} | {"ranks": ranks, "threads": t}
                     for r, (ranks, t, _) in zip(results, launches(cfg))],
    }
    command = rerun_command("benchmarks.throughput", argv)
    write_results(cfg.name, payload, table, command, results_dir=cfg.results_dir)
    print(table)
    return payload


if __name__ == "__main__":
    main()
