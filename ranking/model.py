"""The ranker: TorchRec's DLRM archs over our tables, numeric embeddings and target attention.

Shape symbols: B batch, F pooled features, D embedding dim, N dense features,
H history length. All tables share D (the dot interaction needs it; on CPU D
must be a multiple of 4). Variants are picked at construction, never by flags
inside ``forward``:

- ``numeric="ple"``: each dense feature also enters the interaction as its own
  D-vector (:class:`~ranking.archs.PiecewiseLinearEmbedding`); ``mlp`` keeps
  DLRM's dense MLP alone.
- ``FeatureConfig.history="attention"``: the candidate item (id + SID prefix
  n-grams) queries the user's history items through shared unpooled tables
  (:class:`HistoryAttentionArch`, DIN); ``pooled`` sums the history into bags.
- ``arch``: TorchRec's dot ``InteractionArch`` or DCNv2 ``InteractionDCNArch``.

:class:`RankerTrain` adds the BCE loss (and the L2 of the batch's embedding
rows) and returns ``loss, (bce, logits, labels)`` detached, like TorchRec's
``DLRMTrain``. :func:`shard_model` places the tables across the ranks.

Two options from MME-SID (Wang et al. 2025), both off by default:

- ``sid_init="codebook"``: each SID position table starts from that
  position's tokenizer codebook, PCA-projected to D and scaled to the default
  init's std (ranking/sid_init.py), loaded into the (sharded) tables after DMP;
  against the "catastrophic forgetting" of the tokenizer's geometry.
- ``fusion="freq"``: the item-id slot becomes a gate-weighted mix of the
  item-id embedding and the item's SID embedding, the gate driven by the
  item's frequency (``ranking.fusion.FrequencyGate``).

Example::

    tables = [SparseTable("t_user", 10, ("user_id",)), SparseTable("t_item", 20, ("item_id",))]
    model = build_model(tables, n_dense=7, cfg=ModelConfig(arch="dcn", numeric="mlp"), device="cpu")
    loss, (_, logits, _) = model(batch)  # logits [B]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, OverArch, SparseArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sidrank import contract
from ranking.archs import ItemVocabulary, PiecewiseLinearEmbedding, TargetAttention
from ranking.batches import RankerBatch
from ranking.tables import SparseTable
from ranking.fusion import build_fusion


ARCHS = ("dlrm", "dcn")
NUMERIC = ("ple", "mlp")
SID_INITS = ("random", "codebook", "cowatch")
FACTOR_INITS = ("random", "cowatch")
FUSIONS = ("none", "freq")



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
        sid_init: ``random`` (TorchRec's uniform default), ``codebook``
            (SID position tables from the tokenizer codebooks) or ``cowatch``
            (each SID code and prefix row from the co-watch factors of the
            train items holding it; ranking/factor_init.py).
        factor_init: ``random`` or ``cowatch`` (user and item tables from a
            truncated SVD of who rated what in the train rows; ranking/factor_init.py).
        factor_scale: entry std of the co-watch rows, in units of the random init's.
        fusion: ``none`` or ``freq`` (frequency-gated item-id / SID fusion;
            needs both the item-id and the SID features).
        numeric: ``ple`` adds one piecewise-linear embedding per dense
            feature to the interaction (bins from train quantiles); ``mlp``
            is the dense MLP alone.
        numeric_bins: T, bins of each numeric feature (``ple``).
        attention_hidden: hidden width of the target-attention unit.
        dropout: dropout on the interaction output.
        l2_embedding: weight of the squared norm of the embedding rows each batch looks up.
        item_min_train_rows: items with fewer train rows share the unknown
            item row (0 keeps every item's own row; 1, the default, maps the
            items train never saw, whose rows would stay at their random init).
    """

    arch: str = field(default="dlrm", metadata={"choices": ARCHS})
    emb_dim: int = 16
    dense_layers: tuple[int, ...] = (64,)
    over_layers: tuple[int, ...] = (128, 64)
    dcn_layers: int = 2
    dcn_low_rank: int = 16
    sid_init: str = field(default="random", metadata={"choices": SID_INITS})
    factor_init: str = field(default="cowatch", metadata={"choices": FACTOR_INITS})
    factor_scale: float = 10.0
    fusion: str = field(default="none", metadata={"choices": FUSIONS})
    numeric: str = field(default="ple", metadata={"choices": NUMERIC})
    numeric_bins: int = 16
    attention_hidden: int = 36
    dropout: float = 0.2
    l2_embedding: float = 0.0
    item_min_train_rows: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.numeric not in NUMERIC:
            raise ValueError(f"numeric must be one of {NUMERIC}, got {self.numeric!r}")
        for name in ("numeric_bins", "attention_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or self.l2_embedding < 0:
            raise ValueError(f"dropout must be in [0, 1) and l2_embedding >= 0, got {self.dropout}, {self.l2_embedding}")
        if self.sid_init not in SID_INITS:
            raise ValueError(f"sid_init must be one of {SID_INITS}, got {self.sid_init!r}")
        if not self.factor_scale > 0:
            raise ValueError(f"factor_scale must be > 0, got {self.factor_scale}")
        if self.factor_init not in FACTOR_INITS:
            raise ValueError(f"factor_init must be one of {FACTOR_INITS}, got {self.factor_init!r}")
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


class HistoryAttentionArch(nn.Module):
    """The candidate and its history through shared unpooled tables, then target attention.

    The candidate's vector is the sum of its unpooled features' embeddings
    (item id plus SID prefixes, as n-grams summed with the id); history item
    j's vector is the sum of the same tables' embeddings of item j, so a row
    learns from both roles. Shapes: B rows, H history length, D width.

    Args:
        embedding_collection: unpooled tables; each one's features are the
            candidate's (``item_id``, ``sid_prefix_<d>``) and the history's
            (``hist_items``, ``hist_sid_p<d>``).
        candidate_features: the candidate's feature names.
        history_features: the history's feature names (parallel lists, same lengths).
        history_length: H.
        attention: the attention unit.

    Example::

        arch = HistoryAttentionArch(ec, ["item_id"], ["hist_items"], 20, TargetAttention(16))
        vectors, lookups = arch(kjt)  # [B, 3, D] (item, history sum, attended history), [B, 1 + H, D]
    """

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        candidate_features: Sequence[str],
        history_features: Sequence[str],
        history_length: int,
        attention: TargetAttention,
    ) -> None:
        super().__init__()
        self.embedding_collection = embedding_collection
        self.candidate_features = list(candidate_features)
        self.history_features = list(history_features)
        self.history_length = history_length
        self.attention = attention

    @property
    def n_outputs(self) -> int:
        """Vectors per row: one sum per feature, then the attended history."""
        return len(self.candidate_features) + len(self.history_features) + 1

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KJT of the candidate and history features -> ([B, n_outputs, D], the looked-up vectors [B, 1 + H, D]).

        The per-feature sums are exactly what pooled tables would give (so the
        attention mode adds the attended vector to the pooled model, nothing
        else); a candidate without a SID (a new item at serving) has no prefix
        ids and sums to zero.
        """
        looked_up = self.embedding_collection(features)
        candidate = [looked_up[f].to_padded_dense(desired_length=1)[:, 0] for f in self.candidate_features]
        history = [looked_up[f].to_padded_dense(desired_length=self.history_length) for f in self.history_features]
        lengths = looked_up[self.history_features[0]].lengths()
        mask = torch.arange(self.history_length, device=lengths.device) < lengths.unsqueeze(1)
        query, keys = sum(candidate), sum(history)
        attended = self.attention(query, keys, mask)
        vectors = torch.stack([*candidate, *(h.sum(1) for h in history), attended], dim=1)
        return vectors, torch.cat([query.unsqueeze(1), keys], dim=1)


class SIDRanker(nn.Module):
    """TorchRec's DLRM archs around our tables, numeric embeddings and target attention.

    dense [B, N] -> DenseArch -> [B, D]; pooled KJT -> SparseArch -> fusion ->
    [B, F, D]; optionally numeric embeddings [B, N, D] and the history arch's
    [B, 2, D] join the sparse stack; TorchRec's InteractionArch (dot) or
    InteractionDCNArch (DCNv2) over dense + stack; dropout; OverArch -> [B].

    Args:
        sparse_arch: TorchRec SparseArch over the pooled tables.
        dense_arch: TorchRec DenseArch, N -> D.
        numeric_arch: :class:`PiecewiseLinearEmbedding` or None (the plain dense path only).
        history_arch: :class:`HistoryAttentionArch` or None (pooled history bags).
        fusion: ``ranking.fusion.NoFusion`` or ``FrequencyGate`` on the pooled stack.
        inter_arch: TorchRec InteractionArch or InteractionDCNArch.
        over_arch: TorchRec OverArch ending in one logit.
        dropout: probability on the interaction output.
        vocabulary: item ids -> item-table rows, applied before every lookup.
    """

    def __init__(
        self,
        *,
        vocabulary: ItemVocabulary,
        sparse_arch: SparseArch,
        dense_arch: DenseArch,
        numeric_arch: nn.Module | None,
        history_arch: HistoryAttentionArch | None,
        fusion: nn.Module,
        inter_arch: nn.Module,
        over_arch: OverArch,
        dropout: float,
    ) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.sparse_arch, self.dense_arch, self.numeric_arch = sparse_arch, dense_arch, numeric_arch
        self.history_arch, self.fusion, self.inter_arch = history_arch, fusion, inter_arch
        # Identity at 0: a zero-probability Dropout would still draw from the RNG in training.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.over_arch = over_arch

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The tables' weights (the fused sparse optimizer's); every other parameter is dense."""
        tables = [self.sparse_arch, *([self.history_arch.embedding_collection] if self.history_arch else [])]
        return [p for module in tables for p in module.parameters()]

    def forward(self, batch: RankerBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Batch -> (logits [B], the embeddings it looked up, each [B, *])."""
        dense = batch.dense_features
        pooled = self.sparse_arch(self.vocabulary(batch.sparse_features))
        stack, looked_up = [self.fusion(pooled, dense)], [pooled.flatten(1)]
        if self.numeric_arch is not None:
            stack.append(self.numeric_arch(dense))
        if self.history_arch is not None:
            vectors, history = self.history_arch(self.vocabulary(batch.sequence_features))
            stack.append(vectors)
            looked_up.append(history.flatten(1))
        interaction = self.inter_arch(dense_features=self.dense_arch(dense), sparse_features=torch.cat(stack, dim=1))
        return self.over_arch(self.dropout(interaction)).squeeze(-1), looked_up


class RankerTrain(nn.Module):
    """BCE (+ ``l2`` x the squared norm of the batch's embedding rows): ``loss, (bce, logits, labels)`` detached.

    The L2 term regularises only the rows a batch touches, which is what a
    weight decay on sparse tables would do if the fused CPU kernels offered one.
    """

    def __init__(self, model: SIDRanker, l2: float) -> None:
        super().__init__()
        self.model, self.l2 = model, l2
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: RankerBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits, looked_up = self.model(batch)
        bce = self.loss_fn(logits, batch.labels.float())
        loss = bce
        if self.l2 > 0:  # the penalty's graph is built only when it enters the loss
            loss = bce + self.l2 * sum(t.pow(2).sum(1) for t in looked_up).mean()
        return loss, (bce.detach(), logits.detach(), batch.labels.detach())


def build_history_arch(tables: Sequence[SparseTable], cfg: ModelConfig, device: torch.device | str):
    """The target-attention arch over the unpooled tables, or None when every table is pooled."""
    unpooled = [t for t in tables if not t.pooled]
    if not unpooled:
        return None
    configs = [
        EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=cfg.emb_dim,
                        feature_names=list(t.features))
        for t in unpooled
    ]
    features = [f for t in unpooled for f in t.features]
    history = [f for f in features if f.startswith("hist_")]
    candidate = [f for f in features if not f.startswith("hist_")]
    return HistoryAttentionArch(
        EmbeddingCollection(tables=configs, device=torch.device(device)), candidate, history,
        contract.HISTORY_LENGTH, TargetAttention(cfg.emb_dim, cfg.attention_hidden),
    )


def build_model(
    tables: Sequence[SparseTable],
    n_dense: int,
    cfg: ModelConfig,
    *,
    device: torch.device | str = "meta",
    numeric_edges: torch.Tensor | None = None,
    item_rows: torch.Tensor | None = None,
) -> RankerTrain:
    """RankerTrain(SIDRanker) whose forward maps a RankerBatch to ``loss, (bce, logits [B], labels [B])``.

    Args:
        tables: embedding tables in KJT key order (pooled first).
        n_dense: N, columns of ``dense_features`` [B, N] (``ranking.batches.DENSE_FEATURES``).
        cfg: architecture.
        device: where the embedding tables live (``meta`` before DMP); dense
            layers are always built on CPU.
        numeric_edges: [N, T + 1] bin edges fit on train rows for
            ``numeric="ple"``; None builds placeholders that a checkpoint load fills.
        item_rows: [n_items + 1] item-table row of each item id
            (``ranking.archs.item_rows``); None: every item its own row (or a
            checkpoint's mapping, loaded over it).

    Raises:
        ValueError: ``fusion="freq"`` without the item-id or the SID features.
    """
    pooled = [t for t in tables if t.pooled]
    ebc = build_ebc(pooled, cfg.emb_dim, device)
    history_arch = build_history_arch(tables, cfg, device)
    numeric_arch = None
    if cfg.numeric == "ple":
        edges = numeric_edges if numeric_edges is not None else torch.zeros(n_dense, cfg.numeric_bins + 1)
        numeric_arch = PiecewiseLinearEmbedding(edges, cfg.emb_dim)
    n_stacked = sum(len(t.features) for t in pooled)
    n_stacked += (n_dense if numeric_arch is not None else 0)
    n_stacked += history_arch.n_outputs if history_arch is not None else 0
    if cfg.arch == "dcn":
        crossnet = LowRankCrossNet(in_features=(n_stacked + 1) * cfg.emb_dim, num_layers=cfg.dcn_layers,
                                   low_rank=cfg.dcn_low_rank)
        inter_arch: nn.Module = InteractionDCNArch(num_sparse_features=n_stacked, crossnet=crossnet)
        over_in = (n_stacked + 1) * cfg.emb_dim
    else:
        inter_arch = InteractionArch(num_sparse_features=n_stacked)
        over_in = cfg.emb_dim + n_stacked * (n_stacked + 1) // 2
    item_table = next((t for t in tables if t.name == "t_item"), None)
    n_item_ids = item_table.num_embeddings if item_table is not None else 1
    rows = item_rows if item_rows is not None else torch.arange(n_item_ids)
    model = SIDRanker(
        vocabulary=ItemVocabulary(rows, ["item_id", contract.HIST_ITEMS]),
        sparse_arch=SparseArch(ebc),
        dense_arch=DenseArch(n_dense, [*cfg.dense_layers, cfg.emb_dim]),
        numeric_arch=numeric_arch,
        history_arch=history_arch,
        fusion=build_fusion(tables, cfg.fusion),
        inter_arch=inter_arch,
        over_arch=OverArch(over_in, [*cfg.over_layers, 1]),
        dropout=cfg.dropout,
    )
    return RankerTrain(model, cfg.l2_embedding)
