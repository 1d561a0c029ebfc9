"""Placing the ranker's tables across the ranks: TorchRec's planner, DMP and the optimizers.

Every table gets the fused kernel with its optimizer applied in backward;
the dense layers are data-parallel (DDP) with Adam, as in TorchRec's DLRM
example. The same code plans for CPU ranks (gloo) and GPU ranks (NCCL): the
sharding types and the topology follow the device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from ranking.tables import SparseTable
from ranking.model import RankerTrain

# The optimizers the fused CPU kernel implements (SGD, Adagrad, row-wise Adagrad). Its
# weight_decay is silently ignored on CPU, so none is offered. SGD moves a row
# in proportion to its gradient, so rarely seen ids (most users here) drift
# little from init; row-wise Adagrad normalises the first steps to ~lr each.
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rowwise_adagrad": RowWiseAdagrad,
}

SHARDERS = (EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder())


def sharding_types(pooled: bool, device_type: str) -> list[str]:
    """The sharding types a table may get on ``device_type``: what TorchRec's sharder supports there.

    CPU: pooled tables table-, column- or table-column-wise (row-wise pooled
    tables are GPU-only), unpooled ones also row-wise; GPU adds row-wise and
    table-row-wise for pooled tables. Never data-parallel: those tables would
    train with the dense Adam, so SID and id tables would learn at rates set
    by their size, not by the features.
    """
    sharder = SHARDERS[0] if pooled else SHARDERS[1]
    return [t for t in sharder.sharding_types(device_type) if t != ShardingType.DATA_PARALLEL.value]


def topology(world: int, device: torch.device, ddr_cap_bytes: int) -> Topology:
    """The planner's view of the job: ``world`` ranks, ``LOCAL_WORLD_SIZE`` (torchrun's) of them per host."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    hbm = {"hbm_cap": torch.cuda.get_device_properties(device).total_memory} if device.type == "cuda" else {}
    return Topology(world_size=world, local_world_size=local_world, compute_device=device.type,
                    ddr_cap=ddr_cap_bytes, **hbm)


def shard_model(
    model: RankerTrain,
    tables: Sequence[SparseTable],
    *,
    sparse_optimizer: str,
    lr_sparse: float,
    lr_dense: float,
    ddr_cap_bytes: int,
    pooling_factors: Mapping[str, float] | None = None,
    device: torch.device = torch.device("cpu"),
) -> tuple[DistributedModelParallel, CombinedOptimizer, dict]:
    """Plan the tables across the ranks of the default process group and wrap the model in DMP.

    Every table gets the fused kernel with its optimizer applied in backward;
    the MLPs are data-parallel (DDP) with Adam, as in TorchRec's DLRM example.

    Args:
        model: from :func:`build_model` with ``device="meta"``.
        tables: the model's tables.
        sparse_optimizer: a key of SPARSE_OPTIMIZERS.
        lr_sparse: learning rate of the tables.
        lr_dense: Adam learning rate of the MLPs.
        ddr_cap_bytes: host memory per rank the planner may fill.
        pooling_factors: feature -> mean ids per row (``SplitTensors.pooling_factors``);
            the planner assumes 1 per feature without them and would put the
            20-id history bags beside each other on one rank.
        device: this rank's device (``ranking.distributed.resolve_device``).

    Returns:
        (model, optimizer, plan) with plan ``{"ranks": {table: [ranks]},
        "kinds": {table: "sharding_type/kernel"}, "text": printable plan,
        "local_world_size": ranks per host}``.
    """
    # Unset, the fused kernel would silently use SGD with lr 0.01.
    optimizer = SPARSE_OPTIMIZERS[sparse_optimizer]
    apply_optimizer_in_backward(optimizer, model.model.embedding_parameters(), {"lr": lr_sparse})
    pooling = pooling_factors or {}
    constraints = {
        t.name: ParameterConstraints(
            sharding_types=sharding_types(t.pooled, device.type),
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            pooling_factors=[max(pooling.get(f, 1.0), 1e-3) for f in t.features],
        )
        for t in tables
    }
    hosts = topology(dist.get_world_size(), device, ddr_cap_bytes)
    planner = EmbeddingShardingPlanner(topology=hosts, constraints=constraints)
    sharders = list(SHARDERS)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adam(p, lr=lr_dense)
    )
    params = [(t, ps) for module in plan.plan.values() for t, ps in module.items()]
    summary = {
        "ranks": {t: list(ps.ranks or []) for t, ps in params},
        "kinds": {t: f"{ps.sharding_type}/{ps.compute_kernel}" for t, ps in params},
        "text": str(plan),
        "local_world_size": hosts.local_world_size,
    }
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), summary

