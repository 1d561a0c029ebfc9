"""feature_repo/ is a plain Feast repository: static, movable, safe to copy.

The real `feast` CLI runs on copies of the checkout's feature_repo (tracked
files only, no data/), from another working directory: `feast plan` and
`feast apply` need no generated file, `feast ui` answers HTTP, and applying
and materializing one copy leaves another copy's online tables intact. The
publish helpers that keep every SID version in one table are tested on small
tables.
"""

from __future__ import annotations

import ast
import http.client
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from feast import FeatureStore
from builders import (
    FEATURE_REPO,
    TEST_SID_VERSION,
    build_features,
    random_tied_events,
    write_feature_dataset,
    write_random_sid_version,
)

from features import publish
from sidrank import contract
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from ranking.rows import online_features

FEAST_OBJECTS = {"Entity", "FileSource", "FeatureView", "FeatureService", "Project"}
VIEWS = ["item_behaviour_fv", "item_content_fv", "item_sid_fv", "user_behaviour_fv", "user_profile_fv",
         "user_sid_history_fv"]
UI_START_S = 120


class Applied(NamedTuple):
    repo: Path
    plan: str
    apply: str


def checkout_copy(target: Path) -> Path:
    """The repository's tracked files only: what a fresh clone holds, no data/."""
    files = subprocess.run(["git", "ls-files", "feature_repo"], cwd=FEATURE_REPO.parent, capture_output=True,
                           text=True, check=True).stdout.split()
    assert files, "git lists no file under feature_repo"
    for name in files:
        (target / Path(name).relative_to("feature_repo")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FEATURE_REPO.parent / name, target / Path(name).relative_to("feature_repo"))
    assert not (target / "data").exists()
    return target


def feast(repo: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run([publish.feast_executable(), "-c", str(repo), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"feast {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """List cells as tuples, so frames of online reads compare with assert_frame_equal."""
    return frame.apply(lambda column: column.map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v))


def online_tables(repo: Path) -> dict[str, int]:
    """Table -> row count of the repository's sqlite online store."""
    with sqlite3.connect(contract.RepoPaths(repo).online_store) as con:
        names = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: con.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] for name in names}


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> Applied:
    root = tmp_path_factory.mktemp("clean")
    repo = checkout_copy(root / "repo")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    plan = feast(repo, "plan", cwd=elsewhere)
    applied = feast(repo, "apply", cwd=elsewhere)
    assert not any(elsewhere.iterdir()), "feast wrote into the working directory"
    return Applied(repo, plan, applied)


def test_plan_and_apply_work_on_a_clean_checkout(applied: Applied) -> None:
    for view in VIEWS:
        assert f"Created feature view {view}" in applied.plan
    assert "Created feature service ranker_v1" in applied.plan
    store = FeatureStore(repo_path=str(applied.repo))
    assert sorted(v.name for v in store.list_feature_views()) == VIEWS
    assert [s.name for s in store.list_feature_services()] == [contract.FEATURE_SERVICE]
    assert sorted(online_tables(applied.repo)) == [f"sidrank_{view}" for view in VIEWS]
    # What the publish step and the ranker rely on.
    assert store.get_feature_view("item_sid_fv").join_keys == ["item_id", contract.SID_VERSION]
    assert store.get_feature_view("user_sid_history_fv").join_keys == ["user_id", contract.SID_VERSION]
    profile = [f.name for f in store.get_feature_view("user_profile_fv").features]
    assert profile == list(contract.USER_PROFILE_FEATURES)
    described = [*store.list_entities(), *store.list_data_sources(), *store.list_feature_views(),
                 *store.list_feature_services()]
    assert len(described) == 3 + 6 + 6 + 1 and all(obj.description for obj in described)
    # The registry records no database path (features/online_store.py): nothing to tear down elsewhere.
    assert not store.registry.get_infra(store.project).infra_objects


def test_definitions_are_plain_declarations() -> None:
    """Every Feast object is a module attribute named as the object, built from literals."""
    tree = ast.parse((FEATURE_REPO / "definitions.py").read_text())
    declared = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            kind = getattr(node.value.func, "id", None)
            if kind in FEAST_OBJECTS:
                keywords = {k.arg: k.value for k in node.value.keywords}
                assert isinstance(keywords.get("name"), ast.Constant), f"{kind} without a literal name="
                assert kind == "Project" or "description" in keywords, f"{keywords['name'].value}: no description="
                target = node.targets[0].id
                assert kind == "Project" or target == keywords["name"].value, target
                declared.append(target)
    assert len(declared) == 1 + 3 + 6 + 6 + 1
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
    }
    assert not names & {"globals", "open", "read_text", "json", "Path"}


def test_feast_ui_answers_http(applied: Applied, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen([publish.feast_executable(), "-c", str(applied.repo), "ui", "-h", "127.0.0.1",
                           "-p", str(port)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline, answer = time.monotonic() + UI_START_S, None
        while answer is None and time.monotonic() < deadline and ui.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/projects-list.json")
                response = conn.getresponse()
                answer = (response.status, response.read().decode())
            except OSError:
                time.sleep(1)
        assert answer is not None, f"feast ui did not answer in {UI_START_S} s:\n{(tmp_path / 'ui.log').read_text()}"
        assert answer[0] == 200 and '"id":"sidrank"' in answer[1].replace(" ", ""), answer
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
        log.close()


def test_applying_one_copy_never_touches_another_copys_online_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = assign_protocol_split(random_tied_events(6, 8, n_events=60, n_times=6, seed=5), "copies events")
    paths = write_feature_dataset(tmp_path / "data", events, 6, 8)
    build_features(paths)
    original = checkout_copy(tmp_path / "original")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must resolve against each repository, not here
    publish.main(["--dataset", str(paths.root), "--repo", str(original)])
    before, read_before = online_tables(original), online_features(original, 1, [1, 2, 3])
    assert before and all(before.values())
    # A copy with everything, registry.db and online_store.db included, then another SID version published there.
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    write_random_sid_version(paths, "other-v2", levels=2, codebook_size=5, rng=np.random.default_rng(1))
    build_features(paths)
    publish.main(["--dataset", str(paths.root), "--repo", str(copy)])

    assert online_tables(original) == before
    read_after = online_features(original, 1, [1, 2, 3])
    pd.testing.assert_frame_equal(comparable(read_after), comparable(read_before))
    assert {len(codes) for codes in read_after[contract.SID_CODES]} == {3}
    assert contract.RepoPaths(original).read_sid_registry()["default"] == TEST_SID_VERSION
    # The copy serves both versions, the new one by default.
    assert {len(codes) for codes in online_features(copy, 1, [1, 2, 3])[contract.SID_CODES]} == {2}
    old = online_features(copy, 1, [1, 2, 3], sid_version=TEST_SID_VERSION)
    assert [list(c) for c in old[contract.SID_CODES]] == [list(c) for c in read_before[contract.SID_CODES]]
    assert not any(elsewhere.iterdir())


def _sid_table(path: Path, item_ids: list[int], version: str | None, code: int) -> Path:
    columns = {"item_id": item_ids, "event_timestamp": pd.Timestamp("2020-01-01", tz="UTC"),
               "sid_codes": [[code, code] for _ in item_ids]}
    if version is not None:
        columns["sid_version"] = version
    pd.DataFrame(columns).to_parquet(path)
    return path


def test_publishing_a_version_replaces_its_rows_and_keeps_the_others(tmp_path: Path) -> None:
    target = tmp_path / "item_sids.parquet"

    def merge(source: Path, version: str, keep: set[str]) -> set[str]:
        staged = tmp_path / "staged.parquet"
        kept = publish.merge_version_rows(source, target, staged, version, keep)
        staged.replace(target)
        return kept

    assert merge(_sid_table(tmp_path / "a.parquet", [1, 2], "a", 1), "a", {"a"}) == set()
    assert merge(_sid_table(tmp_path / "b.parquet", [1, 2, 3], None, 2), "b", {"a", "b"}) == {"a"}
    merge(_sid_table(tmp_path / "a2.parquet", [1], "a", 3), "a", {"a", "b"})
    rows = pd.read_parquet(target).sort_values(["sid_version", "item_id"])
    assert list(zip(rows["sid_version"], rows["item_id"], rows["sid_codes"].map(list))) == [
        ("a", 1, [3, 3]), ("b", 1, [2, 2]), ("b", 2, [2, 2]), ("b", 3, [2, 2])
    ]
    # A version dropped from the registry loses its rows.
    merge(_sid_table(tmp_path / "c.parquet", [5], "c", 4), "c", {"c"})
    assert pd.read_parquet(target)["sid_version"].tolist() == ["c"]
    with pytest.raises(DataError, match="column 'sid_version' holds \\['x'\\], the feature meta says 'c'"):
        merge(_sid_table(tmp_path / "x.parquet", [1], "x", 0), "c", {"c"})


def test_profile_columns_are_the_declared_ones(tmp_path: Path) -> None:
    stamp = pd.Timestamp("1970-01-01", tz="UTC")
    table = pa.table({"user_id": [1, 2], "event_timestamp": [stamp, stamp], "age_id": [3, 0]})
    conformed = publish.conform_profile(table, tmp_path)
    assert conformed.column_names == ["user_id", "event_timestamp", *contract.USER_PROFILE_FEATURES]
    assert conformed.column("age_id").to_pylist() == [3, 0] and conformed.column("zip_code_id").to_pylist() == [0, 0]
    with pytest.raises(DataError, match=r"profile column\(s\) \['country_id'\] are not declared"):
        publish.conform_profile(table.append_column("country_id", pa.array([1, 1])), tmp_path)


def test_cli_help_names_the_command_and_every_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        publish.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m features.publish")
    for shown in ("(required)", "(default: feature_repo)", "(default: True)"):
        assert shown in text
    assert text.count("(default:") == 3
