"""Ingest writes one unit: a killed or failing re-ingest never leaves a mixed dataset later stages accept,
and the stages built from an earlier ingest are refused as stale."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from builders import PROJECT_ROOT

from features import build as features_build
from ingest import dataset as ingest_dataset
from ingest.cli import main
from sidrank.contract import DatasetPaths
from sidrank.io import UNIT_MANIFEST
from sidrank.schema import DataError
from tokenizer import train

SMALL = ("--items", "60", "--events", "3000", "--users", "30")


def ingest(out: Path, seed: int) -> DatasetPaths:
    main(["synthetic", *SMALL, "--seed", str(seed), "--out", str(out)])
    return DatasetPaths(out / "synthetic")


def test_sigkill_after_the_first_rename_of_a_reingest_leaves_a_dataset_every_stage_refuses(tmp_path: Path) -> None:
    paths = ingest(tmp_path, seed=0)
    old_events = pd.read_parquet(paths.events)
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        real_replace = os.replace
        def replace_then_die(source, target):
            real_replace(source, target)
            if Path(target).parent == Path(sys.argv[1]):  # the first file moved into the dataset folder
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace_then_die
        from ingest.cli import main
        main(sys.argv[2:])
        """
    )
    argv = ["synthetic", *SMALL, "--seed", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", script, str(paths.root), *argv], cwd=PROJECT_ROOT)
    assert done.returncode == -signal.SIGKILL
    assert not (paths.root / UNIT_MANIFEST).exists()
    with pytest.raises(DataError, match=rf"{paths.root}: incomplete or missing.*python -m ingest"):
        features_build.main(["--dataset", str(paths.root)])
    with pytest.raises(DataError, match="incomplete or missing"):
        train.main(["--dataset", str(paths.root), "--method", "rqkmeans"])
    assert [p.name for p in paths.root.iterdir() if p.name.startswith(".")]  # the killed run's staging folder

    ingest(tmp_path, seed=1)
    assert [p.name for p in paths.root.iterdir() if p.name.startswith(".")] == []
    paths.dataset_digest()
    assert not pd.read_parquet(paths.events).equals(old_events)


def test_a_disk_full_error_while_writing_the_events_keeps_the_old_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = ingest(tmp_path, seed=0)
    digest, meta = paths.dataset_digest(), paths.meta.read_text()
    real_write = ingest_dataset.write_parquet

    def full_disk(frame: pd.DataFrame, path: Path) -> Path:
        if Path(path).name == "events.parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(frame, path)

    monkeypatch.setattr(ingest_dataset, "write_parquet", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ingest(tmp_path, seed=1)
    assert paths.dataset_digest() == digest and paths.meta.read_text() == meta
    assert [p.name for p in paths.root.iterdir() if p.name.startswith(".")] == []


def test_a_reingest_makes_the_sid_versions_of_the_old_dataset_stale(tmp_path: Path) -> None:
    paths = ingest(tmp_path, seed=0)
    train.main(["--dataset", str(paths.root), "--method", "rqkmeans", "--levels", "2", "--codebook-size", "8"])
    features_build.main(["--dataset", str(paths.root)])
    ingest(tmp_path, seed=1)
    stale_sids = r"sids/rqkmeans-\w+: stale, built from another dataset.*tokenizer\.train"
    with pytest.raises(DataError, match=stale_sids):
        features_build.main(["--dataset", str(paths.root)])
    with pytest.raises(DataError, match=stale_sids):  # what features.publish asks: the root cause comes first
        paths.require_features()
    paths.modalities_digest()  # the re-ingest wrote its own modalities


def test_synthetic_sizes_beyond_memory_are_refused_before_allocating(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--items 100000000000 .* need about [\d,]+ GiB, this machine has"):
        main(["synthetic", "--items", "100000000000", "--events", "100", "--users", "5", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
