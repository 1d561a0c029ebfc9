"""Tokenizer benchmark: every method at the same code budget.

    python -m benchmarks.tokenizers                                  # ml-100k + synthetic-tok, 3 seeds
    python -m benchmarks.tokenizers --datasets artifacts/ml-100k --seeds 0 --epochs 20

The synthetic set is made first with
``python -m ingest synthetic --items 5000 --events 200000 --users 2000 --seed 0 --name synthetic-tok``.

Every variant gets P = ``--levels`` code positions of K = ``--codebook-size``
codes and the same schedule (epochs, batch size, learning rate):
RQ-KMeans and RQ-VAE use P levels on the concatenated modalities; MM-RQ-VAE
P / 2 levels per modality (2 modalities); MMQ one shared expert of P - 2
levels plus one 1-level specific expert per modality. Each variant is fitted
on the train items only and measured on all items through
:func:`tokenizer.train.fit_and_measure` (nothing is written to the dataset's
``sids/``): reconstruction (per item, summed over dims, and cosine; overall
and per modality on the items that have it), per-position usage and
perplexity, full and prefix collision rates, largest bucket, training time,
and on data with planted clusters the NMI of the codes against them (first
position, best single position, full SID).

Writes ``benchmarks/results/tokenizers.json`` (every run and its metrics) and
``.md`` (mean +- std over seeds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from benchmarks.report import fmt, markdown_table, mean_std, rerun_command, write_results
from sidrank.cli import add_config_arguments, parse_config, parser_for
from tokenizer.train import TokenizerConfig, TokenizerInputs, fit_and_measure, load_inputs

log = logging.getLogger("benchmarks.tokenizers")

# name -> TokenizerConfig overrides; budgets are set from --levels in variant_config.
VARIANTS: dict[str, dict] = {
    "rqkmeans": {"method": "rqkmeans"},
    "rqvae": {"method": "rqvae"},
    "mm_rqvae": {"method": "mm_rqvae"},  # MMD recon + per-item MSE + MMD alignment (our default)
    "mm_rqvae_mmd_only": {"method": "mm_rqvae", "mse_weight": 0.0},  # the paper's loss: MMD recon only
    "mm_rqvae_infonce": {"method": "mm_rqvae", "align": "infonce"},
    "mm_rqvae_no_align": {"method": "mm_rqvae", "align": "none"},
    "mmq": {"method": "mmq"},
}
SCALARS = ("recon_error", "recon_cosine", "collision_rate", "largest_bucket", "train_seconds")
NMI_KEYS = ("nmi_first_level", "nmi_best_position", "nmi_full_sid")


@dataclass
class TokenizerBenchConfig:
    """What the benchmark runs.

    Args:
        datasets: dataset folders (ingested; modalities are built if missing).
        variants: tokenizer variants (VARIANTS: a method and its overrides).
        seeds: tokenizer seeds (init and batch order).
        levels: P, code positions of every variant.
        codebook_size: K.
        epochs: passes over the fit items of every learned tokenizer.
        batch_size: batch size of every learned tokenizer.
        lr: Adam learning rate of every learned tokenizer.
        name: results file stem under benchmarks/results.
    """

    datasets: tuple[Path, ...] = (Path("artifacts/ml-100k"), Path("artifacts/synthetic-tok"))
    variants: tuple[str, ...] = field(default=tuple(VARIANTS), metadata={"choices": tuple(VARIANTS)})
    seeds: tuple[int, ...] = (0, 1, 2)
    levels: int = 4
    codebook_size: int = 64
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    name: str = "tokenizers"

    def __post_init__(self) -> None:
        self.datasets = tuple(Path(d) for d in self.datasets)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants={unknown}: expected names from {list(VARIANTS)}")
        if self.levels < 3:
            raise ValueError(f"levels={self.levels}: MMQ needs >= 1 shared level plus 2 specific ones; use >= 3")
        if not self.seeds:
            raise ValueError("seeds=(): expected at least one seed")


def variant_config(cfg: TokenizerBenchConfig, base: TokenizerConfig, variant: str, seed: int) -> TokenizerConfig:
    """The tokenizer config of one run: ``base`` (modalities resolved) + the variant + the budget."""
    n_modalities = len(base.modalities)
    overrides = {
        "levels": cfg.levels,
        "codebook_size": cfg.codebook_size,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": seed,
        # MMQ: one 1-level specific expert per modality, the rest of the budget shared
        "n_shared_experts": 1,
        "n_specific_experts": 1,
        "specific_levels": 1,
        "shared_levels": max(1, cfg.levels - n_modalities),
        **VARIANTS[variant],
    }
    return replace(base, **overrides)


def nmi_figures(codes: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    """NMI of the planted ``clusters`` [N] against the first position, the best single
    position and the full SID of ``codes`` [N, P]."""
    per_position = [normalized_mutual_info_score(clusters, codes[:, p]) for p in range(codes.shape[1])]
    _, full = np.unique(codes, axis=0, return_inverse=True)
    return {
        "nmi_first_level": float(per_position[0]),
        "nmi_best_position": float(max(per_position)),
        "nmi_full_sid": float(normalized_mutual_info_score(clusters, full.ravel())),
        "nmi_per_position": [float(v) for v in per_position],
    }


def run_one(cfg: TokenizerBenchConfig, inputs: TokenizerInputs, variant: str, seed: int) -> dict:
    """Fit and measure one (dataset, variant, seed); returns a JSON-ready record."""
    run_cfg = variant_config(cfg, inputs.cfg, variant, seed)
    fitted = fit_and_measure(inputs._replace(cfg=run_cfg))
    metrics = dict(fitted.metrics)
    if inputs.clusters is not None:
        metrics.update(nmi_figures(fitted.codes, inputs.clusters))
    log.info(
        "%s %s seed %d: recon %.4f cos %.4f collisions %.4f usage %s (%.1fs)",
        inputs.cfg.dataset.name, variant, seed, metrics["recon_error"], metrics["recon_cosine"],
        metrics["collision_rate"], "/".join(f"{u:.2f}" for u in metrics["usage"]), metrics["train_seconds"],
    )
    return {"variant": variant, "seed": seed, "config": run_cfg.hashable(), "metrics": metrics}


def per_position(runs: list[dict], key: str, digits: int) -> str:
    """Mean over runs of a per-position list, as ``a/b/c``."""
    values = np.mean([r["metrics"][key] for r in runs], axis=0)
    return "/".join(f"{v:.{digits}f}" for v in values)


def summarise(runs: list[dict], has_clusters: bool) -> tuple[dict, str]:
    """Per-variant mean +- std of the scalar figures, and the Markdown table of one dataset."""
    summary, rows = {}, []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == variant]
        stats = {key: mean_std([r["metrics"].get(key) for r in group]) for key in (*SCALARS, *NMI_KEYS)}
        modality = {
            name: {key: mean_std([r["metrics"]["per_modality"][name].get(key) for r in group])
                   for key in ("recon_error", "recon_cosine")}
            for name in group[0]["metrics"]["per_modality"]
        }
        summary[variant] = {**stats, "per_modality": modality}
        row = [variant, fmt(stats["recon_error"], 3), fmt(stats["recon_cosine"], 3)]
        row += ["; ".join(f"{n} {fmt(s['recon_error'], 3)}" for n, s in modality.items())]
        row += [per_position(group, "usage", 2), per_position(group, "perplexity", 1)]
        row += [fmt(stats["collision_rate"], 4), per_position(group, "prefix_collision_rate", 3)]
        row += [fmt(stats["largest_bucket"], 1), fmt(stats["train_seconds"], 1)]
        if has_clusters:
            row += [fmt(stats[key], 3) for key in NMI_KEYS]
        rows.append(row)
    header = ["method", "recon error", "recon cosine", "recon error per modality", "usage per position",
              "perplexity per position", "collision rate", "prefix collisions", "largest bucket", "train s"]
    if has_clusters:
        header += ["NMI first position", "NMI best position", "NMI full SID"]
    return summary, markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = parser_for("python -m benchmarks.tokenizers", "Every tokenizer method at the same code budget, fitted and measured.")
    add_config_arguments(parser, TokenizerBenchConfig)
    cfg = parse_config(parser, TokenizerBenchConfig, argv)

    start = time.perf_counter()
    results, tables = {}, []
    for dataset in cfg.datasets:
        # inputs once per dataset (modalities, train items); every run fits on the same items
        inputs = load_inputs(TokenizerConfig(dataset=dataset, method="rqkmeans"))
        runs = [run_one(cfg, inputs, variant, seed) for variant in cfg.variants for seed in cfg.seeds]
        summary, table = summarise(runs, inputs.clusters is not None)
        n_items = runs[0]["metrics"]["n_items"]
        results[dataset.name] = {"summary": summary, "runs": runs, "n_items": n_items,
                                 "n_fit_items": len(inputs.fit_ids), "modalities": list(inputs.cfg.modalities)}
        tables.append(
            f"### {dataset.name} ({n_items} items, fit on {len(inputs.fit_ids)} train items; "
            f"P={cfg.levels}, K={cfg.codebook_size}, {cfg.epochs} epochs, seeds {list(cfg.seeds)})\n\n{table}"
        )
    config = {k: [str(v) for v in val] if k == "datasets" else val for k, val in vars(cfg).items()}
    payload = {"datasets": results, "config": config, "total_seconds": time.perf_counter() - start}
    command = rerun_command("benchmarks.tokenizers", argv)
    text = "\n\n".join(tables)
    write_results(cfg.name, payload, text, command)
    print(text)
    return payload


if __name__ == "__main__":
    main()
