"""ranking.model on a tiny batch, single process (no DMP)."""

from __future__ import annotations

import pytest
import torch
from test_batches import META, tiny_rows

from ranking.batches import DENSE_FEATURES, FeatureConfig, build_split, sparse_tables
from ranking.model import ModelConfig, build_ebc, build_model


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


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_loss_decreases(arch: str, batch) -> None:
    torch.manual_seed(0)
    model = build_model(sparse_tables(META, FeatureConfig()), len(DENSE_FEATURES), ModelConfig(arch=arch), device="cpu")
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
    assert ModelConfig(dense_layers=[32]).dense_layers == (32,)
