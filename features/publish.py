"""Publish a dataset's feature tables into the Feast repository, one SID version at a time.

    python -m features.publish --dataset artifacts/ml-100k [--repo feature_repo] [--no-materialize] [--no-set-default]

is the same as these plain commands (run from the project root), where V is
the SID version in ``features/feature_meta.json`` and N its Feast-safe name
(``sidrank.contract.sid_version_name``: ``rqvae-822439f417`` -> ``rqvae_822439f417``):

    cp artifacts/ml-100k/features/{user_behaviour,item_behaviour,user_profile,item_content}.parquet feature_repo/data/
    cp artifacts/ml-100k/features/item_sids.parquet feature_repo/data/item_sids/N.parquet
    cp artifacts/ml-100k/features/user_sid_history.parquet feature_repo/data/user_sid_history/N.parquet
    cp artifacts/ml-100k/features/feature_meta.json feature_repo/data/feature_meta/N.json
    cp artifacts/ml-100k/features/feature_meta.json feature_repo/data/feature_meta.json   # unless --no-set-default
    # add V to feature_repo/data/sid_versions.json (and make it the default)
    feast -c feature_repo apply
    feast -c feature_repo materialize 1970-01-01T00:00:00+00:00 <latest stamp + 1 s>

SID versions (../shared/DESIGN.md section 8): publishing a version adds its
views (``item_sid_<N>_fv``, ``user_sid_history_<N>_fv``) and its service
``ranker_<N>`` and keeps every version published before from the same
events, so training rows of an older tokenizer stay retrievable. The default
version (the last published unless ``--no-set-default``) is also served by
``ranker_v1``. Versions published from other events are dropped from the
registry (their history prefixes would not match the new counts).

Every copy is atomic per file and the Feast steps run the real `feast` CLI of
this environment; a failing step raises with the CLI's stderr. Materialize
covers every stamp: a first `materialize-incremental` on historical data would
load nothing (../shared/DESIGN.md section 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from features.build import SHARED_TABLES
from sidrank.io import atomic_path, read_json, write_json
from sidrank.schema import DataError, require_file
from sidrank.contract import DatasetPaths
from sidrank import contract

log = logging.getLogger(__name__)


@dataclass
class PublishConfig:
    """Configuration of the publish step.

    Args:
        dataset: dataset folder whose ``features/`` were written by ``features.build``.
        repo: the Feast repository (holds ``feature_store.yaml``).
        materialize: also fill the online store.
        set_default: make this SID version the default (``ranker_v1`` and
            ``data/feature_meta.json``); otherwise only add it.
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
        raise DataError(f"{candidate}: not found; install feast[duckdb] into this environment (`make venv`)")
    return str(candidate)


def run_feast(repo: Path, *args: str) -> str:
    """Run ``feast -c <repo> <args>`` and return its stdout; raise with its stderr on failure."""
    command = [feast_executable(), "-c", str(repo), *args]
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {done.returncode}:\n{done.stderr.strip()}")
    return done.stdout


def _copy(source: Path, target: Path) -> Path:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def read_registry(data: Path) -> dict:
    """``data/sid_versions.json``: ``{"default": V, "versions": {V: entry}}``; empty when none published."""
    path = data / contract.SID_VERSIONS_FILE
    return read_json(path) if path.exists() else {"default": None, "versions": {}}


def updated_registry(registry: dict, meta: dict, source: Path, *, set_default: bool) -> dict:
    """The registry with the version of ``meta`` (a feature_meta.json) added.

    Versions from other events are dropped; a different version with the same
    Feast name is an error (its views would overwrite this one's).
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
                f"{source}: column 'sid_version' '{version}' has the Feast name '{name}' of the published "
                f"version '{other}'; rename one tokenizer version"
            )
        versions[other] = entry
    versions[version] = {
        "name": name,
        "service": contract.sid_service(version),
        "sid_levels": int(meta["sid_levels"]),
        "sid_codebook_size": int(meta["sid_codebook_size"]),
        "events_sha256": meta.get("events_sha256", ""),
        "published": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    default = version if set_default or registry["default"] not in versions else registry["default"]
    return {"default": default, "versions": dict(sorted(versions.items()))}


def copy_tables(features: Path, data: Path, *, set_default: bool = True) -> dict:
    """Copy one SID version's tables and meta into the repo's data folder and register it.

    Returns:
        The updated registry (also written to ``data/sid_versions.json``, last).
    """
    made_by = f"python -m features.build --dataset {features.parent}"
    meta_path = require_file(features / contract.FEATURE_META_FILE, made_by)
    meta = read_json(meta_path)
    if "sid_version" not in meta:
        raise DataError(f"{meta_path}: no 'sid_version'; re-run `{made_by}`")
    registry = updated_registry(read_registry(data), meta, meta_path, set_default=set_default)
    name = contract.sid_version_name(meta["sid_version"])
    for table in SHARED_TABLES:
        _copy(require_file(features / f"{table}.parquet", made_by), data / f"{table}.parquet")
    for table in contract.SID_VERSION_TABLES:
        _copy(require_file(features / f"{table}.parquet", made_by), data / table / f"{name}.parquet")
    _copy(meta_path, data / contract.FEATURE_META_DIR / f"{name}.json")
    if registry["default"] == meta["sid_version"]:
        _copy(meta_path, data / contract.FEATURE_META_FILE)
    write_json(registry, data / contract.SID_VERSIONS_FILE)
    log.info("SID versions %s, default %s", sorted(registry["versions"]), registry["default"])
    return registry


def published_tables(data: Path, registry: dict) -> list[Path]:
    """Every parquet file the repository's views read."""
    names = [entry["name"] for entry in registry["versions"].values()]
    return [data / f"{t}.parquet" for t in SHARED_TABLES] + [
        data / t / f"{n}.parquet" for t in contract.SID_VERSION_TABLES for n in names
    ]


def stamp_range(data: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Earliest stamp and latest stamp + 1 s over all published tables (every SID version)."""
    paths = published_tables(data, read_registry(data))
    stamps = [pd.read_parquet(path, columns=["event_timestamp"]).iloc[:, 0] for path in paths]
    return min(s.min() for s in stamps), max(s.max() for s in stamps) + pd.Timedelta(seconds=1)


def publish(config: PublishConfig) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """Copy the tables, ``feast apply`` and (unless disabled) ``feast materialize`` all stamps.

    Returns:
        The materialized (start, end) range, or None without materialization.
    """
    data = config.repo / "data"
    copy_tables(DatasetPaths(config.dataset).features, data, set_default=config.set_default)
    log.info("%s", run_feast(config.repo, "apply").strip())
    if not config.materialize:
        return None
    start, end = stamp_range(data)
    log.info("%s", run_feast(config.repo, "materialize", start.isoformat(), end.isoformat()).strip())
    return start, end


def main(argv: list[str] | None = None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """CLI entry: ``python -m features.publish --dataset D [--repo R] [--no-materialize] [--no-set-default]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="dataset folder")
    parser.add_argument("--repo", type=Path, default=PublishConfig.repo, help="Feast repository folder")
    parser.add_argument("--no-materialize", dest="materialize", action="store_false", help="skip the online store")
    parser.add_argument(
        "--set-default", action=argparse.BooleanOptionalAction, default=PublishConfig.set_default,
        help="make this SID version the default (ranker_v1, data/feature_meta.json)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = PublishConfig(**vars(args))
    log.info("config %s", dataclasses.asdict(config))
    return publish(config)


if __name__ == "__main__":
    main()
