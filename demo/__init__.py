"""The whole pipeline on one dataset, each stage run as the command a user would type.

    python -m demo                      # what `make demo` runs
    python -m demo --method rqkmeans --nproc 1
    python -m demo --sid-init codebook --fusion freq   # unknown flags go to ranking.train
    python -m demo --protocol item-cold  # 20% of the items held out of train: artifacts/ml-100k-item-cold

Stages (each reads files and writes files, so each can be rerun alone):
ingest -> embed + tokenize -> behaviour features -> feast apply/materialize
-> torchrun ranker -> results table. Ends by writing ``<out>/metrics.json``
(the ranker's metrics plus the tokenizer's collision rate) and printing it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sidrank.contract import DatasetPaths
from sidrank.io import read_json, write_json
from ranking.export import read_run
from sidrank.protocol import PROTOCOLS, TEMPORAL, check_protocol, dataset_folder_name
from tokenizer.train import METHODS

# The project's Feast definitions, copied (without data) for a store of another protocol or a benchmark.
DEMO_JSON = "demo.json"  # beside the run folder's sealed files: tokenizer collisions, demo config, stage times
PROJECT_REPO = Path(__file__).resolve().parents[1] / "feature_repo"

# P code positions x K codes: every tokenizer method fits this budget, and the
# ablation (benchmarks/auc_ablation.py) compares them at it.
CODE_BUDGET = ("--levels", "4", "--codebook-size", "64")

# Dataset name -> `python -m ingest` arguments that produce it.
DATASET_COMMANDS = {
    "ml-100k": ["movielens-100k"],
    "synthetic": ["synthetic", "--items", "5000", "--events", "300000", "--users", "3000", "--seed", "0"],
}
TABLE_KEYS = (
    "test_auc",
    "test_auc_cold",
    "test_gauc",
    "test_logloss",
    "valid_auc",
    "train_rows",
    "valid_rows",
    "test_rows",
    "world_size",
    "sid_version",
    "sid_collision_rate",
)


@dataclass
class DemoConfig:
    """What the demo runs.

    Args:
        dataset: dataset name (a key of DATASET_COMMANDS).
        protocol: evaluation protocol, ``temporal`` or ``item-cold``
            (sidrank/protocol.py); ingest records it in meta.json, the later
            stages follow it, and it names the folder (:attr:`dataset_dir`).
        method: tokenizer method, one of ``tokenizer.train.METHODS``.
        artifacts: root folder of dataset artifacts.
        repo: the Feast repository; None means the project's ``feature_repo``
            under the temporal protocol and a copy of its definitions,
            ``<artifacts>/feature_repo-item-cold``, under item-cold, so the two
            demos never republish each other's store.
        out: run folder for the ranker's metrics and predictions; None =
            ``artifacts/demo`` (``artifacts/demo-item-cold`` under item-cold).
        nproc: torchrun processes (ranks).
        seed: seed for tokenizer and ranker.
        ranker_args: extra arguments passed to ``ranking.train``.
    """

    dataset: str = "ml-100k"
    protocol: str = TEMPORAL
    method: str = "mm_rqvae"
    artifacts: Path = Path("artifacts")
    repo: Path | None = None
    out: Path | None = None
    nproc: int = 2
    seed: int = 0
    ranker_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_COMMANDS:
            raise ValueError(f"dataset={self.dataset!r}: expected one of {sorted(DATASET_COMMANDS)}")
        check_protocol(self.protocol, "protocol")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc}: expected >= 1")
        out = Path("artifacts") / dataset_folder_name("demo", self.protocol) if self.out is None else self.out
        self.artifacts, self.out = Path(self.artifacts), Path(out)
        if self.repo is None:
            self.repo = Path("feature_repo") if self.protocol == TEMPORAL else self.artifacts / f"feature_repo-{self.protocol}"
        self.repo = Path(self.repo)

    @property
    def dataset_dir(self) -> Path:
        """The dataset folder ingest writes: ``<artifacts>/<dataset>`` plus the protocol's suffix."""
        return self.artifacts / dataset_folder_name(self.dataset, self.protocol)


def ensure_feature_repo(repo: Path) -> Path:
    """``repo``, created as a copy of the project's Feast definitions (no data) if it has none."""
    if not (Path(repo) / "feature_store.yaml").exists():
        shutil.copytree(PROJECT_REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"), dirs_exist_ok=True)
    return Path(repo)


def run_stage(name: str, argv: list[str]) -> float:
    """Run one stage's command, streaming its output; raise if it fails."""
    print(f"\n=== {name}: {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo: stage '{name}' failed (exit {result.returncode}): {shlex.join(argv)}")
    seconds = time.perf_counter() - start
    print(f"=== {name}: done in {seconds:.1f}s", flush=True)
    return seconds


def stage_commands(cfg: DemoConfig) -> list[tuple[str, list[str]]]:
    """The ordered (name, argv) list of the pipeline's stages."""
    py = sys.executable
    data = str(cfg.dataset_dir)
    # --protocol after --out: callers that swap the source arguments keep everything from --out on.
    ingest = [py, "-m", "ingest", *DATASET_COMMANDS[cfg.dataset], "--out", str(cfg.artifacts),
              "--protocol", cfg.protocol]  # fmt: skip
    return [
        ("ingest", ingest),
        ("tokenize", [py, "-m", "tokenizer.train", "--dataset", data, "--method", cfg.method, "--seed", str(cfg.seed),
                      *CODE_BUDGET]),
        ("features", [py, "-m", "features.build", "--dataset", data, "--sid-version", "LATEST"]),
        ("feast", [py, "-m", "features.publish", "--dataset", data, "--repo", str(cfg.repo)]),
        (
            "ranker",
            [
                py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
                "-m", "ranking.train", "--dataset", data, "--repo", str(cfg.repo), "--out", str(cfg.out),
                "--seed", str(cfg.seed), *cfg.ranker_args,
            ],
        ),
    ]


def results_table(metrics: dict) -> str:
    """A two-column Markdown table of the headline figures."""
    lines = ["| metric | value |", "|---|---|"]
    for key in TABLE_KEYS:
        value = metrics.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False,
        epilog="Flags not listed here go to `python -m ranking.train` (see its --help).",
    )
    defaults = DemoConfig()
    parser.add_argument("--dataset", choices=sorted(DATASET_COMMANDS), default=defaults.dataset,
                        help="dataset")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=defaults.protocol,
                        help="evaluation protocol, recorded by ingest")
    parser.add_argument("--method", choices=METHODS, default=defaults.method,
                        help="tokenizer method of tokenizer.train")
    parser.add_argument("--artifacts", type=Path, default=defaults.artifacts,
                        help="root of the dataset folders")
    parser.add_argument("--repo", type=Path, default=None,
                        help="Feast repository; None means feature_repo (temporal) or a copy per protocol")
    parser.add_argument("--out", type=Path, default=None, help="run folder; None means artifacts/demo[-item-cold]")
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="torchrun ranks")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the tokenizer and the ranker")
    args, ranker_args = parser.parse_known_args(argv)
    cfg = DemoConfig(**vars(args), ranker_args=ranker_args)

    ensure_feature_repo(cfg.repo)
    timings = {name: run_stage(name, argv) for name, argv in stage_commands(cfg)}
    # The run's curves and its test AUC by item frequency against LightGBM, beside metrics.json.
    timings["plots"] = run_stage("plots", [sys.executable, "-m", "benchmarks.plots", "--run", str(cfg.out)])

    paths = DatasetPaths(cfg.dataset_dir)
    metrics = read_run(cfg.out)
    version = metrics["sid_version"]
    tokenizer_metrics = read_json(paths.sid_dir(version) / "metrics.json")
    # The run folder is the ranker's sealed unit: the demo's own figures go beside it, in demo.json.
    demo = {
        "sid_collision_rate": tokenizer_metrics["collision_rate"],
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "stage_seconds": timings,
    }
    write_json(demo, cfg.out / DEMO_JSON)
    metrics = {**metrics, "sid_collision_rate": demo["sid_collision_rate"]}
    ranks = metrics["world_size"]
    print(f"\nResults ({cfg.dataset_dir.name}, tokenizer {version}, {ranks} ranks) -> {cfg.out}/metrics.json, {DEMO_JSON}")
    print(results_table(metrics))
    return metrics


if __name__ == "__main__":
    main()
