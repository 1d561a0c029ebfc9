"""Builders of the small inputs several test modules share: plain functions, no fixtures.

Three families:

- feature-store datasets: random event logs with timestamp ties, a dataset
  folder around them (items, users, meta.json, a random SID version), the
  features built and published into a copy of ``feature_repo``;
- planted-cluster modalities: two noisy linear views of items drawn around
  :data:`PLANTED_CLUSTERS` cluster centres, as arrays with a padding row (the
  modality file layout) or tensors without it (what a tokenizer fits on), and
  the precomputed datasets the tokenizer stages read;
- ranker rows: three hand-written training rows and their feature meta.

Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from features import build as feature_build, publish
from sidrank import contract
from sidrank.contract import DatasetPaths
from sidrank.io import publish_unit, write_json, write_parquet

# --- feature-store datasets -------------------------------------------------------------------

EVENTS_START = pd.Timestamp("2020-01-01", tz="UTC")
# The SID version write_feature_dataset writes (and LATEST names).
TEST_SID_VERSION = "test-v1"
# The repository root and the checked-in test inputs, wherever a test module sits under tests/.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT / "tests" / "fixtures"
FEATURE_REPO = PROJECT_ROOT / "feature_repo"


def seal_unit(folder: Path, names: Sequence[str], built_from: Mapping[str, str] | None = None) -> None:
    """Make files already written into ``folder`` one unit, as the stage that writes them would."""
    with publish_unit(folder, built_from=built_from) as staging:
        for name in names:
            os.replace(folder / name, staging / name)


def seal_dataset(paths: DatasetPaths) -> None:
    """Seal a hand-written dataset folder (those of events, items, users, meta.json it has) as ingest's unit."""
    seal_unit(paths.root, [name for name in contract.DATASET_FILES if (paths.root / name).exists()])


def seal_modalities(paths: DatasetPaths) -> None:
    """Seal hand-written modality files and manifest as a unit built from the dataset."""
    names = [p.name for p in paths.modalities.iterdir() if p.is_file() and p.suffix in (".npy", ".json")]
    seal_unit(paths.modalities, [n for n in names if n != "unit.json"], paths.built_from_dataset())


def seal_sid_version(paths: DatasetPaths, version: str) -> None:
    """Seal a hand-written SID version folder as a unit built from the dataset."""
    folder = paths.sid_dir(version)
    seal_unit(folder, [p.name for p in folder.iterdir() if p.is_file() and p.name != "unit.json"],
              paths.built_from_dataset())


def reseal_dataset_units(paths: DatasetPaths) -> None:
    """Seal a hand-made dataset again after a test edited its files: the dataset, then its modalities and
    every SID version, each built from the new dataset unit."""
    seal_dataset(paths)
    if paths.modality_manifest.exists():
        seal_modalities(paths)
    for folder in sorted(paths.root.glob("sids/*/")):
        seal_sid_version(paths, folder.name)


def random_tied_events(n_users: int, n_items: int, n_events: int, n_times: int, seed: int) -> pd.DataFrame:
    """Unsplit events on ``n_times`` distinct seconds from EVENTS_START, so many share (user, time) and (item, time)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(1, n_users + 1, n_events),
            "item_id": rng.integers(1, n_items + 1, n_events),
            "rating": rng.integers(1, 6, n_events).astype(np.float64),
            "event_timestamp": EVENTS_START + pd.to_timedelta(rng.integers(0, n_times, n_events), unit="s"),
        }
    )
    frame["label"] = (frame["rating"] >= 4).astype(np.int64)
    return frame


def write_feature_dataset(
    root: Path,
    events: pd.DataFrame,
    n_users: int,
    n_items: int,
    *,
    levels: int = 3,
    codebook_size: int = 4,
    seed: int = 0,
    profile_columns: tuple[str, ...] = ("age", "gender", "zip_code"),
) -> DatasetPaths:
    """A dataset folder ``features.build`` accepts: ``events`` (already split) plus matching items,
    users (MovieLens-style profile), meta.json and the random SID version TEST_SID_VERSION."""
    rng = np.random.default_rng(seed)
    paths = DatasetPaths(root)
    tag_pool = ["Action", "Comedy", "Drama", "Horror"]
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1),
            "title": [f"movie {i}" for i in range(1, n_items + 1)],
            "tags": [list(rng.choice(tag_pool, size=rng.integers(0, 3), replace=False)) for _ in range(n_items)],
            "year": rng.choice([0, 1971, 1994, 1995, 1999], size=n_items),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "raw_user_id": [str(u) for u in range(1, n_users + 1)],
            "age": rng.choice(["7", "24", "33", "61", ""], size=n_users),
            "gender": rng.choice(["M", "F"], size=n_users),
            "zip_code": rng.choice(["94110", "94705", "T8H1N"], size=n_users),
        }
    )
    write_parquet(events, paths.events)
    write_parquet(items, paths.items)
    write_parquet(users[["user_id", "raw_user_id", *profile_columns]], paths.users)
    write_json({"n_users": n_users, "n_items": n_items, "user_profile_columns": list(profile_columns)}, paths.meta)
    seal_dataset(paths)
    write_random_sid_version(paths, TEST_SID_VERSION, levels=levels, codebook_size=codebook_size, rng=rng)
    return paths


def write_random_sid_version(
    paths: DatasetPaths, version: str, *, levels: int, codebook_size: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Random SIDs of every item of ``paths`` as ``sids/<version>/``, valid from the first event; LATEST -> it."""
    n_items = int(json.loads(paths.meta.read_text())["n_items"])
    sids = pd.DataFrame({"item_id": np.arange(1, n_items + 1)})
    for level in range(levels):
        sids[f"sid_{level}"] = rng.integers(0, codebook_size, n_items)
    sids["sid_version"] = version
    sids["event_timestamp"] = pd.read_parquet(paths.events, columns=["event_timestamp"]).iloc[:, 0].min()
    sids["created"] = pd.Timestamp.now(tz="UTC")
    write_parquet(sids, paths.sid_dir(version) / "sids.parquet")
    write_json({"levels": levels, "codebook_size": codebook_size}, paths.sid_dir(version) / "config.json")
    seal_sid_version(paths, version)
    (paths.root / "sids" / "LATEST").write_text(version + "\n")
    return sids


def build_features(paths: DatasetPaths) -> contract.FeatureMeta:
    """``features.build`` on the LATEST SID version of ``paths``."""
    return feature_build.build_features(feature_build.FeaturesConfig(dataset=paths.root))


def publish_to_repo_copy(paths: DatasetPaths, repo: Path, *, materialize: bool) -> Path:
    """Build the features, copy feature_repo (without data) to ``repo`` and publish into it; returns ``repo``."""
    build_features(paths)
    shutil.copytree(FEATURE_REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    publish.main(["--dataset", str(paths.root), "--repo", str(repo)] + ([] if materialize else ["--no-materialize"]))
    return repo


def comparable_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Training rows with missing counts as 0 and lists as tuples (None/NaN -> ()), so frames compare with ==."""
    rows = rows.copy()
    for column in (*contract.USER_COUNT_COLUMNS, *contract.ITEM_COUNT_COLUMNS):
        rows[column] = rows[column].fillna(0).astype(np.int64)
    for column in (contract.HIST_ITEMS, *contract.HIST_SID_PREFIXES, contract.ITEM_TAGS, contract.SID_CODES):
        lists = rows[column]
        rows[column] = [tuple(int(v) for v in cell) if isinstance(cell, (list, np.ndarray)) else () for cell in lists]
    return rows


# --- planted-cluster modalities ---------------------------------------------------------------

PLANTED_CLUSTERS = 8
# Modality -> width, in the order the views are drawn.
PLANTED_DIMS = {"text": 32, "tags": 8}


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32."""
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def planted_cluster_views(
    n_items: int = 400, rng: int | np.random.Generator = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two noisy unit-norm linear views (text 32-d, tags 8-d) of latents drawn around 8 cluster centres.

    Args:
        n_items: number of items.
        rng: a seed, or a generator to draw from (and to go on drawing from afterwards).

    Returns:
        Modality -> float32 [n_items + 1, d] with the zero padding row 0 of
        the modality files, and the cluster of each item, [n_items].
    """
    rng = np.random.default_rng(rng)
    clusters = rng.integers(0, PLANTED_CLUSTERS, n_items)
    latent = rng.normal(size=(PLANTED_CLUSTERS, 12))[clusters] * 2 + 0.4 * rng.normal(size=(n_items, 12))
    views = {}
    for name, dim in PLANTED_DIMS.items():
        view = unit_rows(latent @ rng.normal(size=(12, dim)) + 0.5 * rng.normal(size=(n_items, dim)))
        views[name] = np.vstack([np.zeros((1, dim), np.float32), view])
    return views, clusters


def planted_cluster_tensors(n_items: int = 400, seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The views of :func:`planted_cluster_views` as tensors without the padding row, what a tokenizer fits on."""
    views, clusters = planted_cluster_views(n_items, seed)
    return {name: torch.from_numpy(view[1:]) for name, view in views.items()}, clusters


def write_modalities(paths: DatasetPaths, views: dict[str, np.ndarray]) -> None:
    """``views`` (with their padding rows) as the dataset's modality files and manifest."""
    paths.modalities.mkdir(parents=True)
    for name, view in views.items():
        np.save(paths.modality(name), view)
    dims = {name: int(view.shape[1]) for name, view in views.items()}
    manifest = {"names": list(views), "dims": dims, "source": "synthetic"}
    paths.modality_manifest.write_text(json.dumps(manifest))


def write_cluster_items(paths: DatasetPaths, clusters: np.ndarray) -> None:
    """items.parquet of items 1..n with no content but their planted ``cluster`` (the tokenizer's ground truth)."""
    n_items = len(clusters)
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1, dtype=np.int64), "cluster": clusters})
    items["title"], items["tags"], items["year"] = "", [[] for _ in range(n_items)], 0
    items.to_parquet(paths.items, index=False)


def split_by_row_id(row_id: pd.Series) -> np.ndarray:
    """Rows 0..799 train, 800..899 valid, the rest test."""
    return np.where(row_id < 800, "train", np.where(row_id < 900, "valid", "test"))


def write_tokenizer_dataset(
    root: Path, n_items: int = 120, seed: int = 0
) -> tuple[DatasetPaths, dict[str, np.ndarray]]:
    """A dataset ``tokenizer.train`` reads: precomputed planted-cluster modalities and 1000 events.

    Items 101..n_items appear only in valid/test rows (cold); labels alternate.

    Returns:
        The dataset and the modality views written.
    """
    paths = DatasetPaths(root)
    views, clusters = planted_cluster_views(n_items, seed)
    write_modalities(paths, views)
    write_cluster_items(paths, clusters)
    rng = np.random.default_rng(seed)
    warm = rng.integers(1, 101, 800)
    cold = rng.integers(101, n_items + 1, 200)
    events = pd.DataFrame({"item_id": np.concatenate([warm, cold]).astype(np.int64)})
    events["row_id"] = np.arange(len(events), dtype=np.int64)
    events["user_id"] = np.int64(1) + events["row_id"] % 7
    events["label"] = (events["row_id"] % 2).astype(np.int64)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    events["event_timestamp"] = start + pd.to_timedelta(events["row_id"], unit="min")
    events["split"] = split_by_row_id(events["row_id"])
    events.to_parquet(paths.events, index=False)
    paths.meta.write_text(json.dumps({"n_items": n_items, "n_users": 7, "precomputed_modalities": True}))
    seal_dataset(paths)
    seal_modalities(paths)
    return paths, views


def write_click_dataset(root: Path, n_items: int = 120, n_users: int = 20, seed: int = 0) -> DatasetPaths:
    """A dataset ``tokenizer.finetune`` reads: planted-cluster modalities, clicks that depend on the
    cluster, and the Feast-like training rows it would otherwise read from the rows cache.

    Rows 0..799 are train (items 1..100), 800..899 valid, 900..999 test;
    items 101..n_items appear only in valid/test rows. The cached rows are
    ``rows/ranker_v1.parquet``.
    """
    paths = DatasetPaths(root)
    rng = np.random.default_rng(seed)
    views, clusters = planted_cluster_views(n_items, rng)
    write_modalities(paths, views)
    write_cluster_items(paths, clusters)
    item = np.concatenate([rng.integers(1, 101, 800), rng.integers(1, n_items + 1, 200)]).astype(np.int64)
    events = pd.DataFrame({"row_id": np.arange(1000, dtype=np.int64), "item_id": item})
    events["user_id"] = rng.integers(1, n_users + 1, 1000).astype(np.int64)
    liked = clusters[item - 1] < PLANTED_CLUSTERS // 2
    events["label"] = (rng.random(1000) < np.where(liked, 0.85, 0.15)).astype(np.int64)
    events["event_timestamp"] = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(events["row_id"], unit="min")
    events["split"] = split_by_row_id(events["row_id"])
    events.to_parquet(paths.events, index=False)
    rows = events.drop(columns="split")
    for key in ("user", "item"):
        grouped = rows.groupby(f"{key}_id")
        rows[f"{key}_count"] = grouped.cumcount().astype(float).replace(0.0, np.nan)  # NaN: no earlier row
        # Both of a pair come from one behaviour row: missing together.
        rows[f"{key}_pos_count"] = (grouped["label"].cumsum() - rows["label"]).astype(float).where(
            rows[f"{key}_count"].notna()
        )
    (root / "rows").mkdir()
    rows.to_parquet(root / "rows" / "ranker_v1.parquet", index=False)
    paths.meta.write_text(json.dumps({"n_items": n_items, "n_users": n_users, "precomputed_modalities": True}))
    seal_dataset(paths)
    seal_modalities(paths)
    return paths


# --- ranker rows ------------------------------------------------------------------------------

# Table sizes of tiny_rows.
TINY_ROWS_META = contract.FeatureMeta(
    n_users=3, n_items=4, n_tags=5, n_year_buckets=3, sid_levels=3, sid_codebook_size=4,
    sid_version="v1", user_profile={"age_id": 3},
)  # fmt: skip


def tiny_rows() -> pd.DataFrame:
    """Three training rows; item 1 has SID (0, 1, 2), item 2 (3, 3, 3), item 4 (1, 0, 0)."""
    a = np.array
    return pd.DataFrame({
        "row_id": [0, 1, 2], "user_id": [1, 2, 3], "item_id": [1, 2, 4], "label": [1, 0, 1],
        "user_count": [np.nan, 2, 3], "user_pos_count": [np.nan, 1, 1],
        "item_count": [1, 2, 3], "item_pos_count": [0, 1, 2], "year_bucket": [0, 1, 2],
        "tag_ids": [a([1, 2]), None, a([5])],
        "sid_codes": [a([0, 1, 2]), a([3, 3, 3]), a([1, 0, 0])],
        "hist_items": [None, a([1]), a([1, 2])],
        "hist_sid_p1": [None, a([0]), a([0, 3])],
        "hist_sid_p2": [None, a([1]), a([1, 15])],
        "age_id": [1, 2, np.nan], "sid_version": "v1",
    })  # fmt: skip
