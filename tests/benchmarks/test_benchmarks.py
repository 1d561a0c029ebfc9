"""Benchmark bookkeeping: statistics and the baselines' input matrix (the AUC benchmark itself runs in
test_end_to_end.py; its paired intervals are tested in test_metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from benchmarks.baselines import feature_widths, to_sparse_matrix
from benchmarks.report import fmt, mean_std
from ranking.batches import SplitTensors
from ranking.tables import SparseTable


def test_mean_std_is_sample_std_and_undefined_for_one_run():
    stat = mean_std([0.70, 0.72, 0.74])
    assert stat["mean"] == pytest.approx(0.72) and stat["std"] == pytest.approx(0.02)
    single = mean_std([0.7])
    assert math.isnan(single["std"]) and fmt(single) == "0.7000 (1 run)"
    partial = mean_std([0.7, None, float("nan")])
    assert (partial["n"], partial["runs"]) == (1, 3) and "2 of 3 undefined" in fmt(partial)


def test_sparse_matrix_has_one_block_per_feature_and_counts_bag_repeats():
    tables = [SparseTable("t_item", 4, ("item_id", "hist_items")), SparseTable("t_tag", 3, ("tag_ids",))]
    # 2 rows; item ids [1], [3]; history bags [2, 2], []; tags [1], [1, 2]
    split = SplitTensors(
        keys=("item_id", "hist_items", "tag_ids"),
        n_pooled=3,
        dense=torch.tensor([[0.0], [2.0]]),
        labels=torch.tensor([0.0, 1.0]),
        row_ids=torch.tensor([0, 1]),
        values=(torch.tensor([1, 3]), torch.tensor([2, 2]), torch.tensor([1, 1, 2])),
        offsets=(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]), torch.tensor([0, 1, 3])),
    )
    widths = feature_widths(tables)
    assert widths == {"item_id": 4, "hist_items": 4, "tag_ids": 3}
    x = to_sparse_matrix(split, widths, StandardScaler().fit(split.dense.numpy())).toarray()
    assert x.shape == (2, 4 + 4 + 3 + 1)
    np.testing.assert_array_equal(x[0, :11], [0, 1, 0, 0, 0, 0, 2, 0, 0, 1, 0])
    np.testing.assert_array_equal(x[1, :11], [0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(x[:, 11], [-1.0, 1.0])
