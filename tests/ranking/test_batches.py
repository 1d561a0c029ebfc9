"""ranking.batches: KJT layout, shared tables, prefix hashing and input validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from builders import TINY_ROWS_META, tiny_rows

from sidrank.schema import DataError
from sidrank import contract
from sidrank.contract import read_feature_meta
from ranking.batches import DENSE_FEATURES, build_split
from ranking.tables import FeatureConfig, prefix_bucket, sparse_tables

BUCKETS = 4096  # max(MIN_PREFIX_BUCKETS, 4 * n_items)

META = TINY_ROWS_META


def jagged(kjt, key: str) -> list[list[int]]:
    return [t.tolist() for t in kjt[key].to_dense()]


def bucket(value: int, depth: int) -> int:
    return int(prefix_bucket(np.array([value]), depth, BUCKETS)[0])


def test_kjt_keys_lengths_values_for_a_gathered_batch() -> None:
    split = build_split(tiny_rows(), TINY_ROWS_META, FeatureConfig(), "rows.parquet")
    batch = split.batch(torch.tensor([2, 0]))
    kjt = batch.sparse_features
    assert kjt.keys() == [
        "user_id", "item_id", "hist_items", "age_id", "tag_ids", "year_bucket", "sid_0", "sid_1", "sid_2",
        "sid_prefix_2", "sid_prefix_3", "hist_sid_p1", "hist_sid_p2",
    ]
    assert jagged(kjt, "user_id") == [[3], [1]]
    assert jagged(kjt, "item_id") == [[4], [1]]
    assert jagged(kjt, "hist_items") == [[1, 2], []]
    assert jagged(kjt, "age_id") == [[0], [1]]  # NaN profile id -> 0 (unknown)
    assert jagged(kjt, "tag_ids") == [[5], [1, 2]]
    assert jagged(kjt, "year_bucket") == [[2], [0]]
    assert [jagged(kjt, f"sid_{lvl}") for lvl in range(3)] == [[[2], [1]], [[1], [2]], [[1], [3]]]  # code + 1
    enc = contract.encode_prefix
    assert jagged(kjt, "sid_prefix_2") == [[bucket(enc((1, 0), 4), 2)], [bucket(enc((0, 1), 4), 2)]]
    assert jagged(kjt, "sid_prefix_3") == [[bucket(enc((1, 0, 0), 4), 3)], [bucket(enc((0, 1, 2), 4), 3)]]
    assert jagged(kjt, "hist_sid_p1") == [[bucket(0, 1), bucket(3, 1)], []]
    assert jagged(kjt, "hist_sid_p2") == [[bucket(1, 2), bucket(15, 2)], []]
    assert batch.labels.tolist() == [1.0, 1.0]
    assert batch.dense_features.shape == (2, len(DENSE_FEATURES))


def test_item_and_history_share_tables() -> None:
    tables = {t.name: t for t in sparse_tables(TINY_ROWS_META, FeatureConfig())}
    assert tables["t_item"].features == ("item_id", "hist_items")
    assert tables["t_item"].num_embeddings == TINY_ROWS_META.n_items + 1
    assert tables["t_sid_prefix"].features == ("sid_prefix_2", "sid_prefix_3", "hist_sid_p1", "hist_sid_p2")
    assert tables["t_sid_0"].num_embeddings == TINY_ROWS_META.sid_codebook_size + 1
    # Item 1's depth-2 prefix (0, 1) and the same prefix in row 2's history hit one bucket.
    split = build_split(tiny_rows(), TINY_ROWS_META, FeatureConfig(), "rows.parquet")
    kjt = split.batch(torch.tensor([0, 2])).sparse_features
    assert jagged(kjt, "sid_prefix_2")[0][0] == jagged(kjt, "hist_sid_p2")[1][0]


def test_prefix_bucket_is_deterministic_and_in_range() -> None:
    assert prefix_bucket(np.array([1, 2, 3]), 2, 4096).tolist() == [3175, 3650, 2441]  # golden
    values = np.random.default_rng(0).integers(0, 2**40, 10_000)
    out = prefix_bucket(values, 3, 1000)
    assert out.dtype == np.int64 and out.min() >= 0 and out.max() < 1000
    assert np.array_equal(out, prefix_bucket(values.copy(), 3, 1000))
    assert len(np.unique(out)) > 990  # spreads over the table
    # Depth is mixed in: the same integer at another depth lands elsewhere.
    assert (prefix_bucket(values[:100], 2, 1000) != out[:100]).mean() > 0.95


@pytest.mark.parametrize(
    ("column", "value", "size"),
    [
        ("user_id", 4, 4),
        ("item_id", 5, 5),
        ("hist_items", np.array([5]), 5),
        ("age_id", 3, 3),
        ("tag_ids", np.array([6]), 6),
        ("year_bucket", 3, 3),
        ("sid_codes", np.array([0, 4, 0]), 4),
        ("hist_sid_p2", np.array([16]), 16),
    ],
)
def test_out_of_range_ids_name_column_and_table_size(column: str, value, size: int) -> None:
    rows = tiny_rows()
    cells = rows[column].tolist()
    cells[1] = value
    rows[column] = pd.Series(cells, dtype=object)
    with pytest.raises(DataError, match=rf"rows.parquet: column '{column}'.*table of {size} rows"):
        build_split(rows, TINY_ROWS_META, FeatureConfig(), "rows.parquet")


def test_missing_counts_read_as_zero() -> None:
    dense = build_split(tiny_rows(), TINY_ROWS_META, FeatureConfig(), "rows.parquet").dense
    # Row 0: no user history (NaN counts) -> log1p 0 and the prior rate 1 / (1 + 1).
    assert dense[0].tolist() == pytest.approx([0.0, 0.0, np.log1p(1), 0.0, 0.5, 1 / 3, 0.0])
    assert dense[2, DENSE_FEATURES.index("log_hist_len")] == pytest.approx(np.log1p(2))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("user_count", np.nan, "'user_count' is missing in rows \\[1\\] where 'user_pos_count' is set"),
        ("item_count", -1.0, "'item_count' has negative counts"),
        ("item_pos_count", 99.0, "'item_pos_count' exceeds 'item_count'"),
    ],
)
def test_bad_counts_name_the_column_at_fault(column: str, value: float, message: str) -> None:
    rows = tiny_rows()
    rows.loc[1, column] = value
    with pytest.raises(DataError, match=message):
        build_split(rows, TINY_ROWS_META, FeatureConfig(), "rows.parquet")


def test_missing_sid_raises_unless_sids_are_unused() -> None:
    rows = tiny_rows()
    rows["sid_codes"] = pd.Series([np.array([0, 1, 2]), None, np.array([1, 0, 0])], dtype=object)
    with pytest.raises(DataError, match=r"'sid_codes' is missing.*row_id \[1\]"):
        build_split(rows, TINY_ROWS_META, FeatureConfig(), "rows.parquet")
    keys = build_split(rows, TINY_ROWS_META, FeatureConfig(use_sid=False), "rows.parquet").keys
    assert not any(k.startswith(("sid_", "hist_sid")) for k in keys)


def test_nan_inside_a_list_raises() -> None:
    rows = tiny_rows()
    rows["hist_items"] = pd.Series([None, np.array([1.0]), np.array([1.0, np.nan])], dtype=object)
    with pytest.raises(DataError, match="'hist_items' has NaN"):
        build_split(rows, TINY_ROWS_META, FeatureConfig(), "rows.parquet")


def test_empty_split_raises() -> None:
    with pytest.raises(DataError, match="empty"):
        build_split(tiny_rows().iloc[:0], TINY_ROWS_META, FeatureConfig(), "rows.parquet[test]")


def test_feature_selections_of_the_benchmark() -> None:
    def tables(**kw) -> set[str]:
        return {t.name for t in sparse_tables(TINY_ROWS_META, FeatureConfig(**kw))}

    common = {"t_user", "t_age_id", "t_tag", "t_year"}
    sid = {"t_sid_0", "t_sid_1", "t_sid_2", "t_sid_prefix"}
    assert tables(use_sid=False) == common | {"t_item"}
    assert tables() == common | {"t_item"} | sid
    assert tables(use_item_id=False) == common | sid
    keys = build_split(tiny_rows(), TINY_ROWS_META, FeatureConfig(use_item_id=False), "r").keys
    assert "item_id" not in keys and "hist_items" not in keys
    # Without the item content, a cold item is described by its SID alone (the no_content rungs).
    assert tables(use_item_content=False) == common - {"t_tag", "t_year"} | {"t_item"} | sid
    keys = build_split(tiny_rows(), TINY_ROWS_META, FeatureConfig(use_item_content=False), "r").keys
    assert "tag_ids" not in keys and "year_bucket" not in keys and "sid_0" in keys


def test_batch_gather_equals_per_row_lists() -> None:
    rng = np.random.default_rng(1)
    n = 50
    rows = pd.concat([tiny_rows()] * 17, ignore_index=True).iloc[:n].assign(row_id=np.arange(n))
    rows["hist_items"] = [rng.integers(1, 5, rng.integers(0, 4)) for _ in range(n)]
    split = build_split(rows, TINY_ROWS_META, FeatureConfig(), "r")
    index = torch.from_numpy(rng.integers(0, n, 20))
    kjt = split.batch(index).sparse_features
    assert jagged(kjt, "hist_items") == [rows["hist_items"][i].tolist() for i in index.tolist()]
    assert jagged(kjt, "user_id") == [[rows["user_id"][i]] for i in index.tolist()]


def test_read_feature_meta(tmp_path: Path) -> None:
    path = tmp_path / "feature_meta.json"
    path.write_text(json.dumps({**dataclasses.asdict(TINY_ROWS_META), "n_rows": 3}))
    assert read_feature_meta(path) == TINY_ROWS_META
    raw = dataclasses.asdict(TINY_ROWS_META)
    del raw["n_tags"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="n_tags"):
        read_feature_meta(path)


def test_feature_config_validation() -> None:
    with pytest.raises(ValueError, match="prefix_buckets"):
        FeatureConfig(prefix_buckets=0)
    with pytest.raises(ValueError, match="rate_prior_neg"):
        FeatureConfig(rate_prior_neg=0.0)
    assert FeatureConfig(prefix_buckets=64).n_prefix_buckets(TINY_ROWS_META) == 64


def test_pooling_factors_are_mean_ids_per_row() -> None:
    split = build_split(tiny_rows(), TINY_ROWS_META, FeatureConfig(), "rows.parquet")
    factors = split.pooling_factors()
    assert list(factors) == list(split.keys)
    assert factors["user_id"] == 1.0
    lengths = [0 if h is None else len(h) for h in tiny_rows()[contract.HIST_ITEMS]]  # None: no history yet
    assert factors["hist_items"] == pytest.approx(sum(lengths) / len(lengths))


def assert_same_batch(got, expected) -> None:
    """Equal dense features, labels and (pooled and sequence) KJTs, key by key."""
    assert torch.equal(got.dense_features, expected.dense_features) and torch.equal(got.labels, expected.labels)
    for a, b in ((got.sparse_features, expected.sparse_features), (got.sequence_features, expected.sequence_features)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys() and torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())


def test_whole_split_equals_the_gather_of_every_row() -> None:
    rng = np.random.default_rng(2)
    n = 30
    rows = pd.concat([tiny_rows()] * 10, ignore_index=True).iloc[:n].assign(row_id=np.arange(n))
    rows["hist_items"] = [rng.integers(1, 5, rng.integers(0, 4)) for _ in range(n)]
    split = build_split(rows, TINY_ROWS_META, FeatureConfig(), "r")
    assert_same_batch(split.whole(), split.batch(torch.arange(n)))


def test_columns_encode_like_the_frame_they_come_from() -> None:
    rng = np.random.default_rng(3)
    n = 12
    rows = pd.concat([tiny_rows()] * 6, ignore_index=True).iloc[:n].assign(row_id=np.arange(n))
    rows["hist_items"] = [rng.integers(1, 5, rng.integers(0, 4)).tolist() for _ in range(n)]
    rows.loc[3, "item_count"] = rows.loc[3, "item_pos_count"] = np.nan  # no earlier event
    columns = {name: rows[name].to_numpy() for name in rows.columns}
    columns["hist_items"] = pa.array(rows["hist_items"].tolist(), type=pa.list_(pa.int64()))  # as serving gathers it
    assert_same_batch(*(build_split(r, TINY_ROWS_META, FeatureConfig(), "r").whole() for r in (rows, columns)))
    with pytest.raises(ValueError, match="row_id order"):
        build_split({**columns, "row_id": columns["row_id"][::-1].copy()}, TINY_ROWS_META, FeatureConfig(), "r")
