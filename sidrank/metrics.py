"""Ranking metrics of the evaluation protocol (sidrank/protocol.py): AUC, log loss, cold-item AUC, GAUC.

Pure numpy / scikit-learn so the LR and LightGBM baselines score their
predictions with exactly the code the ranker uses. Degenerate inputs (one
class only) give NaN and a logged reason instead of an exception: a tiny
split is a fact to report, not a crash.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from sidrank.protocol import cold_item_mask
from sidrank.schema import DataError, require_columns

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("row_id", "label", "score", "user_id", "item_id")
LOGLOSS_EPS = 1e-7


def _check_pair(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return labels, scores


def auc(labels: np.ndarray, scores: np.ndarray, *, what: str = "auc") -> float:
    """Area under the ROC curve; NaN (with a logged reason) when one class is absent.

    Args:
        labels: [N] 0/1.
        scores: [N] any monotone score (probability or logit).
        what: name used in the log message.
    """
    labels, scores = _check_pair(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        log.warning("%s is undefined: %d rows, %d positives (needs both classes)", what, len(labels), n_pos)
        return float("nan")
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray, *, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps]; NaN when empty."""
    labels, probs = _check_pair(labels, probs)
    if len(labels) == 0:
        log.warning("logloss is undefined on 0 rows")
        return float("nan")
    p = np.clip(probs, eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log1p(-p)))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Per-user AUC weighted by the user's row count, over users with both classes.

    Uses the rank-sum (Mann-Whitney) form per user with average ranks for ties,
    which equals scikit-learn's AUC on each user's rows.

    Args:
        users: [N] user ids.
        labels: [N] 0/1.
        scores: [N] scores.

    Returns:
        (gauc, number of users that entered it); NaN when no user has both classes.
    """
    labels, scores = _check_pair(labels, scores)
    frame = pd.DataFrame({"user": np.asarray(users).ravel(), "label": labels, "score": scores})
    frame["rank"] = frame.groupby("user")["score"].rank(method="average")
    frame["pos_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("user").agg(n=("label", "size"), n_pos=("label", "sum"), pos_rank=("pos_rank", "sum"))
    per_user = per_user[(per_user["n_pos"] > 0) & (per_user["n_pos"] < per_user["n"])]
    if per_user.empty:
        log.warning("gauc is undefined: no user has both positive and negative rows")
        return float("nan"), 0
    n_pos, n_neg = per_user["n_pos"], per_user["n"] - per_user["n_pos"]
    user_auc = (per_user["pos_rank"] - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(np.average(user_auc, weights=per_user["n"])), len(per_user)


def evaluate_predictions(
    frame: pd.DataFrame,
    train_item_counts: np.ndarray | None = None,
    *,
    cold_items: np.ndarray | None = None,
    source: str = "predictions",
) -> dict:
    """All protocol metrics for one scored split.

    The cold set is given either way, exactly one of them:
    ``cold_items`` (``sidrank.protocol.cold_item_ids(meta, events)``, right
    under every protocol) or ``train_item_counts`` (the temporal rule only:
    items with fewer than ``COLD_ITEM_MAX_TRAIN_ROWS`` train rows).

    Args:
        frame: one row per evaluated event with ``row_id``, ``label``,
            ``score`` (probability), ``user_id``, ``item_id``.
        train_item_counts: [n_items + 1] train rows per item
            (``sidrank.protocol.train_item_counts``).
        cold_items: the dataset's cold item ids.
        source: name for error messages.

    Returns:
        ``auc``, ``logloss``, ``auc_cold``, ``gauc``, ``n_rows``, ``n_cold``,
        ``n_gauc_users``; undefined metrics are NaN.
    """
    if (train_item_counts is None) == (cold_items is None):
        raise ValueError("evaluate_predictions: pass exactly one of train_item_counts and cold_items")
    require_columns(frame, PREDICTION_COLUMNS, source)
    items = frame["item_id"].to_numpy()
    if cold_items is not None:
        cold = np.isin(items, np.asarray(cold_items))
    else:
        assert train_item_counts is not None
        if len(items) and int(items.max()) >= len(train_item_counts):
            raise DataError(
                f"{source}: column 'item_id' has id {int(items.max())} beyond train_item_counts "
                f"({len(train_item_counts)} entries); count train rows with the same n_items as the features"
            )
        cold = cold_item_mask(items, train_item_counts)
    labels, scores = frame["label"].to_numpy(), frame["score"].to_numpy()
    user_gauc, n_users = gauc(frame["user_id"].to_numpy(), labels, scores)
    return {
        "auc": auc(labels, scores),
        "logloss": logloss(labels, scores),
        "auc_cold": auc(labels[cold], scores[cold], what="auc_cold"),
        "gauc": user_gauc,
        "n_rows": len(frame),
        "n_cold": int(cold.sum()),
        "n_gauc_users": n_users,
    }
