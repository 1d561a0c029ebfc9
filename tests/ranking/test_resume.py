"""Training survives a failure: every epoch is checkpointed and a restarted job continues after the last one.

The torchrun case (a killed rank under --max-restarts) is in test_train_torchrun.py, beside the
uninterrupted 2-rank run it is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidrank.io import require_complete_unit
from ranking import train
from test_train_torchrun import TRAIN_ARGS, same_run, synthetic_dataset


def test_more_epochs_continue_a_finished_run_exactly(tmp_path: Path) -> None:
    """A rerun with a larger --epochs trains only the new epochs, and ends where one long run ends."""
    dataset, rows, meta = synthetic_dataset(tmp_path)
    base = ["--dataset", str(dataset), "--repo", str(tmp_path), "--feature-meta", str(meta), "--rows", str(rows),
            *TRAIN_ARGS, "--patience", "9", "--no-save-checkpoint"]
    whole = train.main([*base, "--out", str(tmp_path / "whole")])
    short = train.main([*base, "--out", str(tmp_path / "run"), "--epochs", "2"])
    longer = train.main([*base, "--out", str(tmp_path / "run")])

    # The first two epochs were not run again: their measured speeds are carried over from the state.
    assert longer["history"][:2] == short["history"]
    same_run(whole, longer)
    progress = json.loads((tmp_path / "run" / "train_state" / "epoch-0003" / "progress.json").read_text())
    assert progress["epoch"] == 3 and len(progress["history"]) == 4
    # Another config does not resume: it starts at epoch 0.
    other = train.main([*base, "--out", str(tmp_path / "run"), "--seed", "1"])
    assert other["history"][0]["samples_per_s"] != longer["history"][0]["samples_per_s"]


def test_a_run_that_fails_while_writing_its_outputs_leaves_the_previous_run_whole(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint, export, metrics and predictions of --out change together or not at all."""
    dataset, rows, meta = synthetic_dataset(tmp_path)
    argv = ["--dataset", str(dataset), "--repo", str(tmp_path), "--feature-meta", str(meta), "--rows", str(rows),
            "--out", str(tmp_path / "run"), *TRAIN_ARGS, "--epochs", "1"]
    first = train.main(argv)
    before = {p.relative_to(tmp_path / "run"): p.read_bytes() for p in (tmp_path / "run").rglob("*")
              if p.is_file() and "train_state" not in p.parts}

    def crash(out: Path, meta) -> None:
        raise OSError("disk full")

    # Crash after the new checkpoint and metrics exist, before the export: nothing of the new run is visible.
    monkeypatch.setattr(train, "write_export", crash)
    with pytest.raises(OSError, match="disk full"):
        train.main([*argv, "--seed", "1"])
    after = {p.relative_to(tmp_path / "run"): p.read_bytes() for p in (tmp_path / "run").rglob("*")
             if p.is_file() and "train_state" not in p.parts}
    assert after == before
    require_complete_unit(tmp_path / "run", "retrain", files=("metrics.json", "export/model.safetensors"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_auc"] == first["test_auc"]
