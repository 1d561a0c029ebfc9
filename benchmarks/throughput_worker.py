"""One torchrun launch of the throughput benchmark (benchmarks/throughput.py starts it; not a user command).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m benchmarks.throughput_worker JOB.json

``JOB.json`` holds the driver's ``ThroughputConfig``, the threads per rank,
the implementations to run and where rank 0 writes its results. Every rank
builds the same seeded synthetic rows in the row contract (sidrank/contract.py),
encodes its shard of them once with ``build_split`` (as ranking/train.py:
every world-th row) and, per implementation and global batch size, runs
warmup, timed and profiled steps on the same batches:

- ``torchrec``: exactly what ranking/train.py trains (``build_model`` on meta +
  ``shard_model``: DMP over gloo, fused SGD applied in backward, dense Adam);
- ``plain``: :class:`PlainDLRM`, the model a user would write without TorchRec
  (one ``nn.EmbeddingBag`` per table with sparse gradients, ``torch.optim.SGD``
  for the tables at the same rate, Adam for the MLPs; DDP on several ranks).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import NoWait
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from benchmarks.throughput import PHASES, ThroughputConfig
from sidrank.io import read_json, write_json
from sidrank import contract
from ranking.batches import DENSE_FEATURES, SplitTensors, build_split
from ranking.tables import FeatureConfig, SparseTable, sparse_tables
from ranking.model import ModelConfig, build_model
from ranking.sharding import shard_model
from ranking.config import TrainConfig
from ranking.distributed import init_distributed, rank_share

USER_PROFILE = {"age_id": 8, "gender_id": 3, "occupation_id": 22}
N_YEAR_BUCKETS = 10
INPUT_DIST_LABEL = "## input_dist (KJT all-to-all, waited) ##"
PROFILE_TOP = 8


# The architecture both implementations share: DLRM with the dense MLP (the
# numeric embeddings and target attention have no plain counterpart here).
DLRM_CONFIG = ModelConfig(numeric="mlp")

def _popular_ids(rng: np.random.Generator, perm: np.ndarray, size: int, zipf: float) -> np.ndarray:
    """``size`` ids in 1..len(perm), P(popularity rank r) ~ r^-zipf, the ranks scattered over the table by perm."""
    a, n = 1.0 - zipf, len(perm)
    ranks = (((n + 1) ** a - 1) * rng.random(size) + 1) ** (1 / a)  # inverse CDF of the power law on [1, n + 1)
    return perm[np.minimum(ranks.astype(np.int64), n) - 1] + 1


def synthetic_rows(cfg: ThroughputConfig) -> tuple[pd.DataFrame, contract.FeatureMeta]:
    """Seeded training rows in the row contract (object columns of int64 arrays, as Feast returns) and their meta."""
    rng = np.random.default_rng(cfg.seed)
    n, K = cfg.rows, cfg.sid_codebook_size
    item_perm = rng.permutation(cfg.items)
    codes = rng.integers(0, K, (cfg.items + 1, cfg.sid_levels))
    items = _popular_ids(rng, item_perm, n, cfg.zipf)
    hist = _popular_ids(rng, item_perm, n * cfg.history, cfg.zipf).reshape(n, cfg.history)
    user_count, item_count, n_tags = rng.integers(0, 200, n), rng.integers(0, 5000, n), rng.integers(1, 4, n)
    tags = np.split(rng.integers(1, cfg.tags + 1, n_tags.sum()), np.cumsum(n_tags)[:-1])
    rows = pd.DataFrame({
        "row_id": np.arange(n), "label": rng.integers(0, 2, n),
        "user_id": _popular_ids(rng, rng.permutation(cfg.users), n, cfg.zipf), "item_id": items,
        "user_count": user_count, "user_pos_count": rng.integers(0, user_count + 1),
        "item_count": item_count, "item_pos_count": rng.integers(0, item_count + 1),
        "year_bucket": rng.integers(0, N_YEAR_BUCKETS, n),
        **{column: rng.integers(0, size, n) for column, size in USER_PROFILE.items()},
        contract.ITEM_TAGS: pd.Series(tags, dtype=object),
        contract.SID_CODES: list(codes[items]),
        contract.HIST_ITEMS: list(hist),
        contract.HIST_SID_PREFIXES[0]: list(codes[hist, 0]),
        contract.HIST_SID_PREFIXES[1]: list(codes[hist, 0] * K + codes[hist, 1]),
    })
    meta = contract.FeatureMeta(
        n_users=cfg.users, n_items=cfg.items, n_tags=cfg.tags, n_year_buckets=N_YEAR_BUCKETS,
        sid_levels=cfg.sid_levels, sid_codebook_size=K, sid_version="synthetic", user_profile=USER_PROFILE,
    )
    return rows, meta


def kjt_bags(kjt: KeyedJaggedTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per key (values [nnz_k], offsets [B]): the ``nn.EmbeddingBag`` input of each feature."""
    lengths = kjt.lengths().view(len(kjt.keys()), kjt.stride())
    offsets = torch.cumsum(lengths, 1) - lengths
    return list(zip(kjt.values().split(kjt.length_per_key()), offsets))


def _mlp(in_features: int, sizes: Iterable[int]) -> nn.Sequential:
    """Linear + ReLU per size, as TorchRec's ``MLP``."""
    layers = []
    for size in sizes:
        layers += [nn.Linear(in_features, size), nn.ReLU()]
        in_features = size
    return nn.Sequential(*layers)


class PlainDLRM(nn.Module):
    """TorchRec's DLRM written in plain PyTorch: the baseline a user would write without TorchRec.

    One ``nn.EmbeddingBag(mode="sum", sparse=True)`` per table (features of one
    table share it), TorchRec's dense arch (MLP to D), dot interaction
    (B x (D + F(F+1)/2)) and over arch (MLP, then a linear layer to the logit).
    Shapes: B batch, N dense features, F sparse features, D embedding dim.

    Example::

        model = PlainDLRM([SparseTable("t_item", 20, ("item_id", "hist_items"))], n_dense=7, cfg=DLRM_CONFIG)
        bags = [(torch.tensor([3, 4]), torch.tensor([0, 1])), (torch.tensor([5]), torch.tensor([0, 0]))]
        logits = model(torch.rand(2, 7), bags)  # [2]
    """

    def __init__(self, tables: list[SparseTable], n_dense: int, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.emb_dim
        self.tables = nn.ModuleList(nn.EmbeddingBag(t.num_embeddings, D, mode="sum", sparse=True) for t in tables)
        self.table_of_feature = [i for i, t in enumerate(tables) for _ in t.features]
        n = len(self.table_of_feature)
        self.dense_arch = _mlp(n_dense, [*cfg.dense_layers, D])
        self.register_buffer("triu", torch.triu_indices(n + 1, n + 1, offset=1), persistent=False)
        self.over_arch = nn.Sequential(_mlp(D + n * (n + 1) // 2, cfg.over_layers), nn.Linear(cfg.over_layers[-1], 1))

    def forward(self, dense: torch.Tensor, bags: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """[B, N] dense features, F (values, offsets [B]) bags in KJT key order -> [B] logits."""
        embedded = self.dense_arch(dense)
        pooled = [self.tables[t](values, offsets) for t, (values, offsets) in zip(self.table_of_feature, bags)]
        combined = torch.stack([embedded, *pooled], dim=1)  # [B, F + 1, D]
        interactions = torch.bmm(combined, combined.transpose(1, 2))[:, self.triu[0], self.triu[1]]
        return self.over_arch(torch.cat([embedded, interactions], dim=1)).squeeze(-1)


class Trainer(NamedTuple):
    """One implementation's training step, split into the timed phases."""

    load: Callable[[SplitTensors, torch.Tensor], Any]  # data loading: rows -> model input
    loss: Callable[[Any], torch.Tensor]  # forward
    step: Callable[[], None]  # optimizer step and zero_grad
    input_dist_s: list[float]  # seconds of input distribution, accumulated by the probe
    info: dict


def probe_input_dist(dmp: nn.Module, clock: list[float]) -> None:
    """Time TorchRec's input distribution inside DMP's forward, adding seconds to ``clock[0]``.

    ``ShardedModule.forward`` runs ``input_dist(ctx, kjt).wait().wait()`` and
    then the lookups; TorchRec's own ``## all2all_data ##`` profiler labels
    cover only the launch of the all-to-alls, not the wait. The probe does the
    same call and waits in place (the same work at the same point), under
    ``INPUT_DIST_LABEL`` so the profile shows it too.
    """
    for module in dmp.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            def input_dist(ctx, *args, _original=module.input_dist, **kwargs):
                start = time.perf_counter()
                with record_function(INPUT_DIST_LABEL):
                    ready = _original(ctx, *args, **kwargs).wait().wait()
                clock[0] += time.perf_counter() - start
                return NoWait(NoWait(ready))

            module.input_dist = input_dist


def torchrec_trainer(tables: list[SparseTable], split: SplitTensors, seed: int) -> Trainer:
    """ranking/train.py's model, plan and optimizers, with the input-distribution probe."""
    torch.manual_seed(seed)
    model = build_model(tables, len(DENSE_FEATURES), DLRM_CONFIG, device="meta")
    dmp, opt, plan = shard_model(
        model, tables, sparse_optimizer=TrainConfig.sparse_optimizer, lr_sparse=TrainConfig.lr_sparse,
        lr_dense=TrainConfig.lr_dense, ddr_cap_bytes=int(TrainConfig.ddr_cap_gb * 2**30),
        pooling_factors=split.pooling_factors(),
    )
    clock = [0.0]
    probe_input_dist(dmp, clock)
    dmp.train()

    def step() -> None:
        opt.step()  # dense Adam; the tables were already updated inside backward
        opt.zero_grad()

    return Trainer(lambda split, index: split.batch(index), lambda batch: dmp(batch)[0], step, clock,
                   {"sharding": plan["kinds"], "plan": plan["ranks"]})


def plain_trainer(tables: list[SparseTable], split: SplitTensors, seed: int) -> Trainer:
    """:class:`PlainDLRM` with SGD on the sparse table gradients and Adam on the MLPs; DDP on several ranks.

    ``split`` is not read: plain PyTorch has no planner to feed.
    """
    torch.manual_seed(seed)
    model = PlainDLRM(tables, len(DENSE_FEATURES), DLRM_CONFIG)
    net = DistributedDataParallel(model) if dist.get_world_size() > 1 else model
    sgd = torch.optim.SGD(model.tables.parameters(), lr=TrainConfig.lr_sparse)
    adam = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("tables.")],
                            lr=TrainConfig.lr_dense)

    def load(split: SplitTensors, index: torch.Tensor) -> tuple:
        batch = split.batch(index)
        return batch.dense_features, kjt_bags(batch.sparse_features), batch.labels

    def step() -> None:
        for opt in (sgd, adam):
            opt.step()
            opt.zero_grad()

    loss = lambda b: F.binary_cross_entropy_with_logits(net(b[0], b[1]), b[2])  # noqa: E731
    return Trainer(load, loss, step, [0.0], {"ddp": net is not model})


TRAINERS = {"torchrec": torchrec_trainer, "plain": plain_trainer}


def run_steps(trainer: Trainer, split: SplitTensors, indices: list[torch.Tensor], desc: str | None) -> dict:
    """Train on ``indices`` (this rank's rows per step); seconds per phase and wall."""
    phases = dict.fromkeys(PHASES, 0.0)
    trainer.input_dist_s[0] = 0.0
    start = time.perf_counter()
    for index in tqdm(indices, desc=desc, disable=desc is None, mininterval=1.0):
        t0 = time.perf_counter()
        batch = trainer.load(split, index)
        t1 = time.perf_counter()
        loss = trainer.loss(batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        trainer.step()
        t4 = time.perf_counter()
        for phase, seconds in zip(("data", "forward", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[phase] += seconds
    phases["input_dist"] = trainer.input_dist_s[0]
    phases["forward"] -= phases["input_dist"]
    return {**phases, "wall": time.perf_counter() - start}


def top_ops(prof: torch.profiler.profile, steps: int) -> list[dict]:
    """The PROFILE_TOP ops (and record_function ranges) by self CPU time, per step."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:PROFILE_TOP]]


def measure(trainer: Trainer, split: SplitTensors, cfg: ThroughputConfig, batch: int, desc: str) -> dict:
    """Warmup, timed and profiled steps at global ``batch``; figures reduced over ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local, per_pass = batch // world, cfg.rows // batch
    # As ranking.train.train_epoch: every rank shuffles its own shard and takes local rows per step.
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(cfg.seed * world + rank))
    starts = [(s % per_pass) * local for s in range(cfg.warmup + cfg.steps + cfg.profile_steps)]
    indices = [order[first : first + local] for first in starts]
    run_steps(trainer, split, indices[: cfg.warmup], None)
    dist.barrier()
    timed = indices[cfg.warmup : cfg.warmup + cfg.steps]
    phases = run_steps(trainer, split, timed, desc if rank == 0 else None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_steps(trainer, split, indices[cfg.warmup + cfg.steps :], None)
    lookups = [sum(int((offs[index + 1] - offs[index]).sum()) for index in timed) for offs in split.offsets]
    sums = torch.tensor([phases[p] for p in PHASES] + lookups, dtype=torch.float64)
    wall = torch.tensor([phases["wall"]], dtype=torch.float64)
    dist.all_reduce(sums)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    seconds = wall.item()
    return {
        "samples_per_s": cfg.steps * batch / seconds,
        "step_ms": 1e3 * seconds / cfg.steps,
        "phases_ms": {p: 1e3 * float(sums[i]) / world / cfg.steps for i, p in enumerate(PHASES)},
        "lookups_per_step": float(sums[len(PHASES) :].sum()) / cfg.steps,
        "lookups_per_key": {k: float(n) / cfg.steps for k, n in zip(split.keys, sums[len(PHASES) :])},
        "profile_top_ops": top_ops(prof, cfg.profile_steps),
    }


def worker(job_path: Path) -> None:
    """One torchrun launch: build rows, encode this rank's shard, then every implementation at every batch size."""
    job = read_json(job_path)
    cfg = ThroughputConfig(**job["config"])
    created = init_distributed()
    try:
        torch.set_num_threads(job["threads"])
        start = time.perf_counter()
        rows, meta = synthetic_rows(cfg)
        shard = rank_share(rows["row_id"].to_numpy(), "train", dist.get_rank(), dist.get_world_size())
        rows = rows[rows["row_id"].isin(shard)]
        rows_s, start = time.perf_counter() - start, time.perf_counter()
        split = build_split(rows, meta, FeatureConfig(), "synthetic rows")
        encode_s = time.perf_counter() - start
        del rows
        tables = sparse_tables(meta, FeatureConfig())
        runs = []
        for impl in job["impls"]:
            trainer = TRAINERS[impl](tables, split, cfg.seed)
            for batch in cfg.batch_sizes:
                figures = measure(trainer, split, cfg, batch, f"{impl} {job['label']} B={batch}")
                runs.append({"impl": impl, "batch": batch, **figures, **trainer.info})
            del trainer
        if dist.get_rank() == 0:
            write_json({"rows_s": rows_s, "encode_s": encode_s, "runs": runs, "tables": [t._asdict() for t in tables],
                        "emb_dim": DLRM_CONFIG.emb_dim}, job["out"])
    finally:
        if created:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry of ``python -m benchmarks.throughput_worker JOB.json`` under torchrun."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torchrun ... -m benchmarks.throughput_worker JOB.json (from benchmarks.throughput)")
    worker(Path(args[0]))


if __name__ == "__main__":
    main()
