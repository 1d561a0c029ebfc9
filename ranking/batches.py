"""Training rows -> tensors once per split -> TorchRec batches by index.

A split is encoded once into a dense matrix, labels, row ids and one jagged
(values, offsets) pair per sparse feature; a batch is then a tensor gather
(no Python per row), returned as a :class:`RankerBatch` with one
``KeyedJaggedTensor`` for the pooled tables and one for the unpooled ones,
keys in the table order of ``ranking.tables.sparse_tables``.

Dense features (``DENSE_FEATURES``): log1p of the four causal counts,
smoothed positive rates ``(pos + a) / (count + a + b)`` for user and item,
log1p of the history length. Missing counts (no earlier events) read as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sidrank import contract
from sidrank.schema import DataError, check_ids_in_range, require_columns
from ranking.tables import FeatureConfig, item_prefix_buckets, prefix_bucket, profile_columns, sparse_tables

# Rows as a DataFrame or as column name -> numpy array / Arrow array (build_split).
Columns = pd.DataFrame | Mapping[str, "np.ndarray | pa.Array"]

DENSE_FEATURES = (
    "log_user_count",
    "log_user_pos_count",
    "log_item_count",
    "log_item_pos_count",
    "user_pos_rate",
    "item_pos_rate",
    "log_hist_len",
)


def _list_column(rows: Columns, column: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(values int64 [nnz], lengths int64 [N]) of a list column; a missing list is empty."""
    try:
        values = rows[column]
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{source}: column '{column}' is not a column of int64 lists ({exc})") from exc
    if pa.types.is_null(arr.type):
        return np.zeros(0, np.int64), np.zeros(len(arr), np.int64)
    if not pa.types.is_list(arr.type):
        raise DataError(f"{source}: column '{column}' holds {arr.type}, expected lists of int64")
    # pc works on Arrow-backed columns (chunked arrays) and plain arrays alike.
    flat = pc.list_flatten(arr)
    if flat.null_count:
        raise DataError(f"{source}: column '{column}' has NaN/None inside lists; the feature pipeline must drop them")
    values = flat.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise DataError(f"{source}: column '{column}' has non-integer list values; expected int64 ids")
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    return values.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)


def _missing_as_zero(series: pd.Series) -> np.ndarray:
    """float64 values, NaN/None as 0 (numpy: pandas' fillna on an all-None object column warns and is slower)."""
    values = np.asarray(series, dtype=np.float64)
    return np.where(np.isnan(values), 0.0, values)


def _int_column(rows: Columns, column: str, size: int, source: str) -> np.ndarray:
    """A scalar categorical id column; NaN (not joined) means 0 = unknown."""
    series = rows[column]
    if series.dtype.kind in "iu":  # the common case (training rows, online reads): no NaN, no rounding to check
        values = np.asarray(series, dtype=np.int64)
    else:
        floats = _missing_as_zero(series)
        if not np.array_equal(floats, np.round(floats)):
            raise DataError(f"{source}: column '{column}' has non-integer ids; expected int64")
        values = floats.astype(np.int64)
    check_ids_in_range(values, size, f"{source}: column '{column}'")
    return values


def _sid_codes(rows: Columns, meta: contract.FeatureMeta, source: str, allow_missing: bool) -> np.ndarray:
    """[N, L] int64 SID codes in [0, K); -1 on rows without a SID if ``allow_missing``, else an error."""
    L, K = meta.sid_levels, meta.sid_codebook_size
    if K**L >= 2**63:
        raise DataError(f"{source}: SID codebook {K}^{L} overflows 64-bit prefix encoding; use fewer levels or codes")
    values, lengths = _list_column(rows, contract.SID_CODES, source)
    bad = (lengths != L) & ~(allow_missing & (lengths == 0))
    if bad.any():
        raise DataError(
            f"{source}: column '{contract.SID_CODES}' is missing or not {L} codes long for row_id "
            f"{np.asarray(rows['row_id'])[bad][:5].tolist()}; every item needs a SID of version "
            f"'{meta.sid_version}': publish it to Feast before training"
        )
    check_ids_in_range(values, K, f"{source}: column '{contract.SID_CODES}'")
    codes = np.full((len(lengths), L), -1, np.int64)
    codes[lengths == L] = values.reshape(-1, L)
    return codes


def _sid_features(
    rows: Columns, meta: contract.FeatureMeta, cfg: FeatureConfig, source: str, allow_missing_sid: bool
) -> dict:
    """SID positions, hashed item prefixes (depth 1..L) and hashed history prefix lists.

    A row without a SID (``allow_missing_sid``) looks up the unknown row 0 of
    every position table and no prefix: there is no prefix to hash.
    """
    codes = _sid_codes(rows, meta, source, allow_missing_sid)
    L, K, buckets = meta.sid_levels, meta.sid_codebook_size, cfg.n_prefix_buckets(meta)
    known = codes[:, 0] >= 0
    feats = {f"sid_{lvl}": (codes[:, lvl] + 1, np.ones(len(codes), np.int64)) for lvl in range(L)}
    for depth, bucket in enumerate(item_prefix_buckets(codes[known], K, buckets), start=1):
        feats[f"sid_prefix_{depth}"] = (bucket, known.astype(np.int64))
    for depth, column in enumerate(contract.HIST_SID_PREFIXES[:L], start=1):
        values, lengths = _list_column(rows, column, source)
        check_ids_in_range(values, K**depth, f"{source}: column '{column}' (depth-{depth} prefixes)")
        feats[column] = (prefix_bucket(values, depth, buckets), lengths)
    return feats


def _sparse_features(
    rows: Columns, meta: contract.FeatureMeta, cfg: FeatureConfig, source: str, allow_missing_sid: bool
) -> dict:
    """Feature name -> (values [nnz], lengths [N]) for every feature of :func:`sparse_tables`."""
    ones = np.ones(len(rows["row_id"]), np.int64)
    feats = {}
    if cfg.use_user_id:
        feats["user_id"] = (_int_column(rows, "user_id", meta.n_users + 1, source), ones)
    if cfg.use_item_id:
        feats["item_id"] = (_int_column(rows, "item_id", meta.n_items + 1, source), ones)
        values, lengths = _list_column(rows, contract.HIST_ITEMS, source)
        check_ids_in_range(values, meta.n_items + 1, f"{source}: column '{contract.HIST_ITEMS}'")
        feats[contract.HIST_ITEMS] = (values, lengths)
    for column, size in profile_columns(meta, cfg).items():
        feats[column] = (_int_column(rows, column, size, source), ones)
    if cfg.use_item_content:
        values, lengths = _list_column(rows, contract.ITEM_TAGS, source)
        check_ids_in_range(values, meta.n_tags + 1, f"{source}: column '{contract.ITEM_TAGS}'")
        feats[contract.ITEM_TAGS] = (values, lengths)
        feats["year_bucket"] = (_int_column(rows, "year_bucket", meta.n_year_buckets, source), ones)
    if cfg.use_sid:
        feats.update(_sid_features(rows, meta, cfg, source, allow_missing_sid))
    return feats


def dense_features(rows: Columns, cfg: FeatureConfig, source: str) -> np.ndarray:
    """[N, len(DENSE_FEATURES)] float32 dense matrix (see the module docstring)."""
    contract.check_behaviour_counts(rows, source)
    a, b = cfg.rate_prior_pos, cfg.rate_prior_neg
    columns = []
    for count_col, pos_col in (contract.USER_COUNT_COLUMNS, contract.ITEM_COUNT_COLUMNS):
        # Both missing: no earlier event (check_behaviour_counts refused a lone missing one).
        count, pos = (_missing_as_zero(rows[c]) for c in (count_col, pos_col))
        columns.append((np.log1p(count), np.log1p(pos), (pos + a) / (count + a + b)))
    (log_uc, log_upc, user_rate), (log_ic, log_ipc, item_rate) = columns
    _, hist_len = _list_column(rows, contract.HIST_ITEMS, source)
    stacked = np.stack([log_uc, log_upc, log_ic, log_ipc, user_rate, item_rate, np.log1p(hist_len)], axis=1)
    return stacked.astype(np.float32)


def _gather_jagged(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenate ``values[starts[i] : starts[i] + lengths[i]]`` over i without a Python loop."""
    total = int(lengths.sum())
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    # index_select, not values[...]: about 2x faster on CPU, and batch() is the training step's data loading.
    return values.index_select(0, torch.repeat_interleave(shift, lengths, output_size=total) + torch.arange(total))


@dataclass
class RankerBatch(Batch):
    """TorchRec's Batch plus the unpooled features: dense [B, N], pooled KJT, sequence KJT (or None), labels [B]."""

    sequence_features: KeyedJaggedTensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> RankerBatch:
        moved = super().to(device, non_blocking)
        sequence = None if self.sequence_features is None else self.sequence_features.to(device, non_blocking)
        return RankerBatch(moved.dense_features, moved.sparse_features, moved.labels, sequence)

    # TrainPipelineSparseDist copies batches on a side stream; every tensor it moved must be recorded
    # on the consuming stream, or the allocator may reuse its memory early.
    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.sequence_features is not None:
            self.sequence_features.record_stream(stream)

    def pin_memory(self) -> RankerBatch:
        pinned = super().pin_memory()
        sequence = None if self.sequence_features is None else self.sequence_features.pin_memory()
        return RankerBatch(pinned.dense_features, pinned.sparse_features, pinned.labels, sequence)


@dataclass
class SplitTensors:
    """One split encoded once; :meth:`batch` gathers any subset of its rows.

    Shapes: N rows, F dense features, nnz_k values of sparse feature k.

    Args:
        keys: sparse feature names in KJT order.
        n_pooled: the first ``n_pooled`` keys feed pooled tables, the rest unpooled ones.
        dense: [N, F] float32.
        labels: [N] float32 0/1.
        row_ids: [N] int64, ascending.
        values: per key [nnz_k] int64 table ids.
        offsets: per key [N + 1] int64, row i owns ``values[offsets[i]:offsets[i+1]]``.
    """

    keys: tuple[str, ...]
    n_pooled: int
    dense: torch.Tensor
    labels: torch.Tensor
    row_ids: torch.Tensor
    values: tuple[torch.Tensor, ...]
    offsets: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return len(self.row_ids)

    def pooling_factors(self) -> dict[str, float]:
        """Mean ids per row of every sparse feature (the sharding planner's cost input)."""
        return {k: (offs[-1] / max(len(self), 1)).item() for k, offs in zip(self.keys, self.offsets)}

    def _kjt(self, index: torch.Tensor, keys: slice) -> KeyedJaggedTensor:
        """One KJT of B rows per key of ``self.keys[keys]``."""
        lengths, values = [], []
        for vals, offs in zip(self.values[keys], self.offsets[keys]):
            starts = offs.index_select(0, index)
            lens = offs.index_select(0, index + 1) - starts
            values.append(_gather_jagged(vals, starts, lens))
            lengths.append(lens)
        return KeyedJaggedTensor(keys=list(self.keys[keys]), values=torch.cat(values), lengths=torch.cat(lengths))

    def whole(self) -> RankerBatch:
        """Every row in order: :meth:`batch` of ``arange(N)`` without the gather (serving scores all it encodes)."""

        def kjt(keys: slice) -> KeyedJaggedTensor:
            lengths = [offs[1:] - offs[:-1] for offs in self.offsets[keys]]
            return KeyedJaggedTensor(keys=list(self.keys[keys]), values=torch.cat(self.values[keys]),
                                     lengths=torch.cat(lengths))

        sequence = kjt(slice(self.n_pooled, None)) if self.n_pooled < len(self.keys) else None
        return RankerBatch(dense_features=self.dense, sparse_features=kjt(slice(0, self.n_pooled)),
                           labels=self.labels, sequence_features=sequence)

    def batch(self, index: torch.Tensor) -> RankerBatch:
        """Rows ``index`` ([B] int64): dense [B, F], a pooled and (if any) an unpooled KJT, labels [B]."""
        pooled = self._kjt(index, slice(0, self.n_pooled))
        sequence = self._kjt(index, slice(self.n_pooled, None)) if self.n_pooled < len(self.keys) else None
        dense, labels = self.dense.index_select(0, index), self.labels.index_select(0, index)
        return RankerBatch(dense_features=dense, sparse_features=pooled, labels=labels, sequence_features=sequence)


def build_split(
    rows: Columns, meta: contract.FeatureMeta, cfg: FeatureConfig, source: str, *, allow_missing_sid: bool = False
) -> SplitTensors:
    """Encode one split's training rows (``contract`` columns, any order) into tensors.

    Args:
        rows: training rows of one split: a DataFrame, or (serving, a few rows at a
            time) a mapping of column name -> numpy array or Arrow list array in
            ``row_id`` order, which skips pandas' per-column costs.
        meta: table sizes from ``feature_meta.json``.
        cfg: feature selection.
        source: name for error messages, e.g. ``rows.parquet[valid]``.
        allow_missing_sid: serving only: an item the store holds no SID for
            is encoded as unknown (code 0 at every position, no prefix)
            instead of refused; training rows always carry their SID.

    Raises:
        DataError: empty split, missing columns, ids outside their table,
            NaN inside lists, a row without its SID (unless allowed).
    """
    if not (len(rows) if isinstance(rows, pd.DataFrame) else len(rows.get("row_id", ()))):
        raise DataError(f"{source}: no rows; the split is empty, check the 'split' column of events.parquet")
    needed = ["row_id", "label", "user_id", contract.ITEM_TAGS, contract.HIST_ITEMS, *contract.ITEM_SCALAR_COLUMNS]
    needed += [*contract.USER_COUNT_COLUMNS, *contract.ITEM_COUNT_COLUMNS, *profile_columns(meta, cfg)]
    needed += ["item_id"] if cfg.use_item_id else []
    needed += [contract.SID_CODES, *contract.HIST_SID_PREFIXES[: meta.sid_levels]] if cfg.use_sid else []
    require_columns(rows, needed, source)
    labels, row_ids = np.asarray(rows["label"]), np.asarray(rows["row_id"], dtype=np.int64)
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{source}: column 'label' must be 0/1; rebuild the events with the ingest stage")
    if (np.diff(row_ids) < 0).any():
        if not isinstance(rows, pd.DataFrame):
            raise ValueError(f"{source}: rows given as columns must come in row_id order")
        return build_split(rows.sort_values("row_id", kind="stable"), meta, cfg, source,
                           allow_missing_sid=allow_missing_sid)
    feats = _sparse_features(rows, meta, cfg, source, allow_missing_sid)
    tables = sparse_tables(meta, cfg)
    keys = tuple(f for table in tables for f in table.features)
    assert set(keys) <= set(feats), (keys, sorted(feats))
    offsets = [np.concatenate([[0], np.cumsum(feats[k][1])]) for k in keys]
    return SplitTensors(
        keys=keys,
        n_pooled=sum(len(table.features) for table in tables if table.pooled),
        dense=torch.from_numpy(dense_features(rows, cfg, source)),
        labels=torch.from_numpy(labels.astype(np.float32)),
        row_ids=torch.from_numpy(row_ids),
        values=tuple(torch.from_numpy(feats[k][0]) for k in keys),
        offsets=tuple(torch.from_numpy(o.astype(np.int64)) for o in offsets),
    )
