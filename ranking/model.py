"""The ranker: TorchRec's DLRM (dot interaction) or DLRM_DCN (DCNv2) over our tables.

Shape symbols: B batch, F sparse features, D embedding dim, N dense features.
All tables share D (TorchRec's DLRM requires it; on CPU D must be a multiple
of 4). The variant is picked at construction; TorchRec's ``DLRMTrain`` adds
the BCE loss and returns ``loss, (loss, logits, labels)`` detached.
:func:`shard_model` places the tables across the ranks of the process group.

Example::

    tables = [SparseTable("t_user", 10, ("user_id",)), SparseTable("t_item", 20, ("item_id",))]
    model = build_model(tables, n_dense=7, cfg=ModelConfig(arch="dcn"), device="cpu")
    loss, (_, logits, _) = model(batch)  # logits [B]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from ranking.batches import SparseTable

# The optimizers the fused CPU kernel implements (DESIGN.md section 9). Its
# weight_decay is silently ignored on CPU, so none is offered. SGD moves a row
# in proportion to its gradient, so rarely seen ids (most users here) drift
# little from init; row-wise Adagrad normalises the first steps to ~lr each.
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rowwise_adagrad": RowWiseAdagrad,
}

# Row-wise is GPU-only; column-wise splits only dims > 128 (no min_partition given).
FUSED_SHARDING_TYPES = [
    t.value for t in (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.TABLE_COLUMN_WISE)
]


@dataclass
class ModelConfig:
    """Ranker architecture.

    Args:
        arch: ``dlrm`` (pairwise dot interaction) or ``dcn`` (low-rank DCNv2 cross net).
        emb_dim: D, shared by every table; a multiple of 4 (fbgemm CPU kernels).
        dense_layers: hidden sizes of the dense MLP; D is appended as its output.
        over_layers: hidden sizes of the over MLP; the logit (1) is appended.
        dcn_layers: cross layers (``dcn`` only).
        dcn_low_rank: rank of each cross layer's weight (``dcn`` only).
    """

    arch: str = "dlrm"
    emb_dim: int = 16
    dense_layers: tuple[int, ...] = (64,)
    over_layers: tuple[int, ...] = (128, 64)
    dcn_layers: int = 2
    dcn_low_rank: int = 16

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if self.emb_dim <= 0 or self.emb_dim % 4:
            raise ValueError(f"emb_dim must be a positive multiple of 4 (fbgemm CPU), got {self.emb_dim}")
        for name in ("dense_layers", "over_layers"):
            sizes = tuple(getattr(self, name))
            if not sizes or min(sizes) <= 0:
                raise ValueError(f"{name} must be non-empty positive sizes, got {sizes}")
            setattr(self, name, sizes)
        if self.dcn_layers <= 0 or self.dcn_low_rank <= 0:
            raise ValueError(f"dcn_layers and dcn_low_rank must be > 0, got {self.dcn_layers}, {self.dcn_low_rank}")


def build_ebc(tables: Sequence[SparseTable], emb_dim: int, device: torch.device | str) -> EmbeddingBagCollection:
    """One sum-pooled EmbeddingBagCollection; ``device="meta"`` lets DMP allocate only local shards.

    Args:
        tables: from ``ranking.batches.sparse_tables``; a table with several
            features (``t_item``) is looked up by all of them.
        emb_dim: D.
        device: ``meta`` for sharding, ``cpu`` for a plain single-process model.

    Returns:
        EBC mapping a KJT of B rows to F pooled embeddings of size D.
    """
    configs = [
        EmbeddingBagConfig(
            name=t.name, num_embeddings=t.num_embeddings, embedding_dim=emb_dim, feature_names=list(t.features)
        )
        for t in tables
    ]
    return EmbeddingBagCollection(tables=configs, device=torch.device(device))


def _dlrm(ebc: EmbeddingBagCollection, n_dense: int, cfg: ModelConfig) -> DLRM:
    # Dot interaction: B x (D + F(F+1)/2) into the over arch.
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=n_dense,
        dense_arch_layer_sizes=[*cfg.dense_layers, cfg.emb_dim],
        over_arch_layer_sizes=[*cfg.over_layers, 1],
    )


def _dcn(ebc: EmbeddingBagCollection, n_dense: int, cfg: ModelConfig) -> DLRM:
    # DCNv2 cross net on the concatenation: B x (F + 1) * D into the over arch.
    return DLRM_DCN(
        embedding_bag_collection=ebc,
        dense_in_features=n_dense,
        dense_arch_layer_sizes=[*cfg.dense_layers, cfg.emb_dim],
        over_arch_layer_sizes=[*cfg.over_layers, 1],
        dcn_num_layers=cfg.dcn_layers,
        dcn_low_rank_dim=cfg.dcn_low_rank,
    )


ARCHS: dict[str, Callable[[EmbeddingBagCollection, int, ModelConfig], DLRM]] = {"dlrm": _dlrm, "dcn": _dcn}


def build_model(
    tables: Sequence[SparseTable], n_dense: int, cfg: ModelConfig, *, device: torch.device | str = "meta"
) -> DLRMTrain:
    """DLRMTrain(DLRM or DLRM_DCN) whose forward maps a Batch to ``loss, (loss, logits [B], labels [B])``.

    Args:
        tables: embedding tables in KJT key order.
        n_dense: N, columns of ``Batch.dense_features`` [B, N].
        cfg: architecture.
        device: where the embedding tables live (``meta`` before DMP); dense
            layers are always built on CPU.
    """
    ebc = build_ebc(tables, cfg.emb_dim, device)
    return DLRMTrain(ARCHS[cfg.arch](ebc, n_dense, cfg))


def shard_model(
    model: DLRMTrain,
    tables: Sequence[SparseTable],
    *,
    sparse_optimizer: str,
    lr_sparse: float,
    lr_dense: float,
    ddr_cap_bytes: int,
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

    Returns:
        (model, optimizer, plan) with plan ``{"ranks": {table: [ranks]},
        "kinds": {table: "sharding_type/kernel"}, "text": printable plan}``.
    """
    # Unset, the fused kernel would silently use SGD with lr 0.01.
    optimizer = SPARSE_OPTIMIZERS[sparse_optimizer]
    apply_optimizer_in_backward(optimizer, model.model.sparse_arch.parameters(), {"lr": lr_sparse})
    world = dist.get_world_size()
    topology = Topology(world_size=world, local_world_size=world, compute_device="cpu", ddr_cap=ddr_cap_bytes)
    # Fused kernels only: the planner would make small tables data-parallel, and
    # those train with the dense Adam, so SID and id tables would learn at
    # rates set by their size, not by the features.
    fused = ParameterConstraints(
        sharding_types=FUSED_SHARDING_TYPES, compute_kernels=[EmbeddingComputeKernel.FUSED.value]
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints={t.name: fused for t in tables})
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adam(p, lr=lr_dense)
    )
    params = [(t, ps) for module in plan.plan.values() for t, ps in module.items()]
    summary = {
        "ranks": {t: list(ps.ranks or []) for t, ps in params},
        "kinds": {t: f"{ps.sharding_type}/{ps.compute_kernel}" for t, ps in params},
        "text": str(plan),
    }
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), summary
