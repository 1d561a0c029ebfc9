"""Train the DLRM / DCN ranker on Feast training rows with sharded embedding tables.

    OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc_per_node 2 \\
        -m ranking.train --dataset artifacts/ml-100k --repo feature_repo --out runs/dlrm

``python -m ranking.train ...`` (no torchrun) runs as world size 1. Tables are
placed by TorchRec's planner (CPU: table-wise / column-wise, kernel ``fused``,
the sparse optimizer (fused SGD by default, or row-wise Adagrad) applied in
backward); dense layers are data-parallel with Adam.
Writes ``<out>/metrics.json``, ``<out>/predictions_{valid,test}.parquet``,
the best model as a torch.distributed.checkpoint folder ``<out>/checkpoint``
and as a weights-only export ``<out>/export`` (``ranking.export``), as one
unit (``sidrank.io.publish_unit``: ``<out>/unit.json`` with every file's
sha256 is written last). Every epoch is checkpointed in ``<out>/train_state``;
a rerun or a restarted job (``torchrun --max-restarts N``) continues after
the last finished epoch.

SID versions: ``--sid-version V`` trains on any published version (its
feature meta ``<repo>/data/feature_meta/<name>.json``; the rows come from
the one service ``ranker_v1`` with V as a key); the default is the
repository's default version. Rows
are cached per version and service. MME-SID options: ``--sid-init codebook``
starts the SID tables from ``<dataset>/sids/<V>/codebooks.pt``
(ranking/sid_init.py), ``--fusion freq`` gates item-id and SID embeddings by
item frequency (ranking/model.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.distributed as dist
import torchrec
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from sidrank.cli import log_to_stderr, run_main
from sidrank.contract import DatasetPaths
from sidrank.io import publish_unit, read_json, write_json, write_parquet
from sidrank.metrics import auc, evaluate_predictions
from sidrank.protocol import cold_item_ids, train_item_counts
from sidrank.schema import SPLITS, DataError, require_file, validate_events
from ranking.archs import item_rows, quantile_bin_edges
from ranking.batches import DENSE_FEATURES, RankerBatch, SplitTensors, build_split
from ranking.tables import sparse_tables
from ranking.checkpoint import Progress, load_best, resume, save_checkpoint, save_epoch
from ranking.config import TrainConfig, config_from_args, read_meta
from ranking.distributed import init_distributed, on_every_rank, resolve_device
from ranking.export import write_export
from ranking.model import build_model
from ranking.sharding import shard_model
from ranking.shards import load_rows
from ranking.factor_init import cowatch_weights
from ranking.sid_init import init_sid_tables, init_tables

log = logging.getLogger(__name__)


def train_epoch(
    dmp: DistributedModelParallel, opt: CombinedOptimizer, train: SplitTensors, n_train: int, cfg: TrainConfig,
    epoch: int, pipeline: TrainPipelineSparseDist | None = None,
) -> tuple[float, float, float]:
    """One pass over train in global batches, each rank over its shard.

    ``train`` is this rank's shard of the ``n_train`` train rows. With a
    ``pipeline`` (GPUs), TorchRec overlaps the next batches' host-to-device
    copy and input all-to-all with this batch's step; without, a plain loop.
    Returns the mean BCE over ranks, the AUC of the logits as they were
    produced during the epoch (the train curve, free of a second pass) and
    global samples/s.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    local = cfg.batch_size // world
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * world + rank)
    order = torch.randperm(len(train), generator=generator)
    # Every rank runs the same number of steps or the collectives hang; a shard
    # holds at least n_train // world rows, so the last partial batch is dropped.
    n_steps = n_train // cfg.batch_size
    dmp.train()
    device = dmp.device
    loss_sum, start = torch.zeros((), device=device), time.perf_counter()
    logits, labels = torch.empty(n_steps * local, device=device), torch.empty(n_steps * local, device=device)
    batches = _batches(train, order, local, n_steps, epoch)
    bar = tqdm(range(n_steps), desc=f"epoch {epoch}", disable=rank != 0, mininterval=1.0)
    for step in bar:
        if pipeline is None:
            loss, (bce, step_logits, step_labels) = dmp(next(batches).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            bce, step_logits, step_labels = pipeline.progress(batches)
        loss_sum += bce
        logits[step * local : (step + 1) * local], labels[step * local : (step + 1) * local] = step_logits, step_labels
        if rank == 0 and step % 20 == 0:
            rate = (step + 1) * cfg.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{bce.item():.4f}", samples_s=f"{rate:.0f}")
    if pipeline is not None:
        pipeline.detach()  # evaluation calls the model itself
    rate = n_steps * cfg.batch_size / (time.perf_counter() - start)
    dist.all_reduce(loss_sum)
    gathered = [torch.empty(2, len(logits), device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.stack([logits, labels]))
    every = torch.cat(gathered, dim=1).cpu().numpy()
    return float(loss_sum) / (n_steps * world), auc(every[1], every[0], what="train auc"), rate


def _batches(train: SplitTensors, order: torch.Tensor, local: int, n_steps: int, epoch: int) -> Iterator[RankerBatch]:
    """The epoch's ``n_steps`` local batches of ``train`` in ``order``, on the host."""
    for step in range(n_steps):
        _fail_once_for_tests(dist.get_rank(), epoch, step)
        yield train.batch(order[step * local : (step + 1) * local])


def _fail_once_for_tests(rank: int, epoch: int, step: int) -> None:
    """Test hook: ``RANKING_FAIL_ONCE=rank,epoch,step,marker`` kills that rank there, once (the marker file remembers)."""
    spec = os.environ.get("RANKING_FAIL_ONCE")
    if not spec:
        return
    *at, marker = spec.split(",")
    if [rank, epoch, step] == [int(v) for v in at] and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)


def score_split(
    dmp: DistributedModelParallel, part: SplitTensors, n_rows: int, local: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of all ``n_rows`` rows of a split, (row_ids, scores) sorted by row_id, on every rank.

    ``part`` is this rank's contiguous part (:func:`rank_share`); every rank
    runs the same number of batches, padded (padding rows carry row_id -1
    and are dropped after the gather).
    """
    world, device = dist.get_world_size(), dmp.device
    n_batches = math.ceil(math.ceil(n_rows / world) / local)
    index = torch.arange(n_batches * local)
    real = index < len(part)
    index = torch.where(real, index, 0)
    dmp.eval()
    scores = []
    # no_grad, not inference_mode: inference tensors break TorchRec's sharded modules.
    with torch.no_grad():
        for b in range(n_batches):
            _, (_, logits, _) = dmp(part.batch(index[b * local : (b + 1) * local]).to(device))
            scores.append(torch.sigmoid(logits))
    local_ids = torch.where(real, part.row_ids[index], -1).to(device)
    gathered_ids = [torch.empty_like(local_ids) for _ in range(world)]
    gathered_scores = [torch.empty(len(local_ids), device=device) for _ in range(world)]
    dist.all_gather(gathered_ids, local_ids)
    dist.all_gather(gathered_scores, torch.cat(scores))
    ids, probs = torch.cat(gathered_ids).cpu().numpy(), torch.cat(gathered_scores).cpu().numpy()
    keep = ids >= 0
    order = np.argsort(ids[keep], kind="stable")
    return ids[keep][order], probs[keep][order].astype(np.float64)


def _predictions(events: pd.DataFrame, row_ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """One split's events (sorted by row_id) with the gathered scores."""
    frame = events[["row_id", "user_id", "item_id", "label"]]
    assert np.array_equal(frame["row_id"].to_numpy(), row_ids), "scored rows differ from the split"
    return frame.assign(score=scores).reset_index(drop=True)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def run(cfg: TrainConfig, device: torch.device = torch.device("cpu")) -> dict | None:
    """Train on ``device``, early-stop on valid AUC and evaluate the best epoch; metrics dict on rank 0, else None."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # 1. one thread per rank (2 cores), seeds shared by all ranks; main() set up the gloo group
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
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
    on_every_rank(encode_shares)
    n_rows = {s: len(e) for s, e in split_events.items()}
    if n_rows["train"] < cfg.batch_size:
        raise DataError(f"{rows_path}: {n_rows['train']} train rows < batch_size {cfg.batch_size}; lower --batch-size")

    # 4. model, sharding plan, optimizers
    with _timed(timings, "shard_s"):
        tables = sparse_tables(meta, cfg.features)
        edges = None
        if cfg.model.numeric == "ple":
            edges = torch.from_numpy(quantile_bin_edges(splits["train"].dense.numpy(), cfg.model.numeric_bins))
            edges = edges.to(device)
            dist.broadcast(edges, src=0)  # rank 0's train shard sets every rank's bins
            edges = edges.cpu()
        rows = item_rows(train_item_counts(events, meta.n_items), cfg.model.item_min_train_rows)
        model = build_model(
            tables, len(DENSE_FEATURES), cfg.model, device="meta", numeric_edges=edges, item_rows=rows
        )
        dmp, opt, plan = shard_model(
            model, tables, sparse_optimizer=cfg.sparse_optimizer, lr_sparse=cfg.lr_sparse, lr_dense=cfg.lr_dense,
            ddr_cap_bytes=int(cfg.ddr_cap_gb * 2**30), pooling_factors=splits["train"].pooling_factors(),
            device=device,
        )
        log.info("sharding plan:\n%s", plan["text"])
        if cfg.model.sid_init == "codebook":
            codebooks = paths.sid_dir(meta.sid_version) / "codebooks.pt"
            init_sid_tables(dmp, tables, codebooks, meta, cfg.model.emb_dim, seed=cfg.seed)
        if "cowatch" in (cfg.model.factor_init, cfg.model.sid_init):
            sid_cowatch = cfg.features.use_sid and cfg.model.sid_init == "cowatch"
            sids = pd.read_parquet(paths.sid_dir(meta.sid_version) / "sids.parquet") if sid_cowatch else None
            weights = cowatch_weights(
                split_events["train"], tables, cfg.model.emb_dim, meta.n_users, meta.n_items,
                seed=cfg.seed, scale=cfg.model.factor_scale,
                sids=sids, codebook_size=meta.sid_codebook_size,
            )
            if cfg.model.factor_init != "cowatch":
                weights = {name: w for name, w in weights.items() if name not in ("t_user", "t_item")}
            init_tables(dmp, weights, "co-watch factors of the train rows")

    # 5-7. epochs, early stopping on valid AUC; every epoch is checkpointed (train_state/), so a
    # restarted job (torchrun --max-restarts) continues after the last finished epoch.
    local = cfg.batch_size // world
    progress = resume(dmp, opt, cfg.out, config) if cfg.resume else None
    progress = progress or Progress(-1, -1, -math.inf, [], False, config, world)
    # Patience is part of the budget a rerun may raise: a run stopped early under a smaller one goes on.
    progress.stopped = progress.stopped and progress.epoch - progress.best_epoch >= cfg.patience
    # The plain loop on CPU by default: no copies to hide, and no gain measured on 2 cores.
    use_pipeline = cfg.train_pipeline if cfg.train_pipeline is not None else device.type == "cuda"
    pipeline = TrainPipelineSparseDist(dmp, opt, device) if use_pipeline else None
    for epoch in range(progress.epoch + 1, cfg.epochs):
        if progress.stopped:
            break
        with _timed(timings, "train_s"):
            loss, train_auc, rate = train_epoch(dmp, opt, splits["train"], n_rows["train"], cfg, epoch, pipeline)
        with _timed(timings, "eval_s"):
            valid = _predictions(split_events["valid"], *score_split(dmp, splits["valid"], n_rows["valid"], local))
        valid_auc = auc(valid["label"].to_numpy(), valid["score"].to_numpy(), what="valid auc")
        progress.history.append(
            {"epoch": epoch, "train_loss": loss, "train_auc": train_auc, "valid_auc": valid_auc, "samples_per_s": rate}
        )
        log.info("epoch %d: train loss %.4f, train auc %.4f, valid auc %.4f, %.0f samples/s", epoch, loss,
                 train_auc, valid_auc, rate)
        # Every rank holds all scores, so every rank takes the same stopping decision.
        if progress.best_epoch < 0 or valid_auc > progress.best_auc:
            progress.best_epoch, progress.best_auc = epoch, valid_auc
        elif epoch - progress.best_epoch >= cfg.patience:
            log.info("early stop: no better valid auc for %d epochs", cfg.patience)
            progress.stopped = True
        progress.epoch = epoch
        with _timed(timings, "checkpoint_s"):
            save_epoch(dmp, opt, cfg.out, progress)
    history, best_epoch = progress.history, progress.best_epoch
    load_best(dmp, cfg.out, best_epoch)
    with _timed(timings, "eval_s"):
        scored = {s: score_split(dmp, splits[s], n_rows[s], local) for s in ("valid", "test")}

    # 8. the run's outputs as one unit: staged, moved into --out, unit.json (each file's sha256) written last
    with publish_unit(cfg.out) if rank == 0 else nullcontext() as staging:
        shared = [staging]
        dist.broadcast_object_list(shared, src=0)  # every rank saves its shards into rank 0's staging folder
        if cfg.save_checkpoint:
            save_checkpoint({**dmp.state_dict(), "config": json.dumps(config), "best_epoch": best_epoch}, shared[0])
        timings["total_s"] = time.perf_counter() - start
        if rank != 0:
            return None
        preds = {s: _predictions(split_events[s], *scored[s]) for s in ("valid", "test")}
        cold = cold_item_ids(read_json(require_file(paths.meta, "python -m ingest")), events, source=str(paths.meta))
        test, valid = (evaluate_predictions(preds[s], cold_items=cold, source=f"predictions_{s}") for s in ("test", "valid"))
        for name, frame in preds.items():
            write_parquet(frame[["row_id", "label", "score"]], staging / f"predictions_{name}.parquet")
        metrics = {
            **{f"test_{k}": v for k, v in test.items() if k != "n_rows"},
            "valid_auc": valid["auc"],
            "valid_logloss": valid["logloss"],
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            **{f"{s}_rows": n for s, n in n_rows.items()},
            "world_size": world,
            "local_world_size": plan["local_world_size"],
            "device": device.type,
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
        write_json(metrics, staging / "metrics.json")
        if cfg.save_checkpoint:
            write_export(staging, meta)
    log.info("test auc %.4f (cold %.4f, gauc %.4f) at epoch %d -> %s", metrics["test_auc"],
             metrics["test_auc_cold"], metrics["test_gauc"], best_epoch, cfg.out / "metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> dict | None:
    """CLI entry: returns the metrics dict on rank 0 (None on other ranks)."""
    cfg = config_from_args(argv)
    device = resolve_device(cfg.device)
    created = init_distributed(device)
    try:
        return run(cfg, device)
    finally:
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    log_to_stderr("ranking")
    run_main(main, "python -m ranking.train")
