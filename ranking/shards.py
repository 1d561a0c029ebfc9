"""Each rank's share of the training rows: built from Feast once (rank 0), read split by split.

The rows cache (``DatasetPaths.rows_cache``) is rebuilt by rank 0 when it is
missing or older than the feature meta or the SID version registry, which
every publish rewrites; each rank then reads only its rows of it, with
row-group skipping, and checks them against events.parquet so that rows
built from other events are refused, never trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sidrank import contract
from sidrank.io import file_sha256
from sidrank.schema import SPLITS, DataError
from ranking.config import TrainConfig
from ranking.distributed import on_rank0, rank_share
from ranking.rows import arrow_to_frame, write_training_rows

log = logging.getLogger(__name__)


def read_row_ids(path: Path, wanted: np.ndarray) -> pd.DataFrame:
    """The rows of a parquet file whose ``row_id`` is in ``wanted`` (ascending), sorted by row_id.

    Row groups outside ``wanted``'s range are skipped by their statistics
    and the rest are filtered batch by batch, so only the wanted rows are
    ever held at once.
    """
    parquet = pq.ParquetFile(path)
    column = parquet.schema_arrow.get_field_index("row_id")
    lo, hi = (int(wanted[0]), int(wanted[-1])) if len(wanted) else (0, -1)
    groups = []
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max or (stats.min <= hi and stats.max >= lo):
            groups.append(g)
    value_set = pa.array(wanted)
    batches = [
        batch.filter(pc.is_in(batch.column("row_id"), value_set=value_set))
        for batch in parquet.iter_batches(batch_size=1 << 18, row_groups=groups)
    ]
    rows = arrow_to_frame(pa.Table.from_batches(batches, schema=parquet.schema_arrow))
    del batches
    # Arrow's allocator keeps the decoded, filtered-out batches otherwise.
    pa.default_memory_pool().release_unused()
    return rows.sort_values("row_id", kind="stable", ignore_index=True)


def load_rows(
    cfg: TrainConfig, events: pd.DataFrame, meta: contract.FeatureMeta, rank: int = 0, world: int = 1
) -> Iterator[tuple[str, pd.DataFrame]]:
    """This rank's training rows, split by split: (split, its :func:`rank_share` rows sorted by ``row_id``).

    ``--rows`` is read as given. The default cache is (re)built from Feast by
    rank 0 when missing or older than the feature meta or the SID version
    registry, which every publish rewrites; it is streamed to parquet in
    chunks, and each rank reads only its rows of it, one split at a time.
    """
    path = cfg.rows_path_for(meta)
    registry = contract.RepoPaths(cfg.repo).sid_registry
    sources = [cfg.feature_meta_path(meta), *([registry] if registry.exists() else [])]

    def build_if_stale() -> None:
        if path.exists() and (cfg.rows is not None or path.stat().st_mtime >= max(p.stat().st_mtime for p in sources)):
            return
        n_rows = write_training_rows(
            cfg.repo, events, path, service=cfg.service_for(meta), sid_version=meta.sid_version
        )
        log.info("wrote %d training rows to %s", n_rows, path)

    events_file = cfg.dataset / "events.parquet"
    if meta.events_sha256 and meta.events_sha256 != file_sha256(events_file):
        raise DataError(
            f"{cfg.feature_meta_path(meta)}: the feature store was published from other events than {events_file} "
            f"(sha256 {meta.events_sha256[:12]} vs {file_sha256(events_file)[:12]}); publish this dataset with "
            f"`python -m features.build --dataset {cfg.dataset}` and `python -m features.publish`"
        )
    # Rank 0 alone decides: a rank checking the file itself could see it half-way through the rebuild.
    on_rank0(build_if_stale)
    n_cached = pq.ParquetFile(path).metadata.num_rows
    if n_cached != len(events):
        raise DataError(
            f"{path}: its {n_cached} rows do not match the {len(events)} events by row_id; "
            f"it was built from other events: delete {path} to rebuild it"
        )
    by_id = events.set_index("row_id").sort_index()
    for split in SPLITS:
        wanted = rank_share(by_id.index[by_id["split"] == split].to_numpy(), split, rank, world)
        rows = read_row_ids(path, wanted)
        if not np.array_equal(rows["row_id"].to_numpy(), wanted):
            raise DataError(
                f"{path}: {len(rows)} of the {len(wanted)} {split} row ids of {events_file} are in it; "
                f"it was built from other events: delete {path} to rebuild it"
            )
        expected = by_id.loc[wanted]
        # Rows cached (or passed with --rows) before a re-ingest would carry stale labels or ids.
        for column in ("label", "user_id", "item_id"):
            if not np.array_equal(rows[column].to_numpy(), expected[column].to_numpy()):
                raise DataError(
                    f"{path}: column '{column}' disagrees with {events_file} for some row_id; "
                    f"the rows were built from other events: delete {path} (or the --rows file) to rebuild them"
                )
        versions = set(rows[contract.SID_VERSION].dropna()) if contract.SID_VERSION in rows else set()
        if cfg.features.use_sid and versions - {meta.sid_version}:
            raise DataError(
                f"{path}: column '{contract.SID_VERSION}' has {sorted(versions)} but feature meta says "
                f"'{meta.sid_version}'; delete {path} to rebuild the rows"
            )
        yield split, rows
