"""Non-neural baselines on exactly the ranker's inputs: logistic regression and LightGBM.

Both read the tensors ``ranking.batches.build_split`` makes for the DLRM, turned
into one sparse matrix: one one-hot (or bag-count) column block per sparse
feature, then the dense features. So "same split, same features" holds by
construction. Hyper-parameters are chosen on the valid split only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import lightgbm as lgb
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ranking.batches import SplitTensors, build_split
from ranking.tables import SparseTable, sparse_tables
from ranking.config import TrainConfig, read_meta
from ranking.shards import read_row_ids
from sidrank.contract import DatasetPaths
from sidrank.metrics import auc
from sidrank.schema import SPLITS

log = logging.getLogger(__name__)

LOGREG_C_GRID = (0.01, 0.1, 1.0)
ArrayLike = sp.csr_matrix | np.ndarray


def feature_widths(tables: list[SparseTable]) -> dict[str, int]:
    """Column-block width of each sparse feature: the size of the table it looks up."""
    return {feature: table.num_embeddings for table in tables for feature in table.features}


def to_sparse_matrix(split: SplitTensors, widths: dict[str, int], scaler: StandardScaler) -> sp.csr_matrix:
    """[N, sum(widths) + F] CSR: bag counts per sparse feature block, then scaled dense features."""
    n = len(split)
    rows, cols, offset = [], [], 0
    for key, values, offsets in zip(split.keys, split.values, split.offsets):
        rows.append(np.repeat(np.arange(n), np.diff(offsets.numpy())))
        cols.append(offset + values.numpy())
        offset += widths[key]
    row_idx, col_idx = np.concatenate(rows), np.concatenate(cols)
    # Duplicate (row, col) pairs are summed by scipy: a bag holding an id twice counts 2.
    sparse_part = sp.csr_matrix((np.ones(len(row_idx), np.float32), (row_idx, col_idx)), shape=(n, offset))
    dense = sp.csr_matrix(scaler.transform(split.dense.numpy()).astype(np.float32))
    return sp.hstack([sparse_part, dense], format="csr")


def fit_logreg(train: ArrayLike, y_train: np.ndarray, valid: ArrayLike, y_valid: np.ndarray) -> tuple:
    """L2 logistic regression; C picked by valid AUC. Returns (model, chosen C, valid AUC)."""
    best = (None, None, -1.0)
    for c in LOGREG_C_GRID:
        model = LogisticRegression(C=c, max_iter=2000, solver="lbfgs")
        model.fit(train, y_train)
        score = auc(y_valid, model.predict_proba(valid)[:, 1])
        log.info("logreg C=%g valid AUC %.4f", c, score)
        if score > best[2]:
            best = (model, c, score)
    return best


def fit_lightgbm(
    train: sp.csr_matrix, y_train: np.ndarray, valid: sp.csr_matrix, y_valid: np.ndarray, *, seed: int
) -> tuple:
    """Gradient-boosted trees with early stopping on valid AUC. Returns (booster, best iteration, valid AUC)."""
    params = {
        "objective": "binary",
        "metric": "auc",
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": seed,
        "num_threads": 2,
        "verbose": -1,
    }
    dtrain = lgb.Dataset(train, label=y_train)
    dvalid = lgb.Dataset(valid, label=y_valid, reference=dtrain)
    booster = lgb.train(
        params, dtrain, num_boost_round=2000, valid_sets=[dvalid],
        callbacks=[lgb.early_stopping(50, verbose=False)],
    )
    score = auc(y_valid, booster.predict(valid, num_iteration=booster.best_iteration))
    return booster, booster.best_iteration, score


class BaselineInputs(NamedTuple):
    """A ranker run's inputs as baseline matrices, per split.

    Attributes:
        x: split -> [N, W] CSR (:func:`to_sparse_matrix`).
        dense: split -> [N, F] standardised dense features alone.
        y: split -> [N] labels.
        events: split -> the split's events (``row_id``, ``user_id``, ``item_id``, ``label``) in row order.
    """

    x: dict[str, sp.csr_matrix]
    dense: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    events: dict[str, pd.DataFrame]


def run_test_scores(run: Path, test: pd.DataFrame) -> np.ndarray:
    """A ranker run's test scores (``predictions_test.parquet``) in ``test``'s row order."""
    predictions = pd.read_parquet(run / "predictions_test.parquet").set_index("row_id")
    return predictions.loc[test["row_id"].to_numpy(), "score"].to_numpy()


def baseline_inputs(cfg: TrainConfig) -> BaselineInputs:
    """The training rows a ranker run with ``cfg`` reads (its Feast rows cache), encoded with its features."""
    meta = read_meta(cfg)
    events = pd.read_parquet(DatasetPaths(cfg.dataset).events).sort_values("row_id", ignore_index=True)
    path = cfg.rows_path_for(meta)
    splits, frames = {}, {}
    for split in SPLITS:
        frames[split] = events.loc[events["split"] == split, ["row_id", "user_id", "item_id", "label"]]
        rows = read_row_ids(path, frames[split]["row_id"].to_numpy())
        splits[split] = build_split(rows, meta, cfg.features, f"{path}[{split}]")
    widths = feature_widths(sparse_tables(meta, cfg.features))
    scaler = StandardScaler().fit(splits["train"].dense.numpy())
    return BaselineInputs(
        x={s: to_sparse_matrix(t, widths, scaler) for s, t in splits.items()},
        dense={s: scaler.transform(t.dense.numpy()) for s, t in splits.items()},
        y={s: t.labels.numpy() for s, t in splits.items()},
        events={s: f.reset_index(drop=True) for s, f in frames.items()},
    )
