"""The ranker: TorchRec's DLRM (dot interaction) or DLRM_DCN (DCNv2) over our tables.

Shape symbols: B batch, F sparse features, D embedding dim, N dense features.
All tables share D (TorchRec's DLRM requires it; on CPU D must be a multiple
of 4). The variant is picked at construction; TorchRec's ``DLRMTrain`` adds
the BCE loss and returns ``loss, (loss, logits, labels)`` detached.
:func:`shard_model` places the tables across the ranks of the process group.

Two options from MME-SID (Wang et al. 2025), both off by default:

- ``sid_init="codebook"``: each SID position table starts from that
  position's tokenizer codebook, PCA-projected to D and scaled to the default
  init's std (:func:`codebook_table_weights`), loaded into the (sharded)
  tables after DMP by :func:`load_table_weights`; against the "catastrophic
  forgetting" of the tokenizer's geometry by a randomly initialised table.
- ``fusion="freq"``: the item-id slot becomes a gate-weighted mix of the
  item-id embedding and the item's SID embedding, the gate driven by the
  item's frequency (:class:`FrequencyGate`); swapped in as a submodule of
  :class:`FusedDLRM` / :class:`FusedDLRM_DCN`, TorchRec's DLRMs with the
  fusion between the sparse arch and the interaction.

Example::

    tables = [SparseTable("t_user", 10, ("user_id",)), SparseTable("t_item", 20, ("item_id",))]
    model = build_model(tables, n_dense=7, cfg=ModelConfig(arch="dcn"), device="cpu")
    loss, (_, logits, _) = model(batch)  # logits [B]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
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

from sidrank.schema import is_sid_code_column
from ranking.batches import DENSE_FEATURES, SparseTable

# The optimizers the fused CPU kernel implements (DESIGN.md section 9). Its
# weight_decay is silently ignored on CPU, so none is offered. SGD moves a row
# in proportion to its gradient, so rarely seen ids (most users here) drift
# little from init; row-wise Adagrad normalises the first steps to ~lr each.
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rowwise_adagrad": RowWiseAdagrad,
}

SID_INITS = ("random", "codebook")
FUSIONS = ("none", "freq")
# The dense column the fusion gate reads: log1p of the item's causal event count.
FREQUENCY_FEATURE = "log_item_count"

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
        sid_init: ``random`` (TorchRec's uniform default) or ``codebook``
            (SID position tables from the tokenizer codebooks).
        fusion: ``none`` or ``freq`` (frequency-gated item-id / SID fusion;
            needs both the item-id and the SID features).
    """

    arch: str = field(default="dlrm", metadata={"choices": ("dlrm", "dcn")})
    emb_dim: int = 16
    dense_layers: tuple[int, ...] = (64,)
    over_layers: tuple[int, ...] = (128, 64)
    dcn_layers: int = 2
    dcn_low_rank: int = 16
    sid_init: str = field(default="random", metadata={"choices": SID_INITS})
    fusion: str = field(default="none", metadata={"choices": FUSIONS})

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if self.sid_init not in SID_INITS:
            raise ValueError(f"sid_init must be one of {SID_INITS}, got {self.sid_init!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
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


class NoFusion(nn.Module):
    """The sparse embeddings as they are: [B, F, D] -> [B, F, D]."""

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return sparse


class FrequencyGate(nn.Module):
    """Frequency-aware fusion of the item-id and SID embeddings (MME-SID).

    The item-id slot of the sparse embeddings becomes
    ``g * e_id + (1 - g) * e_sid`` with ``e_sid`` the mean of the item's SID
    position embeddings and ``g = sigmoid(a * log1p(count) + b)`` per row:
    frequent items lean on their own id, rare and cold ones on the SID they
    share with similar items. ``a`` and ``b`` are learned with the dense
    parameters; initially g = 0.5 at ``pivot`` train events.

    Args:
        feature_names: the F sparse features in the sparse arch's order.
        item_feature: the item-id feature (its slot is replaced).
        sid_features: the SID position features averaged into ``e_sid``.
        count_column: column of the dense features holding log1p(item count).
        pivot: item count at which the initial gate is 0.5.

    Example::

        gate = FrequencyGate(["item_id", "sid_0", "sid_1"], "item_id", ["sid_0", "sid_1"], count_column=0)
        fused = gate(torch.randn(4, 3, 8), torch.rand(4, 7))  # [4, 3, 8]
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        item_feature: str,
        sid_features: Sequence[str],
        *,
        count_column: int,
        pivot: float = 5.0,
    ) -> None:
        super().__init__()
        names = list(feature_names)
        missing = [f for f in (item_feature, *sid_features) if f not in names]
        if missing or not sid_features:
            raise ValueError(
                f"fusion='freq' fuses the item-id and SID embeddings: features {missing or ['sid_*']} are not "
                f"among {names}; train with both --use-item-id and --use-sid, or --fusion none"
            )
        self.item_index = names.index(item_feature)
        self.register_buffer("sid_index", torch.tensor([names.index(f) for f in sid_features]), persistent=False)
        self.count_column = count_column
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(-math.log1p(pivot)))

    def gate(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, N] dense features -> [B, 1] weight of the item-id embedding."""
        return torch.sigmoid(self.a * dense[:, self.count_column : self.count_column + 1] + self.b)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[B, F, D] sparse embeddings, [B, N] dense features -> [B, F, D] with the item slot fused."""
        g = self.gate(dense)
        e_sid = sparse.index_select(1, self.sid_index).mean(dim=1)
        fused = g * sparse[:, self.item_index] + (1 - g) * e_sid
        i = self.item_index
        return torch.cat([sparse[:, :i], fused.unsqueeze(1), sparse[:, i + 1 :]], dim=1)


class _FusionForward:
    """TorchRec's DLRM.forward with ``self.fusion`` between the sparse arch and the interaction."""

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense_features)
        embedded_sparse = self.fusion(self.sparse_arch(sparse_features), dense_features)
        return self.over_arch(self.inter_arch(dense_features=embedded_dense, sparse_features=embedded_sparse))


class FusedDLRM(_FusionForward, DLRM):
    """TorchRec's DLRM (dot interaction: B x (D + F(F+1)/2) into the over arch) with a fusion submodule."""

    def __init__(self, *, fusion: nn.Module, **dlrm_kwargs) -> None:
        super().__init__(**dlrm_kwargs)
        self.fusion = fusion


class FusedDLRM_DCN(_FusionForward, DLRM_DCN):
    """TorchRec's DLRM_DCN (DCNv2 on B x (F + 1) * D into the over arch) with a fusion submodule."""

    def __init__(self, *, fusion: nn.Module, **dlrm_kwargs) -> None:
        super().__init__(**dlrm_kwargs)
        self.fusion = fusion


def _dlrm(ebc: EmbeddingBagCollection, n_dense: int, cfg: ModelConfig, fusion: nn.Module) -> DLRM:
    return FusedDLRM(
        fusion=fusion,
        embedding_bag_collection=ebc,
        dense_in_features=n_dense,
        dense_arch_layer_sizes=[*cfg.dense_layers, cfg.emb_dim],
        over_arch_layer_sizes=[*cfg.over_layers, 1],
    )


def _dcn(ebc: EmbeddingBagCollection, n_dense: int, cfg: ModelConfig, fusion: nn.Module) -> DLRM:
    return FusedDLRM_DCN(
        fusion=fusion,
        embedding_bag_collection=ebc,
        dense_in_features=n_dense,
        dense_arch_layer_sizes=[*cfg.dense_layers, cfg.emb_dim],
        over_arch_layer_sizes=[*cfg.over_layers, 1],
        dcn_num_layers=cfg.dcn_layers,
        dcn_low_rank_dim=cfg.dcn_low_rank,
    )


ARCHS: dict[str, Callable[[EmbeddingBagCollection, int, ModelConfig, nn.Module], DLRM]] = {"dlrm": _dlrm, "dcn": _dcn}


def build_fusion(tables: Sequence[SparseTable], cfg: ModelConfig) -> nn.Module:
    """The fusion submodule of ``cfg.fusion`` for the features of ``tables`` (in KJT order)."""
    if cfg.fusion == "none":
        return NoFusion()
    names = [f for t in tables for f in t.features]
    sid_features = [f for f in names if is_sid_code_column(f)]
    return FrequencyGate(names, "item_id", sid_features, count_column=DENSE_FEATURES.index(FREQUENCY_FEATURE))


def build_model(
    tables: Sequence[SparseTable], n_dense: int, cfg: ModelConfig, *, device: torch.device | str = "meta"
) -> DLRMTrain:
    """DLRMTrain(DLRM or DLRM_DCN) whose forward maps a Batch to ``loss, (loss, logits [B], labels [B])``.

    Args:
        tables: embedding tables in KJT key order.
        n_dense: N, columns of ``Batch.dense_features`` [B, N] (``ranking.batches.DENSE_FEATURES``).
        cfg: architecture.
        device: where the embedding tables live (``meta`` before DMP); dense
            layers are always built on CPU.

    Raises:
        ValueError: ``fusion="freq"`` without the item-id or the SID features.
    """
    fusion = build_fusion(tables, cfg)
    ebc = build_ebc(tables, cfg.emb_dim, device)
    return DLRMTrain(ARCHS[cfg.arch](ebc, n_dense, cfg, fusion))


def shard_model(
    model: DLRMTrain,
    tables: Sequence[SparseTable],
    *,
    sparse_optimizer: str,
    lr_sparse: float,
    lr_dense: float,
    ddr_cap_bytes: int,
    pooling_factors: Mapping[str, float] | None = None,
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
    pooling = pooling_factors or {}
    constraints = {
        t.name: ParameterConstraints(
            sharding_types=FUSED_SHARDING_TYPES,
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            pooling_factors=[max(pooling.get(f, 1.0), 1e-3) for f in t.features],
        )
        for t in tables
    }
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
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

