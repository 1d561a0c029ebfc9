"""Train a semantic-ID tokenizer and publish a SID version for the dataset.

    python -m tokenizer.train --dataset artifacts/ml-100k --method rqvae
    python -m tokenizer.train --dataset artifacts/ml-100k --method rqkmeans --codebook-size 64 --seed 1
    python -m tokenizer.train --dataset artifacts/ml-100k --method mm_rqvae --levels 4 --align infonce
    python -m tokenizer.train --dataset artifacts/ml-100k --method mmq --levels 4 \\
        --n-shared-experts 1 --shared-levels 2 --n-specific-experts 1 --specific-levels 1
    python -m tokenizer.train --config artifacts/ml-100k/sids/<version>/metrics.json   # replay a run

``--levels`` is P, the number of code positions of a SID, for every method
(:mod:`tokenizer.methods`). The multimodal methods get the modalities
separately (all-zero rows = modality missing, masked out of their losses),
the others concatenated in sorted name order.

Phases: load (or build) the modalities; fit on the items of TRAIN rows only
(nothing from valid/test rows: leakage); encode ALL items 1..n_items, so cold
items get SIDs from their content; write ``D/sids/<version>/`` and point
``D/sids/LATEST`` at it (:mod:`tokenizer.versions`). The version is
``<method>-<sha256(config, modality contents, fit items)[:10]>``, so the same
inputs give the same version and any change gives a new one.

``config.json`` holds the settings the method reads, "levels" = P,
"codebook_size" = K, "position_names" and, under the method's name, the
model's own settings (:meth:`~tokenizer.interface.Tokenizer.settings`);
``metrics.json`` the figures of :func:`tokenizer.metrics.sid_metrics`, the
loss history and terms, and under "config" every option of the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from sidrank.cli import run_main
from sidrank.contract import DatasetPaths
from sidrank.io import read_json
from sidrank.schema import DataError, require_columns, require_file, require_int_ids, require_utc_timestamps
from sidrank.schema import validate_sids
from tokenizer.cli import add_settings_arguments, stage_main
from tokenizer.inputs import Items, widths
from tokenizer.interface import Tokenizer
from tokenizer.methods import METHODS, TokenizerConfig
from tokenizer.metrics import sid_metrics, summary_line
from tokenizer.modalities import INGEST_COMMAND, build_modalities
from tokenizer.versions import content_digests, ground_truth_clusters, sid_table, version_name, write_version

logger = logging.getLogger(__name__)

PROG = "python -m tokenizer.train"


class TokenizerInputs(NamedTuple):
    """What a tokenizer run reads, validated.

    Attributes:
        cfg: the config with ``modalities`` resolved to the sorted names used.
        modalities: name -> float32 [n_items + 1, D_m] (row 0 padding).
        fit_ids: [F] sorted ids of the items of train rows.
        valid_from: earliest event timestamp (SID rows are stamped with it).
        clusters: [n_items] planted cluster per item (synthetic data), else None.
    """

    cfg: TokenizerConfig
    modalities: dict[str, np.ndarray]
    fit_ids: np.ndarray
    valid_from: pd.Timestamp
    clusters: np.ndarray | None


class FittedTokenizer(NamedTuple):
    """A fitted tokenizer, the SIDs of items 1..n_items ([n_items, P]) and its metrics."""

    model: Tokenizer
    codes: np.ndarray
    metrics: dict


def train_item_ids(events: pd.DataFrame, n_items: int, source: str) -> np.ndarray:
    """Sorted distinct item ids of the train rows: the only items a tokenizer may fit on."""
    require_columns(events, ("item_id", "split", "event_timestamp"), source)
    require_int_ids(events, "item_id", source)
    require_utc_timestamps(events, "event_timestamp", source)
    ids = np.unique(events.loc[events["split"] == "train", "item_id"].to_numpy())
    if len(ids) == 0:
        raise DataError(f"{source}: column 'split' has no 'train' rows; re-run the ingest stage")
    if ids[-1] > n_items:
        raise DataError(f"{source}: column 'item_id' has id {ids[-1]} > n_items={n_items} of meta.json; re-run ingest")
    return ids


def version_of(cfg: TokenizerConfig, modalities: dict[str, np.ndarray], fit_ids: np.ndarray) -> tuple[str, str]:
    """``(version, full sha256)`` of the config, the exact modality contents and the items fit on.

    The fit items are part of the identity: another split gives another
    version instead of silently overwriting a published one.
    """
    fit = content_digests({"fit": np.asarray(fit_ids, dtype=np.int64)})["fit"]
    identity = {"config": cfg.hashable(), "modalities": content_digests(modalities), "fit_items": fit}
    return version_name(cfg.method, identity)


def load_inputs(cfg: TokenizerConfig) -> TokenizerInputs:
    """Modalities (built if needed) and the train items of ``cfg.dataset``."""
    paths = DatasetPaths(cfg.dataset)
    meta = read_json(require_file(paths.meta, INGEST_COMMAND))
    modalities = build_modalities(paths, names=cfg.modalities or None)
    cfg = replace(cfg, modalities=tuple(sorted(modalities)))  # resolve "all" to the names used
    events = pd.read_parquet(
        require_file(paths.events, INGEST_COMMAND), columns=["item_id", "split", "event_timestamp"]
    )
    fit_ids = train_item_ids(events, int(meta["n_items"]), str(paths.events))
    return TokenizerInputs(cfg, modalities, fit_ids, events["event_timestamp"].min(), ground_truth_clusters(paths))


def fit_tokenizer(cfg: TokenizerConfig, x_fit: Items) -> tuple[Tokenizer, list[float]]:
    """Build the configured tokenizer from the global seed and fit it; returns it and its loss history.

    Args:
        cfg: the run's config (modalities resolved).
        x_fit: the fit items as the method reads them (:meth:`tokenizer.methods.Method.inputs`).
    """
    torch.manual_seed(cfg.seed)
    model = METHODS[cfg.method].build(cfg, widths(x_fit))
    return model, model.fit(x_fit, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)


def fit_and_measure(inputs: TokenizerInputs) -> FittedTokenizer:
    """Fit on the train items only, encode every item, compute the metrics (writes nothing)."""
    cfg, method = inputs.cfg, METHODS[inputs.cfg.method]
    xs = {name: torch.from_numpy(inputs.modalities[name]) for name in cfg.modalities}  # [n_items + 1, D_m]
    items = {name: x[1:] for name, x in xs.items()}
    rows = torch.from_numpy(inputs.fit_ids)
    x_fit = method.inputs({name: x[rows] for name, x in xs.items()})
    # fit on train items, encode every item
    start = time.perf_counter()
    model, history = fit_tokenizer(cfg, x_fit)
    train_seconds = time.perf_counter() - start
    model.eval()
    x_items = method.inputs(items)
    codes = model.encode(x_items)
    recon = method.per_modality(model.reconstruct(x_items), {name: x.shape[1] for name, x in items.items()})
    metrics = sid_metrics(codes.numpy(), model.codebook_size, items, recon, inputs.clusters)
    metrics.update(
        position_names=model.position_names(),
        n_fit_items=len(inputs.fit_ids),
        train_seconds=train_seconds,
        final_loss=history[-1],
        loss_history=history,
        final_loss_terms=model.metrics(x_fit, batch_size=cfg.batch_size),
    )
    return FittedTokenizer(model, codes.numpy(), metrics)


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Run the whole stage for ``cfg``; returns the metrics (with ``version``)."""
    # inputs: modalities (validated) and the train items
    inputs = load_inputs(cfg)
    cfg, paths = inputs.cfg, DatasetPaths(cfg.dataset)
    if cfg.codebook_size > len(inputs.fit_ids):
        raise DataError(
            f"{paths.events}: {len(inputs.fit_ids)} items have train rows, fewer than --codebook-size "
            f"{cfg.codebook_size}; most codes could never be used, pass --codebook-size <= {len(inputs.fit_ids)}"
        )
    logger.info("config %s", json.dumps({**cfg.hashable(), "dataset": str(cfg.dataset)}))
    dims = {name: int(a.shape[1]) for name, a in inputs.modalities.items()}
    METHODS[cfg.method].build(cfg, dims)  # a code budget that does not fit the modalities fails before any work
    version, digest = version_of(cfg, inputs.modalities, inputs.fit_ids)
    x_all = np.concatenate([inputs.modalities[name] for name in cfg.modalities], axis=1)[1:]
    logger.info("%s: fitting on %d of %d items, widths %s", version, len(inputs.fit_ids), len(x_all), dims)
    no_content = int((~(x_all != 0).any(axis=1)).sum())
    if no_content:
        # All-zero inputs encode to one and the same SID: those items are indistinguishable to SID features.
        logger.warning("%d items have no content in any modality and share one SID", no_content)
    fitted = fit_and_measure(inputs)
    metrics = {**fitted.metrics, "version": version, "config": cfg.to_dict()}
    # artifacts
    config = {
        **cfg.hashable(),
        "dataset": str(cfg.dataset),
        "version": version,
        "config_hash": digest,
        "modality_dims": dims,
        "input_dim": sum(dims.values()),
        "codebook_dim": int(fitted.model.codebooks[0].shape[1]),
        "position_names": metrics["position_names"],
        cfg.method: fitted.model.settings(),  # with the state_dict of codebooks.pt, rebuilds the model
    }
    table = sid_table(fitted.codes, version, inputs.valid_from)
    validate_sids(table, cfg.codebook_size, f"{paths.sid_dir(version)}/sids.parquet")
    out = write_version(paths, version, table=table, model=fitted.model, config=config, metrics=metrics)
    seconds, final = metrics["train_seconds"], metrics["final_loss"]
    print(f"{version} -> {out} ({seconds:.1f}s, final loss {final:.4f})\n  {summary_line(metrics)}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    description = "Train a semantic-ID tokenizer on a dataset's train items and publish a SID version."
    return stage_main(PROG, description, TokenizerConfig, train_tokenizer, argv, add_arguments=add_settings_arguments)


if __name__ == "__main__":
    run_main(main, PROG)
