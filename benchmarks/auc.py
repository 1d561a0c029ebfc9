"""Offline AUC benchmark on the protocol of DESIGN.md section 5 (3 seeds, mean +- std).

    python -m benchmarks.auc                       # MovieLens-100K, the demo's tokenizer, 2 ranks
    python -m benchmarks.auc --seeds 0 1 2 --epochs 20 --no-prepare

Rankers (TorchRec DLRM under torchrun, same rows from Feast):
- ``item_id``: everything but SIDs (user, profile, tags/year, behaviour counts,
  history of item ids).
- ``item_id+sid``: plus SID code positions, hashed prefixes, history prefixes.
- ``sid``: SIDs instead of item ids (no item id, no item-id history).
- ``item_id+sid_rowwise_adagrad``: ``item_id+sid`` with row-wise Adagrad
  (lr 0.05) on the tables instead of the default fused SGD.
Baselines on the ``item_id+sid`` inputs: logistic regression and LightGBM; and
``logreg_dense``: logistic regression on the 7 dense behaviour features alone,
which shows how much the sparse features add.

Seeds vary the ranker (init, shuffling) and LightGBM; the SID table is one
tokenizer run (seed 0), as the feature store serves one version. Writes
``benchmarks/results/<name>.json`` and ``.md``; early stopping uses valid AUC
only, test is read once per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from benchmarks import baselines
from benchmarks.report import fmt, markdown_table, mean_std, rerun_command, write_results
from demo import DemoConfig, run_stage, stage_commands
from sidrank.io import read_json
from sidrank.protocol import train_item_counts
from sidrank.contract import DatasetPaths
from ranking.batches import build_split, sparse_tables
from sidrank import contract
from sidrank.metrics import evaluate_predictions
from ranking.config import config_from_args
from ranking.shards import load_rows

log = logging.getLogger("benchmarks.auc")

VARIANTS = {
    "item_id": ["--no-use-sid"],
    "item_id+sid": [],
    "sid": ["--no-use-item-id"],
    # The optimizer TorchRec's DLRM example uses, at its usual rate: the
    # evidence for fused SGD as our default.
    "item_id+sid_rowwise_adagrad": ["--sparse-optimizer", "rowwise_adagrad", "--lr-sparse", "0.05"],
}
REPORTED = ("test_auc", "test_auc_cold", "test_gauc", "test_logloss", "valid_auc")


@dataclass
class AucBenchConfig:
    """What the benchmark runs.

    Args:
        demo: the pipeline that prepares SIDs and the feature store (and its ranker flags).
        seeds: ranker / LightGBM seeds.
        variants: ranker variants (keys of VARIANTS).
        baselines: also fit logistic regression and LightGBM.
        prepare: run ingest, tokenizer, features and feast first.
        runs: folder of the per-run outputs.
        name: results file stem under benchmarks/results/.
    """

    demo: DemoConfig = field(default_factory=DemoConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    baselines: bool = True
    prepare: bool = True
    runs: Path = Path("artifacts/bench/auc")
    name: str = "auc_ml100k"

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"variants {sorted(unknown)}: expected a subset of {list(VARIANTS)}")
        if len(self.seeds) < 1:
            raise ValueError("seeds: give at least one seed")
        self.runs = Path(self.runs)


def run_ranker(cfg: AucBenchConfig, variant: str, seed: int) -> dict:
    """One torchrun ranker run; returns its metrics.json."""
    out = cfg.runs / variant / f"seed{seed}"
    ranker = stage_commands(dataclasses.replace(cfg.demo, out=out, seed=seed))[-1][1]
    run_stage(f"ranker {variant} seed {seed}", [*ranker, "--no-save-checkpoint", *VARIANTS[variant]])
    return read_json(out / "metrics.json")


def run_baselines(cfg: AucBenchConfig) -> dict[str, list[dict]]:
    """Logistic regression (deterministic, one run) and LightGBM (one run per seed) on the ID+SID inputs."""
    data = DatasetPaths(cfg.demo.artifacts / cfg.demo.dataset)
    meta = contract.RepoPaths(cfg.demo.repo).feature_meta()
    events = pd.read_parquet(data.events)
    # The ranker's own flags give the baselines the ID+SID ranker's exact inputs.
    ranker = config_from_args(
        ["--dataset", str(data.root), "--repo", str(cfg.demo.repo), "--out", str(cfg.runs), *cfg.demo.ranker_args]
    )
    features = dataclasses.replace(ranker.features, use_item_id=True, use_sid=True)
    # The ranker runs cached the Feast rows; load_rows re-attaches splits and checks versions.
    rows = load_rows(ranker, events, meta)
    splits = {s: build_split(rows[rows["split"] == s], meta, features, f"rows[{s}]") for s in ("train", "valid", "test")}
    widths = baselines.feature_widths(sparse_tables(meta, features))
    scaler = StandardScaler().fit(splits["train"].dense.numpy())
    x = {s: baselines.to_sparse_matrix(t, widths, scaler) for s, t in splits.items()}
    y = {s: t.labels.numpy() for s, t in splits.items()}
    counts = train_item_counts(events, meta.n_items)
    test_frame = events.set_index("row_id").loc[splits["test"].row_ids.numpy(), ["user_id", "item_id", "label"]]
    test_frame = test_frame.reset_index()

    def metrics(valid_auc: float, scores: np.ndarray, extra: dict) -> dict:
        test = evaluate_predictions(test_frame.assign(score=scores), counts, source="baseline test")
        return {**{f"test_{k}": v for k, v in test.items()}, "valid_auc": valid_auc, **extra}

    model, c, valid_auc = baselines.fit_logreg(x["train"], y["train"], x["valid"], y["valid"])
    results = {"logreg": [metrics(valid_auc, model.predict_proba(x["test"])[:, 1], {"C": c})]}
    dense = {s: scaler.transform(t.dense.numpy()) for s, t in splits.items()}
    model, c, valid_auc = baselines.fit_logreg(dense["train"], y["train"], dense["valid"], y["valid"])
    results["logreg_dense"] = [metrics(valid_auc, model.predict_proba(dense["test"])[:, 1], {"C": c})]
    results["lightgbm"] = []
    for seed in cfg.seeds:
        booster, iters, valid_auc = baselines.fit_lightgbm(x["train"], y["train"], x["valid"], y["valid"], seed=seed)
        scores = booster.predict(x["test"], num_iteration=iters)
        results["lightgbm"].append(metrics(valid_auc, scores, {"seed": seed, "best_iteration": iters}))
    return results


def summarise(runs: dict[str, list[dict]]) -> tuple[dict, str]:
    """Mean +- std per model and metric, and the Markdown table."""
    summary = {model: {key: mean_std([r[key] for r in rs]) for key in REPORTED} for model, rs in runs.items()}
    header = ["model", "test AUC", "cold-item AUC", "GAUC", "log loss", "valid AUC", "runs"]
    rows = [[model, *(fmt(summary[model][k]) for k in REPORTED), str(len(runs[model]))] for model in runs]
    return summary, markdown_table(header, rows)


def cold_item_verdict(summary: dict) -> dict | None:
    """Is the SID model's cold-item AUC above item-id only by more than two standard deviations?

    None when either side lacks two defined runs: no std, no verdict.
    """
    if "item_id" not in summary or "item_id+sid" not in summary:
        return None
    base, sid = summary["item_id"]["test_auc_cold"], summary["item_id+sid"]["test_auc_cold"]
    if min(base["n"], sid["n"]) < 2:
        return None
    gap = sid["mean"] - base["mean"]
    two_std = 2 * max(base["std"], sid["std"])
    return {"cold_auc_gain": gap, "two_std": two_std, "significant": bool(gap > two_std)}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = AucBenchConfig()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--variants", nargs="+", default=list(defaults.variants))
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=defaults.baselines)
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=defaults.prepare)
    parser.add_argument("--runs", type=Path, default=defaults.runs)
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument("--method", default=defaults.demo.method)
    parser.add_argument("--nproc", type=int, default=defaults.demo.nproc)
    args, ranker_args = parser.parse_known_args(argv)
    demo = DemoConfig(method=args.method, nproc=args.nproc, ranker_args=ranker_args)
    cfg = AucBenchConfig(
        demo=demo, seeds=tuple(args.seeds), variants=tuple(args.variants), baselines=args.baselines,
        prepare=args.prepare, runs=args.runs, name=args.name,
    )

    if cfg.prepare:
        for name, stage in stage_commands(cfg.demo)[:-1]:
            run_stage(name, stage)
    runs = {variant: [run_ranker(cfg, variant, seed) for seed in cfg.seeds] for variant in cfg.variants}
    if cfg.baselines:
        runs.update(run_baselines(cfg))
    summary, table = summarise(runs)
    verdict = cold_item_verdict(summary)
    tokenizer = runs[cfg.variants[0]][0]["sid_version"]
    payload = {"summary": summary, "runs": runs, "cold_item_verdict": verdict, "sid_version": tokenizer,
               "config": {"seeds": cfg.seeds, "variants": cfg.variants, "method": demo.method,
                          "nproc": demo.nproc, "ranker_args": ranker_args}}
    command = rerun_command("benchmarks.auc", argv)
    write_results(cfg.name, payload, table, command)
    print(table)
    if verdict:
        print(f"cold-item AUC gain of SIDs over item id: {verdict['cold_auc_gain']:+.4f} "
              f"(2 std = {verdict['two_std']:.4f}, significant: {verdict['significant']})")
    return payload


if __name__ == "__main__":
    main()
