"""Train a semantic-ID tokenizer and publish a SID version for the dataset.

    python -m tokenizer.train --dataset artifacts/ml-100k --method rqvae
    python -m tokenizer.train --dataset artifacts/ml-100k --method rqkmeans --codebook-size 64 --seed 1

Phases: load (or build) the modalities and concatenate them; fit on the items
of TRAIN rows only (nothing from valid/test rows: leakage); encode ALL items
1..n_items, so cold items get SIDs from their content; write
``D/sids/<version>/`` and point ``D/sids/LATEST`` at it. The version is
``<method>-<sha256(config, modality contents)[:10]>``, so the same inputs give
the same version and any change gives a new one.

Files in ``D/sids/<version>/``: ``sids.parquet`` (item_id, sid_0..sid_{L-1},
tokenizer_version, event_timestamp = earliest event, so a static version serves
every row, created), ``codebooks.pt`` ({"codebooks": [K x dim per level],
"config", "state_dict"}), ``config.json`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipelines.io import atomic_path, read_json, write_json, write_parquet, write_text
from pipelines.schema import (
    DataError,
    DatasetPaths,
    require_columns,
    require_file,
    require_int_ids,
    require_utc_timestamps,
    validate_sids,
)
from tokenizer.metrics import summary_line, tokenizer_metrics
from tokenizer.modalities import INGEST_COMMAND, build_modalities
from tokenizer.rqkmeans import RQKMeans
from tokenizer.rqvae import RQVAE

logger = logging.getLogger(__name__)

METHODS = ("rqvae", "rqkmeans")
RQVAE_ONLY = ("latent_dim", "hidden_dims", "epochs", "batch_size", "lr", "beta", "dead_code_window")


@dataclass
class TokenizerConfig:
    """What one tokenizer run does.

    Args:
        dataset: dataset folder (pipelines.schema.DatasetPaths root).
        method: ``rqvae`` or ``rqkmeans``.
        modalities: modality names, concatenated in sorted order; empty = all in the manifest.
        levels: L, codes per SID.
        codebook_size: K, codes per level. 64 on MovieLens-100K keeps every
            level fully used and the full-code collision rate near 4% (K=32
            collides ~20% of the 1682 items).
        latent_dim: RQ-VAE latent and codeword width (RQ-KMeans codewords live
            in the input space).
        hidden_dims: RQ-VAE encoder hidden widths (decoder mirrored).
        epochs: RQ-VAE passes over the fit items.
        batch_size: RQ-VAE batch size.
        lr: RQ-VAE Adam learning rate.
        beta: commitment weight.
        kmeans_iters: Lloyd iterations per level (RQ-KMeans fit, RQ-VAE init).
        dead_code_window: RQ-VAE steps between dead-code resets (0 = never).
        sinkhorn_last: balanced Sinkhorn assignment on the last level.
        seed: seed of initialisation and batch order.
    """

    dataset: Path
    method: str = "rqvae"
    modalities: tuple[str, ...] = ()
    levels: int = 3
    codebook_size: int = 64
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    beta: float = 0.25
    kmeans_iters: int = 50
    dead_code_window: int = 50
    sinkhorn_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.dataset = Path(self.dataset)
        self.modalities, self.hidden_dims = tuple(self.modalities), tuple(self.hidden_dims)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        positive = ("levels", "codebook_size", "latent_dim", "epochs", "batch_size", "kmeans_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims={self.hidden_dims}: every width must be >= 1")
        if self.lr <= 0 or self.beta < 0 or self.dead_code_window < 0:
            raise ValueError(
                f"lr={self.lr}, beta={self.beta}, dead_code_window={self.dead_code_window}: "
                f"expected lr > 0, beta >= 0, dead_code_window >= 0"
            )

    def hashable(self) -> dict:
        """The settings that determine the result: not where the dataset lies, and for
        RQ-KMeans not the RQ-VAE settings, so changing those keeps its version."""
        ignored = {"dataset", *(RQVAE_ONLY if self.method == "rqkmeans" else ())}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in ignored}


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


def fit_tokenizer(cfg: TokenizerConfig, x_fit: torch.Tensor) -> tuple[RQKMeans | RQVAE, list[float]]:
    """Build the configured tokenizer and fit it on ``x_fit`` [N, D]; returns it and its loss history."""
    torch.manual_seed(cfg.seed)
    if cfg.method == "rqkmeans":
        kmeans_model = RQKMeans(
            x_fit.shape[1],
            levels=cfg.levels,
            codebook_size=cfg.codebook_size,
            kmeans_iters=cfg.kmeans_iters,
            sinkhorn_last=cfg.sinkhorn_last,
        )
        return kmeans_model, [kmeans_model.fit(x_fit, seed=cfg.seed)]
    vae = RQVAE(
        x_fit.shape[1],
        latent_dim=cfg.latent_dim,
        hidden_dims=cfg.hidden_dims,
        levels=cfg.levels,
        codebook_size=cfg.codebook_size,
        beta=cfg.beta,
        kmeans_iters=cfg.kmeans_iters,
        dead_code_window=cfg.dead_code_window,
        sinkhorn_last=cfg.sinkhorn_last,
    )
    return vae, vae.fit(x_fit, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)


def sid_table(codes: np.ndarray, version: str, valid_from: pd.Timestamp) -> pd.DataFrame:
    """The SID contract for codes [n_items, L] of items 1..n_items."""
    table = pd.DataFrame({"item_id": np.arange(1, len(codes) + 1, dtype=np.int64)})
    for level in range(codes.shape[1]):
        table[f"sid_{level}"] = codes[:, level].astype(np.int64)
    table["tokenizer_version"] = version
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
    paths: DatasetPaths, version: str, *, table: pd.DataFrame, model: RQKMeans | RQVAE, config: dict, metrics: dict
) -> Path:
    """Write the version folder, then move ``D/sids/LATEST`` onto it (all atomic)."""
    out = paths.sid_dir(version)
    write_parquet(table, out / "sids.parquet")
    codebooks = [c.detach().clone() for c in model.rq.codebooks]
    with atomic_path(out / "codebooks.pt") as tmp:
        torch.save({"codebooks": codebooks, "config": config, "state_dict": model.state_dict()}, tmp)
    write_json(config, out / "config.json")
    write_json(metrics, out / "metrics.json")
    write_text(version + "\n", paths.root / "sids" / "LATEST")
    return out


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Run the whole stage for ``cfg``; returns the metrics (with ``version``)."""
    paths = DatasetPaths(cfg.dataset)
    # inputs: modalities (validated) and the train items
    meta = read_json(require_file(paths.meta, INGEST_COMMAND))
    n_items = int(meta["n_items"])
    modalities = build_modalities(paths, names=cfg.modalities or None)
    cfg = replace(cfg, modalities=tuple(sorted(modalities)))  # resolve "all" to the names used
    logger.info("config %s", json.dumps({**cfg.hashable(), "dataset": str(cfg.dataset)}))
    x = torch.from_numpy(np.concatenate([modalities[name] for name in cfg.modalities], axis=1))
    events = pd.read_parquet(
        require_file(paths.events, INGEST_COMMAND), columns=["item_id", "split", "event_timestamp"]
    )
    fit_ids = train_item_ids(events, n_items, str(paths.events))
    version, digest = version_of(cfg, modalities, fit_ids)
    logger.info("%s: fitting on %d of %d items, input width %d", version, len(fit_ids), n_items, x.shape[1])
    no_content = int((x[1:].abs().sum(dim=1) == 0).sum())
    if no_content:
        # All-zero inputs encode to one and the same SID: those items are indistinguishable to SID features.
        logger.warning("%d items have no content in any modality and share one SID", no_content)
    # fit on train items, encode every item
    start = time.perf_counter()
    model, history = fit_tokenizer(cfg, x[torch.from_numpy(fit_ids)])
    train_seconds = time.perf_counter() - start
    model.eval()
    codes = model.encode(x[1:])
    recon = model.decode(codes)
    # metrics and artifacts
    metrics = tokenizer_metrics(
        codes.numpy(), cfg.codebook_size, x=x[1:].numpy(), recon=recon.numpy(), clusters=ground_truth_clusters(paths)
    )
    metrics.update(
        version=version,
        n_fit_items=len(fit_ids),
        train_seconds=train_seconds,
        final_loss=history[-1],
        loss_history=history,
    )
    config = {
        **cfg.hashable(),
        "dataset": str(cfg.dataset),
        "version": version,
        "config_hash": digest,
        "modality_dims": {name: int(a.shape[1]) for name, a in modalities.items()},
        "input_dim": int(x.shape[1]),
        "codebook_dim": int(model.rq.codebooks.shape[-1]),
    }
    table = sid_table(codes.numpy(), version, events["event_timestamp"].min())
    validate_sids(table, cfg.codebook_size, f"{paths.sid_dir(version)}/sids.parquet")
    out = write_version(paths, version, table=table, model=model, config=config, metrics=metrics)
    print(f"{version} -> {out} ({train_seconds:.1f}s, final loss {history[-1]:.4f})\n  {summary_line(metrics)}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    defaults = TokenizerConfig(dataset=Path("."))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default=defaults.method)
    parser.add_argument("--modalities", nargs="+", default=list(defaults.modalities))
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=list(defaults.hidden_dims))
    for name in (
        "levels",
        "codebook_size",
        "latent_dim",
        "epochs",
        "batch_size",
        "kmeans_iters",
        "dead_code_window",
        "seed",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "beta"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--sinkhorn-last", action="store_true", default=defaults.sinkhorn_last)
    return train_tokenizer(TokenizerConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
