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
from scipy.stats import rankdata
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


def per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """AUC of every user with both classes (index: user id; columns ``auc`` and ``n`` rows).

    Uses the rank-sum (Mann-Whitney) form per user with average ranks for ties,
    which equals scikit-learn's AUC on each user's rows.
    """
    labels, scores = _check_pair(labels, scores)
    frame = pd.DataFrame({"user": np.asarray(users).ravel(), "label": labels, "score": scores})
    frame["rank"] = frame.groupby("user")["score"].rank(method="average")
    frame["pos_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("user").agg(n=("label", "size"), n_pos=("label", "sum"), pos_rank=("pos_rank", "sum"))
    per_user = per_user[(per_user["n_pos"] > 0) & (per_user["n_pos"] < per_user["n"])]
    n_pos, n_neg = per_user["n_pos"], per_user["n"] - per_user["n_pos"]
    return pd.DataFrame({"auc": (per_user["pos_rank"] - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), "n": per_user["n"]})


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Per-user AUC weighted by the user's row count, over users with both classes.

    Args:
        users: [N] user ids.
        labels: [N] 0/1.
        scores: [N] scores.

    Returns:
        (gauc, number of users that entered it); NaN when no user has both classes.
    """
    per_user = per_user_auc(users, labels, scores)
    if per_user.empty:
        log.warning("gauc is undefined: no user has both positive and negative rows")
        return float("nan"), 0
    return float(np.average(per_user["auc"], weights=per_user["n"])), len(per_user)


def _rank_auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of ``scores`` [S, N] against ``labels`` [N] (average ranks for ties)."""
    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return ((ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def paired_bootstrap(
    labels: np.ndarray,
    scores_a: list[np.ndarray],
    scores_b: list[np.ndarray],
    *,
    users: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of the AUC (or GAUC) difference A - B on the same rows.

    Each resample draws the rows (or, for GAUC, the users) with replacement
    once and scores every run of A and of B on that same draw; the
    difference is the mean over A's runs minus the mean over B's runs (seeds
    of one model enter as repeated runs, so seed noise counts too).

    Args:
        labels: [N] 0/1 of the compared rows.
        scores_a: runs of model A, each [N] (same row order as ``labels``).
        scores_b: runs of model B, each [N].
        users: [N] user ids: compare GAUC with a bootstrap over users instead of AUC over rows.
        n_boot: resamples.
        seed: the resampling seed.

    Returns:
        ``{"diff": point estimate, "low": 2.5%, "high": 97.5%, "n_boot": n_boot, "n_rows": N}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not scores_a or not scores_b:
        raise ValueError("paired_bootstrap needs at least one run of each model")
    rng = np.random.default_rng(seed)
    if users is not None:
        tables = [per_user_auc(users, labels, s) for s in (*scores_a, *scores_b)]
        common = tables[0].index
        for table in tables[1:]:
            common = common.intersection(table.index)
        aucs = np.stack([t.loc[common, "auc"].to_numpy() for t in tables])  # [runs, U]
        weights = tables[0].loc[common, "n"].to_numpy(np.float64)
        diff_per_user = aucs[: len(scores_a)].mean(0) - aucs[len(scores_a) :].mean(0)
        point = float(np.average(diff_per_user, weights=weights))
        draws = rng.integers(0, len(common), size=(n_boot, len(common)))
        boots = (diff_per_user[draws] * weights[draws]).sum(1) / weights[draws].sum(1)
    else:
        stacked = np.stack([*scores_a, *scores_b]).astype(np.float64)  # [runs, N]
        point_aucs = _rank_auc_rows(labels, stacked)
        point = float(point_aucs[: len(scores_a)].mean() - point_aucs[len(scores_a) :].mean())
        boots = np.empty(n_boot)
        for b in range(n_boot):
            draw = rng.integers(0, len(labels), size=len(labels))
            aucs = _rank_auc_rows(labels[draw], stacked[:, draw])
            boots[b] = aucs[: len(scores_a)].mean() - aucs[len(scores_a) :].mean()
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"diff": point, "low": float(low), "high": float(high), "n_boot": n_boot, "n_rows": int(len(labels))}


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
