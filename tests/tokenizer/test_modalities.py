"""Modality building: tag/year features, real MiniLM title embeddings, content-keyed cache,
precomputed (synthetic) modalities validated, bad files rejected with DataError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sidrank.io import read_json
from sidrank.schema import DataError, validate_modality
from sidrank.contract import DatasetPaths
from tokenizer import modalities
from tokenizer.modalities import build_modalities, read_modalities, tag_features
from builders import seal_dataset, seal_modalities

TITLES = ["Star Wars", "Star Trek", "Pride and Prejudice", "Sense and Sensibility", ""]
TAGS = [["Sci-Fi", "Action"], ["Sci-Fi"], ["Romance", "Drama"], ["Romance"], []]
YEARS = [1977, 1979, 1995, 0, 1990]


def write_items(root: Path, titles: list[str], *, precomputed: bool = False) -> DatasetPaths:
    paths = DatasetPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    n = len(titles)
    items = pd.DataFrame(
        {"item_id": np.arange(1, n + 1, dtype=np.int64), "title": titles, "tags": TAGS[:n], "year": np.array(YEARS[:n])}
    )
    items.to_parquet(paths.items, index=False)
    paths.meta.write_text(json.dumps({"n_items": n, "n_users": 1, "precomputed_modalities": precomputed}))
    seal_dataset(paths)
    return paths


def refuse_to_load() -> None:
    raise AssertionError("the text model must not be loaded on a cache hit")


def test_tag_features_multi_hot_year_bucket_and_missing_rows() -> None:
    features, vocab, buckets = tag_features(TAGS, np.array(YEARS))
    assert vocab == ["Action", "Drama", "Romance", "Sci-Fi"]
    assert buckets == [1975, 1990, 1995]
    expected_first = np.array([1, 0, 0, 1, 1, 0, 0]) / np.sqrt(3)  # Action, Sci-Fi, 1975 bucket
    np.testing.assert_allclose(features[0], expected_first, rtol=1e-6)
    np.testing.assert_allclose(features[3], [0, 0, 1, 0, 0, 0, 0])  # unknown year: genre bit only
    assert not features[4].any()  # no tags -> modality missing, even with a known year
    np.testing.assert_allclose(np.linalg.norm(features[:4], axis=1), 1, rtol=1e-6)


def test_text_embeddings_real_model_cache_and_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_items(tmp_path / "d", TITLES)
    arrays = build_modalities(paths)
    text = arrays["text"]
    assert text.shape == (len(TITLES) + 1, 384) and text.dtype == np.float32
    validate_modality("text", text, len(TITLES), "test")
    assert not text[0].any() and not text[5].any()  # padding row; empty title -> missing
    sim = text @ text.T
    assert sim[1, 2] > sim[1, 3] + 0.1  # Star Wars nearer Star Trek than Pride and Prejudice
    assert sim[3, 4] > sim[3, 2] + 0.03  # Austen nearer Austen than Star Trek
    manifest = read_json(paths.modalities / "manifest.json")
    assert manifest["names"] == ["tags", "text"] and manifest["dims"] == {"tags": 7, "text": 384}
    np.testing.assert_array_equal(np.load(paths.modality("text")), text)

    # same titles: the cache answers and the model is never loaded
    monkeypatch.setattr(modalities, "load_text_model", refuse_to_load)
    again = build_modalities(paths)
    np.testing.assert_array_equal(again["text"], text)
    np.testing.assert_array_equal(again["tags"], arrays["tags"])
    # a changed title is a different cache key: the encoder is needed again
    write_items(paths.root, ["Star Wars: A New Hope", *TITLES[1:]])
    with pytest.raises(AssertionError, match="must not be loaded"):
        build_modalities(paths)


def test_precomputed_modalities_are_only_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_items(tmp_path / "d", [""] * 4, precomputed=True)
    rng = np.random.default_rng(0)
    view = rng.normal(size=(5, 6)).astype(np.float32)
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    view[0] = 0
    paths.modalities.mkdir()
    np.save(paths.modality("text"), view)
    (paths.modalities / "manifest.json").write_text(
        json.dumps({"names": ["text"], "dims": {"text": 6}, "source": "synthetic"})
    )
    seal_modalities(paths)
    monkeypatch.setattr(modalities, "load_text_model", refuse_to_load)
    arrays = build_modalities(paths)
    assert list(arrays) == ["text"]
    np.testing.assert_array_equal(arrays["text"], view)
    assert not paths.modality("tags").exists()

    with pytest.raises(DataError, match="'image' is not listed"):
        read_modalities(paths, ["image"])
    bad = view.copy()
    bad[2, 1] = np.nan
    np.save(paths.modality("text"), bad)
    with pytest.raises(DataError, match=r"text\.npy: missing or changed.*tokenizer\.modalities"):
        read_modalities(paths)
    seal_modalities(paths)
    with pytest.raises(DataError, match=r"text\.npy.*NaN"):
        read_modalities(paths)
    np.save(paths.modality("text"), view[:, :4] / np.linalg.norm(view[:, :4], axis=1, keepdims=True).clip(1e-9))
    seal_modalities(paths)
    with pytest.raises(DataError, match=r"text\.npy.*says width 6"):
        read_modalities(paths)
    paths.modality("text").unlink()
    with pytest.raises(DataError, match=r"text\.npy: missing or changed"):
        read_modalities(paths)


def test_items_with_gaps_in_ids_are_rejected(tmp_path: Path) -> None:
    paths = write_items(tmp_path / "d", TITLES[:2])
    items = pd.read_parquet(paths.items)
    items.loc[1, "item_id"] = 7
    items.to_parquet(paths.items, index=False)
    seal_dataset(paths)
    with pytest.raises(DataError, match=r"items\.parquet: column 'item_id' must hold 1\.\.2"):
        build_modalities(paths)


@pytest.mark.parametrize(
    ("cached", "problem"),
    [
        (np.full((len(TITLES), modalities.TEXT_DIM), np.nan, np.float32), "NaN/inf values"),
        (np.full((len(TITLES), 300), 300**-0.5, np.float32), r"shape \(5, 300\), expected \(5, 384\)"),  # unit rows
    ],
)
def test_a_bad_text_cache_is_named_and_deleted_so_the_rerun_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: np.ndarray, problem: str
) -> None:
    paths = write_items(tmp_path / "d", TITLES)
    cache = modalities.text_cache_path(TITLES, paths.modalities / "cache")
    cache.parent.mkdir(parents=True)
    np.save(cache, cached)
    monkeypatch.setattr(modalities, "load_text_model", refuse_to_load)
    with pytest.raises(DataError, match=f"{cache.name}: cached text embeddings have {problem}; the file was deleted"):
        build_modalities(paths)
    assert not cache.exists() and not paths.modality_manifest.exists()
    with pytest.raises(AssertionError, match="must not be loaded"):  # the rerun goes to the encoder
        build_modalities(paths)
