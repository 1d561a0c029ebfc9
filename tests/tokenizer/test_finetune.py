"""MMQ stage 2 (tokenizer.finetune): a new SID version, trained on train rows only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import reseal_dataset_units, write_click_dataset

from sidrank.schema import DataError, is_sid_code_column, validate_sids
from sidrank.contract import DatasetPaths
from tokenizer import finetune, train
from tokenizer.click_model import row_tensors

N_ITEMS = 120
COLD = np.arange(101, N_ITEMS + 1)  # items with valid/test rows only
FT_ARGS = ("--epochs", "3", "--batch-size", "64", "--lr", "0.01", "--tau", "0.5", "--hidden-dim", "16")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetPaths, str]:
    """A dataset with a stage-1 MMQ version written by tokenizer.train (4 positions, K = 8)."""
    paths = write_click_dataset(tmp_path_factory.mktemp("ft") / "d")
    args = ["--dataset", str(paths.root), "--method", "mmq", "--levels", "4", "--codebook-size", "8"]
    args += ["--epochs", "20", "--latent-dim", "8", "--hidden-dims", "32", "--batch-size", "32"]
    return paths, train.main(args)["version"]


def copy_of(stage1: tuple[DatasetPaths, str], dest: Path) -> DatasetPaths:
    shutil.copytree(stage1[0].root, dest)
    return DatasetPaths(dest)


def run(paths: DatasetPaths, version: str, *extra: str) -> dict:
    rows = paths.root / "rows" / "ranker_v1.parquet"  # the fixture's Feast-like rows, passed explicitly
    return finetune.main(["--dataset", str(paths.root), "--sid-version", version, "--rows", str(rows), *FT_ARGS, *extra])


def codes_of(paths: DatasetPaths, version: str) -> np.ndarray:
    table = pd.read_parquet(paths.sid_dir(version) / "sids.parquet").sort_values("item_id")
    return table[[c for c in table.columns if is_sid_code_column(c)]].to_numpy()


def flip_labels(paths: DatasetPaths, splits: tuple[str, ...]) -> None:
    """Flip the labels of ``splits`` in events.parquet and, consistently, in the cached rows."""
    events = pd.read_parquet(paths.events)
    flipped = events["row_id"][events["split"].isin(splits)]
    events.loc[events["row_id"].isin(flipped), "label"] ^= 1
    events.to_parquet(paths.events, index=False)
    reseal_dataset_units(paths)
    rows_file = paths.root / "rows" / "ranker_v1.parquet"
    rows = pd.read_parquet(rows_file)
    rows.loc[rows["row_id"].isin(flipped), "label"] ^= 1
    rows.to_parquet(rows_file, index=False)


def test_cli_writes_a_new_version_with_its_parent(stage1, tmp_path: Path) -> None:
    paths = copy_of(stage1, tmp_path / "d")
    parent = stage1[1]
    metrics = run(paths, "LATEST")
    version = metrics["version"]
    assert version.startswith("mmq-ft-") and version != parent
    assert (paths.root / "sids" / "LATEST").read_text().strip() == version
    out = paths.sid_dir(version)
    table = pd.read_parquet(out / "sids.parquet")
    assert validate_sids(table, 8, "sids.parquet") == ["sid_0", "sid_1", "sid_2", "sid_3"]
    assert table["item_id"].tolist() == list(range(1, N_ITEMS + 1)) and (table["sid_version"] == version).all()
    written = json.loads((out / "metrics.json").read_text())
    changed = (codes_of(paths, version) != codes_of(paths, parent)).any(1).mean()
    assert written["parent_version"] == parent and written["changed_items_share"] == pytest.approx(changed)
    assert len(written["history"]["valid_auc"]) == 3 and written["n_train_rows"] == 800
    config = json.loads((out / "config.json").read_text())
    assert config["levels"] == 4 and config["codebook_size"] == 8 and config["parent_version"] == parent
    # the saved model reproduces the table and can be fine-tuned again
    again = finetune.load_stage1(paths, version)
    np.testing.assert_array_equal(again.codes, codes_of(paths, version))
    saved = torch.load(out / "codebooks.pt", weights_only=False)
    for book, expected in zip(saved["codebooks"], again.model.codebooks, strict=True):
        torch.testing.assert_close(book, expected.detach())
    assert run(paths, version, "--epochs", "1")["parent_version"] == version


def test_valid_and_test_labels_never_reach_the_codes(stage1, tmp_path: Path) -> None:
    parent = stage1[1]
    base = run(copy_of(stage1, tmp_path / "base"), parent)
    codes = codes_of(DatasetPaths(tmp_path / "base"), base["version"])
    assert base["changed_items_share"] > 0  # fine-tuning does move codes

    flipped = copy_of(stage1, tmp_path / "flipped")
    flip_labels(flipped, ("valid", "test"))
    result = run(flipped, parent)
    np.testing.assert_array_equal(codes_of(flipped, result["version"]), codes)  # bit-identical
    # ... although the valid labels were read (for evaluation only)
    assert result["valid_auc"] == pytest.approx(1 - base["valid_auc"], abs=1e-6)

    # control: the test can fail - train labels do reach the codes
    control = copy_of(stage1, tmp_path / "control")
    flip_labels(control, ("train",))
    assert not np.array_equal(codes_of(control, run(control, parent)["version"]), codes)


def test_held_out_item_moves_only_through_its_content(stage1, tmp_path: Path) -> None:
    parent, item = stage1[1], int(COLD[5])
    base_paths = copy_of(stage1, tmp_path / "base")
    base = finetune.load_stage1(base_paths, run(base_paths, parent)["version"])

    changed = copy_of(stage1, tmp_path / "changed")
    for name in ("tags", "text"):  # give the held-out item another item's content
        view = np.load(changed.modality(name))
        view[item] = view[1]
        np.save(changed.modality(name), view)
    reseal_dataset_units(changed)
    result = finetune.load_stage1(changed, run(changed, parent)["version"])
    # the fine-tuned tokenizer is bit-identical: the held-out item's content never entered training ...
    for key, value in base.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[key]), key
    others = np.arange(N_ITEMS) != item - 1
    np.testing.assert_array_equal(result.codes[others], base.codes[others])
    # ... and its new code is that tokenizer applied to its new content (item 1's code)
    np.testing.assert_array_equal(result.codes[item - 1], base.codes[0])


def test_bad_inputs(stage1, tmp_path: Path) -> None:
    paths = copy_of(stage1, tmp_path / "d")
    other = train.main(["--dataset", str(paths.root), "--method", "rqkmeans", "--levels", "2", "--codebook-size", "8"])
    with pytest.raises(DataError, match="made by method 'rqkmeans'.*--method mmq"):
        run(paths, other["version"])
    with pytest.raises(DataError, match="sids/no-such: incomplete or missing.*tokenizer.train"):
        run(paths, "no-such")
    rows_file = paths.root / "rows" / "ranker_v1.parquet"
    rows = pd.read_parquet(rows_file)
    rows.loc[rows["row_id"] == 3, "label"] ^= 1
    rows.to_parquet(rows_file, index=False)
    with pytest.raises(DataError, match="column 'label' disagrees"):
        run(paths, stage1[1])
    rows.drop(columns="item_count").to_parquet(rows_file, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['item_count'\]"):
        run(paths, stage1[1])
    rows_file.unlink()
    with pytest.raises(DataError, match="ranker_v1.parquet: file not found"):
        run(paths, stage1[1])
    with pytest.raises(ValueError, match="tau=0"):
        finetune.FinetuneConfig(dataset=paths.root, tau=0)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("user_count", np.nan, r"column 'user_count' is missing in rows \[1\] where 'user_pos_count' is set"),
        ("item_pos_count", np.nan, r"column 'item_pos_count' is missing in rows \[1\] where 'item_count' is set"),
        ("item_count", -1.0, r"column 'item_count' has negative counts in rows \[1\]"),
        ("user_pos_count", 9.0, r"column 'user_pos_count' exceeds 'user_count' in rows \[1\]"),
    ],
)
def test_bad_counts_in_the_rows_name_the_column_at_fault(column: str, value: float, message: str) -> None:
    rows = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "label": [1, 0], "user_count": [np.nan, 2.0],
                         "user_pos_count": [np.nan, 1.0], "item_count": [np.nan, 1.0], "item_pos_count": [np.nan, 1.0]})
    row_tensors(rows, 2, 1, "rows.parquet")  # both of a pair missing: no earlier event, read as 0
    rows.loc[1, column] = value
    with pytest.raises(DataError, match=rf"rows\.parquet: {message}; rebuild the behaviour features"):
        row_tensors(rows, 2, 1, "rows.parquet")
