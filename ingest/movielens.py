"""MovieLens-100K readers: the RecBole wheel from PyPI and the GroupLens files.

Both readers produce the same events (ids, labels, timestamps, hence the same
``row_id`` order) and the same item content: the title without its "(1995)"
suffix, the year, and the genres as tags.

The RecBole wheel (``recbole==1.2.1``) ships the dataset under
``recbole/dataset_example/ml-100k/``; it is downloaded with pip into a cache,
checked against a pinned sha256 and read straight out of the zip (recbole is
never installed or extracted).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sidrank.io import file_sha256
from ingest.dataset import (
    ITEM_BASE_COLUMNS,
    IngestedDataset,
    dense_ids,
    make_events,
    parse_ratings,
    parse_unix_seconds,
    sorted_vocabulary,
)
from sidrank.schema import DataError, require_columns

log = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_DIR = "recbole/dataset_example/ml-100k"
PROFILE_COLUMNS = ["age", "gender", "occupation", "zip_code"]
# u.genre order of the GroupLens release; used when u.genre is absent.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# Item 267 is a placeholder: GroupLens writes "unknown", RecBole "unkonwn"; it carries no content.
PLACEHOLDERS = frozenset({"unknown", "unkonwn"})
GROUPLENS_FIX = "pass --path pointing at the folder of the GroupLens ml-100k release (u.data, u.item, u.user)"

_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")


def _year(text: str) -> int:
    """Four-digit year at the end of ``text`` ("1995", "01-Jan-1995"), else 0 (unknown)."""
    match = re.search(r"(\d{4})\s*$", text)
    return int(match.group(1)) if match else 0


def _clean_title(title: str) -> str:
    title = title.strip()
    return "" if title in PLACEHOLDERS else title


def _tags(genres: list[str]) -> list[str]:
    # "unknown" is the no-genre flag, not a genre.
    return [genre for genre in genres if genre not in PLACEHOLDERS]


def _read_table(data: bytes | Path, source: str, *, sep: str, header: bool, encoding: str = "utf-8") -> pd.DataFrame:
    """Every field as a string; an empty or blank file or a malformed line is a DataError naming the file."""
    raw = data if isinstance(data, bytes) else data.read_bytes()
    if not raw.strip():
        raise DataError(f"{source}: the file is empty or blank; pass the release's file")
    buffer = io.BytesIO(raw)
    try:
        return pd.read_csv(
            buffer, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False,
            quoting=csv.QUOTE_NONE, encoding=encoding,
        )  # fmt: skip
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot parse the file ({exc}); is it the right file?") from exc


def _require_width(df: pd.DataFrame, width: int, source: str, layout: str) -> None:
    if df.shape[1] != width:
        raise DataError(f"{source}: expected {width} columns ({layout}), found {df.shape[1]}; is it the right file?")


def _assemble(
    name: str,
    ratings: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    files: tuple[str, str, str],
    source: dict[str, Any],
) -> IngestedDataset:
    """Shared tail of both readers.

    Args:
        ratings: ``user``, ``item``, ``rating``, ``timestamp`` as strings.
        items: ``raw_item_id``, ``title``, ``year`` (int), ``tags`` (list of str).
        users: ``raw_user_id`` and the profile columns as strings.
        files: names of the ratings, item and user files for error messages.
    """
    ratings_file, item_file, user_file = files
    for frame, column, file in ((items, "raw_item_id", item_file), (users, "raw_user_id", user_file)):
        if frame[column].duplicated().any():
            dup = frame.loc[frame[column].duplicated(), column].iloc[0]
            raise DataError(f"{file}: id column has duplicate id {dup!r}; pass an unmodified release file")
    item_vocab, user_vocab = sorted_vocabulary(items["raw_item_id"]), sorted_vocabulary(users["raw_user_id"])
    events = make_events(
        user_id=dense_ids(ratings["user"], user_vocab, ratings_file, "user_id", user_file),
        item_id=dense_ids(ratings["item"], item_vocab, ratings_file, "item_id", item_file),
        rating=parse_ratings(ratings["rating"], ratings_file, "rating"),
        event_timestamp=parse_unix_seconds(ratings["timestamp"], ratings_file, "timestamp"),
    )
    items = items.set_index("raw_item_id").loc[item_vocab].reset_index(names="raw_item_id")
    items.insert(0, "item_id", np.arange(1, len(items) + 1, dtype=np.int64))
    items["year"] = items["year"].astype(np.int64)
    users = users.set_index("raw_user_id").loc[user_vocab].reset_index(names="raw_user_id")
    users.insert(0, "user_id", np.arange(1, len(users) + 1, dtype=np.int64))
    return IngestedDataset(
        name=name,
        events=events,
        items=items.loc[:, list(ITEM_BASE_COLUMNS)],
        users=users.loc[:, ["user_id", "raw_user_id", *PROFILE_COLUMNS]],
        profile_columns=list(PROFILE_COLUMNS),
        source=source,
        events_file=ratings_file,
    )


def fetch_recbole_wheel(cache_dir: str | Path) -> Path:
    """Download ``recbole==1.2.1`` (no deps) into ``cache_dir`` unless present; verify its sha256.

    Returns:
        Path of the verified wheel.
    """
    cache_dir = Path(cache_dir)
    wheel = cache_dir / RECBOLE_WHEEL
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from PyPI into %s", RECBOLE_REQUIREMENT, cache_dir)
        # Download into a temporary sibling so an interrupted download never looks cached.
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                       RECBOLE_REQUIREMENT, "-d", tmp]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            downloaded = Path(tmp) / RECBOLE_WHEEL
            if result.returncode != 0 or not downloaded.exists():
                raise DataError(
                    f"{wheel}: `pip download {RECBOLE_REQUIREMENT}` failed ({result.stderr.strip()[-300:]}); "
                    f"put {RECBOLE_WHEEL} into {cache_dir} by hand, or use the GroupLens files: "
                    f"`python -m ingest grouplens --path DIR`"
                )
            os.replace(downloaded, wheel)
    actual = file_sha256(wheel)
    if actual != RECBOLE_SHA256:
        raise DataError(
            f"{wheel}: sha256 is {actual}, expected {RECBOLE_SHA256}; "
            f"delete the file and re-run to download {RECBOLE_REQUIREMENT} again"
        )
    return wheel


def _read_member(archive: zipfile.ZipFile, wheel: Path, member: str, columns: list[str]) -> pd.DataFrame:
    """Read a RecBole atomic file (typed headers like ``user_id:token``) from the wheel."""
    source = f"{wheel}:{member}"
    try:
        data = archive.read(member)
    except KeyError as exc:
        raise DataError(f"{source}: not in the archive; pass the {RECBOLE_WHEEL} wheel") from exc
    df = _read_table(data, source, sep="\t", header=True)
    df.columns = [column.split(":", 1)[0] for column in df.columns]
    require_columns(df, columns, source)
    return df


def load_recbole_wheel(wheel: str | Path, name: str = "ml-100k") -> IngestedDataset:
    """Read MovieLens-100K out of the RecBole wheel (files ml-100k.inter/.item/.user)."""
    wheel = Path(wheel)
    members = [f"{RECBOLE_DIR}/ml-100k.{kind}" for kind in ("inter", "item", "user")]
    with zipfile.ZipFile(wheel) as archive:
        inter = _read_member(archive, wheel, members[0], ["user_id", "item_id", "rating", "timestamp"])
        item = _read_member(archive, wheel, members[1], ["item_id", "movie_title", "release_year", "class"])
        user = _read_member(archive, wheel, members[2], ["user_id", *PROFILE_COLUMNS])
    items = pd.DataFrame(
        {
            "raw_item_id": item["item_id"],
            "title": item["movie_title"].map(_clean_title),
            "year": item["release_year"].map(_year),
            "tags": item["class"].map(lambda genres: _tags(genres.split())),
        }
    )
    ratings = inter.rename(columns={"user_id": "user", "item_id": "item"})
    users = user.rename(columns={"user_id": "raw_user_id"})
    source = {"kind": "recbole-wheel", "requirement": RECBOLE_REQUIREMENT, "wheel": wheel.name,
              "sha256": file_sha256(wheel), "files": members}  # fmt: skip
    files = (f"{wheel.name}:{members[0]}", f"{wheel.name}:{members[1]}", f"{wheel.name}:{members[2]}")
    return _assemble(name, ratings, items, users, files, source)


def _grouplens_file(folder: Path, file_name: str) -> Path:
    path = folder / file_name
    if not path.is_file():
        raise DataError(f"{path}: file not found; {GROUPLENS_FIX}")
    return path


def _grouplens_genres(folder: Path) -> tuple[str, ...]:
    """Genre names ordered by flag index from u.genre ("name|index"), else the standard 19."""
    path = folder / "u.genre"
    if not path.is_file():
        return GROUPLENS_GENRES
    table = _read_table(path, str(path), sep="|", header=False, encoding="latin-1")
    table = table[table[0].str.strip() != ""]
    _require_width(table, 2, str(path), "genre|index")
    index = pd.to_numeric(table[1], errors="coerce")
    if index.isna().any():
        raise DataError(f"{path}: column 'index' (second field) must be an integer; pass the release's u.genre")
    return tuple(table[0].to_numpy()[np.argsort(index.to_numpy(), kind="stable")])


def _grouplens_items(path: Path, genres: tuple[str, ...]) -> pd.DataFrame:
    table = _read_table(path, str(path), sep="|", header=False, encoding="latin-1")
    _require_width(table, 5 + len(genres), str(path), f"id|title|release date|video date|url|{len(genres)} genre flags")
    flags = table.iloc[:, 5:].to_numpy() == "1"
    names = np.array(genres, dtype=object)
    parsed = table[1].str.strip().str.extract(_TITLE_YEAR)
    title = parsed["title"].fillna(table[1])
    # The year in the title is the movie's; the release date is the fallback.
    year = pd.to_numeric(parsed["year"]).fillna(table[2].map(_year))
    return pd.DataFrame(
        {
            "raw_item_id": table[0].str.strip(),
            "title": title.map(_clean_title),
            "year": year.astype(np.int64),
            "tags": [_tags(names[row].tolist()) for row in flags],
        }
    )


def load_grouplens(folder: str | Path, name: str = "ml-100k-grouplens") -> IngestedDataset:
    """Read the GroupLens ml-100k files: u.data (tab), u.item and u.user (pipe, latin-1)."""
    folder = Path(folder)
    data_path, item_path, user_path = (_grouplens_file(folder, f) for f in ("u.data", "u.item", "u.user"))
    ratings = _read_table(data_path, str(data_path), sep="\t", header=False)
    _require_width(ratings, 4, str(data_path), "user id, item id, rating, unix timestamp")
    ratings.columns = ["user", "item", "rating", "timestamp"]
    users = _read_table(user_path, str(user_path), sep="|", header=False, encoding="latin-1")
    _require_width(users, 5, str(user_path), "id|age|gender|occupation|zip code")
    users.columns = ["raw_user_id", *PROFILE_COLUMNS]
    items = _grouplens_items(item_path, _grouplens_genres(folder))
    source = {"kind": "grouplens", "path": str(folder),
              "files": {p.name: file_sha256(p) for p in (data_path, item_path, user_path)}}  # fmt: skip
    return _assemble(name, ratings, items, users, (str(data_path), str(item_path), str(user_path)), source)
