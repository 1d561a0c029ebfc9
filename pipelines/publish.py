"""Publish a dataset's feature tables into the Feast repository.

    python -m pipelines.publish --dataset artifacts/ml-100k [--repo feature_repo] [--no-materialize]

is the same as these plain commands (run from the project root):

    cp artifacts/ml-100k/features/*.parquet artifacts/ml-100k/features/feature_meta.json feature_repo/data/
    feast -c feature_repo apply
    feast -c feature_repo materialize 1970-01-01T00:00:00+00:00 <latest stamp + 1 s>

The copy is atomic per file and the Feast steps run the real `feast` CLI of
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

from pipelines.features import TABLES
from pipelines.io import atomic_path
from pipelines.schema import DataError, DatasetPaths, require_file
from ranking import spec

log = logging.getLogger(__name__)


@dataclass
class PublishConfig:
    """Configuration of the publish step.

    Args:
        dataset: dataset folder whose ``features/`` were written by ``pipelines.features``.
        repo: the Feast repository (holds ``feature_store.yaml``).
        materialize: also fill the online store.
    """

    dataset: Path
    repo: Path = Path("feature_repo")
    materialize: bool = True

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


def copy_tables(features: Path, data: Path) -> list[Path]:
    """Copy the feature tables and feature_meta.json into the repo's data folder, atomically per file."""
    sources = [features / f"{table}.parquet" for table in TABLES] + [features / spec.FEATURE_META_FILE]
    copied = []
    for source in sources:
        require_file(source, f"python -m pipelines.features --dataset {features.parent}")
        with atomic_path(data / source.name) as tmp:
            shutil.copyfile(source, tmp)
        copied.append(data / source.name)
    return copied


def stamp_range(data: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Earliest stamp and latest stamp + 1 s over all published tables."""
    stamps = [pd.read_parquet(data / f"{table}.parquet", columns=["event_timestamp"]).iloc[:, 0] for table in TABLES]
    return min(s.min() for s in stamps), max(s.max() for s in stamps) + pd.Timedelta(seconds=1)


def publish(config: PublishConfig) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """Copy the tables, ``feast apply`` and (unless disabled) ``feast materialize`` all stamps.

    Returns:
        The materialized (start, end) range, or None without materialization.
    """
    data = config.repo / "data"
    copy_tables(DatasetPaths(config.dataset).features, data)
    log.info("%s", run_feast(config.repo, "apply").strip())
    if not config.materialize:
        return None
    start, end = stamp_range(data)
    log.info("%s", run_feast(config.repo, "materialize", start.isoformat(), end.isoformat()).strip())
    return start, end


def main(argv: list[str] | None = None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """CLI entry: ``python -m pipelines.publish --dataset D [--repo R] [--no-materialize]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="dataset folder")
    parser.add_argument("--repo", type=Path, default=PublishConfig.repo, help="Feast repository folder")
    parser.add_argument("--no-materialize", dest="materialize", action="store_false", help="skip the online store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = PublishConfig(dataset=args.dataset, repo=args.repo, materialize=args.materialize)
    log.info("config %s", dataclasses.asdict(config))
    return publish(config)


if __name__ == "__main__":
    main()
