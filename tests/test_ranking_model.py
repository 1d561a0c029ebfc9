"""ranking.model on a tiny batch, single process (no DMP); the frequency-gated item-id / SID fusion."""

from __future__ import annotations

import pytest
import torch
from test_batches import META, tiny_rows

from ranking.batches import DENSE_FEATURES, FeatureConfig, build_split, sparse_tables
from ranking.model import FrequencyGate, FusedDLRM, FusedDLRM_DCN, ModelConfig, NoFusion, build_ebc, build_model


@pytest.fixture(scope="module")
def batch():
    split = build_split(tiny_rows(), META, FeatureConfig(), "rows.parquet")
    return split.batch(torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_forward_shapes(arch: str, batch) -> None:
    torch.manual_seed(0)
    tables = sparse_tables(META, FeatureConfig())
    model = build_model(tables, len(DENSE_FEATURES), ModelConfig(arch=arch, emb_dim=8), device="cpu")
    loss, (loss_d, logits, labels) = model(batch)
    assert logits.shape == (4,) and labels.shape == (4,)
    assert loss.ndim == 0 and loss.requires_grad and not loss_d.requires_grad
    # The sparse arch pools one D-vector per feature: B x F x D.
    sparse = model.model.sparse_arch(batch.sparse_features)
    assert sparse.shape == (4, len(batch.sparse_features.keys()), 8)


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
    assert isinstance(plain, FusedDLRM_DCN) and isinstance(plain.fusion, NoFusion)
    assert isinstance(fused.fusion, FrequencyGate) and fused.fusion.item_index == 1  # after user_id
    assert [n for n, _ in fused.fusion.named_parameters()] == ["a", "b"]
    dlrm = build_model(tables, len(DENSE_FEATURES), ModelConfig(fusion="freq"), device="cpu").model
    assert isinstance(dlrm, FusedDLRM)
    # With the gate at g = 1 the fused model is the plain one with the same weights.
    fused.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        fused.fusion.a.zero_()
        fused.fusion.b.fill_(50.0)
    assert torch.allclose(fused(batch.dense_features, batch.sparse_features),
                          plain(batch.dense_features, batch.sparse_features))
    for features in (FeatureConfig(use_sid=False), FeatureConfig(use_item_id=False)):
        with pytest.raises(ValueError, match="fusion='freq' fuses the item-id and SID embeddings"):
            build_model(sparse_tables(META, features), len(DENSE_FEATURES), ModelConfig(fusion="freq"), device="cpu")
