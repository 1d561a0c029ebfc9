"""features.publish: the repository's data folder is one unit, a materialize that would roll the online
store back to older values is refused (Feast's sqlite store keeps the last write, not the newest), and each
upstream unit is hashed once per publish, build or read."""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from builders import build_features, publish_to_repo_copy, random_tied_events, write_feature_dataset

from features import publish
from sidrank import contract
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
def published_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetPaths, Path]:
    """A dataset published and materialized into a repository copy: built once (Feast takes ~30 s), never mutated."""
    root = tmp_path_factory.mktemp("publish")
    paths = dataset(root / "late", n_times=50)
    return paths, publish_to_repo_copy(paths, root / "repo", materialize=True)


@pytest.fixture
def published(published_once: tuple[DatasetPaths, Path], tmp_path: Path) -> tuple[DatasetPaths, Path]:
    """This test's own copy of the published dataset and repository, so tests that damage them stay independent
    (units record relative names and content digests, the repository relative paths: a copy is as valid)."""
    paths, repo = published_once
    return DatasetPaths(shutil.copytree(paths.root, tmp_path / "late")), shutil.copytree(repo, tmp_path / "repo")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_materialize_ending_before_the_online_store_is_refused_before_anything_is_written(
    published: tuple[DatasetPaths, Path], tmp_path: Path
) -> None:
    _, repo = published
    data = RepoPaths(repo)
    recorded = json.loads(data.materialized.read_text())
    assert pd.Timestamp(recorded["end"]) == publish.stamp_range(repo)[1]
    before = snapshot(repo)
    earlier = dataset(tmp_path / "early", n_times=5)
    message = f"materialized.json: the online store holds values materialized up to {recorded['end']};"
    with pytest.raises(DataError, match=re.escape(message) + rf".*older values over newer ones.*feast -c {repo} teardown"):
        publish.main(["--dataset", str(earlier.root), "--repo", str(repo)])
    assert snapshot(repo) == before  # nothing copied, nothing applied, no staging folder left


def test_features_replaced_by_an_older_window_during_a_publish_are_refused_before_the_repository_changes(
    published: tuple[DatasetPaths, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window is checked on the tables being published, not on a look at the features taken earlier:
    a features.build of an older window finishing while publish runs (simulated once the features unit
    has been checked) is refused before the data folder is replaced or `feast apply` runs."""
    paths, repo = published
    earlier = dataset(tmp_path / "early", n_times=5)
    read_registry = publish.published_registry

    def registry_after_a_rebuild(repo_paths: RepoPaths) -> dict:
        shutil.rmtree(paths.features)
        shutil.copytree(earlier.features, paths.features)
        return read_registry(repo_paths)

    monkeypatch.setattr(publish, "published_registry", registry_after_a_rebuild)
    before = snapshot(repo)
    with pytest.raises(DataError, match=r"materialized\.json: the online store holds values materialized up to"):
        publish.main(["--dataset", str(paths.root), "--repo", str(repo)])
    assert snapshot(repo) == before


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
    with pytest.raises(DataError, match=r"item_behaviour\.parquet: missing or changed.*features\.build"):
        publish.main(["--dataset", str(paths.root), "--repo", str(repo), "--no-materialize"])


@pytest.fixture
def unit_checks(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Folder -> how often a unit was checked (hashed) through sidrank.contract, counted from now on."""
    checks: collections.Counter = collections.Counter()
    check = contract.require_complete_unit

    def counted(folder, *args, **kwargs):
        checks[Path(folder)] += 1
        return check(folder, *args, **kwargs)

    monkeypatch.setattr(contract, "require_complete_unit", counted)
    return checks


def test_each_unit_is_hashed_once_per_publish_build_and_read(
    published: tuple[DatasetPaths, Path], unit_checks: collections.Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing costs time in proportion to the data: each operation checks each unit it reads once."""
    paths, repo = published
    sids = paths.sid_dir(paths.resolve_sid_version(contract.LATEST))
    paths.require_features()
    assert unit_checks == {paths.features: 1, paths.root: 1, sids: 1}

    unit_checks.clear()
    monkeypatch.setattr(publish, "run_feast", lambda *args: "")  # the Feast CLI is not under test here
    publish.main(["--dataset", str(paths.root), "--repo", str(repo), "--no-materialize"])
    assert unit_checks == {paths.features: 1, paths.root: 1, sids: 1, RepoPaths(repo).data: 1}

    unit_checks.clear()
    build_features(paths)
    assert unit_checks == {paths.root: 1, sids: 1}

    unit_checks.clear()
    RepoPaths(repo).feature_meta()
    assert unit_checks == {RepoPaths(repo).data: 1}


def test_a_features_unit_replaced_between_two_reads_is_checked_again(published: tuple[DatasetPaths, Path]) -> None:
    """Nothing is remembered across calls: a long-running reader sees the unit as it is now."""
    paths, _ = published
    paths.require_features()
    (paths.features / "item_behaviour.parquet").write_bytes(b"another file")
    with pytest.raises(DataError, match=r"item_behaviour\.parquet: missing or changed"):
        paths.require_features()
