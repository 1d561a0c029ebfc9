"""Train a semantic-ID tokenizer and publish a SID version for the dataset.

    python -m tokenizer.train --dataset artifacts/ml-100k --method rqvae
    python -m tokenizer.train --dataset artifacts/ml-100k --method rqkmeans --codebook-size 64 --seed 1
    python -m tokenizer.train --dataset artifacts/ml-100k --method mm_rqvae --levels 4 --align infonce
    python -m tokenizer.train --dataset artifacts/ml-100k --method mmq --levels 4 \
        --n-shared-experts 1 --shared-levels 2 --n-specific-experts 1 --specific-levels 1

``--levels`` is P, the number of code positions of a SID, for every method:
RQ-KMeans and RQ-VAE use P residual levels on the concatenated modalities;
MM-RQ-VAE (:mod:`tokenizer.mm_rqvae`) gives each of the M modalities P / M
levels; MMQ (:mod:`tokenizer.mmq`) needs n_shared_experts x shared_levels +
M x n_specific_experts x specific_levels = P. The multimodal methods get the
modalities separately (all-zero rows = modality missing, masked out of their
losses), the others concatenated in sorted name order.

Phases: load (or build) the modalities; fit on the items
of TRAIN rows only (nothing from valid/test rows: leakage); encode ALL items
1..n_items, so cold items get SIDs from their content; write
``D/sids/<version>/`` and point ``D/sids/LATEST`` at it. The version is
``<method>-<sha256(config, modality contents)[:10]>``, so the same inputs give
the same version and any change gives a new one.

Files in ``D/sids/<version>/``: ``sids.parquet`` (item_id, sid_0..sid_{P-1},
sid_version, event_timestamp = earliest event, so a static version serves
every row, created), ``codebooks.pt`` ({"codebooks": [K x dim per position, in
SID order], "config", "state_dict"}), ``config.json`` ("levels" = P,
"codebook_size" = K, "position_names", and for multimodal methods the model
config under the method's name) and ``metrics.json`` (also per-modality
reconstruction on the items that have the modality).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from sidrank.io import atomic_path, read_json, write_json, write_parquet
from sidrank.schema import (
    DataError,
    require_columns,
    require_file,
    require_int_ids,
    require_utc_timestamps,
    validate_sids,
)
from sidrank.contract import DatasetPaths
from tokenizer import defaults
from tokenizer.metrics import reconstruction_metrics, summary_line, tokenizer_metrics
from tokenizer.losses import present_rows
from tokenizer.mm_rqvae import ALIGN_KINDS, MMRQVAE, MMRQVAEConfig
from tokenizer.mmq import MMQ, MMQConfig
from tokenizer.modalities import INGEST_COMMAND, build_modalities
from tokenizer.rqkmeans import RQKMeans
from tokenizer.rqvae import RQVAE

logger = logging.getLogger(__name__)

METHODS = ("rqvae", "rqkmeans", "mm_rqvae", "mmq")
MULTIMODAL = ("mm_rqvae", "mmq")  # get the modalities separately, not concatenated
# Settings only some methods read: the others leave them out of their version
# hash, so changing them keeps those versions (and the published rqvae ones).
LEARNED = ("latent_dim", "hidden_dims", "epochs", "batch_size", "lr", "beta", "dead_code_window")
MM_RQVAE_ONLY = ("recon_weight", "mse_weight", "align", "align_weight", "temperature", "mmd_bandwidth")
MMQ_COUNTS = ("n_shared_experts", "n_specific_experts", "shared_levels", "specific_levels")
MMQ_ONLY = (*MMQ_COUNTS, "ortho_weight")
UNUSED = {
    "rqkmeans": (*LEARNED, *MM_RQVAE_ONLY, *MMQ_ONLY),
    "rqvae": (*MM_RQVAE_ONLY, *MMQ_ONLY),
    "mm_rqvae": MMQ_ONLY,
    "mmq": MM_RQVAE_ONLY,
}
Model = RQKMeans | RQVAE | MMRQVAE | MMQ


@dataclass
class TokenizerConfig:
    """What one tokenizer run does.

    Args:
        dataset: dataset folder (sidrank.schema.DatasetPaths root).
        method: ``rqvae``, ``rqkmeans``, ``mm_rqvae`` or ``mmq``.
        modalities: modality names, used in sorted order; empty = all in the manifest.
        levels: P, code positions per SID (see the module docstring per method).
        codebook_size: K, codes per level (why 64: tokenizer/defaults.py).
        latent_dim: latent and codeword width of the learned tokenizers
            (RQ-KMeans codewords live in the input space).
        hidden_dims: encoder hidden widths of the learned tokenizers (decoders mirrored).
        epochs: passes over the fit items (learned tokenizers).
        batch_size: batch size (learned tokenizers).
        lr: Adam learning rate (learned tokenizers).
        beta: commitment weight.
        kmeans_iters: Lloyd iterations per level (RQ-KMeans fit, codebook init of the others).
        dead_code_window: training steps between dead-code resets (0 = never).
        sinkhorn_last: balanced Sinkhorn assignment on the last level (per
            modality for MM-RQ-VAE; MMQ has none).
        seed: seed of initialisation and batch order.
        recon_weight: MM-RQ-VAE weight of the MMD reconstruction loss.
        mse_weight: MM-RQ-VAE weight of the per-item squared error (0 = MMD only, as the paper).
        align: MM-RQ-VAE cross-modal alignment, ``mmd``, ``infonce`` or ``none``.
        align_weight: MM-RQ-VAE weight of the alignment loss.
        temperature: MM-RQ-VAE InfoNCE temperature.
        mmd_bandwidth: MM-RQ-VAE fixed MMD bandwidth; None = mean pairwise squared distance.
        n_shared_experts: MMQ experts over all modalities.
        n_specific_experts: MMQ experts per modality.
        shared_levels: MMQ levels per shared expert.
        specific_levels: MMQ levels per specific expert.
        ortho_weight: MMQ weight of the shared/specific orthogonality loss.
    """

    dataset: Path
    method: str = "rqvae"
    modalities: tuple[str, ...] = ()
    # shared defaults live in tokenizer/defaults.py, which the model classes read too (one place)
    levels: int = defaults.LEVELS
    codebook_size: int = defaults.CODEBOOK_SIZE
    latent_dim: int = defaults.LATENT_DIM
    hidden_dims: tuple[int, ...] = defaults.HIDDEN_DIMS
    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    lr: float = defaults.LR
    beta: float = defaults.BETA
    kmeans_iters: int = defaults.KMEANS_ITERS
    dead_code_window: int = defaults.DEAD_CODE_WINDOW
    sinkhorn_last: bool = False
    seed: int = 0
    # defaults of the multimodal methods are their model configs' defaults (one place)
    recon_weight: float = MMRQVAEConfig.recon_weight
    mse_weight: float = MMRQVAEConfig.mse_weight
    align: str = MMRQVAEConfig.align
    align_weight: float = MMRQVAEConfig.align_weight
    temperature: float = MMRQVAEConfig.temperature
    mmd_bandwidth: float | None = MMRQVAEConfig.mmd_bandwidth
    n_shared_experts: int = MMQConfig.n_shared_experts
    n_specific_experts: int = MMQConfig.n_specific_experts
    shared_levels: int = MMQConfig.shared_levels
    specific_levels: int = MMQConfig.specific_levels
    ortho_weight: float = MMQConfig.ortho_weight

    def __post_init__(self) -> None:
        self.dataset = Path(self.dataset)
        self.modalities, self.hidden_dims = tuple(self.modalities), tuple(self.hidden_dims)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        for name in (*("levels", "codebook_size", "latent_dim", "epochs", "batch_size", "kmeans_iters"), *MMQ_COUNTS):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims={self.hidden_dims}: every width must be >= 1")
        if self.lr <= 0 or self.beta < 0 or self.dead_code_window < 0:
            raise ValueError(
                f"lr={self.lr}, beta={self.beta}, dead_code_window={self.dead_code_window}: "
                f"expected lr > 0, beta >= 0, dead_code_window >= 0"
            )
        for name in ("recon_weight", "mse_weight", "align_weight", "ortho_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.align not in ALIGN_KINDS:
            raise ValueError(f"align={self.align!r}: expected one of {ALIGN_KINDS}")
        if self.temperature <= 0 or (self.mmd_bandwidth is not None and self.mmd_bandwidth <= 0):
            raise ValueError(f"temperature={self.temperature}, mmd_bandwidth={self.mmd_bandwidth}: expected > 0")
        if self.method == "mmq" and self.sinkhorn_last:
            raise ValueError("sinkhorn_last=True: method 'mmq' has no Sinkhorn assignment; drop --sinkhorn-last")

    def hashable(self) -> dict:
        """The settings that determine the result: not where the dataset lies, nor the
        settings of other methods, so changing those keeps this method's version."""
        ignored = {"dataset", *UNUSED[self.method]}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in ignored}

    def model_config(self, dims: Mapping[str, int]) -> MMRQVAEConfig | MMQConfig:
        """The multimodal model config for modality widths ``dims``; ValueError unless its
        number of code positions equals ``levels`` (P, the same budget for every method)."""
        if self.method not in MULTIMODAL:
            raise ValueError(f"method={self.method!r} has no multimodal model config")
        common = {name: getattr(self, name) for name in ("latent_dim", "hidden_dims", "codebook_size", "beta")}
        common.update(modality_dims=dict(dims), kmeans_iters=self.kmeans_iters, dead_code_window=self.dead_code_window)
        if self.method == "mm_rqvae":
            if self.levels % len(dims):
                raise ValueError(
                    f"levels={self.levels}: mm_rqvae splits the P={self.levels} code positions evenly over "
                    f"{len(dims)} modalities {sorted(dims)}; pass --levels a multiple of {len(dims)}"
                )
            extra = {name: getattr(self, name) for name in MM_RQVAE_ONLY}
            return MMRQVAEConfig(**common, **extra, levels=self.levels // len(dims), sinkhorn_last=self.sinkhorn_last)
        mmq = MMQConfig(**common, **{name: getattr(self, name) for name in MMQ_ONLY})
        if mmq.n_positions != self.levels:
            raise ValueError(
                f"levels={self.levels}: mmq with these experts has n_shared_experts x shared_levels + "
                f"{len(dims)} modalities x n_specific_experts x specific_levels = {self.n_shared_experts}x"
                f"{self.shared_levels} + {len(dims)}x{self.n_specific_experts}x{self.specific_levels} = "
                f"{mmq.n_positions} code positions; pass --levels {mmq.n_positions} or change the experts"
            )
        return mmq


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
    contents = {name: hashlib.sha256(np.ascontiguousarray(a).data).hexdigest() for name, a in modalities.items()}
    fit = hashlib.sha256(np.ascontiguousarray(fit_ids, dtype=np.int64).data).hexdigest()
    identity = {"config": cfg.hashable(), "modalities": contents, "fit_items": fit}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    return f"{cfg.method}-{digest.hexdigest()[:10]}", digest.hexdigest()


def build_tokenizer(cfg: TokenizerConfig, dims: Mapping[str, int]) -> Model:
    """The configured, unfitted tokenizer for modality widths ``dims`` (name -> D_m);
    ``rqkmeans`` / ``rqvae`` read their concatenation."""
    if cfg.method in MULTIMODAL:
        model_cfg = cfg.model_config(dims)
        return MMRQVAE(model_cfg) if isinstance(model_cfg, MMRQVAEConfig) else MMQ(model_cfg)
    in_dim = sum(dims.values())
    if cfg.method == "rqkmeans":
        return RQKMeans(
            in_dim,
            levels=cfg.levels,
            codebook_size=cfg.codebook_size,
            kmeans_iters=cfg.kmeans_iters,
            sinkhorn_last=cfg.sinkhorn_last,
        )
    return RQVAE(
        in_dim,
        latent_dim=cfg.latent_dim,
        hidden_dims=cfg.hidden_dims,
        levels=cfg.levels,
        codebook_size=cfg.codebook_size,
        beta=cfg.beta,
        kmeans_iters=cfg.kmeans_iters,
        dead_code_window=cfg.dead_code_window,
        sinkhorn_last=cfg.sinkhorn_last,
    )


def fit_tokenizer(cfg: TokenizerConfig, x_fit: torch.Tensor | dict[str, torch.Tensor]) -> tuple[Model, list[float]]:
    """Build the configured tokenizer and fit it; returns it and its loss history.

    Args:
        cfg: the run's config (modalities resolved).
        x_fit: the fit items' concatenated modalities [N, D] for ``rqkmeans`` /
            ``rqvae``, the modalities separately (name -> [N, D_m]) for the
            multimodal methods.
    """
    torch.manual_seed(cfg.seed)
    if (cfg.method in MULTIMODAL) != isinstance(x_fit, dict):
        raise TypeError(f"method {cfg.method!r} takes {'a modality dict' if cfg.method in MULTIMODAL else 'one tensor'}")
    dims = {name: x.shape[1] for name, x in x_fit.items()} if isinstance(x_fit, dict) else {"concatenated": x_fit.shape[1]}
    model = build_tokenizer(cfg, dims)
    if isinstance(model, RQKMeans):
        return model, [model.fit(x_fit, seed=cfg.seed)]
    return model, model.fit(x_fit, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)


def position_codebooks(model: Model) -> list[torch.Tensor]:
    """One [K, d] codebook per SID position, in SID order (copies)."""
    books = model.codebooks if isinstance(model, (MMRQVAE, MMQ)) else list(model.rq.codebooks)
    return [c.detach().clone() for c in books]


def position_names(model: Model) -> list[str]:
    """Human name of each SID position (``level0``.. for single-input tokenizers)."""
    if isinstance(model, (MMRQVAE, MMQ)):
        return model.cfg.position_names()
    return [f"level{level}" for level in range(model.rq.levels)]


@torch.no_grad()
def loss_terms(model: MMRQVAE | MMQ, xs: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Mean over the items of ``xs`` of every scalar loss field of the model's forward output,
    in eval mode and batches of ``batch_size`` (so MMD terms see training-sized batches)."""
    n = len(next(iter(xs.values())))
    sums: dict[str, float] = {}
    for batch in torch.arange(n).split(batch_size):
        out = model({name: x[batch] for name, x in xs.items()})
        for key, value in out._asdict().items():
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                sums[key] = sums.get(key, 0.0) + value.item() * len(batch)
    return {key: value / n for key, value in sums.items()}


def modality_metrics(items: dict[str, torch.Tensor], recon: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Reconstruction error and cosine per modality over the items that HAVE it (non-zero rows)."""
    result = {}
    for name, x in items.items():
        present = present_rows(x)
        figures: dict[str, float] = {"n_present": int(present.sum())}
        if figures["n_present"]:
            figures.update(reconstruction_metrics(x[present].numpy(), recon[name][present].numpy()))
        result[name] = figures
    return result


def sid_table(codes: np.ndarray, version: str, valid_from: pd.Timestamp) -> pd.DataFrame:
    """The SID contract for codes [n_items, L] of items 1..n_items."""
    table = pd.DataFrame({"item_id": np.arange(1, len(codes) + 1, dtype=np.int64)})
    for level in range(codes.shape[1]):
        table[f"sid_{level}"] = codes[:, level].astype(np.int64)
    table["sid_version"] = version
    table["event_timestamp"] = pd.Series(valid_from, index=table.index).astype("datetime64[ns, UTC]")
    table["created"] = pd.Series(pd.Timestamp.now(tz="UTC"), index=table.index).astype("datetime64[ns, UTC]")
    return table


def ground_truth_clusters(paths: DatasetPaths) -> np.ndarray | None:
    """items.parquet's ``cluster`` column in item order (synthetic data), else None."""
    if "cluster" not in pq.read_schema(paths.items).names:
        return None
    items = pd.read_parquet(paths.items, columns=["item_id", "cluster"]).sort_values("item_id")
    return items["cluster"].to_numpy()


def write_version(
    paths: DatasetPaths, version: str, *, table: pd.DataFrame, model: Model, config: dict, metrics: dict
) -> Path:
    """Write the version folder, then move ``D/sids/LATEST`` onto it (all atomic)."""
    out = paths.sid_dir(version)
    write_parquet(table, out / "sids.parquet")
    with atomic_path(out / "codebooks.pt") as tmp:
        payload = {"codebooks": position_codebooks(model), "config": config, "state_dict": model.state_dict()}
        torch.save(payload, tmp)
    write_json(config, out / "config.json")
    write_json(metrics, out / "metrics.json")
    paths.mark_latest_sid_version(version)
    return out


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

    model: Model
    codes: np.ndarray
    metrics: dict


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


def fit_and_measure(inputs: TokenizerInputs) -> FittedTokenizer:
    """Fit on the train items only, encode every item, compute the metrics (writes nothing)."""
    cfg = inputs.cfg
    xs = {name: torch.from_numpy(inputs.modalities[name]) for name in cfg.modalities}  # [n_items + 1, D_m]
    items = {name: x[1:] for name, x in xs.items()}
    x_all = torch.cat([items[name] for name in cfg.modalities], dim=1)
    rows = torch.from_numpy(inputs.fit_ids)
    multimodal = cfg.method in MULTIMODAL
    x_fit = {name: x[rows] for name, x in xs.items()} if multimodal else torch.cat(list(xs.values()), dim=1)[rows]
    # fit on train items, encode every item
    start = time.perf_counter()
    model, history = fit_tokenizer(cfg, x_fit)
    train_seconds = time.perf_counter() - start
    model.eval()
    if isinstance(model, (MMRQVAE, MMQ)):
        codes, recon = model.encode(items), model.reconstruct(items)
    else:
        codes = model.encode(x_all)
        parts = model.decode(codes).split([x.shape[1] for x in items.values()], dim=1)
        recon = dict(zip(items, parts, strict=True))
    # metrics: overall on the concatenation (as for every method), then per modality on present rows
    recon_all = torch.cat([recon[name] for name in cfg.modalities], dim=1)
    metrics = tokenizer_metrics(
        codes.numpy(), cfg.codebook_size, x=x_all.numpy(), recon=recon_all.numpy(), clusters=inputs.clusters
    )
    metrics.update(
        per_modality=modality_metrics(items, recon),
        position_names=position_names(model),
        n_fit_items=len(inputs.fit_ids),
        train_seconds=train_seconds,
        final_loss=history[-1],
        loss_history=history,
    )
    if isinstance(model, (MMRQVAE, MMQ)) and isinstance(x_fit, dict):
        metrics["final_loss_terms"] = loss_terms(model, x_fit, cfg.batch_size)
    return FittedTokenizer(model, codes.numpy(), metrics)


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Run the whole stage for ``cfg``; returns the metrics (with ``version``)."""
    # inputs: modalities (validated) and the train items
    inputs = load_inputs(cfg)
    cfg, paths = inputs.cfg, DatasetPaths(cfg.dataset)
    logger.info("config %s", json.dumps({**cfg.hashable(), "dataset": str(cfg.dataset)}))
    dims = {name: int(a.shape[1]) for name, a in inputs.modalities.items()}
    if cfg.method in MULTIMODAL:
        cfg.model_config(dims)  # a code budget that does not fit the modalities fails before any work
    version, digest = version_of(cfg, inputs.modalities, inputs.fit_ids)
    x_all = np.concatenate([inputs.modalities[name] for name in cfg.modalities], axis=1)[1:]
    logger.info("%s: fitting on %d of %d items, widths %s", version, len(inputs.fit_ids), len(x_all), dims)
    no_content = int((~(x_all != 0).any(axis=1)).sum())
    if no_content:
        # All-zero inputs encode to one and the same SID: those items are indistinguishable to SID features.
        logger.warning("%d items have no content in any modality and share one SID", no_content)
    fitted = fit_and_measure(inputs)
    metrics = {**fitted.metrics, "version": version}
    # artifacts
    codebooks = position_codebooks(fitted.model)
    config = {
        **cfg.hashable(),
        "dataset": str(cfg.dataset),
        "version": version,
        "config_hash": digest,
        "modality_dims": dims,
        "input_dim": sum(dims.values()),
        "codebook_dim": int(codebooks[0].shape[1]),
        "position_names": metrics["position_names"],
    }
    if isinstance(fitted.model, (MMRQVAE, MMQ)):
        config[cfg.method] = fitted.model.cfg.to_dict()  # rebuilds the model from codebooks.pt
    table = sid_table(fitted.codes, version, inputs.valid_from)
    validate_sids(table, cfg.codebook_size, f"{paths.sid_dir(version)}/sids.parquet")
    out = write_version(paths, version, table=table, model=fitted.model, config=config, metrics=metrics)
    seconds, final = metrics["train_seconds"], metrics["final_loss"]
    print(f"{version} -> {out} ({seconds:.1f}s, final loss {final:.4f})\n  {summary_line(metrics)}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    defaults = TokenizerConfig(dataset=Path("."))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default=defaults.method)
    parser.add_argument("--modalities", nargs="+", default=list(defaults.modalities))
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=list(defaults.hidden_dims))
    ints = ("levels", "codebook_size", "latent_dim", "epochs", "batch_size", "kmeans_iters", "dead_code_window", "seed")
    for name in (*ints, "n_shared_experts", "n_specific_experts", "shared_levels", "specific_levels"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    floats = ("lr", "beta", "recon_weight", "mse_weight", "align_weight", "temperature", "ortho_weight")
    for name in (*floats, "mmd_bandwidth"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--align", choices=ALIGN_KINDS, default=defaults.align)
    parser.add_argument("--sinkhorn-last", action="store_true", default=defaults.sinkhorn_last)
    return train_tokenizer(TokenizerConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
