"""The MMQ paper's ablation on MovieLens-100K: which tokenizer, codebook init, item id.

    python -m benchmarks.auc_ablation                 # after `make demo` (ingest done)
    python -m benchmarks.auc_ablation --seeds 0 1 2 --tokenizers rqvae mmq

Every tokenizer gets the same code budget (P = 4 code positions, K = 64), is
fit on train items only (seed 0), and is published to Feast as its own SID
version beside the others (``features.publish --no-set-default``).
``mmq_ft`` is MMQ stage 2: ``tokenizer.finetune`` from the MMQ version, on
train rows only. Each version is then ranked by the same 2-rank DLRM with
random or codebook-initialised SID tables, with and without the item id, over
the seeds; ``item_id`` (no SIDs at all) is the reference. Writes
``benchmarks/results/auc_ablation_ml100k.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.auc import REPORTED
from benchmarks.report import fmt, markdown_table, mean_std, rerun_command, write_results
from demo import CODE_BUDGET, DemoConfig, run_stage, stage_commands
from ranking.export import read_run
from sidrank.cli import parser_for
from sidrank.contract import LATEST, DatasetPaths

TOKENIZERS = ("rqkmeans", "rqvae", "mm_rqvae", "mmq", "mmq_ft")
SID_INITS = ("random", "codebook")


@dataclass
class AblationConfig:
    """What the ablation runs.

    Args:
        demo: dataset, Feast repo and ranker settings (its ``method`` is unused).
        tokenizers: keys of TOKENIZERS.
        seeds: ranker seeds.
        runs: folder of per-run outputs.
        name: results file stem.
    """

    demo: DemoConfig = field(default_factory=DemoConfig)
    tokenizers: tuple[str, ...] = TOKENIZERS
    seeds: tuple[int, ...] = (0, 1, 2)
    runs: Path = Path("artifacts/bench/ablation")
    name: str = "auc_ablation_ml100k"

    def __post_init__(self) -> None:
        unknown = set(self.tokenizers) - set(TOKENIZERS)
        if unknown:
            raise ValueError(f"tokenizers {sorted(unknown)}: expected a subset of {TOKENIZERS}")
        if "mmq_ft" in self.tokenizers and "mmq" not in self.tokenizers:
            raise ValueError("tokenizers: mmq_ft fine-tunes the mmq version; list mmq too")
        self.runs = Path(self.runs)


def publish_latest(cfg: AblationConfig, label: str) -> str:
    """Build features for the dataset's LATEST SID version and add it to Feast; returns the version."""
    data = DatasetPaths(cfg.demo.dataset_dir)
    version = data.resolve_sid_version(LATEST)
    py = sys.executable
    run_stage(f"features {label}", [py, "-m", "features.build", "--dataset", str(data.root), "--sid-version", version])
    run_stage(f"feast {label}", [py, "-m", "features.publish", "--dataset", str(data.root), "--repo",
                                 str(cfg.demo.repo), "--no-set-default"])
    return version


def train_tokenizer(cfg: AblationConfig, method: str) -> str:
    """Fit one tokenizer at the shared code budget and publish it; returns its SID version."""
    data = str(cfg.demo.dataset_dir)
    run_stage(f"tokenize {method}", [sys.executable, "-m", "tokenizer.train", "--dataset", data, "--method", method,
                                     "--seed", "0", *CODE_BUDGET])
    return publish_latest(cfg, method)


def finetune(cfg: AblationConfig, parent: str) -> str:
    """MMQ stage 2 from ``parent`` (its Feast rows must be cached by a ranker run); returns the new version."""
    data = str(cfg.demo.dataset_dir)
    run_stage("finetune mmq", [sys.executable, "-m", "tokenizer.finetune", "--dataset", data, "--sid-version", parent])
    return publish_latest(cfg, "mmq_ft")


def rank(cfg: AblationConfig, label: str, seed: int, flags: list[str]) -> dict:
    """One 2-rank ranker run; returns its metrics.json."""
    out = cfg.runs / label / f"seed{seed}"
    ranker = stage_commands(dataclasses.replace(cfg.demo, out=out, seed=seed))[-1][1]
    run_stage(f"ranker {label} seed {seed}", [*ranker, "--no-save-checkpoint", *flags])
    return read_run(out)


def grid(cfg: AblationConfig, tokenizer: str, version: str) -> dict[str, list[dict]]:
    """Random / codebook init x with / without item id, every seed, for one SID version."""
    runs = {}
    for init in SID_INITS:
        for use_item_id in (True, False):
            label = f"{tokenizer} {init}{'' if use_item_id else ' no-item-id'}"
            flags = ["--sid-version", version, "--sid-init", init, *([] if use_item_id else ["--no-use-item-id"])]
            runs[label] = [rank(cfg, label.replace(" ", "_"), seed, flags) for seed in cfg.seeds]
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = parser_for("python -m benchmarks.auc_ablation", __doc__.splitlines()[0] + " Other flags go to ranking.train.")
    defaults = AblationConfig()
    parser.add_argument("--tokenizers", nargs="+", default=list(defaults.tokenizers), help="keys of TOKENIZERS")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds), help="ranker seeds")
    parser.add_argument("--runs", type=Path, default=defaults.runs, help="folder of per-run outputs")
    parser.add_argument("--name", default=defaults.name, help="results file stem")
    parser.add_argument("--nproc", type=int, default=defaults.demo.nproc, help="torchrun ranks per ranker run")
    args, ranker_args = parser.parse_known_args(argv)
    cfg = AblationConfig(
        demo=DemoConfig(nproc=args.nproc, ranker_args=ranker_args), tokenizers=tuple(args.tokenizers),
        seeds=tuple(args.seeds), runs=args.runs, name=args.name,
    )

    versions: dict[str, str] = {}
    runs: dict[str, list[dict]] = {}
    for tokenizer in cfg.tokenizers:
        versions[tokenizer] = finetune(cfg, versions["mmq"]) if tokenizer == "mmq_ft" else train_tokenizer(cfg, tokenizer)
        if not runs:  # the no-SID reference, read through the first version's rows
            runs["item_id"] = [rank(cfg, "item_id", s, ["--sid-version", versions[tokenizer], "--no-use-sid"])
                               for s in cfg.seeds]
        runs.update(grid(cfg, tokenizer, versions[tokenizer]))

    summary = {label: {key: mean_std([r[key] for r in rs]) for key in REPORTED} for label, rs in runs.items()}
    header = ["ranker", "test AUC", "cold-item AUC", "GAUC", "log loss", "valid AUC", "runs"]
    rows = [[label, *(fmt(summary[label][k]) for k in REPORTED), str(len(runs[label]))] for label in runs]
    table = markdown_table(header, rows)
    payload = {"summary": summary, "runs": runs, "versions": versions,
               "config": {"tokenizers": cfg.tokenizers, "seeds": cfg.seeds, "code_budget": CODE_BUDGET,
                          "ranker_args": ranker_args}}
    command = rerun_command("benchmarks.auc_ablation", argv)
    write_results(cfg.name, payload, table, command)
    print(table)
    return payload


if __name__ == "__main__":
    main()
