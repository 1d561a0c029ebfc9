"""Publishing a SID version: its name, its SID table and its folder, written atomically.

Both tokenizer stages (:mod:`tokenizer.train`, :mod:`tokenizer.finetune`)
publish through here. A version is named ``<prefix>-<sha256(identity)[:10]>``
(:func:`version_name`), so the same inputs give the same version and any
change a new one. Its folder ``D/sids/<version>/`` holds:

* ``sids.parquet``: the SID contract (:func:`sid_table`);
* ``codebooks.pt``: ``{"codebooks": [K x d per position, in SID order],
  "config", "state_dict"}``;
* ``config.json`` and ``metrics.json``.

:func:`write_version` writes the folder as one unit
(:func:`sidrank.io.publish_unit`, recording the dataset unit it was built
from), then moves ``D/sids/LATEST`` onto it: readers
(:meth:`sidrank.contract.DatasetPaths.sid_digest`) accept a complete version
built from the current dataset or none, and LATEST never names a half-written
one. A degenerate version (:func:`tokenizer.metrics.degenerate_reason`) is
refused before anything is written, so LATEST never moves onto it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from sidrank.contract import DatasetPaths
from sidrank.io import publish_unit, write_json, write_parquet
from sidrank.schema import DataError
from tokenizer.interface import Tokenizer
from tokenizer.metrics import degenerate_reason


def content_digests(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """sha256 of the exact contents of each array (name -> hex digest)."""
    return {name: hashlib.sha256(np.ascontiguousarray(a).data).hexdigest() for name, a in arrays.items()}


def version_name(prefix: str, identity: Mapping[str, Any]) -> tuple[str, str]:
    """``(<prefix>-<hash[:10]>, full sha256)`` of ``identity`` (JSON, keys sorted)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{prefix}-{digest[:10]}", digest


def sid_table(codes: np.ndarray, version: str, valid_from: pd.Timestamp) -> pd.DataFrame:
    """The SID contract for codes [n_items, P] of items 1..n_items: item_id, sid_0..sid_{P-1},
    sid_version, event_timestamp = ``valid_from`` (a static version serves every row), created."""
    table = pd.DataFrame({"item_id": np.arange(1, len(codes) + 1, dtype=np.int64)})
    for level in range(codes.shape[1]):
        table[f"sid_{level}"] = codes[:, level].astype(np.int64)
    table["sid_version"] = version
    table["event_timestamp"] = pd.Series(valid_from, index=table.index).astype("datetime64[ns, UTC]")
    table["created"] = pd.Series(pd.Timestamp.now(tz="UTC"), index=table.index).astype("datetime64[ns, UTC]")
    return table


def ground_truth_clusters(paths: DatasetPaths) -> np.ndarray | None:
    """items.parquet's ``cluster`` column in item order (synthetic data), else None."""
    if "cluster" not in pq.read_schema(paths.items).names:
        return None
    items = pd.read_parquet(paths.items, columns=["item_id", "cluster"]).sort_values("item_id")
    return items["cluster"].to_numpy()


def write_version(
    paths: DatasetPaths, version: str, *, table: pd.DataFrame, model: Tokenizer, config: dict, metrics: dict
) -> Path:
    """Write ``D/sids/<version>/`` as one unit (replacing an earlier copy of the same version),
    then move ``D/sids/LATEST`` onto it.

    Raises:
        DataError: the SIDs are degenerate (:func:`tokenizer.metrics.degenerate_reason`);
            nothing is written and LATEST stays where it was.
    """
    final = paths.sid_dir(version)
    reason = degenerate_reason(metrics)
    if reason:
        raise DataError(
            f"{final}: version not published, its SIDs are degenerate ({reason}); LATEST still names the previous "
            f"version. Use a smaller --codebook-size or fewer --levels, or train longer"
        )
    with publish_unit(final, built_from=paths.built_from_dataset()) as staging:
        write_parquet(table, staging / "sids.parquet")
        codebooks = [c.clone() for c in model.codebooks]
        torch.save({"codebooks": codebooks, "config": config, "state_dict": model.state_dict()}, staging / "codebooks.pt")
        write_json(config, staging / "config.json")
        write_json(metrics, staging / "metrics.json")
    paths.mark_latest_sid_version(version)
    return final
