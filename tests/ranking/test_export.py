"""The weights-only export: serving loads it without unpickling anything, and it scores like the DCP checkpoint."""

from __future__ import annotations

import json
import pathlib
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sidrank.io import publish_unit
from sidrank.schema import DataError
from ranking import serve, train
from ranking.batches import build_split
from ranking.checkpoint import load_checkpoint
from ranking.export import MODEL_JSON, WEIGHTS, load_export, read_run
from test_train_torchrun import META, TRAIN_ARGS, synthetic_dataset


class _Payload:
    """Unpickling it creates ``marker``: the stand-in for a command a crafted run folder would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A finished world-size-1 run on the synthetic rows, and its test rows."""
    root = tmp_path_factory.mktemp("export")
    dataset, rows, meta = synthetic_dataset(root)
    train.main(["--dataset", str(dataset), "--repo", str(root), "--feature-meta", str(meta), "--rows", str(rows),
                "--out", str(root / "run"), *TRAIN_ARGS, "--epochs", "2"])
    events = pd.read_parquet(dataset / "events.parquet")
    test_ids = events.loc[events["split"] == "test", "row_id"]
    test_rows = pd.read_parquet(rows).pipe(lambda r: r[r["row_id"].isin(test_ids)]).sort_values("row_id")
    return root / "run", test_rows


def _scores(model: torch.nn.Module, features, rows: pd.DataFrame) -> np.ndarray:
    split = build_split(rows, META, features, "test rows")
    with torch.no_grad():
        _, (_, logits, _) = model(split.batch(torch.arange(len(split))))
    return torch.sigmoid(logits).numpy()


def test_export_scores_like_the_checkpoint_and_the_runs_predictions(run: tuple[Path, pd.DataFrame]) -> None:
    folder, rows = run
    exported, checkpoint = load_export(folder, META), load_checkpoint(folder / "checkpoint", META)
    assert exported.config == checkpoint.config == json.loads((folder / "metrics.json").read_text())["config"]
    scores = _scores(exported.model, exported.features, rows)
    np.testing.assert_array_equal(scores, _scores(checkpoint.model, checkpoint.features, rows))
    predictions = pd.read_parquet(folder / "predictions_test.parquet")
    np.testing.assert_allclose(scores, predictions["score"], atol=1e-6)


def _republished(run: Path, replace: dict[str, bytes]) -> None:
    """Rewrite files of ``run`` and a unit.json that lists them: what someone crafting the whole folder can do."""
    listed = json.loads((run / "unit.json").read_text())["files"]
    with publish_unit(run) as staging:
        for name in listed:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(replace.get(name, (run / name).read_bytes()))


def test_a_crafted_run_folder_runs_no_code_when_served(run: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    marker, crafted = tmp_path / "payload-ran", tmp_path / "crafted"
    shutil.copytree(run[0], crafted)
    # A pickle in the DCP folder (its unit.json made to match): serving never opens it; the DCP loader runs it.
    _republished(crafted, {"checkpoint/.metadata": pickle.dumps(_Payload(marker))})
    serve.load_model(crafted, META)
    assert not marker.exists()
    with pytest.raises(Exception):
        load_checkpoint(crafted / "checkpoint", META)
    assert marker.exists(), "the payload is live: the DCP loader unpickles it"
    marker.unlink()
    # The export itself replaced by a pickle, with a unit.json that matches it: refused, nothing runs.
    _republished(crafted, {WEIGHTS: pickle.dumps(_Payload(marker))})
    with pytest.raises(DataError, match="not a safetensors file"):
        serve.load_model(crafted, META)
    assert not marker.exists()


def test_a_tampered_or_unfinished_export_is_refused(run: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(DataError, match="model.safetensors: missing or changed"):
        load_export(folder, META)
    (folder / "unit.json").unlink()  # a run that stopped before its outputs were complete
    with pytest.raises(DataError, match="no unit.json"):
        load_export(folder, META)
    # An export of another format version.
    shutil.rmtree(folder)
    shutil.copytree(run[0], folder)
    description = json.loads((folder / MODEL_JSON).read_text())
    _republished(folder, {MODEL_JSON: json.dumps({**description, "format": 99}).encode()})
    with pytest.raises(DataError, match="key 'format' is 99"):
        load_export(folder, META)


def test_benchmarks_read_only_whole_runs(run: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    assert read_run(folder) == json.loads((folder / "metrics.json").read_text())
    predictions = pd.read_parquet(folder / "predictions_test.parquet")
    predictions.assign(score=1 - predictions["score"]).to_parquet(folder / "predictions_test.parquet")
    with pytest.raises(DataError, match="predictions_test.parquet: missing or changed"):
        read_run(folder)


@pytest.mark.parametrize(("drop", "missing"), [(("meta",), "meta"), (("config", "model"), "config.model"),
                                                (("meta", "n_items"), "meta.n_items")])
def test_an_export_without_a_key_it_needs_is_a_data_error_naming_it(
    run: tuple[Path, pd.DataFrame], tmp_path: Path, drop: tuple[str, ...], missing: str
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    description = json.loads((folder / MODEL_JSON).read_text())
    node = description
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    _republished(folder, {MODEL_JSON: json.dumps(description).encode()})  # its unit.json matching: only the key is wrong
    with pytest.raises(DataError, match=rf"model\.json: missing key '{re.escape(missing)}'; retrain.*ranking\.train"):
        load_export(folder, META)
