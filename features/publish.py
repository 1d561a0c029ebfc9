"""Publish a dataset's feature tables into the Feast repository, one SID version at a time.

    python -m features.publish --dataset artifacts/ml-100k [--repo feature_repo] [--no-materialize] [--no-set-default]

For the SID version V of ``<dataset>/features/feature_meta.json`` it writes
the files ``feature_repo/definitions.py`` reads (``sidrank.contract.RepoPaths``
names each) and then runs the real Feast CLI:

- ``data/{user_behaviour,item_behaviour,item_content}.parquet``: copies;
- ``data/user_profile.parquet``: the profile columns the repository declares
  (``contract.USER_PROFILE_FEATURES``), 0 (unknown) for those the dataset lacks;
- ``data/item_sids.parquet``, ``data/user_sid_history.parquet``: V's rows
  replaced, every other published version's rows kept, keyed by ``sid_version``;
- ``data/feature_meta/<name>.json`` (and ``data/feature_meta.json`` when V
  becomes the default) and, last, ``data/sid_versions.json``;
- ``feast -c <repo> apply`` and
  ``feast -c <repo> materialize <earliest stamp> <latest stamp + 1 s>``.

SID versions: the one feature service ``ranker_v1`` serves every published
version; a request names its version through the ``sid_version`` key, so
publishing a version never hides an older one. The default version (the
last published unless ``--no-set-default``) is what a request without a
version gets. Versions published from other events are dropped, rows
included: their history prefixes would not match the new counts.

The data folder's files are one unit (:func:`sidrank.io.publish_unit`): a
killed or failing publish leaves the old unit or one readers refuse (and the
next publish starts over); a failing Feast step raises with the CLI's
stderr. Materialize covers every stamp: a first ``materialize-incremental``
of a view with ttl 0 starts a year before now and would miss older events.

Rollback guard: Feast's sqlite online store upserts without comparing event
times, so materializing a window that ends earlier than an earlier one puts
older values over newer ones. ``data/materialized.json`` records the window
materialized so far; a publish whose window would end before it is refused
before anything in the repository changes (:func:`check_materialize_window`,
run on the staged tables, the ones a materialize would read).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.build import SHARED_TABLES
from sidrank import contract
from sidrank.cli import run_main
from sidrank.contract import DatasetPaths, RepoPaths
from sidrank.io import publish_unit, read_json, write_json
from sidrank.schema import DataError

log = logging.getLogger(__name__)

PROG = "python -m features.publish"
# Copied as they are; user_profile is conformed to the declared profile columns.
COPIED_TABLES = tuple(table for table in SHARED_TABLES if table != "user_profile")
# Rows per batch when rewriting a SID-version table: bounds memory at 10M+ events.
BATCH_ROWS = 1_000_000


@dataclass
class PublishConfig:
    """Configuration of the publish step.

    Args:
        dataset: dataset folder whose ``features/`` were written by ``features.build``.
        repo: the Feast repository (holds ``feature_store.yaml``).
        materialize: also fill the online store.
        set_default: make this SID version the repository's default (what a
            request without a version gets, and ``data/feature_meta.json``);
            otherwise only add it.
    """

    dataset: Path
    repo: Path = Path("feature_repo")
    materialize: bool = True
    set_default: bool = True

    def __post_init__(self) -> None:
        self.dataset, self.repo = Path(self.dataset), Path(self.repo)
        if not (self.repo / "feature_store.yaml").is_file():
            raise ValueError(f"repo={self.repo}: no feature_store.yaml there; pass the Feast repository folder")


def feast_executable() -> str:
    """The `feast` CLI installed beside this interpreter (the venv's, not one on PATH)."""
    candidate = Path(sys.executable).parent / "feast"
    if not candidate.exists():
        raise DataError(f"{candidate}: not found; install requirements.txt into this environment (`make venv`)")
    return str(candidate)


def run_feast(repo: Path, *args: str) -> str:
    """Run ``feast -c <repo> <args>`` and return its stdout; raise with its stderr on failure."""
    command = [feast_executable(), "-c", str(repo), *args]
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {done.returncode}:\n{done.stderr.strip()}")
    return done.stdout


def updated_registry(registry: dict, meta: dict, source: Path, *, set_default: bool) -> dict:
    """The registry with the version of ``meta`` (a feature_meta.json) added.

    Versions from other events are dropped; a different version with the same
    file name is an error (its feature meta would overwrite this one's).
    """
    version = str(meta["sid_version"])
    name = contract.sid_version_name(version)
    versions = {}
    for other, entry in registry["versions"].items():
        if entry.get("events_sha256") != meta.get("events_sha256", ""):
            log.warning("dropping SID version %s from the registry: it was published from other events", other)
            continue
        if other != version and entry["name"] == name:
            raise DataError(
                f"{source}: column 'sid_version' '{version}' has the file name '{name}' of the published "
                f"version '{other}'; rename one tokenizer version"
            )
        versions[other] = entry
    versions[version] = {
        "name": name,
        "sid_levels": int(meta["sid_levels"]),
        "sid_codebook_size": int(meta["sid_codebook_size"]),
        "events_sha256": meta.get("events_sha256", ""),
        "published": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    default = version if set_default or registry["default"] not in versions else registry["default"]
    return {"default": default, "versions": dict(sorted(versions.items()))}


def conform_profile(table: pa.Table, source: Path) -> pa.Table:
    """``user_id``, ``event_timestamp`` and every declared profile feature (0 = unknown where absent).

    Raises:
        DataError: a profile column the repository does not declare (the
            ranker would ask for a feature the service does not serve).
    """
    keys = ["user_id", "event_timestamp"]
    undeclared = sorted(set(table.column_names) - set(keys) - set(contract.USER_PROFILE_FEATURES))
    if undeclared:
        raise DataError(
            f"{source}: profile column(s) {undeclared} are not declared in the Feast repository (declared: "
            f"{list(contract.USER_PROFILE_FEATURES)}); add a Field to user_profile_fv in definitions.py and to "
            f"sidrank.contract.USER_PROFILE_FEATURES"
        )
    zeros = pa.array(np.zeros(len(table), np.int64))
    columns = {name: table.column(name) for name in keys}
    for name in contract.USER_PROFILE_FEATURES:
        columns[name] = table.column(name).cast(pa.int64()) if name in table.column_names else zeros
    return pa.table(columns)


def _version_batches(source: Path, version: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and record batches of one version's table, its ``sid_version`` column set to ``version``."""
    file = pq.ParquetFile(source)
    names = [name for name in file.schema_arrow.names if name != contract.SID_VERSION]
    schema = pa.schema([*(file.schema_arrow.field(n) for n in names), pa.field(contract.SID_VERSION, pa.string())])

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in file.iter_batches(BATCH_ROWS):
            if contract.SID_VERSION in batch.schema.names:
                found = pc.unique(batch.column(contract.SID_VERSION)).to_pylist()
                if found != [version]:
                    raise DataError(
                        f"{source}: column '{contract.SID_VERSION}' holds {found[:3]}, the feature meta says "
                        f"'{version}'; re-run `python -m features.build`"
                    )
            columns = [batch.column(n) for n in names] + [pa.array([version] * len(batch), pa.string())]
            yield pa.RecordBatch.from_arrays(columns, schema=schema)

    return schema, batches()


def merge_version_rows(source: Path, published: Path, target: Path, version: str, keep: set[str]) -> set[str]:
    """Write ``target``: the rows of ``published`` of the versions in ``keep`` (other than ``version``) plus ``source``'s.

    Streams batch by batch. Returns the versions whose rows were kept, so a
    registered version without rows (its table deleted by hand) is dropped
    from the registry rather than served empty.
    """
    schema, new_batches = _version_batches(source, version)
    keep = set(keep) - {version}
    kept: set[str] = set()
    with pq.ParquetWriter(target, schema) as writer:
        if published.exists() and keep:
            old = pq.ParquetFile(published)
            if contract.SID_VERSION not in old.schema_arrow.names:
                raise DataError(
                    f"{published}: no '{contract.SID_VERSION}' column; delete {published.parent} and republish"
                )
            for batch in old.iter_batches(BATCH_ROWS, columns=schema.names):
                rows = pa.Table.from_batches([batch]).filter(
                    pc.is_in(batch.column(contract.SID_VERSION), value_set=pa.array(sorted(keep), pa.string()))
                )
                if len(rows):
                    kept |= set(pc.unique(rows.column(contract.SID_VERSION)).to_pylist())
                    writer.write_table(rows.cast(schema))
        for batch in new_batches:
            writer.write_batch(batch)
    return kept


def published_registry(paths: RepoPaths) -> dict:
    """The registry of the repository's complete data unit; empty when nothing is published.

    A data folder a killed publish left incomplete is not merged into: the
    versions it held are dropped (with a warning) and this publish starts over.
    """
    try:
        return paths.read_sid_registry()
    except DataError as exc:
        log.warning("%s; publishing this version alone", exc)
        return {"default": None, "versions": {}}


def copy_tables(dataset: DatasetPaths, repo: Path, *, set_default: bool = True, check_window: bool = False) -> dict:
    """Write one SID version's tables and meta into the repository's data folder and register it.

    The data folder's files are one unit (:func:`sidrank.io.publish_unit`):
    tables, feature metas and the registry appear together or not at all.
    The feature unit is checked once (:meth:`DatasetPaths.require_features`).

    Args:
        check_window: refuse tables whose stamps end before the window the
            online store holds (:func:`check_materialize_window`), checked on
            the staged tables, so the refusal leaves the data folder as it was.

    Returns:
        The updated registry (also written to ``data/sid_versions.json``).
    """
    paths = RepoPaths(repo)
    features = dataset.features
    dataset.require_features()
    meta_path = dataset.feature_meta
    meta = read_json(meta_path)
    version = str(meta["sid_version"])
    registry = updated_registry(published_registry(paths), meta, meta_path, set_default=set_default)
    with publish_unit(paths.data) as staging:

        def staged(path: Path) -> Path:
            (staging / path.relative_to(paths.data)).parent.mkdir(parents=True, exist_ok=True)
            return staging / path.relative_to(paths.data)

        for table in COPIED_TABLES:
            shutil.copyfile(features / f"{table}.parquet", staged(paths.table(table)))
        profile = features / "user_profile.parquet"
        pq.write_table(conform_profile(pq.read_table(profile), profile), staged(paths.table("user_profile")))
        present = set(registry["versions"])
        for table in contract.SID_VERSION_TABLES:
            kept = merge_version_rows(features / f"{table}.parquet", paths.table(table), staged(paths.table(table)),
                                      version, set(registry["versions"]))
            present &= kept | {version}
        for lost in sorted(set(registry["versions"]) - present):
            log.warning("dropping SID version %s from the registry: its rows are not in %s; republish it", lost,
                        paths.data)
            del registry["versions"][lost]
        if registry["default"] not in registry["versions"]:
            registry["default"] = version
        for other in registry["versions"]:
            source = meta_path if other == version else paths.feature_meta_path(other)
            shutil.copyfile(source, staged(paths.feature_meta_path(other)))
        shutil.copyfile(staged(paths.feature_meta_path(registry["default"])), staged(paths.default_feature_meta_path))
        write_json(registry, staged(paths.sid_registry))
        if check_window:
            # Exactly the tables a materialize after this publish reads: the new version's and those kept.
            check_materialize_window(paths, tables_stamp_range([staged(t) for t in published_tables(repo)])[1])
    log.info("SID versions %s, default %s", sorted(registry["versions"]), registry["default"])
    return registry


def published_tables(repo: Path) -> list[Path]:
    """Every parquet file the repository's views read."""
    paths = RepoPaths(repo)
    return [paths.table(t) for t in (*SHARED_TABLES, *contract.SID_VERSION_TABLES)]


def stamp_range(repo: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Earliest stamp and latest stamp + 1 s over all published tables (every SID version)."""
    return tables_stamp_range(published_tables(repo))


def tables_stamp_range(tables: list[Path]) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Earliest stamp and latest stamp + 1 s over ``tables``."""
    stamps = [pq.read_table(path, columns=["event_timestamp"]).column(0) for path in tables]
    start = min(pd.Timestamp(pc.min(s).as_py()) for s in stamps)
    end = max(pd.Timestamp(pc.max(s).as_py()) for s in stamps)
    return start, end + pd.Timedelta(seconds=1)


def check_materialize_window(paths: RepoPaths, end: pd.Timestamp) -> None:
    """Refuse a materialize window ending before the one ``paths.materialized`` records.

    Raises:
        DataError: naming the record, both ends and how to start the online
            store over.
    """
    if not paths.materialized.exists():
        return
    recorded = pd.Timestamp(read_json(paths.materialized)["end"])
    if end < recorded:
        raise DataError(
            f"{paths.materialized}: the online store holds values materialized up to {recorded.isoformat()}; "
            f"materializing up to {end.isoformat()} would put older values over newer ones (Feast's sqlite store "
            f"keeps the last write, not the newest). Publish features that reach {recorded.isoformat()}, publish "
            f"with --no-materialize, or start the online store over: `feast -c {paths.repo} teardown`, delete "
            f"{paths.materialized}, then publish again"
        )


def record_materialized(paths: RepoPaths, start: pd.Timestamp, end: pd.Timestamp) -> None:
    """Widen the recorded window by a materialize of [start, end) that succeeded."""
    if paths.materialized.exists():
        recorded = read_json(paths.materialized)
        start, end = min(start, pd.Timestamp(recorded["start"])), max(end, pd.Timestamp(recorded["end"]))
    write_json({"start": start.isoformat(), "end": end.isoformat()}, paths.materialized)


def publish(config: PublishConfig) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """Write the tables, ``feast apply`` and (unless disabled) ``feast materialize`` all stamps.

    Raises:
        DataError: the features are incomplete or stale, or (with
            materialize) their window ends before the online store's
            (:func:`check_materialize_window`); the repository is left as
            it was then.

    Returns:
        The materialized (start, end) range, or None without materialization.
    """
    paths = RepoPaths(config.repo)
    copy_tables(DatasetPaths(config.dataset), config.repo, set_default=config.set_default,
                check_window=config.materialize)
    log.info("%s", run_feast(config.repo, "apply").strip())
    if not config.materialize:
        return None
    start, end = stamp_range(config.repo)
    log.info("%s", run_feast(config.repo, "materialize", start.isoformat(), end.isoformat()).strip())
    record_materialized(paths, start, end)
    return start, end


def arg_parser() -> argparse.ArgumentParser:
    """The CLI; every option's help shows its default."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset", type=Path, required=True,
        help="dataset folder whose features/ were written by `python -m features.build` (required)",
    )
    parser.add_argument(
        "--repo", type=Path, default=PublishConfig.repo,
        help="Feast repository folder, the one holding feature_store.yaml (default: %(default)s)",
    )
    parser.add_argument(
        "--materialize", action=argparse.BooleanOptionalAction, default=PublishConfig.materialize,
        help="also fill the online store with `feast materialize` (default: %(default)s)",
    )
    parser.add_argument(
        "--set-default", action=argparse.BooleanOptionalAction, default=PublishConfig.set_default,
        help="make this SID version the repository's default, the one a request without a version gets "
             "(default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """CLI entry: ``python -m features.publish --dataset D [--repo R] [--no-materialize] [--no-set-default]``."""
    args = arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = PublishConfig(**vars(args))
    log.info("config %s", dataclasses.asdict(config))
    return publish(config)


if __name__ == "__main__":
    run_main(main, PROG)
