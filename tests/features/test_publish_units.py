"""features.publish: the repository's data folder is one unit, and a materialize that would roll the
online store back to older values is refused (Feast's sqlite store keeps the last write, not the newest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from builders import build_features, publish_to_repo_copy, random_tied_events, write_feature_dataset

from features import publish
from sidrank.contract import DatasetPaths, RepoPaths
from sidrank.io import UNIT_MANIFEST
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError

N_USERS, N_ITEMS = 6, 8


def dataset(root: Path, n_times: int) -> DatasetPaths:
    """A feature dataset whose events span ``n_times`` seconds (so its stamps end later for larger ones)."""
    events = random_tied_events(N_USERS, N_ITEMS, n_events=80, n_times=n_times, seed=n_times)
    paths = write_feature_dataset(root, assign_protocol_split(events, f"events of {root.name}"), N_USERS, N_ITEMS)
    build_features(paths)
    return paths


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetPaths, Path]:
    root = tmp_path_factory.mktemp("publish")
    paths = dataset(root / "late", n_times=50)
    return paths, publish_to_repo_copy(paths, root / "repo", materialize=True)


def test_a_materialize_ending_before_the_online_store_is_refused_before_anything_is_written(
    published: tuple[DatasetPaths, Path], tmp_path: Path
) -> None:
    _, repo = published
    data = RepoPaths(repo)
    recorded = json.loads(data.materialized.read_text())
    assert pd.Timestamp(recorded["end"]) == publish.stamp_range(repo)[1]
    before = (data.data / UNIT_MANIFEST).read_text()
    earlier = dataset(tmp_path / "early", n_times=5)
    message = f"materialized.json: the online store holds values materialized up to {recorded['end']};"
    with pytest.raises(DataError, match=re.escape(message) + rf".*older values over newer ones.*feast -c {repo} teardown"):
        publish.main(["--dataset", str(earlier.root), "--repo", str(repo)])
    assert (data.data / UNIT_MANIFEST).read_text() == before  # nothing copied, nothing applied


def test_an_incomplete_data_unit_is_refused_by_readers_and_the_next_publish_starts_over(
    published: tuple[DatasetPaths, Path], caplog: pytest.LogCaptureFixture
) -> None:
    paths, repo = published
    (repo / "data" / UNIT_MANIFEST).unlink()  # what a publish killed while moving its files leaves
    with pytest.raises(DataError, match=rf"{repo / 'data'}: incomplete or missing.*python -m features\.publish"):
        RepoPaths(repo).feature_meta()
    publish.main(["--dataset", str(paths.root), "--repo", str(repo), "--no-materialize"])
    assert "publishing this version alone" in caplog.text
    assert RepoPaths(repo).feature_meta().n_items == N_ITEMS


def test_incomplete_features_are_not_published(published: tuple[DatasetPaths, Path]) -> None:
    paths, repo = published
    (paths.features / "item_behaviour.parquet").write_bytes(b"half a file")
    try:
        with pytest.raises(DataError, match=r"item_behaviour\.parquet: missing or changed.*features\.build"):
            publish.main(["--dataset", str(paths.root), "--repo", str(repo), "--no-materialize"])
    finally:
        build_features(paths)
