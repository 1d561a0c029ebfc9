"""ranking.factor_init: co-watch factors recover planted taste groups, use no label, and reach the SID rows of cold items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from sidrank import contract
from ranking.batches import DENSE_FEATURES
from ranking.factor_init import cowatch_factors, cowatch_weights, sid_factor_rows
from ranking.model import ModelConfig, build_model
from ranking.sid_init import default_init_std, init_tables
from ranking.tables import FeatureConfig, prefix_bucket, sparse_tables

N_USERS, N_ITEMS, DIM, CODES = 60, 40, 8, 4
META = contract.FeatureMeta(
    n_users=N_USERS, n_items=N_ITEMS, n_tags=3, n_year_buckets=2, sid_levels=2, sid_codebook_size=CODES,
    sid_version="v1", user_profile={},
)


def planted_events(seed: int = 0) -> pd.DataFrame:
    """Users 1..30 watch items 1..20, users 31..60 items 21..40; labels random (they must not matter)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(1, N_USERS + 1):
        group = 0 if user <= N_USERS // 2 else 1
        watched = rng.choice(np.arange(1, 21) + 20 * group, size=8, replace=False)
        users += [user] * len(watched)
        items += watched.tolist()
    return pd.DataFrame({"user_id": users, "item_id": items, "label": rng.integers(0, 2, len(users))})


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ b.T


def test_factors_separate_planted_groups_and_leave_unseen_ids_zero() -> None:
    events = planted_events()
    users, items = cowatch_factors(
        events["user_id"].to_numpy(), events["item_id"].to_numpy(), N_USERS + 1, N_ITEMS + 1, DIM, seed=0
    )
    assert users.shape == (N_USERS + 1, DIM) and items.shape == (N_ITEMS + 1, DIM)
    assert np.allclose(np.linalg.norm(items[1:], axis=1), 1.0) and not items[0].any() and not users[0].any()
    sims = cosine(items[1:], items[1:])
    group = np.arange(N_ITEMS) < 20
    same = group[:, None] == group[None, :]
    off_diagonal = ~np.eye(N_ITEMS, dtype=bool)
    assert sims[same & off_diagonal].mean() > 0.3 and abs(sims[~same].mean()) < 0.05
    # A user is closer to the items of their own group.
    assert cosine(users[1:31], items[1:21]).mean() > cosine(users[1:31], items[21:]).mean() + 0.3


def test_weights_ignore_labels_and_are_reproducible() -> None:
    events = planted_events()
    tables = sparse_tables(META, FeatureConfig(use_sid=False))
    flipped = events.assign(label=1 - events["label"])
    first = cowatch_weights(events, tables, DIM, N_USERS, N_ITEMS, seed=3)
    again = cowatch_weights(flipped, tables, DIM, N_USERS, N_ITEMS, seed=3)
    assert set(first) == {"t_user", "t_item"}
    for name in first:
        assert torch.equal(first[name], again[name])
    # Rows with a factor have entry std scale x the default init's; the unknown row starts at zero.
    item = cowatch_weights(events, tables, DIM, N_USERS, N_ITEMS, seed=3, scale=4.0)["t_item"]
    std = default_init_std(N_ITEMS + 1)
    assert abs(item[1:].std().item() / (4.0 * std) - 1) < 0.1
    assert not item[0].any()


def test_cold_item_sid_rows_come_from_train_items_with_its_codes() -> None:
    events = planted_events()
    events = events[events["item_id"] != 40]  # item 40 is cold: no train row
    tables = sparse_tables(META, FeatureConfig())
    # Items of group 0 have first code 0, group 1 first code 1; second code spreads them.
    item_ids = np.arange(1, N_ITEMS + 1)
    sids = pd.DataFrame({"item_id": item_ids, "sid_0": (item_ids > 20).astype(int), "sid_1": item_ids % CODES})
    _, item_f = cowatch_factors(
        events["user_id"].to_numpy(), events["item_id"].to_numpy(), N_USERS + 1, N_ITEMS + 1, DIM, seed=0
    )
    rows = sid_factor_rows(item_f, sids, tables, CODES)
    assert {"t_sid_0", "t_sid_1", "t_sid_prefix"} <= set(rows)
    group1 = item_f[21:40].sum(axis=0)
    code_row = rows["t_sid_0"][1 + 1]  # code 1 of position 0 -> row 2
    assert np.allclose(code_row, group1)
    # The cold item's depth-2 prefix row is the direction of the train items sharing that prefix.
    buckets = tables[[t.name for t in tables].index("t_sid_prefix")].num_embeddings
    cold_prefix = contract.encode_prefix((1, 40 % CODES), CODES)
    row = rows["t_sid_prefix"][prefix_bucket(np.array([cold_prefix]), 2, buckets)[0]]
    peers = [i for i in range(21, 40) if i % CODES == 40 % CODES]
    assert np.allclose(row, item_f[peers].sum(axis=0))
    assert (row / np.linalg.norm(row)) @ group1 / np.linalg.norm(group1) > 0.9


def test_init_tables_lands_in_an_unsharded_model() -> None:
    tables = sparse_tables(META, FeatureConfig())
    model = build_model(tables, len(DENSE_FEATURES), ModelConfig(emb_dim=DIM), device="cpu")
    weights = cowatch_weights(planted_events(), tables, DIM, N_USERS, N_ITEMS, seed=0)
    assert init_tables(model, weights, "test") == ["t_item", "t_user"]
    state = model.state_dict()
    key = next(k for k in state if k.endswith("t_item.weight"))
    assert torch.equal(state[key], weights["t_item"])


def test_sid_rows_without_an_item_table_cover_items_train_never_saw() -> None:
    # --no-use-item-id --sid-init cowatch: the factors are sized by the meta, not the largest train id.
    events = planted_events()
    events = events[events["item_id"] < 30]
    tables = sparse_tables(META, FeatureConfig(use_item_id=False))
    item_ids = np.arange(1, N_ITEMS + 1)
    sids = pd.DataFrame({"item_id": item_ids, "sid_0": (item_ids > 20).astype(int), "sid_1": item_ids % CODES})
    weights = cowatch_weights(events, tables, DIM, N_USERS, N_ITEMS, seed=0, sids=sids, codebook_size=CODES)
    assert "t_item" not in weights and weights["t_sid_0"].shape == (CODES + 1, DIM)
