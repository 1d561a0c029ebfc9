"""The ranker on CPU or GPU: device choice, the planner's topology, sharding types per device, two nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchrec.distributed.types import ShardingType

from sidrank.net import free_port
from sidrank.schema import DataError
from ranking import train
from ranking.distributed import resolve_device
from ranking.sharding import sharding_types, topology
from test_train_torchrun import ROOT, TRAIN_ARGS, synthetic_dataset


def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DataError, match="--device cuda: torch .* sees no GPU .* or pass --device cpu"):
        resolve_device("cuda")
    # The trainer stops before any process group or data is touched.
    with pytest.raises(DataError, match="sees no GPU"):
        train.main(["--dataset", str(tmp_path), "--repo", str(tmp_path), "--out", str(tmp_path / "run"),
                    "--device", "cuda"])


def test_one_gpu_per_local_rank(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DataError, match="LOCAL_RANK 2 but 2 GPUs"):
        resolve_device("cuda")


def test_topology_takes_the_local_world_size_from_torchrun(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    hosts = topology(8, torch.device("cpu"), 2**30)
    assert (hosts.world_size, hosts.local_world_size, hosts.compute_device) == (8, 2, "cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert topology(4, torch.device("cpu"), 2**30).local_world_size == 4  # one host without torchrun's word


def test_sharding_types_follow_the_device() -> None:
    row_wise = {ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value}
    assert set(sharding_types(True, "cpu")) == {
        ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value
    }
    assert row_wise <= set(sharding_types(True, "cuda"))
    assert ShardingType.ROW_WISE.value in sharding_types(False, "cpu")
    for pooled in (True, False):
        for device in ("cpu", "cuda"):
            assert ShardingType.DATA_PARALLEL.value not in sharding_types(pooled, device)


@pytest.mark.slow
def test_two_nodes_on_one_host(tmp_path: Path) -> None:
    """torchrun --nnodes 2 with one process each, started twice on this host, rendezvous over c10d."""
    dataset, rows, meta = synthetic_dataset(tmp_path)
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
        "-m", "ranking.train", "--dataset", str(dataset), "--repo", str(tmp_path), "--rows", str(rows),
        "--feature-meta", str(meta), "--out", str(tmp_path / "run"), *TRAIN_ARGS, "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(err[-3000:] for _, err in outputs)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["local_world_size"], metrics["device"]) == (2, 1, "cpu")
    assert {r for ranks in metrics["plan"].values() for r in ranks} == {0, 1}
    assert metrics["test_auc"] > 0.7


def test_the_gpu_training_pipeline_trains_like_the_plain_loop(tmp_path: Path) -> None:
    """TorchRec's TrainPipelineSparseDist (the GPU path) run on CPU: the same model as the plain loop."""
    dataset, rows, meta = synthetic_dataset(tmp_path)
    base = ["--dataset", str(dataset), "--repo", str(tmp_path), "--feature-meta", str(meta), "--rows", str(rows),
            *TRAIN_ARGS, "--epochs", "2", "--no-save-checkpoint"]
    plain = train.main([*base, "--out", str(tmp_path / "plain")])
    piped = train.main([*base, "--out", str(tmp_path / "piped"), "--train-pipeline"])
    assert piped["config"]["train_pipeline"] and plain["config"]["train_pipeline"] is None
    assert [h["train_loss"] for h in piped["history"]] == [h["train_loss"] for h in plain["history"]]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "plain" / "predictions_test.parquet"),
                                  pd.read_parquet(tmp_path / "piped" / "predictions_test.parquet"))
