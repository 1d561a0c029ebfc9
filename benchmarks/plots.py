"""Pictures of a ranker run, written beside its metrics.json.

    python -m benchmarks.plots --run artifacts/demo      # what `make demo` runs last

- ``curves.png``: train and valid AUC per epoch (the train AUC is that of the
  logits as the epoch produced them), the chosen epoch marked.
- ``auc_by_frequency.png`` (+ ``.json``): test AUC per bucket of the item's
  train-row count, the run against LightGBM fit on exactly the run's inputs
  (seed 0, early-stopped on valid), so one sees where each model wins: cold,
  rare or popular items.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
# Figure, not pyplot: no GUI backend or global figure state, files only.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from benchmarks import baselines
from ranking.config import config_from_args
from ranking.export import read_run
from sidrank.cli import parser_for, run_main
from sidrank.io import atomic_path, write_json
from sidrank.metrics import auc
from sidrank.protocol import train_item_counts

log = logging.getLogger(__name__)

CURVES_PNG = "curves.png"
FREQUENCY_PNG = "auc_by_frequency.png"
# Upper bounds (inclusive) of the train-row buckets; the last bucket is open.
FREQUENCY_EDGES = (0, 4, 19, 49, 99, 199)


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def training_curves(history: list[dict], best_epoch: int, path: Path) -> Path:
    """Train and valid AUC per epoch with the chosen epoch marked."""
    figure = Figure(figsize=(5.5, 3.5))
    axis = figure.subplots()
    epochs = [h["epoch"] for h in history]
    axis.plot(epochs, [h.get("train_auc", np.nan) for h in history], marker="o", label="train AUC (during the epoch)")
    axis.plot(epochs, [h["valid_auc"] for h in history], marker="o", label="valid AUC")
    axis.axvline(best_epoch, color="grey", linestyle=":", label=f"chosen epoch {best_epoch}")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("AUC")
    axis.legend()
    axis.grid(alpha=0.3)
    return _save(figure, path)


def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """Bucket index of each item train count (see FREQUENCY_EDGES)."""
    return np.searchsorted(np.asarray(FREQUENCY_EDGES), counts, side="left")


def bucket_labels() -> list[str]:
    edges = FREQUENCY_EDGES
    labels = ["0"] + [f"{lo + 1}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    return labels + [f">{edges[-1]}"]


def auc_by_frequency(test: pd.DataFrame, counts: np.ndarray, scores: dict[str, np.ndarray], path: Path) -> dict:
    """Bar chart (and JSON beside it) of each model's test AUC per item train-frequency bucket.

    Args:
        test: test rows (``item_id``, ``label``) in the scores' order.
        counts: train rows per item id.
        scores: model name -> [N] test scores.
        path: the PNG to write.

    Returns:
        ``{"buckets": [...], "rows": [...], model: [AUC or None]}`` (None: one class only in the bucket).
    """
    buckets = frequency_buckets(counts[test["item_id"].to_numpy()])
    labels = test["label"].to_numpy()
    names = bucket_labels()
    table: dict = {"buckets": names, "rows": [int((buckets == b).sum()) for b in range(len(names))]}
    for model, model_scores in scores.items():
        table[model] = [
            auc(labels[buckets == b], model_scores[buckets == b]) if len(set(labels[buckets == b])) == 2 else None
            for b in range(len(names))
        ]
    figure = Figure(figsize=(7, 3.5))
    axis = figure.subplots()
    width = 0.8 / len(scores)
    for i, model in enumerate(scores):
        values = [np.nan if v is None else v for v in table[model]]
        axis.bar(np.arange(len(names)) + i * width, values, width, label=model)
    axis.set_xticks(np.arange(len(names)) + width * (len(scores) - 1) / 2)
    axis.set_xticklabels([f"{n}\n({r} rows)" for n, r in zip(names, table["rows"])], fontsize=8)
    axis.set_xlabel("item's train rows")
    axis.set_ylabel("test AUC")
    defined = [v for model in scores for v in table[model] if v is not None]
    if defined:
        axis.set_ylim(max(0.0, min(defined) - 0.05), min(1.0, max(defined) + 0.03))
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    _save(figure, path)
    write_json(table, path.with_suffix(".json"))
    return table


def plot_run(run: Path) -> list[Path]:
    """Both pictures for the run folder ``run`` (its metrics.json and test predictions)."""
    metrics = read_run(run)
    written = [training_curves(metrics["history"], metrics["best_epoch"], run / CURVES_PNG)]
    cfg = config_from_args(["--config", str(run / "metrics.json")])
    inputs = baselines.baseline_inputs(cfg)
    x, y = inputs.x, inputs.y
    booster, iterations, _ = baselines.fit_lightgbm(x["train"], y["train"], x["valid"], y["valid"], seed=0)
    test = inputs.events["test"]
    scores = {
        "ranker": baselines.run_test_scores(run, test),
        "LightGBM": booster.predict(x["test"], num_iteration=iterations),
    }
    events = pd.read_parquet(cfg.dataset / "events.parquet", columns=["item_id", "split"])
    auc_by_frequency(test, train_item_counts(events, int(events["item_id"].max())), scores, run / FREQUENCY_PNG)
    return [*written, run / FREQUENCY_PNG]


def main(argv: list[str] | None = None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = parser_for("python -m benchmarks.plots", __doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, default=argparse.SUPPRESS, help="run folder of ranking.train")
    written = plot_run(parser.parse_args(argv).run)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.plots")
