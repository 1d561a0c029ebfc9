"""End-to-end: the trainer under torchrun with 2 gloo ranks on a planted-signal dataset."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch

from sidrank.io import publish_unit, write_json, write_parquet
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from ranking import shards, train
from sidrank import contract
from sidrank.metrics import auc
from ranking.config import config_from_args
from ranking.distributed import rank_share
from ranking.shards import load_rows
from builders import PROJECT_ROOT

N_ROWS, N_USERS, N_ITEMS, COLD, LEVELS, CODES = 4000, 300, 120, 20, 3, 8
ROOT = PROJECT_ROOT
# A few hundred SGD steps on 4000 rows: a higher sparse rate than the MovieLens default.
TRAIN_ARGS = ("--batch-size", "256", "--epochs", "4", "--patience", "2", "--seed", "0", "--lr-sparse", "1.0")
META = contract.FeatureMeta(
    n_users=N_USERS, n_items=N_ITEMS, n_tags=6, n_year_buckets=4, sid_levels=LEVELS,
    sid_codebook_size=CODES, sid_version="rq-test", user_profile={"age_id": 5, "gender_id": 3},
)


def synthetic_dataset(root: Path, *, shuffle_train_labels: bool = False, seed: int = 0) -> tuple[Path, Path, Path]:
    """events.parquet, rows parquet and feature_meta.json whose label follows sid_0 and age.

    Also the SID version's codebooks.pt: codeword c of position 0 sits at +1 (c < CODES / 2, the
    codes of liked items) or -1 on its first axis, so a codebook-initialised table starts separated.

    Returns:
        (dataset folder, rows path, feature meta path).
    """
    rng = np.random.default_rng(seed)
    item_codes = rng.integers(0, CODES, size=(N_ITEMS + 1, LEVELS))
    age = rng.integers(0, 5, size=N_USERS + 1)
    users = rng.integers(1, N_USERS + 1, N_ROWS)
    # The last COLD items first appear after the train cut, so test has cold rows.
    items = rng.integers(1, N_ITEMS + 1 - COLD, N_ROWS)
    late = np.arange(N_ROWS) >= int(N_ROWS * 0.8)
    items[late] = rng.integers(1, N_ITEMS + 1, late.sum())
    logit = 2.5 * (item_codes[items, 0] < CODES // 2) + 1.5 * (age[users] >= 3) - 2.0
    labels = (rng.random(N_ROWS) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    events = pd.DataFrame({
        "user_id": users, "item_id": items, "label": labels,
        "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.arange(N_ROWS), unit="min"),
    })
    events = assign_protocol_split(events, "synthetic")
    if shuffle_train_labels:
        in_train = events["split"] == "train"
        events.loc[in_train, "label"] = rng.permutation(events.loc[in_train, "label"].to_numpy())
    hist = [rng.integers(1, N_ITEMS + 1, rng.integers(0, 5)) for _ in range(N_ROWS)]
    no_user_rows = rng.random(N_ROWS) < 0.2  # a user's first row: no counts before it
    rows = events.drop(columns=["split"]).assign(
        user_count=np.where(no_user_rows, np.nan, rng.integers(0, 50, N_ROWS)),
        user_pos_count=np.where(no_user_rows, np.nan, 0),
        item_count=rng.integers(0, 50, N_ROWS),
        item_pos_count=0,
        year_bucket=rng.integers(0, 4, N_ROWS),
        tag_ids=[rng.integers(1, 7, rng.integers(0, 3)) for _ in range(N_ROWS)],
        sid_codes=list(item_codes[events["item_id"].to_numpy()]),
        hist_items=hist,
        hist_sid_p1=[item_codes[h, 0] for h in hist],
        hist_sid_p2=[item_codes[h, 0] * CODES + item_codes[h, 1] for h in hist],
        sid_version=META.sid_version,
        age_id=age[events["user_id"].to_numpy()],
        gender_id=rng.integers(0, 3, N_ROWS),
    )
    dataset = root / "data"
    codebooks = [torch.randn(CODES, 6, generator=torch.Generator().manual_seed(level)) for level in range(LEVELS)]
    codebooks[0][:, 0] = torch.where(torch.arange(CODES) < CODES // 2, 1.0, -1.0) * 4
    sid_dir = dataset / "sids" / META.sid_version
    sid_dir.mkdir(parents=True)
    torch.save({"codebooks": codebooks, "config": {"levels": LEVELS}}, sid_dir / "codebooks.pt")
    write_parquet(events, dataset / "events.parquet")
    write_json({"n_items": N_ITEMS, "protocol": "temporal"}, dataset / "meta.json")
    write_parquet(rows, dataset / "rows.parquet")
    write_json({**dataclasses.asdict(META), "extra": 1}, root / "feature_meta.json")
    return dataset, dataset / "rows.parquet", root / "feature_meta.json"


def torchrun(
    dataset: Path, rows: Path, meta: Path, out: Path, *extra: str,
    launcher: tuple[str, ...] = ("--standalone", "--nproc_per_node", "2"), env: dict[str, str] | None = None,
) -> tuple[dict, str]:
    """``torchrun <launcher> -m ranking.train`` on the synthetic dataset; (metrics, stderr)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", *launcher,
        "-m", "ranking.train", "--dataset", str(dataset), "--repo", str(dataset.parent),
        "--rows", str(rows), "--feature-meta", str(meta), "--out", str(out), *TRAIN_ARGS, *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "metrics.json").read_text()), proc.stderr


def _torchrun(dataset: Path, rows: Path, meta: Path, out: Path, *extra: str) -> dict:
    return torchrun(dataset, rows, meta, out, *extra)[0]


class TwoRanks(NamedTuple):
    root: Path
    inputs: tuple[Path, Path, Path]
    metrics: dict


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> TwoRanks:
    """One uninterrupted 2-rank run on the planted-signal rows (``<root>/run``)."""
    root = tmp_path_factory.mktemp("two_ranks")
    inputs = synthetic_dataset(root)
    return TwoRanks(root, inputs, _torchrun(*inputs, root / "run"))


@pytest.mark.slow
def test_torchrun_two_ranks_learns_planted_signal(two_ranks: TwoRanks) -> None:
    tmp_path, (dataset, rows, meta), metrics = two_ranks

    assert metrics["world_size"] == 2
    assert metrics["test_auc"] > 0.7, metrics["history"]
    assert np.isfinite(metrics["test_auc_cold"]) and metrics["test_n_cold"] > 0
    # Tables spread over both ranks, every one with the fused kernel.
    assert {r for ranks in metrics["plan"].values() for r in ranks} == {0, 1}
    assert all(ranks for ranks in metrics["plan"].values())
    assert all(kind.endswith("/fused") for kind in metrics["sharding"].values()), metrics["sharding"]
    assert metrics["config"]["batch_size"] == 256 and metrics["sid_version"] == META.sid_version
    events = pd.read_parquet(dataset / "events.parquet")
    for split in ("valid", "test"):
        preds = pd.read_parquet(tmp_path / "run" / f"predictions_{split}.parquet")
        expected = events.loc[events["split"] == split].sort_values("row_id")
        assert preds["row_id"].tolist() == expected["row_id"].tolist()
        assert preds["label"].tolist() == expected["label"].tolist()
        assert preds["score"].between(0, 1).all()
    test_preds = pd.read_parquet(tmp_path / "run" / "predictions_test.parquet")
    assert auc(test_preds["label"], test_preds["score"]) == pytest.approx(metrics["test_auc"])
    # The reported epoch is the best valid epoch, and its predictions are the ones saved.
    history = metrics["history"]
    assert metrics["valid_auc"] == pytest.approx(max(h["valid_auc"] for h in history))
    assert history[metrics["best_epoch"]]["valid_auc"] == pytest.approx(metrics["valid_auc"])
    valid_preds = pd.read_parquet(tmp_path / "run" / "predictions_valid.parquet")
    assert auc(valid_preds["label"], valid_preds["score"]) == pytest.approx(metrics["valid_auc"])
    assert (tmp_path / "run" / "checkpoint" / ".metadata").exists()


@pytest.mark.slow
def test_killed_rank_restarts_from_the_last_epoch_and_matches_an_uninterrupted_run(
    two_ranks: TwoRanks, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"
    # Rank 1 dies in the middle of epoch 1; torchrun restarts both ranks once.
    launcher = ("--standalone", "--nproc_per_node", "2", "--max-restarts", "1")
    resumed, log = torchrun(*two_ranks.inputs, tmp_path / "resumed", launcher=launcher,
                            env={"RANKING_FAIL_ONCE": f"1,1,5,{marker}"})

    assert marker.exists()
    assert "resumed from" in log and "epoch-0000" in log, log[-3000:]
    same_run(two_ranks.metrics, resumed)
    for split in ("valid", "test"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(two_ranks.root / "run" / f"predictions_{split}.parquet"),
            pd.read_parquet(tmp_path / "resumed" / f"predictions_{split}.parquet"),
        )


def same_run(a: dict, b: dict) -> None:
    """Metrics and per-epoch history equal; measured speeds, timings, the config (its --out) and the sharding
    types aside (the planner may pick column-wise or table-column-wise for the same placement in another
    process; DCP loads a state across plans)."""
    skip = {"timings", "samples_per_s", "history", "config", "sharding"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    strip = [{k: v for k, v in h.items() if k != "samples_per_s"} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "samples_per_s"} for h in b["history"]]


@pytest.mark.slow
def test_torchrun_shuffled_train_labels_give_chance_auc(tmp_path: Path) -> None:
    dataset, rows, meta = synthetic_dataset(tmp_path, shuffle_train_labels=True)
    # The MME-SID options under 2 ranks too: no path around the shuffled labels.
    metrics = _torchrun(
        dataset, rows, meta, tmp_path / "run", "--arch", "dcn", "--no-save-checkpoint",
        "--sparse-optimizer", "rowwise_adagrad", "--lr-sparse", "0.05", "--sid-init", "codebook", "--fusion", "freq",
    )

    assert metrics["config"]["model"]["sid_init"] == "codebook" and metrics["config"]["model"]["fusion"] == "freq"
    assert abs(metrics["test_auc"] - 0.5) < 0.07, metrics["history"]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_world_size_one_builds_rows_once_and_trains_sid_only(tmp_path: Path, monkeypatch) -> None:
    """Plain ``main()`` in-process is world size 1; a missing or stale rows cache is built via ranking.rows."""
    dataset, rows_path, meta = synthetic_dataset(tmp_path)
    rows = pd.read_parquet(rows_path)
    calls = []

    def fake_write_training_rows(repo, events, path, *, service, sid_version):
        calls.append((Path(repo), len(events), service, sid_version))
        write_parquet(rows, path)
        return len(rows)

    monkeypatch.setattr(shards, "write_training_rows", fake_write_training_rows)
    argv = ["--dataset", str(dataset), "--repo", str(tmp_path), "--feature-meta", str(meta),
            "--out", str(tmp_path / "run"), *TRAIN_ARGS, "--no-use-item-id", "--no-save-checkpoint"]
    metrics = train.main(argv)

    # The service and the cache of the feature meta's SID version.
    assert calls == [(tmp_path, N_ROWS, "ranker_v1", META.sid_version)]
    assert (dataset / "rows" / "rq_test" / "ranker_v1.parquet").exists()
    assert metrics["service"] == "ranker_v1"
    assert metrics["world_size"] == 1 and set(map(tuple, metrics["plan"].values())) == {(0,)}
    assert "t_item" not in metrics["plan"] and "t_sid_0" in metrics["plan"]
    assert metrics["test_auc"] > 0.7
    train.main(argv)  # the cache is read, not rebuilt
    assert len(calls) == 1
    later = time.time() + 10
    os.utime(meta, (later, later))  # a re-publish rewrites the feature meta: the cache is stale
    train.main(argv)
    assert len(calls) == 2


def test_cached_rows_of_another_tokenizer_are_rejected(tmp_path: Path) -> None:
    dataset, rows, _ = synthetic_dataset(tmp_path)
    argv = ["--dataset", str(dataset), "--repo", str(tmp_path), "--out", str(tmp_path), "--rows", str(rows)]
    cfg = config_from_args(argv)
    events = pd.read_parquet(dataset / "events.parquet")
    shares = dict(load_rows(cfg, events, META))
    for split, rows in shares.items():
        assert rows["row_id"].tolist() == sorted(events.loc[events["split"] == split, "row_id"]), split
    with pytest.raises(DataError, match="sid_version"):
        dict(load_rows(cfg, events, dataclasses.replace(META, sid_version="rq-other")))
    with pytest.raises(DataError, match="rows do not match the"):
        dict(load_rows(cfg, events.iloc[:-1], META))


def test_cli_rejects_unknown_and_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--dataset", str(tmp_path), "--repo", str(tmp_path), "--out", str(tmp_path)]
    for unknown in (["--no-such-flag"], ["--epoch", "3"]):  # abbreviations are unknown too
        with pytest.raises(SystemExit):
            config_from_args([*base, *unknown])
    # A bad value is one usage error naming it, not a traceback.
    for flags, message in (
        (["--emb-dim", "10"], "emb_dim"),
        (["--batch-size", "0"], "batch_size"),
        (["--fusion", "freq", "--no-use-sid"], "fusion='freq' .* needs use_item_id and use_sid"),
        (["--sid-init", "codebook", "--no-use-sid"], "sid_init='codebook' .* needs use_sid"),
    ):
        with pytest.raises(SystemExit):
            config_from_args([*base, *flags])
        assert re.search(message, capsys.readouterr().err)
    for flag, value in (("--sid-init", "pca"), ("--fusion", "sum")):
        with pytest.raises(SystemExit):
            config_from_args([*base, flag, value])
    cfg = config_from_args([*base, "--dense-layers", "32", "16", "--no-use-sid"])
    assert cfg.model.dense_layers == (32, 16) and not cfg.features.use_sid


def _relabel_rows(rows_path: Path, meta: Path) -> None:
    rows = pd.read_parquet(rows_path)
    rows.loc[rows.index[:5], "label"] = 1 - rows.loc[rows.index[:5], "label"]
    write_parquet(rows, rows_path)


def _other_events_meta(rows_path: Path, meta: Path) -> None:
    write_json({**dataclasses.asdict(META), "events_sha256": "0" * 64}, meta)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_relabel_rows, "column 'label' disagrees"), (_other_events_meta, "published from other events")],
)
def test_rows_or_feature_store_of_other_events_are_refused(tmp_path: Path, corrupt, message: str) -> None:
    dataset, rows_path, meta = synthetic_dataset(tmp_path)
    corrupt(rows_path, meta)
    argv = ["--dataset", str(dataset), "--repo", str(tmp_path), "--out", str(tmp_path / "run"),
            "--rows", str(rows_path), "--feature-meta", str(meta)]
    with pytest.raises(DataError, match=message):
        train.main(argv)


def test_sid_version_selects_meta_service_and_cache_and_names_both_versions(tmp_path: Path) -> None:
    dataset, rows_path, meta = synthetic_dataset(tmp_path)
    repo = tmp_path / "repo"
    base = ["--dataset", str(dataset), "--repo", str(repo), "--out", str(tmp_path / "run")]
    cfg = config_from_args([*base, "--sid-version", "rq-test"])
    assert cfg.feature_meta_path(META) == repo / "data" / "feature_meta" / f"{contract.sid_version_name(META.sid_version)}.json"
    assert cfg.service_for(META) == "ranker_v1"
    assert cfg.rows_path_for(META) == dataset / "rows" / "rq_test" / "ranker_v1.parquet"
    # A version the repository never published: the error lists what is published.
    registry = {"default": "rq-test", "versions": {"rq-test": {"name": "rq_test"}}}
    with publish_unit(repo / "data") as staging:  # the store's data folder is one unit
        write_json(registry, staging / contract.SID_VERSIONS_FILE)
    with pytest.raises(DataError, match=r"SID version 'rq-other' is not published .*\['rq-test'\]"):
        train.main([*base, "--sid-version", "rq-other"])
    # A feature meta of another version than configured: both named.
    with pytest.raises(DataError, match="'rq-test' but the ranker is configured with --sid-version 'rq-other'"):
        train.main([*base, "--sid-version", "rq-other", "--feature-meta", str(meta), "--rows", str(rows_path)])


def test_world_size_one_trains_with_codebook_init_and_frequency_fusion(tmp_path: Path) -> None:
    dataset, rows_path, meta = synthetic_dataset(tmp_path)
    argv = ["--dataset", str(dataset), "--repo", str(tmp_path), "--feature-meta", str(meta), "--rows", str(rows_path),
            "--out", str(tmp_path / "run"), *TRAIN_ARGS, "--no-save-checkpoint", "--sid-init", "codebook",
            "--fusion", "freq"]
    metrics = train.main(argv)
    assert metrics["test_auc"] > 0.7 and metrics["config"]["model"]["sid_init"] == "codebook"
    (dataset / "sids" / META.sid_version / "codebooks.pt").unlink()
    with pytest.raises(DataError, match="codebooks.pt: not found; --sid-init codebook needs"):
        train.main(argv)


def test_rank_shares_cover_every_row_once() -> None:
    ids = np.arange(100, 111)
    for split in ("train", "valid", "test"):
        shares = [rank_share(ids, split, rank, 3) for rank in range(3)]
        assert np.array_equal(np.sort(np.concatenate(shares)), ids), split
    assert [len(rank_share(ids, "test", rank, 3)) for rank in range(3)] == [4, 4, 3]  # contiguous parts
    # Parts differ by at most one row: ceil-sized parts would leave rank 3 of 4 with none of 9 rows.
    assert [len(rank_share(np.arange(9), "valid", rank, 4)) for rank in range(4)] == [3, 2, 2, 2]
    assert rank_share(ids, "train", 1, 3).tolist() == [101, 104, 107, 110]  # a stride: shards mix all times


def test_config_replays_a_saved_run_and_flags_beside_it_win(tmp_path: Path) -> None:
    base = ["--dataset", str(tmp_path), "--repo", str(tmp_path / "repo"), "--out", str(tmp_path / "run")]
    cfg = config_from_args([*base, "--history", "attention", "--dense-layers", "32", "16", "--dropout", "0.3"])
    saved = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    write_json({"test_auc": 0.7, "config": saved}, tmp_path / "metrics.json")
    assert config_from_args(["--config", str(tmp_path / "metrics.json")]) == cfg
    replayed = config_from_args(["--config", str(tmp_path / "metrics.json"), "--dropout", "0.1"])
    assert replayed.model.dropout == 0.1 and replayed.features.history == "attention"
    write_json({"config": {**saved, "no_such_option": 1}}, tmp_path / "stale.json")
    with pytest.raises(DataError, match=r"config keys \['no_such_option'\] are not options"):
        config_from_args(["--config", str(tmp_path / "stale.json")])
