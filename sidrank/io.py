"""Atomic artifact writes: one file (a temporary sibling, then a rename) or a unit of files.

A job that crashes half-way leaves the previous good artifact in place, never
a truncated file (``os.replace`` is atomic on one filesystem).

A *unit* is the set of files one stage run writes into one folder (ingest's
events/items/users/meta.json, a SID version, the feature tables, the Feast
repository's data). :func:`publish_unit` builds them in a staging folder and
moves them into place under a manifest written last (``unit.json``: each
file's size and sha256, the upstream units it was built from, a digest);
:func:`require_complete_unit` is what readers call: no manifest, a listed file
missing or changed, or another upstream digest is a :class:`DataError` naming
the folder and the command that rebuilds it. So a run killed at any moment
leaves either the old unit, or a folder readers refuse, never a mix they
accept. Files a unit does not list (a later stage's subfolders) are not part
of it and are left alone.

Hashing costs time in proportion to the data, so a reader checks each unit
once per operation: one that learns the upstream from the unit's own files
reads them with :func:`read_unit_file` and compares the digests with
:func:`require_built_from`, instead of hashing the unit twice. Nothing is
remembered between operations: a unit replaced on disk is seen by the next.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from sidrank.schema import DataError

# The manifest of a unit, written last (publish_unit), checked by every reader (require_complete_unit).
UNIT_MANIFEST = "unit.json"
# Staging folders of publish_unit live inside the unit's folder (same filesystem: renames are atomic).
STAGING_PREFIX = ".staging-"


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


def clean_leftovers(folder: Path) -> list[Path]:
    """Delete what killed writers left in ``folder``: staging folders and ``.*.tmp`` files or folders.

    Returns the deleted paths. Only one writer may work on a folder at a time.
    """
    leftovers = [p for p in folder.glob(".*") if p.name.startswith(STAGING_PREFIX) or p.name.endswith(".tmp")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def _unit_digest(files: Mapping[str, Mapping[str, Any]], built_from: Mapping[str, str]) -> str:
    listing = {"files": {name: entry["sha256"] for name, entry in files.items()}, "built_from": dict(built_from)}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _listed_files(manifest_path: Path) -> set[str]:
    """The files an existing manifest lists (none when it is absent or unreadable)."""
    try:
        return set(json.loads(manifest_path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _commit_unit(staging: Path, final_dir: Path, built_from: Mapping[str, str]) -> dict:
    """Move every file of ``staging`` into ``final_dir`` and write the manifest last."""
    staged = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*")) if p.is_file()}
    if UNIT_MANIFEST in staged:
        raise ValueError(f"{staging}: a unit may not contain its own {UNIT_MANIFEST}")
    files = {name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for name, path in staged.items()}
    manifest_path = final_dir / UNIT_MANIFEST
    old = _listed_files(manifest_path)
    # From here until the new manifest exists, readers see an incomplete unit and refuse it.
    manifest_path.unlink(missing_ok=True)
    for name, path in staged.items():
        (final_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final_dir / name)
    for name in sorted(old - set(staged)):
        (final_dir / name).unlink(missing_ok=True)
    manifest = {
        "files": files,
        "built_from": dict(built_from),
        "digest": _unit_digest(files, built_from),
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    write_json(manifest, manifest_path)
    return manifest


@contextmanager
def publish_unit(final_dir: str | Path, *, built_from: Mapping[str, str] | None = None) -> Iterator[Path]:
    """Yield a staging folder; when the block succeeds, its files become ``final_dir``'s unit at once.

    Write every file of the unit under the yielded folder (subfolders allowed;
    plain writes suffice, nothing is visible before the end). On success the
    old manifest is removed, the files are renamed into ``final_dir``, files
    of the old unit the new one lacks are deleted and the new manifest is
    written last. On an error the staging folder is deleted and the old unit
    stays as it was. Leftovers of killed runs are deleted on entry.

    Args:
        final_dir: the unit's folder (created if needed).
        built_from: upstream key -> the digest of the unit this one was built
            from (e.g. ``{"dataset": ...}``), checked by readers through
            :func:`require_complete_unit`.
    """
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final_dir)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=final_dir))
    try:
        yield staging
        _commit_unit(staging, final_dir, built_from or {})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def require_complete_unit(
    folder: str | Path, rebuild: str, *, built_from: Mapping[str, str] | None = None, files: tuple[str, ...] = ()
) -> dict:
    """The manifest of the complete unit in ``folder``, every listed file checked against its sha256.

    Args:
        folder: the unit's folder.
        rebuild: the command that rebuilds the unit, named in every error.
        built_from: upstream key -> the digest the unit must record (a unit
            built from an older upstream is stale).
        files: names the unit must list.

    Raises:
        DataError: no manifest (a writer was interrupted, or the folder
            predates units), a file missing, changed or not listed, or another
            upstream digest; the message names the folder and ``rebuild``.
    """
    folder = Path(folder)
    manifest_path = folder / UNIT_MANIFEST
    fix = f"rebuild it with `{rebuild}`"
    if not manifest_path.is_file():
        raise DataError(
            f"{folder}: incomplete or missing (no {UNIT_MANIFEST}: its writer was interrupted, or it was written "
            f"before units were recorded); {fix}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{manifest_path}: unreadable unit manifest ({exc}); {fix}") from exc
    for name in files:
        if name not in listed:
            raise DataError(f"{folder / name}: not part of the unit listed in {manifest_path}; {fix}")
    for name, (size, sha256) in listed.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size or file_sha256(path) != sha256:
            raise DataError(f"{path}: missing or changed since {manifest_path} was written (a half-written or "
                            f"hand-edited unit); {fix}")
    require_built_from(folder, manifest, rebuild, built_from or {})
    return manifest


def require_built_from(folder: str | Path, manifest: Mapping[str, Any], rebuild: str,
                       built_from: Mapping[str, str]) -> None:
    """Refuse a unit whose manifest (one :func:`require_complete_unit` returned) records other upstream digests.

    For a reader that learns the upstream only from the unit's own files: it
    compares the manifest it has checked instead of hashing the unit again.

    Raises:
        DataError: the unit is stale; the message names ``folder`` and ``rebuild``.
    """
    recorded = manifest.get("built_from", {})
    for key, digest in built_from.items():
        if recorded.get(key) != digest:
            raise DataError(
                f"{folder}: stale, built from another {key} (recorded {str(recorded.get(key))[:12]}, now "
                f"{digest[:12]}: the {key} was rebuilt since); rebuild it with `{rebuild}`"
            )


def read_unit_file(folder: str | Path, manifest: Mapping[str, Any], name: str, rebuild: str) -> bytes:
    """The bytes of file ``name`` of the unit whose checked manifest is ``manifest``.

    The file is read once and its sha256 compared with the manifest's, so a
    unit replaced between the check and this read is refused instead of its
    file being taken for the checked unit's.

    Raises:
        DataError: the file is not listed, missing or differs from the
            manifest; the message names it and ``rebuild``.
    """
    path = Path(folder) / name
    fix = f"rebuild it with `{rebuild}`"
    entry = manifest["files"].get(name)
    if entry is None:
        raise DataError(f"{path}: not part of the unit listed in {Path(folder) / UNIT_MANIFEST}; {fix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{path}: missing or changed since {Path(folder) / UNIT_MANIFEST} was written (replaced "
                        f"while it was read, or hand-edited); {fix}")
    return data
