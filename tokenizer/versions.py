"""Publishing a SID version: its name, its SID table and its folder, written atomically.

Both tokenizer stages (:mod:`tokenizer.train`, :mod:`tokenizer.finetune`)
publish through here. A version is named ``<prefix>-<sha256(identity)[:10]>``
(:func:`version_name`), so the same inputs give the same version and any
change a new one. Its folder ``D/sids/<version>/`` holds:

* ``sids.parquet``: the SID contract (:func:`sid_table`);
* ``codebooks.pt``: ``{"codebooks": [K x d per position, in SID order],
  "config", "state_dict"}``;
* ``config.json`` and ``metrics.json``.

:func:`write_version` writes the folder under a temporary name and renames it
into place, then moves ``D/sids/LATEST`` onto it: a reader sees a complete
version or none, and LATEST never names a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from sidrank.contract import DatasetPaths
from sidrank.io import write_json, write_parquet
from tokenizer.interface import Tokenizer


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
    """Write ``D/sids/<version>/`` atomically (a temporary folder renamed into place, replacing
    an earlier copy of the same version), then move ``D/sids/LATEST`` onto it."""
    final = paths.sid_dir(version)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=final.parent))
    try:
        write_parquet(table, staging / "sids.parquet")
        codebooks = [c.clone() for c in model.codebooks]
        torch.save({"codebooks": codebooks, "config": config, "state_dict": model.state_dict()}, staging / "codebooks.pt")
        write_json(config, staging / "config.json")
        write_json(metrics, staging / "metrics.json")
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths.mark_latest_sid_version(version)
    return final


def replace_dir(source: Path, target: Path) -> None:
    """Rename folder ``source`` onto ``target`` (same filesystem). An existing ``target`` is
    renamed aside first, so ``target`` is the old folder or the new one, never a mix (between
    the two renames it is briefly absent)."""
    if not target.exists():
        source.rename(target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    aside.rmdir()
    target.rename(aside)
    source.rename(target)
    shutil.rmtree(aside, ignore_errors=True)
