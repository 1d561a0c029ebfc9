"""sidrank.metrics against hand-computed examples and scikit-learn."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from sidrank.schema import DataError
from sidrank.metrics import auc, evaluate_predictions, gauc, logloss


def three_users_predictions() -> pd.DataFrame:
    """Six scored rows: users 1 and 2 rate items 1 and 2, user 3 rates item 3 twice."""
    return pd.DataFrame({
        "row_id": np.arange(6),
        "user_id": [1, 1, 2, 2, 3, 3],
        "item_id": [1, 2, 1, 2, 3, 3],
        "label": [1, 0, 0, 1, 1, 0],
        "score": [0.9, 0.2, 0.3, 0.4, 0.7, 0.6],
    })  # fmt: skip


def test_auc_hand_example_and_ties() -> None:
    # Pairs (pos, neg): (0.35 > 0.1) (0.35 < 0.4) (0.8 > 0.1) (0.8 > 0.4) -> 3/4.
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_auc_one_class_is_nan_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidrank.metrics"):
        assert math.isnan(auc(np.ones(3), np.array([0.1, 0.2, 0.3])))
    assert "needs both classes" in caplog.text


def test_logloss_hand_example_and_clipping() -> None:
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(expected)
    # A confident miss is clipped to eps instead of becoming inf.
    assert logloss(np.array([0]), np.array([1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_gauc_hand_example() -> None:
    # User 1: pos 0.9 and 0.2 vs neg 0.5 -> AUC 1/2, 3 rows. User 2: AUC 1, 2 rows.
    # User 3 has only positives and is left out: (3 * 0.5 + 2 * 1) / 5 = 0.7.
    users = np.array([1, 1, 1, 2, 2, 3])
    labels = np.array([1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.5, 0.2, 0.3, 0.6, 0.1])
    value, n_users = gauc(users, labels, scores)
    assert value == pytest.approx(0.7) and n_users == 2


def test_gauc_matches_sklearn_per_user_with_ties() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600)
    labels = rng.integers(0, 2, 600)
    scores = rng.integers(0, 5, 600) / 4.0  # many ties
    value, n_users = gauc(users, labels, scores)
    per_user, weights = [], []
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            per_user.append(roc_auc_score(labels[m], scores[m]))
            weights.append(m.sum())
    assert n_users == len(per_user)
    assert value == pytest.approx(np.average(per_user, weights=weights))


def test_gauc_without_mixed_users_is_nan() -> None:
    value, n_users = gauc(np.array([1, 2]), np.array([1, 0]), np.array([0.3, 0.4]))
    assert math.isnan(value) and n_users == 0


def test_evaluate_predictions_cold_items() -> None:
    frame = three_users_predictions()
    counts = np.array([0, 10, 2, 4])  # item 1 warm, items 2 and 3 cold (< 5 train rows)
    out = evaluate_predictions(frame, counts)
    assert out["n_rows"] == 6 and out["n_cold"] == 4
    cold = frame["item_id"] != 1
    assert out["auc_cold"] == pytest.approx(roc_auc_score(frame["label"][cold], frame["score"][cold]))
    assert out["auc"] == pytest.approx(roc_auc_score(frame["label"], frame["score"]))
    assert set(out) == {"auc", "logloss", "auc_cold", "gauc", "n_rows", "n_cold", "n_gauc_users"}


def test_evaluate_predictions_with_given_cold_items() -> None:
    frame = three_users_predictions()
    out = evaluate_predictions(frame, cold_items=np.array([1, 2]))  # e.g. item-cold's held-out items
    cold = frame["item_id"] != 3
    assert out["n_cold"] == 4
    assert out["auc_cold"] == pytest.approx(roc_auc_score(frame["label"][cold], frame["score"][cold]))
    with pytest.raises(ValueError, match="exactly one of train_item_counts and cold_items"):
        evaluate_predictions(frame)


def test_evaluate_predictions_names_missing_column() -> None:
    frame = pd.DataFrame({"row_id": [0], "label": [1], "score": [0.5], "item_id": [1]})
    with pytest.raises(DataError, match="user_id"):
        evaluate_predictions(frame, np.zeros(2, dtype=np.int64), source="preds.parquet")


def test_paired_bootstrap_interval_covers_a_planted_gain_and_not_noise() -> None:
    from sidrank.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    good = [labels + rng.normal(0, 0.8, 4000) for _ in range(2)]
    poor = [labels + rng.normal(0, 2.0, 4000) for _ in range(2)]
    gain = paired_bootstrap(labels, good, poor, n_boot=200)
    assert gain["low"] > 0 and gain["low"] <= gain["diff"] <= gain["high"]
    assert gain["diff"] == pytest.approx(np.mean([auc(labels, g) for g in good]) - np.mean([auc(labels, p) for p in poor]))
    same = paired_bootstrap(labels, good, good, n_boot=200)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    users = rng.integers(0, 50, 4000)
    by_user = paired_bootstrap(labels, good, poor, users=users, n_boot=200)
    assert by_user["low"] > 0 and by_user["diff"] == pytest.approx(
        np.mean([gauc(users, labels, g)[0] for g in good]) - np.mean([gauc(users, labels, p)[0] for p in poor])
    )
