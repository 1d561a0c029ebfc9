"""Train the DLRM / DCN ranker on Feast training rows with sharded embedding tables.

    OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc_per_node 2 \\
        -m ranking.train --dataset artifacts/ml-100k --repo feature_repo --out runs/dlrm

``python -m ranking.train ...`` (no torchrun) runs as world size 1. Tables are
placed by TorchRec's planner (CPU: table-wise / column-wise, kernel ``fused``,
the sparse optimizer (fused SGD by default, or row-wise Adagrad) applied in
backward); dense layers are data-parallel with Adam.
Writes ``<out>/metrics.json``, ``<out>/predictions_{valid,test}.parquet`` and
the best model as a torch.distributed.checkpoint folder ``<out>/checkpoint``.

SID versions: ``--sid-version V`` trains on any published version (its
feature meta ``<repo>/data/feature_meta/<name>.json`` and service
``ranker_<name>``); the default is the repository's default version. Rows
are cached per version and service. MME-SID options: ``--sid-init codebook``
starts the SID tables from ``<dataset>/sids/<V>/codebooks.pt``
(ranking/sid_init.py), ``--fusion freq`` gates item-id and SID embeddings by
item frequency (ranking/model.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torchrec
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from sidrank.io import file_sha256
from sidrank.io import write_json, write_parquet
from sidrank.protocol import train_item_counts
from sidrank.schema import DataError, require_file, validate_events
from sidrank.contract import DatasetPaths
from sidrank import contract
from ranking.batches import DENSE_FEATURES, FeatureConfig, SplitTensors, build_split, sparse_tables
from sidrank.metrics import auc, evaluate_predictions
from ranking.model import FUSIONS, SID_INITS, SPARSE_OPTIMIZERS, ModelConfig, build_model, shard_model
from ranking.rows import arrow_to_frame, write_training_rows
from ranking.sid_init import init_sid_tables

log = logging.getLogger("ranking.train")


@dataclass
class TrainConfig:
    """One training run.

    Args:
        dataset: dataset folder with ``events.parquet`` (row ids and splits).
        repo: Feast repository the training rows come from.
        out: run folder for metrics, predictions and the checkpoint.
        rows: training rows parquet, read as given. None means the cache
            ``<dataset>/rows/<version name>/<service>.parquet``, (re)built from
            Feast by rank 0 when missing or older than the feature meta or the
            repository's SID version registry.
        feature_meta: None means ``<repo>/data/feature_meta/<version name>.json``
            with ``sid_version``, else ``<repo>/data/feature_meta.json`` (the default version).
        sid_version: tokenizer version to train on; None means the feature meta's.
        service: Feast feature service name; None means ``ranker_<version name>``.
        epochs: maximum epochs.
        batch_size: global batch (split evenly across ranks).
        sparse_optimizer: fused optimizer of the embedding tables (model.SPARSE_OPTIMIZERS).
        lr_sparse: its learning rate.
        lr_dense: Adam learning rate of the MLPs.
        patience: epochs without a better valid AUC before stopping.
        seed: seeds init and the per-epoch shuffle (shared by all ranks).
        ddr_cap_gb: host memory per rank the planner may fill.
        save_checkpoint: write the best model with torch.distributed.checkpoint.
        features: sparse feature selection.
        model: architecture.
    """

    dataset: Path
    repo: Path
    out: Path
    rows: Path | None = None
    feature_meta: Path | None = None
    sid_version: str | None = None
    service: str | None = None
    epochs: int = 10
    batch_size: int = 1024
    sparse_optimizer: str = "sgd"
    lr_sparse: float = 0.03
    lr_dense: float = 1e-3
    patience: int = 3
    seed: int = 0
    ddr_cap_gb: float = 4.0
    save_checkpoint: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        for name in ("dataset", "repo", "out", "rows", "feature_meta"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sparse_optimizer={self.sparse_optimizer!r}: expected one of {sorted(SPARSE_OPTIMIZERS)}")
        for name in ("lr_sparse", "lr_dense", "ddr_cap_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sid_version is not None:
            contract.sid_version_name(self.sid_version)  # raises on an empty name
        if self.model.fusion == "freq" and not (self.features.use_item_id and self.features.use_sid):
            raise ValueError("fusion='freq' fuses the item-id and SID embeddings: it needs use_item_id and use_sid")
        if self.model.sid_init == "codebook" and not self.features.use_sid:
            raise ValueError("sid_init='codebook' initialises the SID tables: it needs use_sid")

    def feature_meta_path(self, meta: contract.FeatureMeta) -> Path:
        """``feature_meta`` or the repository's file of the meta's SID version."""
        return self.feature_meta or contract.RepoPaths(self.repo).feature_meta_path(meta.sid_version)

    def service_for(self, meta: contract.FeatureMeta) -> str:
        """The feature service of the rows: ``service`` or the one of the meta's SID version."""
        return self.service or contract.sid_service(meta.sid_version)

    def rows_path_for(self, meta: contract.FeatureMeta) -> Path:
        """``rows`` or the per-version, per-service cache (``DatasetPaths.rows_cache``)."""
        return self.rows or DatasetPaths(self.dataset).rows_cache(meta.sid_version, self.service_for(meta))


def read_meta(cfg: TrainConfig) -> contract.FeatureMeta:
    """The feature meta of the configured SID version; a DataError names both versions when they differ."""
    if cfg.feature_meta is None:
        return contract.RepoPaths(cfg.repo).feature_meta(cfg.sid_version)
    meta = contract.read_feature_meta(cfg.feature_meta)
    if cfg.sid_version is not None and meta.sid_version != cfg.sid_version:
        raise DataError(
            f"{cfg.feature_meta}: key 'sid_version' is '{meta.sid_version}' but the ranker is configured with "
            f"--sid-version '{cfg.sid_version}'; pass the feature meta of '{cfg.sid_version}' or drop --feature-meta"
        )
    return meta


def _init_distributed() -> bool:
    """Join torchrun's gloo group, or form a one-process group; True if this call created it."""
    if dist.is_initialized():
        return False
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def _on_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 while the others wait; a failure there stops every rank instead of hanging them."""
    if not dist.is_initialized():
        fn()
        return
    error = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as exc:
            error = [f"{type(exc).__name__}: {exc}"]
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"rank 0 failed: {error[0]}")


def rank_share(row_ids: np.ndarray, split: str, rank: int, world: int) -> np.ndarray:
    """The row ids of one split (ascending) that this rank encodes.

    Train: every world-th row from ``rank`` (each rank trains on its own
    shard, so no rank holds all rows). Valid/test: one contiguous part, the
    part :func:`score_split` scores; parts differ by at most one row, so no
    rank is left without rows while the split has at least ``world``.
    """
    if split == "train":
        return row_ids[rank::world]
    return np.array_split(row_ids, world)[rank]


SPLITS = ("train", "valid", "test")


def read_row_ids(path: Path, wanted: np.ndarray) -> pd.DataFrame:
    """The rows of a parquet file whose ``row_id`` is in ``wanted`` (ascending), sorted by row_id.

    Row groups outside ``wanted``'s range are skipped by their statistics
    and the rest are filtered batch by batch, so only the wanted rows are
    ever held at once.
    """
    parquet = pq.ParquetFile(path)
    column = parquet.schema_arrow.get_field_index("row_id")
    lo, hi = (int(wanted[0]), int(wanted[-1])) if len(wanted) else (0, -1)
    groups = []
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max or (stats.min <= hi and stats.max >= lo):
            groups.append(g)
    value_set = pa.array(wanted)
    batches = [
        batch.filter(pc.is_in(batch.column("row_id"), value_set=value_set))
        for batch in parquet.iter_batches(batch_size=1 << 18, row_groups=groups)
    ]
    rows = arrow_to_frame(pa.Table.from_batches(batches, schema=parquet.schema_arrow))
    del batches
    # Arrow's allocator keeps the decoded, filtered-out batches otherwise.
    pa.default_memory_pool().release_unused()
    return rows.sort_values("row_id", kind="stable", ignore_index=True)


def _on_every_rank(fn: Callable[[], None]) -> None:
    """Run ``fn`` on every rank; if it fails on any, every rank raises (the others would wait in a collective)."""
    failure = None
    try:
        fn()
    except Exception as exc:
        failure = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if failure is None else f"{type(failure).__name__}: {failure}")
        failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
        if failed and failure is None:
            raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if failure is not None:
        raise failure


def load_rows(
    cfg: TrainConfig, events: pd.DataFrame, meta: contract.FeatureMeta, rank: int = 0, world: int = 1
) -> Iterator[tuple[str, pd.DataFrame]]:
    """This rank's training rows, split by split: (split, its :func:`rank_share` rows sorted by ``row_id``).

    ``--rows`` is read as given. The default cache is (re)built from Feast by
    rank 0 when missing or older than the feature meta or the SID version
    registry, which every publish rewrites; it is streamed to parquet in
    chunks, and each rank reads only its rows of it, one split at a time.
    """
    path = cfg.rows_path_for(meta)
    registry = contract.RepoPaths(cfg.repo).sid_registry
    sources = [cfg.feature_meta_path(meta), *([registry] if registry.exists() else [])]

    def build_if_stale() -> None:
        if path.exists() and (cfg.rows is not None or path.stat().st_mtime >= max(p.stat().st_mtime for p in sources)):
            return
        n_rows = write_training_rows(
            cfg.repo, events, path, service=cfg.service_for(meta), expected_sid_version=meta.sid_version
        )
        log.info("wrote %d training rows to %s", n_rows, path)

    events_file = cfg.dataset / "events.parquet"
    if meta.events_sha256 and meta.events_sha256 != file_sha256(events_file):
        raise DataError(
            f"{cfg.feature_meta_path(meta)}: the feature store was published from other events than {events_file} "
            f"(sha256 {meta.events_sha256[:12]} vs {file_sha256(events_file)[:12]}); publish this dataset with "
            f"`python -m features.build --dataset {cfg.dataset}` and `python -m features.publish`"
        )
    # Rank 0 alone decides: a rank checking the file itself could see it half-way through the rebuild.
    _on_rank0(build_if_stale)
    n_cached = pq.ParquetFile(path).metadata.num_rows
    if n_cached != len(events):
        raise DataError(
            f"{path}: its {n_cached} rows do not match the {len(events)} events by row_id; "
            f"it was built from other events: delete {path} to rebuild it"
        )
    by_id = events.set_index("row_id").sort_index()
    for split in SPLITS:
        wanted = rank_share(by_id.index[by_id["split"] == split].to_numpy(), split, rank, world)
        rows = read_row_ids(path, wanted)
        if not np.array_equal(rows["row_id"].to_numpy(), wanted):
            raise DataError(
                f"{path}: {len(rows)} of the {len(wanted)} {split} row ids of {events_file} are in it; "
                f"it was built from other events: delete {path} to rebuild it"
            )
        expected = by_id.loc[wanted]
        # Rows cached (or passed with --rows) before a re-ingest would carry stale labels or ids.
        for column in ("label", "user_id", "item_id"):
            if not np.array_equal(rows[column].to_numpy(), expected[column].to_numpy()):
                raise DataError(
                    f"{path}: column '{column}' disagrees with {events_file} for some row_id; "
                    f"the rows were built from other events: delete {path} (or the --rows file) to rebuild them"
                )
        versions = set(rows[contract.SID_VERSION].dropna()) if contract.SID_VERSION in rows else set()
        if cfg.features.use_sid and versions - {meta.sid_version}:
            raise DataError(
                f"{path}: column '{contract.SID_VERSION}' has {sorted(versions)} but feature meta says "
                f"'{meta.sid_version}'; delete {path} to rebuild the rows"
            )
        yield split, rows


def train_epoch(
    dmp: DistributedModelParallel, opt: CombinedOptimizer, train: SplitTensors, n_train: int, cfg: TrainConfig,
    epoch: int,
) -> tuple[float, float]:
    """One pass over train in global batches, each rank over its shard; (mean loss over ranks, global samples/s).

    ``train`` is this rank's shard of the ``n_train`` train rows.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    local = cfg.batch_size // world
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * world + rank)
    order = torch.randperm(len(train), generator=generator)
    # Every rank runs the same number of steps or the collectives hang; a shard
    # holds at least n_train // world rows, so the last partial batch is dropped.
    n_steps = n_train // cfg.batch_size
    dmp.train()
    loss_sum, start = torch.zeros(()), time.perf_counter()
    bar = tqdm(range(n_steps), desc=f"epoch {epoch}", disable=rank != 0, mininterval=1.0)
    for step in bar:
        loss, _ = dmp(train.batch(order[step * local : (step + 1) * local]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
        if rank == 0 and step % 20 == 0:
            rate = (step + 1) * cfg.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
    rate = n_steps * cfg.batch_size / (time.perf_counter() - start)
    dist.all_reduce(loss_sum)
    return float(loss_sum) / (n_steps * world), rate


def score_split(
    dmp: DistributedModelParallel, part: SplitTensors, n_rows: int, local: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of all ``n_rows`` rows of a split, (row_ids, scores) sorted by row_id, on every rank.

    ``part`` is this rank's contiguous part (:func:`rank_share`); every rank
    runs the same number of batches, padded (padding rows carry row_id -1
    and are dropped after the gather).
    """
    world = dist.get_world_size()
    n_batches = math.ceil(math.ceil(n_rows / world) / local)
    index = torch.arange(n_batches * local)
    real = index < len(part)
    index = torch.where(real, index, 0)
    dmp.eval()
    scores = []
    # no_grad, not inference_mode: inference tensors break TorchRec's sharded modules (DESIGN section 9).
    with torch.no_grad():
        for b in range(n_batches):
            _, (_, logits, _) = dmp(part.batch(index[b * local : (b + 1) * local]))
            scores.append(torch.sigmoid(logits))
    local_ids = torch.where(real, part.row_ids[index], -1)
    gathered_ids = [torch.empty_like(local_ids) for _ in range(world)]
    gathered_scores = [torch.empty(len(local_ids)) for _ in range(world)]
    dist.all_gather(gathered_ids, local_ids)
    dist.all_gather(gathered_scores, torch.cat(scores))
    ids, probs = torch.cat(gathered_ids).numpy(), torch.cat(gathered_scores).numpy()
    keep = ids >= 0
    order = np.argsort(ids[keep], kind="stable")
    return ids[keep][order], probs[keep][order].astype(np.float64)


def _predictions(events: pd.DataFrame, row_ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """One split's events (sorted by row_id) with the gathered scores."""
    frame = events[["row_id", "user_id", "item_id", "label"]]
    assert np.array_equal(frame["row_id"].to_numpy(), row_ids), "scored rows differ from the split"
    return frame.assign(score=scores).reset_index(drop=True)


def save_checkpoint(state: dict[str, Any], out: Path) -> None:
    """Sharded save of ``state`` into ``out/checkpoint``; a temp folder renamed at the end, never half-written."""
    final, tmp = out / "checkpoint", out / ".checkpoint.tmp"
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def run(cfg: TrainConfig) -> dict | None:
    """Train, early-stop on valid AUC and evaluate the best epoch; metrics dict on rank 0, else None."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # 1. one thread per rank (2 cores), seeds shared by all ranks; main() set up the gloo group
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {world}")
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    log.info("config: %s", json.dumps(config, sort_keys=True))

    # 2. rows: events give row ids and splits; features come from Feast (cached)
    with _timed(timings, "rows_s"):
        paths = DatasetPaths(cfg.dataset)
        events = pd.read_parquet(require_file(paths.events, "python -m ingest"))
        events = validate_events(events, str(paths.events))
        meta = read_meta(cfg)
        rows_path = cfg.rows_path_for(meta)
        columns = ["row_id", "user_id", "item_id", "label"]
        split_events = {s: events.loc[events["split"] == s, columns].sort_values("row_id") for s in SPLITS}
        shares = load_rows(cfg, events, meta, rank, world)

    # 3. tensors per split, encoded once; a split's rows are dropped once encoded
    splits = {}

    def encode_shares() -> None:
        for _ in SPLITS:
            with _timed(timings, "rows_s"):
                split, rows = next(shares)
            with _timed(timings, "batches_s"):
                splits[split] = build_split(rows, meta, cfg.features, f"{rows_path}[{split}]")
                del rows
                pa.default_memory_pool().release_unused()

    # Each rank checks its own shard: one rank's DataError must stop all of them.
    _on_every_rank(encode_shares)
    n_rows = {s: len(e) for s, e in split_events.items()}
    if n_rows["train"] < cfg.batch_size:
        raise DataError(f"{rows_path}: {n_rows['train']} train rows < batch_size {cfg.batch_size}; lower --batch-size")

    # 4. model, sharding plan, optimizers
    with _timed(timings, "shard_s"):
        tables = sparse_tables(meta, cfg.features)
        model = build_model(tables, len(DENSE_FEATURES), cfg.model, device="meta")
        dmp, opt, plan = shard_model(
            model, tables, sparse_optimizer=cfg.sparse_optimizer, lr_sparse=cfg.lr_sparse, lr_dense=cfg.lr_dense,
            ddr_cap_bytes=int(cfg.ddr_cap_gb * 2**30), pooling_factors=splits["train"].pooling_factors(),
        )
        log.info("sharding plan:\n%s", plan["text"])
        if cfg.model.sid_init == "codebook":
            codebooks = DatasetPaths(cfg.dataset).sid_dir(meta.sid_version) / "codebooks.pt"
            init_sid_tables(dmp, tables, codebooks, meta, cfg.model.emb_dim, seed=cfg.seed)

    # 5-7. epochs, early stopping on valid AUC; the best state is a deep copy of the sharded state_dict
    local, history, best = cfg.batch_size // world, [], {"epoch": -1, "auc": -math.inf}
    for epoch in range(cfg.epochs):
        with _timed(timings, "train_s"):
            loss, rate = train_epoch(dmp, opt, splits["train"], n_rows["train"], cfg, epoch)
        with _timed(timings, "eval_s"):
            ids, scores = score_split(dmp, splits["valid"], n_rows["valid"], local)
        # Every rank holds all scores, so every rank takes the same stopping decision.
        assert np.array_equal(ids, split_events["valid"]["row_id"].to_numpy()), "gathered scores out of row order"
        valid_auc = auc(split_events["valid"]["label"].to_numpy(), scores, what="valid auc")
        history.append({"epoch": epoch, "train_loss": loss, "valid_auc": valid_auc, "samples_per_s": rate})
        log.info("epoch %d: train loss %.4f, valid auc %.4f, %.0f samples/s", epoch, loss, valid_auc, rate)
        if best["epoch"] < 0 or valid_auc > best["auc"]:
            best = {"epoch": epoch, "auc": valid_auc, "state": copy.deepcopy(dmp.state_dict()), "valid": (ids, scores)}
        elif epoch - best["epoch"] >= cfg.patience:
            log.info("early stop: no better valid auc for %d epochs", cfg.patience)
            break
    dmp.load_state_dict(best["state"])
    with _timed(timings, "eval_s"):
        test_ids, test_scores = score_split(dmp, splits["test"], n_rows["test"], local)
    if cfg.save_checkpoint:
        save_checkpoint({**best["state"], "config": json.dumps(config), "best_epoch": best["epoch"]}, cfg.out)
    timings["total_s"] = time.perf_counter() - start
    if rank != 0:
        return None

    # 8. metrics and predictions (rank 0)
    preds = {
        "valid": _predictions(split_events["valid"], *best["valid"]),
        "test": _predictions(split_events["test"], test_ids, test_scores),
    }
    counts = train_item_counts(events, meta.n_items)
    test, valid = (evaluate_predictions(preds[s], counts, source=f"predictions_{s}") for s in ("test", "valid"))
    for name, frame in preds.items():
        write_parquet(frame[["row_id", "label", "score"]], cfg.out / f"predictions_{name}.parquet")
    metrics = {
        **{f"test_{k}": v for k, v in test.items() if k != "n_rows"},
        "valid_auc": valid["auc"],
        "valid_logloss": valid["logloss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        **{f"{s}_rows": n for s, n in n_rows.items()},
        "world_size": world,
        "sid_version": meta.sid_version,
        "service": cfg.service_for(meta),
        "samples_per_s": float(np.mean([h["samples_per_s"] for h in history])),
        "history": history,
        "config": config,
        "plan": plan["ranks"],
        "sharding": plan["kinds"],
        "timings": timings,
        "versions": {"torch": torch.__version__, "torchrec": torchrec.__version__},
    }
    write_json(metrics, cfg.out / "metrics.json")
    log.info("test auc %.4f (cold %.4f, gauc %.4f) at epoch %d -> %s", metrics["test_auc"],
             metrics["test_auc_cold"], metrics["test_gauc"], best["epoch"], cfg.out / "metrics.json")
    return metrics


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ranking.train", description="Train the sharded DLRM/DCN ranker.", allow_abbrev=False
    )
    p.add_argument("--dataset", type=Path, required=True, help="folder with events.parquet")
    p.add_argument("--repo", type=Path, required=True, help="Feast repository")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--rows", type=Path, default=TrainConfig.rows, help="cached training rows parquet")
    p.add_argument("--feature-meta", type=Path, default=TrainConfig.feature_meta)
    p.add_argument("--sid-version", default=TrainConfig.sid_version, help="published SID version (default: the repo's)")
    p.add_argument("--service", default=TrainConfig.service, help="feature service (default: the SID version's)")
    for name in ("epochs", "batch_size", "patience", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(TrainConfig, name))
    p.add_argument("--sparse-optimizer", choices=sorted(SPARSE_OPTIMIZERS), default=TrainConfig.sparse_optimizer)
    for name in ("lr_sparse", "lr_dense", "ddr_cap_gb"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(TrainConfig, name))
    p.add_argument("--save-checkpoint", action=argparse.BooleanOptionalAction, default=TrainConfig.save_checkpoint)
    p.add_argument("--use-user-id", action=argparse.BooleanOptionalAction, default=FeatureConfig.use_user_id)
    p.add_argument("--use-item-id", action=argparse.BooleanOptionalAction, default=FeatureConfig.use_item_id)
    p.add_argument("--use-sid", action=argparse.BooleanOptionalAction, default=FeatureConfig.use_sid)
    p.add_argument("--prefix-buckets", type=int, default=FeatureConfig.prefix_buckets)
    p.add_argument("--rate-prior-pos", type=float, default=FeatureConfig.rate_prior_pos)
    p.add_argument("--rate-prior-neg", type=float, default=FeatureConfig.rate_prior_neg)
    p.add_argument("--arch", choices=("dlrm", "dcn"), default=ModelConfig.arch)
    p.add_argument("--emb-dim", type=int, default=ModelConfig.emb_dim)
    p.add_argument("--dense-layers", type=int, nargs="+", default=ModelConfig.dense_layers)
    p.add_argument("--over-layers", type=int, nargs="+", default=ModelConfig.over_layers)
    p.add_argument("--dcn-layers", type=int, default=ModelConfig.dcn_layers)
    p.add_argument("--dcn-low-rank", type=int, default=ModelConfig.dcn_low_rank)
    p.add_argument("--sid-init", choices=SID_INITS, default=ModelConfig.sid_init, help="SID tables: random or codebook")
    p.add_argument("--fusion", choices=FUSIONS, default=ModelConfig.fusion, help="item-id / SID fusion: none or freq")
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse command-line flags (unknown flags are an error) into a validated TrainConfig."""
    args = vars(_parser().parse_args(argv))
    sub = {}
    for cls in (FeatureConfig, ModelConfig):
        sub[cls] = cls(**{f.name: args.pop(f.name) for f in dataclasses.fields(cls)})
    return TrainConfig(**args, features=sub[FeatureConfig], model=sub[ModelConfig])


def _log_to_stderr() -> None:
    # Our own handler for the CLI: TorchRec configures the root logger on
    # import, so basicConfig would be a silent no-op.
    handler = logging.StreamHandler()
    rank = os.environ.get("RANK", "0")
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("ranking")
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: list[str] | None = None) -> dict | None:
    """CLI entry: returns the metrics dict on rank 0 (None on other ranks)."""
    cfg = config_from_args(argv)
    created = _init_distributed()
    logging.getLogger("ranking").setLevel(logging.INFO if dist.get_rank() == 0 else logging.WARNING)
    try:
        return run(cfg)
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    _log_to_stderr()
    main()
