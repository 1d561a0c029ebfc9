"""benchmarks.throughput: a tiny run reports every row and column; the plain baseline is TorchRec's DLRM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.throughput import IMPLS, PHASES, ThroughputConfig, _label, derive, launches, main, report, targets
from benchmarks.throughput_worker import DLRM_CONFIG, PlainDLRM, kjt_bags, synthetic_rows
from ranking.batches import DENSE_FEATURES, build_split
from ranking.tables import FeatureConfig, sparse_tables
from ranking.model import build_model

TINY = ["--rows", "1500", "--items", "300", "--users", "60", "--batch-sizes", "256", "128", "--warmup", "1",
        "--steps", "2", "--profile-steps", "1", "--copy-gib", "0.01", "--copy-repeats", "2"]
POSITIVE = ("samples_per_s", "step_ms", "lookups_per_step", "lookup_bytes_per_s", "bandwidth_fraction", "data_share")
COLUMNS = ("samples/s", "vs plain", "vs 1 rank x 1 thread", "step ms", "data ms", "input dist ms", "forward ms",
           "backward ms", "optimizer ms", "data share", "lookups GB/s", "of copy bandwidth")


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_run_reports_every_launch_batch_and_column(tmp_path: Path) -> None:
    # Without the 1 rank x 2 threads launch to stay fast; the report test below covers its rows.
    main([*TINY, "--no-two-threads", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "throughput.json").read_text())
    markdown = (tmp_path / "throughput.md").read_text()

    expected = {(impl, r, t, b) for r, t in ((1, 1), (2, 1)) for impl in IMPLS for b in (256, 128)}
    assert {(r["impl"], r["ranks"], r["threads"], r["batch"]) for r in data["runs"]} == expected
    assert all(positive(v) for v in data["bandwidth_bytes_per_s"].values())
    for run in data["runs"]:
        assert all(positive(run[key]) for key in POSITIVE), run
        assert set(run["phases_ms"]) == set(PHASES)
        assert all(positive(run["phases_ms"][p]) for p in PHASES if p != "input_dist" or run["impl"] == "torchrec")
        assert (run["vs_plain"] is None) == (run["impl"] == "plain")
        assert (run["vs_one_rank"] is None) == (run["ranks"] == 1)
        assert all(positive(run[k]) for k in ("vs_plain", "vs_one_rank") if run[k] is not None)
        assert run["profile_top_ops"] and all(positive(op["self_cpu_ms_per_step"]) for op in run["profile_top_ops"])
        assert sum(run["lookups_per_key"].values()) == pytest.approx(run["lookups_per_step"])
        if run["impl"] == "torchrec":  # the model of ranking/train.py: every table on the fused kernel
            assert all(kind.endswith("/fused") for kind in run["sharding"].values()), run["sharding"]
            assert sum(run["lookup_share_per_rank"]) == pytest.approx(1.0)
    assert [t["verdict"] in ("PASS", "MISS") for t in data["targets"]] == [True] * 4
    header = markdown.splitlines()[2]
    assert all(column in header for column in COLUMNS), header
    assert markdown.count("| torchrec 2 ranks x 1 thread | ") == markdown.count("| plain 1 rank x 1 thread | ") == 2
    assert data["command"].startswith("python -m benchmarks.throughput --rows 1500")


def fake_run(impl: str, ranks: int, threads: int, samples_per_s: float, data_ms: float = 1.0) -> dict:
    step_ms = 4096 / samples_per_s * 1e3
    phases = {"data": data_ms, "input_dist": 0.0, "forward": 1.0, "backward": 1.0, "optimizer": 1.0}
    return {"impl": impl, "ranks": ranks, "threads": threads, "batch": 4096, "samples_per_s": samples_per_s,
            "step_ms": step_ms, "phases_ms": phases, "lookups_per_step": 1e5,
            "profile_top_ops": [{"op": f"aten::{impl}", "self_cpu_ms_per_step": 1.0, "share": 1.0,
                                 "calls_per_step": 1}]}


def test_targets_and_report_of_every_launch() -> None:
    cfg = ThroughputConfig()
    assert launches(cfg) == [(1, 1, IMPLS), (1, 2, IMPLS), (2, 1, IMPLS)]
    runs = [fake_run("torchrec", 1, 1, 30_000), fake_run("plain", 1, 1, 10_000, data_ms=300.0),
            fake_run("torchrec", 1, 2, 25_000), fake_run("plain", 1, 2, 20_000),
            fake_run("torchrec", 2, 1, 60_000), fake_run("plain", 2, 1, 10_000)]
    tables = [{"name": "t_item", "features": ["item_id", "hist_items"]}, {"name": "t_user", "features": ["user_id"]}]
    runs[4].update(plan={"t_item": [0, 1], "t_user": [1]}, sharding={"t_item": "column_wise/fused"},
                   lookups_per_key={"item_id": 1.0, "hist_items": 5.0, "user_id": 2.0})
    derive(runs, bandwidth=1e10, emb_dim=16, tables=tables)
    assert runs[4]["lookup_share_per_rank"] == pytest.approx([3 / 8, 5 / 8])
    assert runs[0]["vs_plain"] == pytest.approx(3.0) and runs[4]["vs_one_rank"] == pytest.approx(2.0)
    assert runs[0]["lookup_bytes_per_s"] == pytest.approx(2 * 1e5 * 16 * 4 * 30_000 / 4096)
    checks = targets(runs, 4096)
    assert [c["verdict"] for c in checks] == ["PASS", "MISS", "PASS", "PASS", "context", "MISS"]
    assert checks[4]["value"] == pytest.approx(2.4)
    bandwidth = {"one_thread": 1e10, "all_threads": 1e10, "threads": 2, "reference": 1e10}
    text = report(cfg, runs, checks, bandwidth, {"emb_dim": 16, "tables": 12, "features": 17, "encode_s": 1.0})
    assert all(f"| {_label(run)} | 4096 |" in text for run in runs)
    assert "rank 0 serves 38% of the lookups (t_item); rank 1 serves 62% of the lookups (t_item, t_user)" in text
    # Each run behind a miss shows its profile once: torchrec and plain 1 x 2 threads, plain 1 x 1 (data share).
    assert text.count("Profile of ") == 3 and "`aten::plain`" in text


def test_plain_dlrm_has_the_layers_of_torchrec_dlrm() -> None:
    rows, meta = synthetic_rows(ThroughputConfig(rows=64, items=50, users=20, batch_sizes=(32,)))
    tables = sparse_tables(meta, FeatureConfig())
    dlrm = build_model(tables, len(DENSE_FEATURES), DLRM_CONFIG, device="cpu").model
    plain = PlainDLRM(tables, len(DENSE_FEATURES), DLRM_CONFIG)

    def shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in module.parameters()]

    assert shapes(plain.dense_arch) == shapes(dlrm.dense_arch)
    assert shapes(plain.over_arch) == shapes(dlrm.over_arch)
    assert sorted(shapes(plain.tables)) == sorted(shapes(dlrm.sparse_arch))
    batch = build_split(rows, meta, FeatureConfig(), "synthetic").batch(torch.arange(8))
    logits = plain(batch.dense_features, kjt_bags(batch.sparse_features))
    assert logits.shape == (8,) and torch.isfinite(logits).all()


def test_kjt_bags_are_each_features_values_and_offsets() -> None:
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 0, 1, 2]))
    (a_values, a_offsets), (b_values, b_offsets) = kjt_bags(kjt)
    assert a_values.tolist() == [1, 2] and a_offsets.tolist() == [0, 2]
    assert b_values.tolist() == [3, 4, 5] and b_offsets.tolist() == [0, 1]


def test_synthetic_rows_follow_the_row_contract_with_popular_items() -> None:
    cfg = ThroughputConfig(rows=2000, items=500, users=100, history=5, batch_sizes=(256,))
    rows, meta = synthetic_rows(cfg)
    split = build_split(rows, meta, FeatureConfig(), "synthetic")  # validates every id against its table
    assert len(split) == cfg.rows
    assert split.keys == tuple(f for t in sparse_tables(meta, FeatureConfig()) for f in t.features)
    assert rows["hist_items"].map(len).eq(5).all() and rows["sid_codes"].map(len).eq(cfg.sid_levels).all()
    counts = rows["item_id"].value_counts()
    assert counts.iloc[0] > 5 * cfg.rows / cfg.items  # power-law popularity, not uniform
    again, _ = synthetic_rows(cfg)
    assert again["hist_items"].map(tuple).equals(rows["hist_items"].map(tuple))  # seeded


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("rows", 0, "rows must be"), ("rows", 100, "rows 100 < the largest batch 4096"), ("zipf", 1.0, "zipf"),
     ("batch_sizes", (255,), "batch_sizes"), ("sid_levels", 1, "sid_levels"), ("copy_gib", 0, "copy_gib")],
)
def test_config_rejects_bad_values(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ThroughputConfig(**{field: value})
