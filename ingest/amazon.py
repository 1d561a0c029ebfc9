"""Amazon review + metadata reader (McAuley et al. format, e.g. Beauty).

Reviews are JSON lines with ``reviewerID``, ``asin``, ``overall`` (rating) and
``unixReviewTime``; metadata lines carry ``asin`` and optionally ``title``,
``categories`` (list of category paths, 2014 release) or ``category`` (one
flat path, 2018 release), ``brand`` and ``description``. Files ending in
``.gz`` are read through gzip. The 2014 metadata files are Python dict
literals rather than JSON; both are accepted.

Conventions:
- raw ids map to dense ids 1..n in sorted raw-id order (independent of line order);
- only items that occur in the reviews become items; items without a metadata
  line keep title "" and no tags (common in the public dumps, not an error);
- tags = the flattened category paths plus the brand, de-duplicated in order;
  year = 0 (unknown); repeated (user, item) reviews stay separate events.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from tqdm import tqdm

from sidrank.io import file_sha256
from ingest.dataset import (
    IngestedDataset,
    dense_ids,
    make_events,
    parse_ratings,
    parse_unix_seconds,
    sorted_vocabulary,
)
from sidrank.schema import DataError

log = logging.getLogger(__name__)

REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")


def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse_line(line: str, path: Path, line_no: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, RecursionError, MemoryError) as exc:
            raise DataError(f"{path}: line {line_no} is neither JSON nor a Python dict literal; pass a JSON-lines file") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: line {line_no} is nested too deeply to be a review or metadata record; fix that line") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {line_no} is a {type(record).__name__}, expected one object per line")
    return record


def _require_file(path: Path, flag: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass the Amazon file with {flag} PATH")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line of a JSON-lines file.

    Raises:
        DataError: the file is not UTF-8, a ``.gz`` is truncated or corrupt, a
            line is not one object, or the file holds no record at all.
    """
    line_no, found = 0, False
    try:
        with _open_text(path) as fh:
            for line_no, line in enumerate(tqdm(fh, desc=path.name, unit=" lines", mininterval=2.0), start=1):
                if line.strip():
                    found = True
                    yield line_no, _parse_line(line, path, line_no)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {line_no + 1} is not UTF-8 ({exc.reason}); re-encode the file as UTF-8") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt after line {line_no} ({exc}); download "
                        f"the file again") from exc
    if not found:
        raise DataError(f"{path}: the file is empty or blank; pass the Amazon JSON-lines file")


def _raw_id(record: dict[str, Any], name: str, path: Path, line_no: int) -> str:
    """The id in column ``name``: a non-empty string (a null would become the id "None")."""
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: line {line_no} column '{name}' is {value!r}, expected a non-empty string id; "
                        f"fix or drop that line")
    return value


def _rating(record: dict[str, Any], path: Path, line_no: int) -> Any:
    """Column ``overall`` as read; a boolean (``true`` would count as 1 star) is a DataError."""
    value = record["overall"]
    if isinstance(value, bool):
        raise DataError(f"{path}: line {line_no} column 'overall' is {value!r}, expected a star rating; fix that line")
    return value


def _read_reviews(path: Path) -> pd.DataFrame:
    columns: dict[str, list[Any]] = {name: [] for name in REVIEW_FIELDS}
    for line_no, record in _records(path):
        missing = [name for name in REVIEW_FIELDS if name not in record]
        if missing:
            raise DataError(f"{path}: line {line_no} lacks column(s) {missing}; every review needs {list(REVIEW_FIELDS)}")
        record = {**record, "reviewerID": _raw_id(record, "reviewerID", path, line_no),
                  "asin": _raw_id(record, "asin", path, line_no), "overall": _rating(record, path, line_no)}
        for name in REVIEW_FIELDS:
            columns[name].append(record[name])
    return pd.DataFrame(columns)


def _text(value: Any) -> str:
    # Some dumps store description/title as a list of paragraphs.
    if isinstance(value, list):
        return " ".join(str(part) for part in value).strip()
    return "" if value is None else str(value).strip()


def _tags(record: dict[str, Any], path: Path, line_no: int) -> list[str]:
    categories = record.get("categories", record.get("category", []))
    if not isinstance(categories, list):
        raise DataError(f"{path}: line {line_no} column 'categories' must be a list of lists (or 'category' a list)")
    flat = [name for entry in categories for name in (entry if isinstance(entry, list) else [entry])]
    names = (_text(name) for name in [*flat, record.get("brand")])
    return list(dict.fromkeys(name for name in names if name))


def _read_meta(path: Path, wanted: set[str]) -> dict[str, tuple[str, list[str], str]]:
    """asin -> (title, tags, description) for the asins in ``wanted``; the first line of an asin wins."""
    content: dict[str, tuple[str, list[str], str]] = {}
    for line_no, record in _records(path):
        if "asin" not in record:
            raise DataError(f"{path}: line {line_no} lacks column 'asin'; every metadata line needs it")
        asin = _raw_id(record, "asin", path, line_no)
        if asin in wanted and asin not in content:
            content[asin] = (_text(record.get("title")), _tags(record, path, line_no), _text(record.get("description")))
    return content


def load_amazon(reviews: str | Path, meta: str | Path, name: str = "beauty") -> IngestedDataset:
    """Read Amazon reviews and metadata into an :class:`IngestedDataset`."""
    reviews, meta = Path(reviews), Path(meta)
    _require_file(reviews, "--reviews")
    _require_file(meta, "--meta")
    table = _read_reviews(reviews)
    raw_users, raw_items = table["reviewerID"].astype(str), table["asin"].astype(str)
    user_vocab, item_vocab = sorted_vocabulary(raw_users), sorted_vocabulary(raw_items)
    events = make_events(
        user_id=dense_ids(raw_users, user_vocab, str(reviews), "reviewerID", str(reviews)),
        item_id=dense_ids(raw_items, item_vocab, str(reviews), "asin", str(reviews)),
        rating=parse_ratings(table["overall"], str(reviews), "overall"),
        event_timestamp=parse_unix_seconds(table["unixReviewTime"], str(reviews), "unixReviewTime"),
    )
    content = _read_meta(meta, set(item_vocab))
    missing = len(item_vocab) - len(content)
    if missing:
        log.info("%d of %d reviewed items have no line in %s: empty title, no tags", missing, len(item_vocab), meta)
    rows = [content.get(asin, ("", [], "")) for asin in item_vocab]
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, len(item_vocab) + 1, dtype=np.int64),
            "raw_item_id": item_vocab.to_numpy(dtype=object),
            "title": [row[0] for row in rows],
            "tags": [row[1] for row in rows],
            "year": np.zeros(len(item_vocab), dtype=np.int64),
            "description": [row[2] for row in rows],
        }
    )
    users = pd.DataFrame(
        {"user_id": np.arange(1, len(user_vocab) + 1, dtype=np.int64), "raw_user_id": user_vocab.to_numpy(dtype=object)}
    )
    source = {"kind": "amazon", "files": {reviews.name: file_sha256(reviews), meta.name: file_sha256(meta)}}
    return IngestedDataset(
        name=name, events=events, items=items, users=users, profile_columns=[], source=source, events_file=str(reviews)
    )
