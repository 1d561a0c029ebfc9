"""ranking.sid_init: codebook projection, codebook file checks, and the weights landing in sharded tables on 2 ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.decomposition import PCA

from sidrank.schema import DataError
from sidrank import contract
from ranking.batches import DENSE_FEATURES
from ranking.tables import FeatureConfig, sparse_tables
from ranking.model import ModelConfig, build_model
from ranking.sharding import shard_model
from ranking.sid_init import (
    codebook_table_weights,
    default_init_std,
    init_sid_tables,
    load_table_weights,
    project_codebook,
    read_codebooks,
)

LEVELS, CODES, DIM = 4, 8, 8
META = contract.FeatureMeta(
    n_users=30, n_items=40, n_tags=5, n_year_buckets=3, sid_levels=LEVELS, sid_codebook_size=CODES,
    sid_version="v1", user_profile={"age_id": 4},
)


def pairwise(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), x.double())


def codebooks(d: int = 5) -> list[torch.Tensor]:
    return [torch.randn(CODES, d, generator=torch.Generator().manual_seed(p)) for p in range(LEVELS)]


def test_narrow_codebook_keeps_its_geometry_and_fills_the_rest() -> None:
    book = torch.randn(CODES, 3, generator=torch.Generator().manual_seed(0))
    std = default_init_std(CODES + 1)
    out = project_codebook(book, DIM, std, torch.Generator().manual_seed(1))
    assert out.shape == (CODES, DIM) and out.dtype == torch.float32
    # d = 3 < D: a rotation and one scale, so every distance keeps its ratio to the others.
    off_diagonal = ~torch.eye(CODES, dtype=torch.bool)
    ratio = pairwise(out[:, :3])[off_diagonal] / pairwise(book)[off_diagonal]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    assert out[:, :3].std().item() == pytest.approx(std, rel=1e-5)
    # The other columns are the default uniform init: within its bounds, not all equal.
    bound = np.sqrt(1 / (CODES + 1))
    assert out[:, 3:].abs().max() <= bound and out[:, 3:].std() > 0


def test_wide_codebook_is_its_top_principal_axes() -> None:
    book = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.1, 32)
    out = project_codebook(book, DIM, 0.05, torch.Generator())
    scores = PCA(n_components=DIM).fit_transform(book.double().numpy())
    scale = 0.05 / scores.std()
    # Same axes as sklearn's PCA up to the sign of each axis, one scale for all.
    np.testing.assert_allclose(np.abs(out.numpy()), np.abs(scores * scale), rtol=1e-3, atol=1e-6)
    assert (out.numpy()[np.abs(out.numpy()).argmax(0), range(DIM)] > 0).all()  # sign convention


def test_table_weights_keep_row_zero_random_and_shift_codes_by_one() -> None:
    tables = sparse_tables(META, FeatureConfig())
    books = codebooks()
    weights = codebook_table_weights(books, tables, DIM, seed=0)
    assert sorted(weights) == [f"t_sid_{p}" for p in range(LEVELS)]
    for position, book in enumerate(books):
        w = weights[f"t_sid_{position}"]
        assert w.shape == (CODES + 1, DIM)
        assert w[0].abs().max() <= np.sqrt(1 / (CODES + 1))  # unknown: default uniform init
        # Row c + 1 is codeword c: its 5 principal coordinates, then filler columns.
        projected = project_codebook(book, DIM, default_init_std(CODES + 1), torch.Generator())
        assert torch.equal(w[1:, :5], projected[:, :5])
    assert torch.equal(weights["t_sid_0"], codebook_table_weights(books, tables, DIM, seed=0)["t_sid_0"])


def test_plain_model_gets_the_weights(tmp_path: Path) -> None:
    tables = sparse_tables(META, FeatureConfig())
    model = build_model(tables, len(DENSE_FEATURES), ModelConfig(emb_dim=DIM), device="cpu")
    torch.save({"codebooks": codebooks()}, tmp_path / "codebooks.pt")
    assert init_sid_tables(model, tables, tmp_path / "codebooks.pt", META, DIM, seed=0) == [
        f"t_sid_{p}" for p in range(LEVELS)
    ]
    bags = model.model.sparse_arch.embedding_bag_collection.embedding_bags
    expected = codebook_table_weights(codebooks(), tables, DIM, seed=0)
    assert all(torch.equal(bags[name].weight.detach(), w) for name, w in expected.items())
    with pytest.raises(ValueError, match="t_sid_0: table is"):
        load_table_weights(model, {"t_sid_0": torch.zeros(3, DIM)})


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"books": []}, "no 'codebooks' key"),
        ({"codebooks": codebooks()[:2]}, "2 codebooks, expected one"),
        ({"codebooks": [torch.zeros(CODES + 1, 3)] * LEVELS}, r"shape \(9, 3\)"),
        ({"codebooks": [torch.full((CODES, 3), float("nan"))] * LEVELS}, "all finite: False"),
        ({"codebooks": [torch.ones(CODES, 3)] * LEVELS}, "one distinct codeword"),
    ],
)
def test_bad_codebook_files_name_the_file(tmp_path: Path, saved: dict, message: str) -> None:
    path = tmp_path / "codebooks.pt"
    torch.save(saved, path)
    with pytest.raises(DataError, match=message) as caught:
        read_codebooks(path, LEVELS, CODES)
    assert str(path) in str(caught.value)


def test_missing_or_foreign_codebook_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found; --sid-init codebook"):
        read_codebooks(tmp_path / "codebooks.pt", LEVELS, CODES)
    (tmp_path / "codebooks.pt").write_text("not a torch file")
    with pytest.raises(DataError, match="not a torch file"):
        read_codebooks(tmp_path / "codebooks.pt", LEVELS, CODES)
    # A stacked [P, K, d] tensor is P codebooks too.
    torch.save({"codebooks": torch.stack(codebooks())}, tmp_path / "codebooks.pt")
    assert len(read_codebooks(tmp_path / "codebooks.pt", LEVELS, CODES)) == LEVELS


def _sharded_worker(rank: int, root: str) -> None:
    """One of 2 gloo ranks: shard, codebook-init, then read the weights back two ways."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(f"{root}/store", 2), rank=rank, world_size=2)
    try:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        tables = sparse_tables(META, FeatureConfig())
        model = build_model(tables, len(DENSE_FEATURES), ModelConfig(emb_dim=DIM), device="meta")
        dmp, _, plan = shard_model(
            model, tables, sparse_optimizer="sgd", lr_sparse=0.1, lr_dense=1e-3, ddr_cap_bytes=2**30
        )
        init_sid_tables(dmp, tables, Path(root) / "codebooks.pt", META, DIM, seed=3)
        expected = codebook_table_weights(codebooks(), tables, DIM, seed=3)
        # 1. this rank's shards of the state_dict hold the expected slices
        local = {}
        for key, value in dmp.state_dict().items():
            table = key.split(".")[-2]
            if table in expected:
                for shard in value.local_shards():
                    (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    assert torch.equal(shard.tensor, expected[table][r0 : r0 + rows, c0 : c0 + cols]), table
                    local[table] = local.get(table, 0) + rows * cols
        # 2. a lookup of every code (+ the unknown row) through the sharded forward returns those rows
        keys = [f for t in tables for f in t.features]
        rows = torch.arange(CODES + 1)
        values = torch.cat([rows if k.startswith("sid_") and k[4:].isdigit() else 0 * rows for k in keys])
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(len(values), dtype=torch.long))
        with torch.no_grad():
            pooled = dmp.module.model.sparse_arch(kjt)  # [CODES + 1, F, D]
        for position in range(LEVELS):
            assert torch.equal(pooled[:, keys.index(f"sid_{position}")], expected[f"t_sid_{position}"])
        Path(f"{root}/rank{rank}.json").write_text(json.dumps({"local": local, "plan": plan["ranks"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_codebook_weights_land_in_sharded_tables_on_both_ranks(tmp_path: Path) -> None:
    torch.save({"codebooks": codebooks()}, tmp_path / "codebooks.pt")
    mp.spawn(_sharded_worker, args=(str(tmp_path),), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    sid_tables = {f"t_sid_{p}" for p in range(LEVELS)}
    # Each table's elements were checked exactly once over the ranks, and both ranks hold SID shards.
    checked = {t: sum(r["local"].get(t, 0) for r in reports) for t in sid_tables}
    assert checked == {t: (CODES + 1) * DIM for t in sid_tables}
    assert all(set(r["local"]) & sid_tables for r in reports), reports[0]["plan"]
