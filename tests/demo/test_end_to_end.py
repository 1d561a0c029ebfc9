"""The whole chain on a small synthetic set: ingest -> tokenize -> features -> Feast -> 2-rank torchrun -> AUC.

Every stage runs as its real command (the chain of ``python -m demo``), Feast included,
in a copy of the feature repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import demo
from sidrank.io import read_json
from ingest.synthetic import SyntheticConfig, user_favourites
from builders import FEATURE_REPO

REPO = FEATURE_REPO
SMALL = ["synthetic", "--items", "400", "--events", "30000", "--users", "300", "--seed", "1"]  # = favourite_oracle_auc's config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[demo.DemoConfig, dict]:
    root = tmp_path_factory.mktemp("e2e")
    repo = root / "feature_repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    cfg = demo.DemoConfig(
        dataset="synthetic", method="rqkmeans", artifacts=root / "artifacts", repo=repo, out=root / "run",
        ranker_args=["--batch-size", "512", "--epochs", "4", "--lr-sparse", "0.5"],
    )
    stages = demo.stage_commands(cfg)
    name, ingest = stages[0]
    ingest = ingest[: ingest.index("synthetic")] + SMALL + ingest[ingest.index("--out") :]
    for stage, argv in [(name, ingest), *stages[1:]]:
        demo.run_stage(stage, argv)
    return cfg, read_json(cfg.out / "metrics.json")


def test_every_event_becomes_one_training_row(run: tuple[demo.DemoConfig, dict]) -> None:
    cfg, metrics = run
    events = pd.read_parquet(cfg.artifacts / "synthetic" / "events.parquet")
    assert metrics["train_rows"] + metrics["valid_rows"] + metrics["test_rows"] == len(events) == 30000
    predictions = pd.read_parquet(cfg.out / "predictions_test.parquet")
    test = events[events["split"] == "test"]
    assert predictions["row_id"].tolist() == sorted(test["row_id"].tolist())
    assert predictions.set_index("row_id")["label"].equals(test.set_index("row_id")["label"].sort_index())


def favourite_oracle_auc(cfg: demo.DemoConfig) -> float:
    """Test AUC of the planted signal itself: is the item's cluster one of the user's favourites?"""
    data = cfg.artifacts / "synthetic"
    events = pd.read_parquet(data / "events.parquet")
    events = events[events["split"] == "test"]
    cluster = pd.read_parquet(data / "items.parquet").set_index("item_id")["cluster"]
    favourites = user_favourites(SyntheticConfig(n_items=400, n_events=30000, n_users=300, seed=1))
    hit = (favourites[events["user_id"].to_numpy() - 1] == cluster.loc[events["item_id"]].to_numpy()[:, None]).any(1)
    return roc_auc_score(events["label"], hit)


def test_planted_structure_is_learned_across_two_ranks(run: tuple[demo.DemoConfig, dict]) -> None:
    cfg, metrics = run
    assert metrics["world_size"] == 2
    assert {rank for ranks in metrics["plan"].values() for rank in ranks} == {0, 1}
    assert metrics["sid_version"].startswith("rqkmeans-")
    # 3000 test rows: chance AUC has a std of about 0.01, so 0.58 is far from
    # chance; the favourite-cluster indicator alone (the planted signal, about
    # 0.63 here) bounds what user x cluster learning can reach.
    oracle = favourite_oracle_auc(cfg)
    assert metrics["test_auc"] > 0.58, metrics["history"]
    assert metrics["test_auc"] > oracle - 0.03, (metrics["test_auc"], oracle)


def test_demo_offers_every_tokenizer_method(capsys: pytest.CaptureFixture) -> None:
    from tokenizer.train import METHODS

    for method in METHODS:
        tokenize = dict(demo.stage_commands(demo.DemoConfig(method=method)))["tokenize"]
        assert tokenize[tokenize.index("--method") + 1] == method
    with pytest.raises(SystemExit):
        demo.main(["--method", "no-such-method"])
    assert "invalid choice: 'no-such-method'" in capsys.readouterr().err


def test_auc_benchmark_runs_the_ladder_baselines_and_paired_intervals(
    run: tuple[demo.DemoConfig, dict], tmp_path: Path
) -> None:
    from benchmarks import auc

    cfg, _ = run
    payload = auc.main([
        "--dataset", "synthetic", "--method", "rqkmeans", "--no-prepare", "--artifacts", str(cfg.artifacts),
        "--repo", str(cfg.repo), "--seeds", "0", "--variants", "item_id", "sid", "full", "--epochs", "1",
        "--batch-size", "512", "--nproc", "1", "--n-boot", "50", "--runs", str(tmp_path / "runs"),
        "--results-dir", str(tmp_path / "results"),
    ])
    assert set(payload["summary"]) == {"item_id", "sid", "full", "lightgbm", "logreg"}
    assert payload["cold_test_rows"] > 0
    for pair in ("full - lightgbm", "sid - item_id"):
        for metric in ("auc", "auc_cold", "gauc"):
            found = payload["comparisons"][pair][metric]
            assert found["low"] <= found["diff"] <= found["high"] and found["n_boot"] == 50
    # LightGBM learns the planted signal on the same inputs as the ranker.
    assert payload["summary"]["lightgbm"]["test_auc"]["mean"] > 0.58
    written = read_json(tmp_path / "results" / "auc_synthetic_temporal.json")
    assert written["summary"]["full"]["test_auc"]["mean"] == payload["summary"]["full"]["test_auc"]["mean"]
    assert "command" in written and written["comparisons"] == payload["comparisons"]
    for picture in ("curves", "by_frequency"):
        assert (tmp_path / "results" / f"auc_synthetic_temporal_{picture}.png").stat().st_size > 0
