"""Atomic artifact writes: write to a temporary sibling, then rename.

A job that crashes half-way leaves the previous good artifact in place, never
a truncated file (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` (without its index) to parquet atomically."""
    return _write_with(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as strict JSON atomically (numpy scalars converted, NaN/inf as null).

    An undefined metric (e.g. cold-item AUC without cold rows) becomes ``null``
    so any JSON parser, not only Python's, reads the file.
    """
    text = json.dumps(_null_nonfinite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    return _write_with(path, lambda tmp: tmp.write_text(text + "\n"))


def write_npy(array: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` as .npy atomically."""

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return _write_with(path, writer)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` atomically."""
    return _write_with(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path) -> Any:
    """Read JSON, naming the file in the error when it is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it first")
    return json.loads(path.read_text())


def _null_nonfinite(obj: Any) -> Any:
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _null_nonfinite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_null_nonfinite(value) for value in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
