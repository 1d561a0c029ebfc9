"""Offline AUC benchmark: the ranker's ablation ladder against LightGBM and logistic regression.

    python -m benchmarks.auc --protocol temporal              # MovieLens-100K, 3 seeds, 2 ranks
    python -m benchmarks.auc --protocol item-cold --no-prepare
    python -m benchmarks.auc --dataset synthetic --seeds 0 --epochs 2   # a quick smoke run

Rankers (TorchRec under torchrun, the same Feast rows), each a set of flags
over ``ranking.train``'s defaults:

- ``item_id``: DLRM with item ids, no SIDs; pooled history bags; dense MLP only.
- ``sid``: + SID code positions and prefix n-grams (pooled, like the history).
- ``attention``: ``sid`` + target attention over the history (unpooled, shared tables).
- ``numeric``: ``sid`` + piecewise-linear numeric embeddings.
- ``full``: the defaults, chosen on valid AUC (numeric embeddings, dropout).
- ``full_no_sid``: ``full`` without SIDs.
- ``full_random_init``: ``full`` with randomly initialised user and item
  tables instead of the co-watch factors of the train rows.
- ``id_no_content`` / ``sid_no_content``: ``item_id`` / ``sid`` without the
  item's genre tags and release year, so the SIDs are the only content a
  cold item has (what SIDs add where nothing else describes the item).

Baselines on exactly the ``full`` model's inputs: LightGBM (one run per seed)
and logistic regression (deterministic), both with every choice made on
valid. Reported: mean +- std over seeds of test AUC, cold-item AUC (the
protocol's cold set), GAUC, log loss and valid AUC, and paired bootstrap 95%
intervals on the same test rows (``sidrank.metrics.paired_bootstrap``):
full model minus LightGBM, and SIDs minus item id only (in the DLRM and in
the full model), overall, on cold items and per user. Writes ``benchmarks/results/<name>.{json,md}`` and the
full model's (seed 0) ``<name>_curves.png`` and ``<name>_by_frequency.png``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import baselines, plots
from benchmarks.report import RESULTS_DIR, fmt, markdown_table, mean_std, rerun_command, write_results
from demo import DemoConfig, ensure_feature_repo, run_stage, stage_commands
from ranking.config import TrainConfig, config_from_args
from ranking.export import read_run
from sidrank.cli import add_config_arguments, parse_config, parser_for, run_main
from sidrank.contract import DatasetPaths
from sidrank.io import read_json
from sidrank.metrics import evaluate_predictions, paired_bootstrap
from sidrank.protocol import cold_item_ids, train_item_counts

log = logging.getLogger("benchmarks.auc")

VARIANTS = {
    "item_id": ["--no-use-sid", "--numeric", "mlp", "--dropout", "0", "--history", "pooled"],
    "sid": ["--numeric", "mlp", "--dropout", "0", "--history", "pooled"],
    "attention": ["--numeric", "mlp", "--dropout", "0", "--history", "attention"],
    "numeric": ["--numeric", "ple", "--dropout", "0", "--history", "pooled"],
    # ranking.train's defaults: the configuration chosen on valid AUC, which `make demo` runs.
    "full": [],
    "full_no_sid": ["--no-use-sid"],
    "full_random_init": ["--factor-init", "random"],
    "id_no_content": ["--no-use-sid", "--no-use-item-content", "--numeric", "mlp", "--dropout", "0", "--history", "pooled"],
    "sid_no_content": ["--no-use-item-content", "--numeric", "mlp", "--dropout", "0", "--history", "pooled"],
}
REPORTED = ("test_auc", "test_auc_cold", "test_gauc", "test_logloss", "valid_auc")
# (A, B) pairs compared on the same test rows; A - B.
COMPARISONS = (
    ("full", "lightgbm"),
    ("sid", "item_id"),
    ("full", "full_no_sid"),
    ("full", "full_random_init"),
    ("sid_no_content", "id_no_content"),
)


@dataclass
class AucBenchConfig:
    """What the benchmark runs.

    Args:
        dataset: dataset name of the demo (``ml-100k`` or ``synthetic``).
        protocol: evaluation protocol (``temporal`` or ``item-cold``).
        method: tokenizer method of the SIDs.
        nproc: torchrun ranks per ranker run.
        seeds: ranker and LightGBM seeds.
        variants: ranker variants (keys of VARIANTS), ``full`` needed for its comparison.
        baselines: also fit LightGBM and logistic regression on the full model's inputs.
        prepare: run ingest, tokenizer, features and feast first.
        epochs: ranker epochs (early stopping on valid AUC may end sooner).
        n_boot: bootstrap resamples per comparison.
        batch_size: ranker batch size.
        artifacts: root of the dataset folders.
        repo: the Feast repository; None means a copy of the project's made under ``runs`` per
            dataset and protocol, so a benchmark never republishes the demo's store.
        runs: folder of the per-run outputs (a subfolder per dataset and protocol).
        results_dir: where the JSON and Markdown results go.
        name: results file stem; empty means auc_<dataset>_<protocol>.
    """

    dataset: str = "ml-100k"
    protocol: str = "temporal"
    method: str = DemoConfig.method
    nproc: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    baselines: bool = True
    prepare: bool = True
    epochs: int = 10
    n_boot: int = 1000
    batch_size: int = TrainConfig.batch_size
    artifacts: Path = DemoConfig.artifacts
    repo: Path | None = None
    runs: Path = Path("artifacts/bench/auc")
    results_dir: Path = RESULTS_DIR
    name: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"variants {sorted(unknown)}: expected a subset of {list(VARIANTS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        self.runs, self.artifacts, self.results_dir = map(Path, (self.runs, self.artifacts, self.results_dir))
        self.repo = self.run_root / "feature_repo" if self.repo is None else Path(self.repo)

    @property
    def run_root(self) -> Path:
        return self.runs / f"{self.dataset}-{self.protocol}"

    @property
    def results_name(self) -> str:
        return self.name or f"auc_{self.dataset}_{self.protocol}".replace("-", "_")

    @property
    def demo(self) -> DemoConfig:
        return DemoConfig(dataset=self.dataset, protocol=self.protocol, method=self.method, nproc=self.nproc,
                          artifacts=self.artifacts, repo=self.repo)


def run_ranker(cfg: AucBenchConfig, variant: str, seed: int) -> Path:
    """One torchrun ranker run; returns its run folder."""
    out = cfg.run_root / variant / f"seed{seed}"
    ranker = stage_commands(dataclasses.replace(cfg.demo, out=out, seed=seed))[-1][1]
    flags = ["--no-save-checkpoint", "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), *VARIANTS[variant]]
    run_stage(f"ranker {variant} seed {seed}", [*ranker, *flags])
    return out


def fit_baselines(cfg: AucBenchConfig, inputs: baselines.BaselineInputs) -> dict[str, list[dict]]:
    """LightGBM per seed and logistic regression once: ``model -> [{"valid_auc", "scores", ...}]``."""
    x, y = inputs.x, inputs.y
    fitted = {"lightgbm": [], "logreg": []}
    for seed in cfg.seeds:
        booster, iterations, valid_auc = baselines.fit_lightgbm(x["train"], y["train"], x["valid"], y["valid"], seed=seed)
        scores = booster.predict(x["test"], num_iteration=iterations)
        fitted["lightgbm"].append({"seed": seed, "best_iteration": iterations, "valid_auc": valid_auc, "scores": scores})
    model, c, valid_auc = baselines.fit_logreg(x["train"], y["train"], x["valid"], y["valid"])
    fitted["logreg"].append({"C": c, "valid_auc": valid_auc, "scores": model.predict_proba(x["test"])[:, 1]})
    return fitted


def compare(test: pd.DataFrame, cold: np.ndarray, scores: dict[str, list[np.ndarray]], cfg: AucBenchConfig) -> dict:
    """Paired bootstrap intervals of each COMPARISONS pair present: overall, cold items, GAUC."""
    labels, is_cold = test["label"].to_numpy(), np.isin(test["item_id"].to_numpy(), cold)
    found = {}
    for a, b in COMPARISONS:
        if a not in scores or b not in scores:
            continue
        found[f"{a} - {b}"] = {
            "auc": paired_bootstrap(labels, scores[a], scores[b], n_boot=cfg.n_boot),
            "auc_cold": paired_bootstrap(labels[is_cold], [s[is_cold] for s in scores[a]],
                                         [s[is_cold] for s in scores[b]], n_boot=cfg.n_boot),
            "gauc": paired_bootstrap(labels, scores[a], scores[b], users=test["user_id"].to_numpy(),
                                     n_boot=cfg.n_boot),
        }
    return found


def summarise(runs: dict[str, list[dict]], comparisons: dict) -> tuple[dict, str]:
    """Mean +- std per model and metric, and the Markdown tables."""
    summary = {model: {key: mean_std([r[key] for r in rs]) for key in REPORTED} for model, rs in runs.items()}
    header = ["model", "test AUC", "cold-item AUC", "GAUC", "log loss", "valid AUC", "runs"]
    rows = [[model, *(fmt(summary[model][k]) for k in REPORTED), str(len(runs[model]))] for model in runs]
    table = markdown_table(header, rows)
    if comparisons:
        pairs = [
            [pair, *(f"{c[k]['diff']:+.4f} [{c[k]['low']:+.4f}, {c[k]['high']:+.4f}]" for k in ("auc", "auc_cold", "gauc"))]
            for pair, c in comparisons.items()
        ]
        header = ["paired difference (95% bootstrap interval)", "test AUC", "cold-item AUC", "GAUC"]
        table += "\n\n" + markdown_table(header, pairs)
    return summary, table


def draw_pictures(
    cfg: AucBenchConfig, full_run: dict, test: pd.DataFrame, counts: np.ndarray, scores: dict[str, np.ndarray]
) -> None:
    """The full model's (seed 0) curves and its test AUC by item frequency against LightGBM, beside the results."""
    stem = cfg.results_dir / cfg.results_name
    plots.training_curves(full_run["history"], full_run["best_epoch"], stem.with_name(f"{stem.name}_curves.png"))
    plots.auc_by_frequency(test, counts, scores, stem.with_name(f"{stem.name}_by_frequency.png"))


def run(cfg: AucBenchConfig, command: str) -> dict:
    """Prepare, train every variant and seed, fit the baselines, compare, write the results."""
    ensure_feature_repo(cfg.repo)
    if cfg.prepare:
        for name, stage in stage_commands(cfg.demo)[:-1]:
            run_stage(name, stage)
    run_dirs = {variant: [run_ranker(cfg, variant, seed) for seed in cfg.seeds] for variant in cfg.variants}
    data = DatasetPaths(cfg.demo.dataset_dir)
    events = pd.read_parquet(data.events)
    cold = cold_item_ids(read_json(data.meta), events, source=str(data.meta))
    full = config_from_args(
        ["--dataset", str(data.root), "--repo", str(cfg.demo.repo), "--out", str(cfg.run_root), *VARIANTS["full"]]
    )
    inputs = baselines.baseline_inputs(full)
    test = inputs.events["test"]
    runs = {v: [read_run(d) for d in dirs] for v, dirs in run_dirs.items()}
    scores = {v: [baselines.run_test_scores(d, test) for d in dirs] for v, dirs in run_dirs.items()}
    if cfg.baselines:
        for model, fits in fit_baselines(cfg, inputs).items():
            scores[model] = [fit.pop("scores") for fit in fits]
            runs[model] = [
                {**{f"test_{k}": v for k, v in evaluate_predictions(test.assign(score=s), cold_items=cold,
                                                                     source=f"{model} test").items()}, **fit}
                for s, fit in zip(scores[model], fits)
            ]
    comparisons = compare(test, cold, scores, cfg)
    summary, table = summarise(runs, comparisons)
    if "full" in run_dirs and "lightgbm" in scores:
        draw_pictures(cfg, runs["full"][0], test, train_item_counts(events, int(events["item_id"].max())),
                      {"full model": scores["full"][0], "LightGBM": scores["lightgbm"][0]})
    payload = {
        "summary": summary, "comparisons": comparisons, "runs": runs, "sid_version": runs[cfg.variants[0]][0]["sid_version"],
        "cold_items": int(len(cold)), "cold_test_rows": int(np.isin(test["item_id"], cold).sum()),
        "config": {**dataclasses.asdict(cfg), "variants_flags": {v: VARIANTS[v] for v in cfg.variants}},
    }
    write_results(cfg.results_name, payload, table, command, cfg.results_dir)
    print(table)
    return payload


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = parser_for("python -m benchmarks.auc", __doc__.splitlines()[0])
    add_config_arguments(parser, AucBenchConfig)
    cfg = parse_config(parser, AucBenchConfig, argv)
    return run(cfg, rerun_command("benchmarks.auc", argv))


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.auc")
