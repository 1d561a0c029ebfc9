"""Synthetic generator: contracts, planted structure, determinism, scale."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ingest.dataset import write_dataset
from ingest.cli import main
from sidrank.schema import validate_modality
from sidrank.contract import DatasetPaths
from ingest.synthetic import MODALITY_DIMS, SyntheticConfig, generate, user_favourites

CONFIG = SyntheticConfig(n_items=1500, n_events=60_000, n_users=400, seed=3)


@pytest.fixture(scope="module")
def dataset():
    return generate(CONFIG)


def _window_start(config: SyntheticConfig) -> pd.Timestamp:
    return pd.Timestamp(config.start, tz="UTC") + pd.Timedelta(days=(1 - config.late_window) * config.days)


def _nearest_centroid_accuracy(matrix: np.ndarray, cluster: np.ndarray) -> float:
    centroids = np.stack([matrix[cluster == c].mean(axis=0) for c in np.unique(cluster)])
    return float(((matrix @ centroids.T).argmax(axis=1) == cluster).mean())


def test_tables_shapes_and_dtypes(dataset):
    events, items, users = dataset.events, dataset.items, dataset.users
    assert len(events) == CONFIG.n_events and len(items) == CONFIG.n_items and len(users) == CONFIG.n_users
    assert events[["user_id", "item_id", "label"]].dtypes.eq(np.int64).all()
    assert events["rating"].dtype == np.float64 and np.array_equal(events["rating"], events["label"].astype(float))
    assert str(events["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert events["user_id"].between(1, CONFIG.n_users).all() and events["item_id"].between(1, CONFIG.n_items).all()
    assert list(items.columns) == ["item_id", "raw_item_id", "title", "tags", "year", "cluster", "late"]
    assert items["cluster"].dtype == np.int64 and items["late"].dtype == bool
    assert items["cluster"].between(0, CONFIG.n_clusters - 1).all() and int(items["late"].sum()) == CONFIG.n_late
    assert list(users.columns) == ["user_id", "raw_user_id", "segment"] and users["segment"].map(type).eq(str).all()
    span = events["event_timestamp"].max() - events["event_timestamp"].min()
    assert pd.Timedelta(days=CONFIG.days - 1) < span <= pd.Timedelta(days=CONFIG.days)


def test_modalities_are_unit_rows_that_carry_the_cluster_complementarily(dataset):
    cluster = dataset.items["cluster"].to_numpy()
    accuracy = {}
    for name, dim in MODALITY_DIMS.items():
        matrix = dataset.modalities[name]
        assert matrix.shape == (CONFIG.n_items + 1, dim) and matrix.dtype == np.float32
        validate_modality(name, matrix, CONFIG.n_items, "synthetic")  # row 0 zeros, unit rows, finite
        accuracy[name] = _nearest_centroid_accuracy(matrix[1:], cluster)
        assert 0.4 < accuracy[name] < 0.97, (name, accuracy[name])  # carries the cluster, not perfectly
    both = np.concatenate([dataset.modalities[name][1:] for name in MODALITY_DIMS], axis=1)
    assert _nearest_centroid_accuracy(both, cluster) > max(accuracy.values()) + 0.05


def test_late_items_only_appear_in_the_late_window(dataset):
    events, late = dataset.events, dataset.items["late"].to_numpy()
    on_late = late[events["item_id"].to_numpy() - 1]
    assert on_late.sum() > 0
    assert events.loc[on_late, "event_timestamp"].min() >= _window_start(CONFIG)
    assert events.loc[~on_late, "event_timestamp"].min() < _window_start(CONFIG)


def test_clicks_depend_on_cluster_affinity(dataset):
    favourites = user_favourites(CONFIG)
    assert favourites.shape == (CONFIG.n_users, CONFIG.favourites)
    assert all(len(set(row)) == CONFIG.favourites for row in favourites[:50].tolist())
    cluster = dataset.items["cluster"].to_numpy()
    events = dataset.events
    on_favourite = (favourites[events["user_id"] - 1] == cluster[events["item_id"] - 1][:, None]).any(axis=1)
    ctr_favourite, ctr_other = events["label"][on_favourite].mean(), events["label"][~on_favourite].mean()
    assert ctr_favourite > ctr_other + 0.3, (ctr_favourite, ctr_other)
    expected = favourites[:, 0] * CONFIG.n_segments // CONFIG.n_clusters
    assert dataset.users["segment"].tolist() == [f"s{s}" for s in expected]


def test_same_seed_same_data_other_seed_other_data(dataset):
    again = generate(CONFIG)
    pd.testing.assert_frame_equal(again.events, dataset.events)
    pd.testing.assert_frame_equal(again.items, dataset.items)
    assert all(np.array_equal(again.modalities[k], dataset.modalities[k]) for k in MODALITY_DIMS)
    other = generate(SyntheticConfig(n_items=1500, n_events=60_000, n_users=400, seed=4))
    assert not np.array_equal(other.events["item_id"], dataset.events["item_id"])


@pytest.mark.parametrize(
    "overrides",
    [{"favourites": 20}, {"late_fraction": 1.0}, {"n_items": 0}, {"late_window": 0.0}, {"view_noise": -1.0}],
)
def test_config_rejects_bad_values(overrides):
    settings = {"n_items": 10, "n_events": 10, "n_users": 2, **overrides}
    with pytest.raises(ValueError, match=next(iter(overrides))):
        SyntheticConfig(**settings)


def test_written_dataset_puts_late_items_out_of_train(dataset, tmp_path):
    meta = write_dataset(dataset, tmp_path)
    events = pd.read_parquet(DatasetPaths(tmp_path / "synthetic").events)
    late = dataset.items["late"].to_numpy()[events["item_id"].to_numpy() - 1]
    train_late = late[events["split"].to_numpy() == "train"].mean()
    test_late = late[events["split"].to_numpy() == "test"].mean()
    assert train_late < 0.01 and test_late > 0.1, (train_late, test_late)
    assert meta["precomputed_modalities"] is True and meta["user_profile_columns"] == ["segment"]


def test_cli_moderately_large_run(tmp_path):
    meta = main(["synthetic", "--items", "100000", "--events", "1000000", "--users", "20000", "--seed", "1",
                 "--clusters", "64", "--out", str(tmp_path), "--name", "syn"])  # fmt: skip
    paths = DatasetPaths(tmp_path / "syn")
    assert (meta["n_items"], meta["n_events"], meta["n_users"]) == (100_000, 1_000_000, 20_000)
    assert sum(meta["split_rows"].values()) == 1_000_000
    manifest = json.loads((paths.modalities / "manifest.json").read_text())
    assert manifest == {"names": ["text", "tags"], "dims": {"text": 64, "tags": 16}, "source": "synthetic"}
    text = np.load(paths.modality("text"), mmap_mode="r")
    assert text.shape == (100_001, 64) and text.dtype == np.float32
    items = pd.read_parquet(paths.items, columns=["cluster"])
    assert items["cluster"].nunique() == 64
    assert meta["source"]["config"]["n_clusters"] == 64
