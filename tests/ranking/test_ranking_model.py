"""ranking.model and ranking.archs on a tiny batch, single process (no DMP): variants, target attention,
numeric embeddings, the frequency-gated item-id / SID fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import TINY_ROWS_META as META
from builders import tiny_rows
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranking.batches import DENSE_FEATURES, build_split
from ranking.tables import FeatureConfig, sparse_tables
from ranking.archs import ItemVocabulary, PiecewiseLinearEmbedding, TargetAttention, item_rows, quantile_bin_edges
from ranking.fusion import FrequencyGate, NoFusion
from ranking.model import ModelConfig, SIDRanker, build_ebc, build_model


@pytest.fixture(scope="module")
def batch():
    split = build_split(tiny_rows(), META, FeatureConfig(), "rows.parquet")
    return split.batch(torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("history", ["pooled", "attention"])
@pytest.mark.parametrize("numeric", ["ple", "mlp"])
@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_forward_shapes(arch: str, numeric: str, history: str) -> None:
    torch.manual_seed(0)
    features = FeatureConfig(history=history)
    split = build_split(tiny_rows(), META, features, "rows.parquet")
    batch = split.batch(torch.tensor([0, 1, 2, 0]))
    tables = sparse_tables(META, features)
    edges = torch.from_numpy(quantile_bin_edges(split.dense.numpy(), 4))
    cfg = ModelConfig(arch=arch, emb_dim=8, numeric=numeric, numeric_bins=4, l2_embedding=1e-3)
    model = build_model(tables, len(DENSE_FEATURES), cfg, device="cpu", numeric_edges=edges)
    loss, (bce, logits, labels) = model(batch)
    assert logits.shape == (4,) and labels.shape == (4,)
    assert loss.ndim == 0 and loss.requires_grad and not bce.requires_grad and loss > bce  # the L2 term
    # The sparse arch pools one D-vector per pooled feature: B x F x D.
    sparse = model.model.sparse_arch(batch.sparse_features)
    assert sparse.shape == (4, len(batch.sparse_features.keys()), 8)
    assert (batch.sequence_features is None) == (history == "pooled")
    loss.backward()
    assert all(p.grad is not None for p in model.model.embedding_parameters())


def test_shared_item_table_pools_the_same_vector() -> None:
    tables = sparse_tables(META, FeatureConfig())
    ebc = build_ebc(tables, 4, "cpu")
    assert [c.name for c in ebc.embedding_bag_configs()].count("t_item") == 1
    rows = tiny_rows()
    rows["hist_items"] = [None, None, [4]]  # row 2 is item 4 with history [4]
    kjt = build_split(rows, META, FeatureConfig(), "r").batch(torch.tensor([2])).sparse_features
    pooled = ebc(kjt).to_dict()
    assert torch.equal(pooled["item_id"], pooled["hist_items"])


@pytest.mark.parametrize("fusion", ["none", "freq"])
@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_loss_decreases(arch: str, fusion: str, batch) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, fusion=fusion)
    model = build_model(sparse_tables(META, FeatureConfig()), len(DENSE_FEATURES), cfg, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(20):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_model_config_validation() -> None:
    with pytest.raises(ValueError, match="emb_dim"):
        ModelConfig(emb_dim=10)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="wide_deep")
    with pytest.raises(ValueError, match="over_layers"):
        ModelConfig(over_layers=())
    with pytest.raises(ValueError, match="sid_init"):
        ModelConfig(sid_init="pca")
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="concat")
    assert ModelConfig(dense_layers=[32]).dense_layers == (32,)


def test_frequency_gate_mixes_id_and_mean_sid_by_item_count() -> None:
    names = ["user_id", "item_id", "sid_0", "sid_1", "sid_2"]
    gate = FrequencyGate(names, "item_id", ["sid_0", "sid_1", "sid_2"], count_column=2)
    sparse = torch.randn(3, 5, 4)
    dense = torch.zeros(3, len(DENSE_FEATURES))
    dense[:, 2] = torch.log1p(torch.tensor([0.0, 5.0, 500.0]))
    out = gate(sparse, dense)
    g = torch.sigmoid(dense[:, 2:3] - torch.log1p(torch.tensor(5.0)))  # a = 1, b = -log1p(5) at init
    assert torch.allclose(out[:, 1], g * sparse[:, 1] + (1 - g) * sparse[:, 2:5].mean(dim=1))
    assert torch.equal(out[:, [0, 2, 3, 4]], sparse[:, [0, 2, 3, 4]])
    weights = gate.gate(dense).squeeze(1)
    assert weights[1].item() == pytest.approx(0.5) and weights[0] < 0.2 and weights[2] > 0.95  # cold -> SID
    out[:, 1].sum().backward()
    assert gate.a.grad is not None and gate.b.grad is not None and gate.a.grad != 0


def test_fusion_is_a_swapped_submodule_and_needs_item_id_and_sid(batch) -> None:
    tables = sparse_tables(META, FeatureConfig())
    plain = build_model(tables, len(DENSE_FEATURES), ModelConfig(arch="dcn"), device="cpu").model
    fused = build_model(tables, len(DENSE_FEATURES), ModelConfig(arch="dcn", fusion="freq"), device="cpu").model
    assert isinstance(plain, SIDRanker) and isinstance(plain.fusion, NoFusion)
    assert isinstance(fused.fusion, FrequencyGate) and fused.fusion.item_index == 1  # after user_id
    assert [n for n, _ in fused.fusion.named_parameters()] == ["a", "b"]
    # With the gate at g = 1 the fused model is the plain one with the same weights (no dropout in eval).
    fused.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), fused.eval()
    with torch.no_grad():
        fused.fusion.a.zero_()
        fused.fusion.b.fill_(50.0)
    assert torch.allclose(fused(batch)[0], plain(batch)[0])
    for features in (FeatureConfig(use_sid=False), FeatureConfig(use_item_id=False)):
        with pytest.raises(ValueError, match="fusion='freq' fuses the item-id and SID embeddings"):
            build_model(sparse_tables(META, features), len(DENSE_FEATURES), ModelConfig(fusion="freq"), device="cpu")


def test_attention_shares_rows_between_candidate_and_history() -> None:
    features = FeatureConfig(history="attention")
    tables = sparse_tables(META, features)
    unpooled = {t.name: t.features for t in tables if not t.pooled}
    assert unpooled["t_item"] == ("item_id", "hist_items")
    assert unpooled["t_sid_prefix"] == ("sid_prefix_1", "sid_prefix_2", "hist_sid_p1", "hist_sid_p2")
    assert [t.pooled for t in tables] == sorted((t.pooled for t in tables), reverse=True)  # pooled keys first
    rows = tiny_rows()
    rows["hist_items"] = [None, None, [4]]  # row 2 is item 4 with history [4] and the same prefixes
    rows["hist_sid_p1"] = [None, None, [rows["sid_codes"][2][0]]]
    rows["hist_sid_p2"] = [None, None, [rows["sid_codes"][2][0] * META.sid_codebook_size + rows["sid_codes"][2][1]]]
    batch = build_split(rows, META, features, "r").batch(torch.tensor([2, 0]))
    arch = build_model(tables, len(DENSE_FEATURES), ModelConfig(numeric="mlp"), device="cpu").model.history_arch
    vectors, looked_up = arch(batch.sequence_features)
    names = [*arch.candidate_features, *arch.history_features, "attended"]
    assert vectors.shape == (2, arch.n_outputs, 16) and len(names) == arch.n_outputs
    assert torch.allclose(looked_up[0, 0], looked_up[0, 1])  # candidate == its own history entry
    # The per-feature sums are the pooled features: item 4 and a history of [4] give the same vectors.
    for candidate, history in (("item_id", "hist_items"), ("sid_prefix_1", "hist_sid_p1")):
        assert torch.allclose(vectors[0, names.index(candidate)], vectors[0, names.index(history)])
    attended = vectors[:, -1]
    weight = attended[0].norm() / looked_up[0, 0].norm()  # one history item: attention returns it, weighted
    assert 0 < weight < 1 and torch.allclose(attended[0], weight * looked_up[0, 0], atol=1e-6)
    assert torch.equal(attended[1], torch.zeros(16))  # row 0 has no history


def test_target_attention_ignores_padding_and_depends_on_the_query() -> None:
    torch.manual_seed(0)
    attend = TargetAttention(4)
    keys, query = torch.randn(2, 3, 4), torch.randn(2, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = attend(query, keys, mask)
    assert torch.equal(out[1], torch.zeros(4))  # an empty history attends to nothing
    padded = keys.clone()
    padded[0, 2] = 100.0  # padding may hold anything
    assert torch.allclose(attend(query, padded, mask), out)
    # A mix of the real keys with weights in (0, 1), unnormalised as in DIN, that move with the query.
    assert not torch.allclose(attend(-5 * query, keys, mask)[0], out[0])
    weights = torch.linalg.lstsq(keys[0, :2].T, out[0].unsqueeze(1)).solution.squeeze(1)
    assert (weights > 0).all() and (weights < 1).all()


def test_piecewise_linear_bins_fit_quantiles_and_saturate_outside_the_train_range() -> None:
    rng = np.random.default_rng(0)
    values = np.stack([rng.exponential(size=1000), np.repeat([0.0, 1.0], 500)], axis=1)
    edges = quantile_bin_edges(values, 8)
    assert edges.shape == (2, 9) and (np.diff(edges, axis=1) > 0).all()  # a 2-valued column still gets 8 bins
    ple = PiecewiseLinearEmbedding(torch.from_numpy(edges), 4)
    far = ple(torch.tensor([[1e6, 1.0], [edges[0, -1], 1.0]]))
    assert torch.allclose(far[0], far[1])  # beyond the last edge nothing changes: no extrapolation
    assert ple(torch.rand(5, 2)).shape == (5, 2, 4)
    with pytest.raises(ValueError, match="non-empty"):
        quantile_bin_edges(np.zeros((0, 2)), 4)


def test_rare_items_share_the_unknown_row_in_every_item_feature() -> None:
    rows = item_rows(np.array([0, 9, 1, 5]), 5)  # ids 0..3 with 0, 9, 1 and 5 train rows
    assert rows.tolist() == [0, 1, 0, 3]
    vocab = ItemVocabulary(rows, ["item_id", "hist_items"])
    # One row: user 2, item 2, history [3, 1, 2].
    kjt = KeyedJaggedTensor(
        keys=["user_id", "item_id", "hist_items"], values=torch.tensor([2, 2, 3, 1, 2]), lengths=torch.tensor([1, 1, 3])
    )
    mapped = vocab(kjt)
    assert mapped.keys() == kjt.keys() and torch.equal(mapped.lengths(), kjt.lengths())
    assert mapped["user_id"].values().tolist() == [2]  # not an item feature: untouched
    assert mapped["item_id"].values().tolist() == [0]
    assert mapped["hist_items"].values().tolist() == [3, 1, 0]
    assert vocab(None) is None
