"""The evaluation protocols: the item-cold held-out set, its splits, meta.json, the cold set and the chain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import demo
from ingest.cli import IngestConfig, main
from sidrank.contract import DatasetPaths
from sidrank.io import read_json
from sidrank.metrics import evaluate_predictions
from sidrank.protocol import (
    COLD_ITEM_MAX_TRAIN_ROWS,
    HELD_OUT_FRACTION,
    HELD_OUT_SEED,
    ITEM_COLD,
    TEMPORAL,
    apply_protocol,
    assign_protocol_split,
    cold_item_ids,
    cold_item_mask,
    dataset_folder_name,
    held_out_items,
    ids_sha256,
    train_item_counts,
)
from sidrank.schema import DataError
from tokenizer import train as tokenizer_train
from builders import PROJECT_ROOT

REPO = PROJECT_ROOT
# sha256 of held_out_items(1682) (MovieLens-100K): pins the documented rule, so a changed hash shows here.
ML100K_HELD_OUT_SHA256 = "507d90f32421aba2e78051056c6c14e8560af03344444a39766c249e580b1ba7"
SYNTHETIC = ["synthetic", "--items", "300", "--events", "6000", "--users", "120", "--seed", "2"]
T0 = pd.Timestamp("2021-03-01", tz="UTC")


def random_events(n_users: int = 40, n_items: int = 50, n_events: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Unsplit events with timestamp ties, every item drawn often enough to reach valid and test."""
    rng = np.random.default_rng(seed)
    rating = rng.integers(1, 6, n_events).astype(np.float64)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, n_users + 1, n_events),
            "item_id": rng.integers(1, n_items + 1, n_events),
            "label": (rating >= 4).astype(np.int64),
            "rating": rating,
            "event_timestamp": T0 + pd.to_timedelta(rng.integers(0, 300, n_events), unit="s"),
        }
    )


# --- the held-out set --------------------------------------------------------------------------


def test_held_out_set_is_a_fixed_fifth_of_the_items_spread_over_the_ids() -> None:
    for n_items in (1, 7, 50, 1682, 10_000):
        held = held_out_items(n_items)
        assert len(held) == round(HELD_OUT_FRACTION * n_items)
        assert np.all(np.diff(held) > 0) and (len(held) == 0 or (held[0] >= 1 and held[-1] <= n_items))
    held = held_out_items(10_000)
    # A hash, not a prefix: each tenth of the ids holds about a fifth of its items.
    per_tenth = np.bincount((held - 1) // 1000, minlength=10) / 1000
    assert np.all(np.abs(per_tenth - HELD_OUT_FRACTION) < 0.05), per_tenth
    assert ids_sha256(held_out_items(1682)) == ML100K_HELD_OUT_SHA256
    assert not np.array_equal(held_out_items(1682, seed=HELD_OUT_SEED + 1), held_out_items(1682))


def test_held_out_set_ignores_python_hash_randomisation() -> None:
    code = "from sidrank.protocol import held_out_items, ids_sha256; print(ids_sha256(held_out_items(1682)))"
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == ML100K_HELD_OUT_SHA256


def test_item_cold_split_keeps_valid_and_test_row_ids_and_drops_held_out_train_rows() -> None:
    events = random_events()
    temporal, temporal_entries = apply_protocol(events, 50, TEMPORAL, "events.csv")
    cold, entries = apply_protocol(events, 50, ITEM_COLD, "events.csv")
    held = held_out_items(50)
    assert temporal_entries == {"protocol": TEMPORAL}
    assert temporal.equals(assign_protocol_split(events, "events.csv"))
    # Valid and test rows are identical, row ids included.
    for split in ("valid", "test"):
        assert cold[cold["split"] == split].reset_index(drop=True).equals(
            temporal[temporal["split"] == split].reset_index(drop=True)
        )
    # Train = temporal train without the held-out items, nothing else.
    is_train = temporal["split"] == "train"
    expected_train = temporal[is_train & ~temporal["item_id"].isin(held)].reset_index(drop=True)
    assert cold[cold["split"] == "train"].reset_index(drop=True).equals(expected_train)
    assert not cold.loc[cold["split"] == "train", "item_id"].isin(held).any()
    assert entries["held_out"]["removed_train_rows"] == int((is_train & temporal["item_id"].isin(held)).sum()) > 0
    assert (entries["held_out"]["fraction"], entries["held_out"]["seed"]) == (HELD_OUT_FRACTION, HELD_OUT_SEED)
    assert (entries["held_out"]["n_items"], entries["held_out"]["items_sha256"]) == (len(held), ids_sha256(held))


def test_item_cold_split_does_not_depend_on_input_row_order() -> None:
    # Rows that tie on the whole sort key keep their input order (a stable sort), so the check uses unique keys.
    events = random_events(seed=1).drop_duplicates(["event_timestamp", "user_id", "item_id"], ignore_index=True)
    shuffled = events.sample(frac=1.0, random_state=7).reset_index(drop=True)
    a, entries_a = apply_protocol(events, 50, ITEM_COLD, "a")
    b, entries_b = apply_protocol(shuffled, 50, ITEM_COLD, "b")
    assert a.equals(b) and entries_a == entries_b


# --- the cold set ------------------------------------------------------------------------------


def test_cold_set_is_the_held_out_items_valid_and_test_rows() -> None:
    events, entries = apply_protocol(random_events(), 50, ITEM_COLD, "events.csv")
    meta = {"n_items": 50, **entries}
    cold = cold_item_ids(meta, events)
    assert np.array_equal(cold, held_out_items(50))
    is_cold = events["item_id"].isin(cold)
    assert set(events.loc[is_cold, "split"]) == {"valid", "test"}
    # evaluate_predictions scores exactly those rows.
    test = events[events["split"] == "test"]
    test = test.assign(score=np.random.default_rng(0).random(len(test)))
    out = evaluate_predictions(test, cold_items=cold, source="predictions_test")
    mask = test["item_id"].isin(cold)
    assert out["n_cold"] == mask.sum() > 0
    assert out["auc_cold"] == pytest.approx(roc_auc_score(test.loc[mask, "label"], test.loc[mask, "score"]))


def test_temporal_cold_set_is_the_few_train_rows_rule() -> None:
    events = assign_protocol_split(random_events(n_items=400), "events.csv")
    cold = cold_item_ids({"n_items": 400}, events)  # a meta.json without "protocol" reads as temporal
    counts = train_item_counts(events, 400)
    assert np.array_equal(cold, np.flatnonzero(counts[1:] < COLD_ITEM_MAX_TRAIN_ROWS) + 1)
    items = events["item_id"].to_numpy()
    assert np.array_equal(np.isin(items, cold), cold_item_mask(items, counts))
    test = events[events["split"] == "test"].assign(score=0.5 + 0.1 * events["label"])
    by_counts = evaluate_predictions(test, counts)
    assert evaluate_predictions(test, cold_items=cold) == pytest.approx(by_counts, nan_ok=True)
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_predictions(test, counts, cold_items=cold)


def test_cold_set_refuses_meta_and_events_that_disagree() -> None:
    raw = random_events()
    events, entries = apply_protocol(raw, 50, ITEM_COLD, "events.csv")
    meta = {"n_items": 50, **entries}
    with pytest.raises(DataError, match=r"meta\.json: key 'held_out'.*re-run ingest"):
        cold_item_ids({**meta, "held_out": {**entries["held_out"], "seed": 1}}, events)
    with pytest.raises(DataError, match=r"held-out items .* have train rows.*--protocol item-cold"):
        cold_item_ids(meta, assign_protocol_split(raw, "events.csv"))
    with pytest.raises(DataError, match=r"key 'protocol' is 'leave-one-out'"):
        cold_item_ids({**meta, "protocol": "leave-one-out"}, events)
    with pytest.raises(DataError, match="'held_out'"):
        cold_item_ids({"n_items": 50, "protocol": ITEM_COLD}, events)


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_protocol_names_the_flag_and_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([*SYNTHETIC, "--out", str(tmp_path), "--protocol", "random"])
    err = capsys.readouterr().err
    assert "--protocol" in err and "'temporal'" in err and "'item-cold'" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"protocol='random'.*temporal, item-cold"):
        IngestConfig(source="movielens-100k", name="ml-100k", protocol="random")
    with pytest.raises(ValueError, match=r"protocol='random'"):
        apply_protocol(random_events(), 50, "random", "events.csv")
    with pytest.raises(SystemExit):
        demo.main(["--protocol", "random"])
    assert "--protocol" in capsys.readouterr().err


def test_item_cold_without_train_rows_or_cold_rows_is_a_data_error() -> None:
    held = held_out_items(50)
    events = random_events()
    # Every train-period event on a held-out item: nothing is left to train on.
    only_held = events.assign(item_id=held[np.arange(len(events)) % len(held)])
    with pytest.raises(DataError, match=r"events\.csv: the item-cold protocol leaves no train rows.*protocol temporal"):
        apply_protocol(only_held, 50, ITEM_COLD, "events.csv")
    # No held-out item after the train period: the cold valid set would be empty.
    distinct = events.assign(event_timestamp=T0 + pd.to_timedelta(np.arange(len(events)), unit="s"))
    late = np.arange(len(events)) >= int(round(0.8 * len(events)))  # distinct times: input order = protocol order
    warm_item = int(np.setdiff1d(np.arange(1, 51), held)[0])
    warm = distinct.assign(item_id=np.where(late & distinct["item_id"].isin(held), warm_item, distinct["item_id"]))
    with pytest.raises(DataError, match=r"events\.csv: no valid row has one of the 10 held-out items.*ingest more"):
        apply_protocol(warm, 50, ITEM_COLD, "events.csv")
    # Too few items to hold any out.
    with pytest.raises(DataError, match="0 held-out items"):
        apply_protocol(random_events(n_items=2), 2, ITEM_COLD, "events.csv")


# --- ingest, tokenizer and demo follow the protocol --------------------------------------------


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset ingested under both protocols into one output root."""
    out = tmp_path_factory.mktemp("protocols")
    main([*SYNTHETIC, "--out", str(out)])
    main([*SYNTHETIC, "--out", str(out), "--protocol", ITEM_COLD])
    return out


def test_ingest_writes_each_protocol_to_its_own_folder_and_records_it(synthetic_root: Path) -> None:
    temporal, cold = DatasetPaths(synthetic_root / "synthetic"), DatasetPaths(synthetic_root / "synthetic-item-cold")
    assert dataset_folder_name("synthetic", ITEM_COLD) == cold.root.name
    assert dataset_folder_name("synthetic-item-cold", ITEM_COLD) == cold.root.name
    t_meta, c_meta = read_json(temporal.meta), read_json(cold.meta)
    assert t_meta["protocol"] == TEMPORAL and "held_out" not in t_meta
    assert (c_meta["protocol"], c_meta["dataset"]) == (ITEM_COLD, "synthetic-item-cold")
    held = held_out_items(300)
    record = c_meta["held_out"]
    assert (record["fraction"], record["seed"], record["n_items"]) == (HELD_OUT_FRACTION, HELD_OUT_SEED, 60)
    assert record["items_sha256"] == ids_sha256(held)
    t_events, c_events = pd.read_parquet(temporal.events), pd.read_parquet(cold.events)
    assert record["removed_train_rows"] == len(t_events) - len(c_events) > 0
    assert c_meta["split_rows"]["train"] == t_meta["split_rows"]["train"] - record["removed_train_rows"]
    for split in ("valid", "test"):
        assert c_meta["split_rows"][split] == t_meta["split_rows"][split]
        rows = c_events[c_events["split"] == split]
        assert np.array_equal(rows["row_id"], t_events.loc[t_events["split"] == split, "row_id"])
        assert c_meta["cold_items"]["rows"][split] == int(rows["item_id"].isin(held).sum()) > 0
    assert c_meta["cold_items"]["rows"]["train"] == 0


def test_tokenizer_encodes_held_out_items_but_never_fits_on_them(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = DatasetPaths(synthetic_root / "synthetic-item-cold")
    held = cold_item_ids(read_json(paths.meta), pd.read_parquet(paths.events))
    seen: list[torch.Tensor] = []
    fit = tokenizer_train.fit_tokenizer

    def recording_fit(cfg: tokenizer_train.TokenizerConfig, x_fit: torch.Tensor) -> tuple:
        seen.append(x_fit)
        return fit(cfg, x_fit)

    monkeypatch.setattr(tokenizer_train, "fit_tokenizer", recording_fit)
    cfg = tokenizer_train.TokenizerConfig(
        dataset=paths.root, method="rqkmeans", levels=2, codebook_size=8, kmeans_iters=5
    )
    inputs = tokenizer_train.load_inputs(cfg)
    assert len(inputs.fit_ids) > 0 and not np.isin(inputs.fit_ids, held).any()
    metrics = tokenizer_train.train_tokenizer(cfg)
    # The rows the tokenizer was fit on are exactly the train items' inputs: no held-out item among them.
    x_all = np.concatenate([inputs.modalities[name] for name in inputs.cfg.modalities], axis=1)
    (x_fit,) = seen
    assert np.array_equal(x_fit.numpy(), x_all[inputs.fit_ids])
    assert metrics["n_fit_items"] == len(inputs.fit_ids) <= 300 - len(held)
    # ... and every item, held-out ones included, has a SID.
    sids = pd.read_parquet(paths.sid_dir(metrics["version"]) / "sids.parquet")
    assert np.array_equal(sids["item_id"], np.arange(1, 301)) and sids["item_id"].isin(held).sum() == len(held)


def test_demo_chain_follows_the_protocol() -> None:
    cfg = demo.DemoConfig(protocol=ITEM_COLD)
    stages = dict(demo.stage_commands(cfg))
    ingest = stages["ingest"]
    assert ingest[ingest.index("--protocol") + 1] == ITEM_COLD and ingest.index("--protocol") > ingest.index("--out")
    data = str(Path("artifacts") / "ml-100k-item-cold")
    for name in ("tokenize", "features", "feast", "ranker"):
        argv = stages[name]
        assert argv[argv.index("--dataset") + 1] == data, name
    assert cfg.out == Path("artifacts/demo-item-cold") and demo.DemoConfig().out == Path("artifacts/demo")
    assert demo.DemoConfig().dataset_dir == Path("artifacts/ml-100k")
    # Each protocol publishes into its own store: the item-cold demo never overwrites the temporal one's tables.
    assert demo.DemoConfig().repo == Path("feature_repo") and cfg.repo == Path("artifacts/feature_repo-item-cold")
    assert stages["feast"][stages["feast"].index("--repo") + 1] == str(cfg.repo)


def test_a_store_of_another_protocol_starts_from_the_project_definitions(tmp_path: Path) -> None:
    repo = demo.ensure_feature_repo(tmp_path / "repo")
    assert (repo / "feature_store.yaml").exists() and (repo / "definitions.py").exists()
    assert not (repo / "data").exists()
