"""What every benchmark records: environment, git commit, mean +- std, JSON + Markdown."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from sidrank.io import write_json, write_text

RESULTS_DIR = Path("benchmarks/results")
T = TypeVar("T")
VERSIONED_PACKAGES = ("torch", "torchrec", "fbgemm-gpu-cpu", "feast", "duckdb", "scikit-learn", "lightgbm")


def environment() -> dict:
    """Versions, machine and git commit, so a number can be traced to its run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # Untracked code counts (a run may import it); results files do not.
        status = ["git", "status", "--porcelain", "--", ".", ":!benchmarks/results", ":!README.md"]
        dirty = bool(subprocess.run(status, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", True
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in VERSIONED_PACKAGES},
    }


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


def mean_std(values: list[float | None]) -> dict:
    """Mean and sample standard deviation (ddof=1) over the defined values.

    ``n`` counts the defined values, ``runs`` all of them; the std of one value
    is undefined (NaN), never 0, so a single run cannot pass a 2-std test.
    """
    arr = np.asarray([v for v in values if v is not None and v == v], dtype=float)
    mean = float(arr.mean()) if len(arr) else float("nan")
    std = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
    return {"mean": mean, "std": std, "n": int(len(arr)), "runs": len(values)}


def fmt(stat: dict, digits: int = 4) -> str:
    """``mean ± std`` for a Markdown cell; notes single runs and undefined values."""
    if stat["n"] == 0:
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    text += f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else " (1 run)"
    if stat["n"] < stat["runs"]:
        text += f" ({stat['runs'] - stat['n']} of {stat['runs']} undefined)"
    return text


def latency_stats(seconds: list[float]) -> dict:
    """p50, p99 and mean in milliseconds, and the sample count."""
    ms = np.asarray(seconds, dtype=float) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(len(ms))}


def time_each(fn: Callable[[T], object], inputs: list[T]) -> list[float]:
    """Wall seconds of ``fn`` on each input, in order."""
    seconds = []
    for item in inputs:
        start = time.perf_counter()
        fn(item)
        seconds.append(time.perf_counter() - start)
    return seconds


def rerun_command(module: str, argv: list[str] | None) -> str:
    """The command that reruns a benchmark: ``python -m <module>`` with the arguments it was given."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str, command: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<name>.json`` (payload + environment + command) and ``<name>.md`` atomically."""
    payload = {**payload, "command": command, "environment": environment()}
    json_path = write_json(payload, results_dir / f"{name}.json")
    env = payload["environment"]
    md_text = (
        f"{table}\n\nCommand: `{command}`  \n"
        f"Commit {env['git_commit'][:10]}{' (dirty)' if env['git_dirty'] else ''}, "
        f"torch {env['packages']['torch']}, torchrec {env['packages']['torchrec']}, "
        f"feast {env['packages']['feast']}, {env['cpus']} CPUs.\n"
    )
    write_text(md_text, results_dir / f"{name}.md")
    return json_path
