"""Online ranking: one user's candidate items, features from the Feast online store, one trained model.

    python -m ranking.serve rank --run artifacts/demo --repo feature_repo --user 5 --items 1 2 3
    python -m ranking.serve http --run artifacts/demo --repo feature_repo --port 8765 --workers 2
    curl -s 127.0.0.1:8765/rank -d '{"user_id": 5, "item_ids": [1, 2, 3]}'      # GET /health too

The model is the run's, loaded once per process (:func:`load_model`) into the
model built unsharded on CPU. Features are the latest rows of the run's
feature service, read for a whole batch of requests at once (user-keyed
views once per distinct user, item-keyed views once per distinct item:
``ranking.rows.OnlineFeatures.read``), encoded by the training code
(``ranking.batches.build_split``), so a served score equals the offline
model's score of the same row (tests/ranking/test_serve.py).
The service talks to ``feast.FeatureStore`` only, so it serves from whichever
online store the repository's ``feature_store.yaml`` selects.

Cold start: a user or item the model has no id row for (an id beyond the
model's tables, e.g. an item published after training) or that the store
does not know is looked up as the unknown id 0; its SID, content and counts
still come from the store, so a new item is scored through its SID. An item
without any row in the store is scored on unknown features throughout and
flagged ``"features": "none"``. The response lists the items best first,
``{"item_id", "score", "cold_item", "features", "sid"}``, beside ``batch``
(``{"requests", "candidates"}`` ranked together) and ``timings_ms`` (the
batch's stages; the HTTP service adds ``queue``, the wait for a worker).
A request's scores do not depend on what it was batched with, up to the last
bits of float32 rounding.

Store outages: a failed online read drops the store connection and retries
once on a fresh one (a connection may point at a database file that was
removed or replaced since); if that fails too the request gets
:class:`StoreUnavailable` (HTTP 503, ``ranking.service``), and the next
request reconnects again, so the service recovers by itself once the store
is back.

The HTTP service (one FastAPI/uvicorn process, ranking worker processes behind
it) is in ``ranking.service``; :class:`HttpConfig` holds its limits.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torchrec.datasets.utils import Batch

from sidrank.cli import add_config_arguments, build_config, log_to_stderr, parser_for, run_main
from sidrank.schema import DataError
from sidrank import contract
from ranking.batches import RankerBatch, build_split
from ranking.checkpoint import Loaded
from ranking.export import load_export, read_run
from ranking.rows import OnlineFeatures, OnlineTables, StoreReadError, object_array

log = logging.getLogger("ranking.serve")

# Loopback only: the service has no authentication.
HOST = "127.0.0.1"
MAX_ID = 2**63 - 1  # Feast's int64 entity keys
USER_COLUMNS = (*contract.USER_COUNT_COLUMNS, contract.HIST_ITEMS, *contract.HIST_SID_PREFIXES)
ITEM_CONTENT_COLUMNS = (contract.ITEM_TAGS, *contract.ITEM_SCALAR_COLUMNS, contract.SID_CODES)
# (has behaviour counts, has content or SID) -> the response's "features" flag.
FEATURE_FLAGS = {(True, True): "full", (False, True): "content", (True, False): "behaviour", (False, False): "none"}
# The /health probe: the first user and item of every model's vocabulary, so the store must hold their rows.
PROBE_USER, PROBE_ITEM = 1, 1

Query = tuple[int, list[int]]  # one request: (user id, candidate item ids)


@dataclass
class ServeConfig:
    """The ranker of a serving process.

    Args:
        run: run folder of ``ranking.train`` (``metrics.json`` and the model).
        repo: the Feast repository, published and materialized (any online store Feast supports).
        service: feature service; None means the one the run was trained on.
        max_candidates: most item ids one request may rank (more: HTTP 413).
        threads: torch intra-op threads per process.
    """

    run: Path
    repo: Path
    service: str | None = None
    max_candidates: int = 1000
    threads: int = 1

    def __post_init__(self) -> None:
        self.run, self.repo = Path(self.run), Path(self.repo)
        for name in ("max_candidates", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class HttpConfig:
    """The HTTP service on 127.0.0.1 (FastAPI on uvicorn).

    Args:
        ranker: the model and store every worker loads.
        port: HTTP port (0 picks a free one).
        workers: ranking worker processes behind the one HTTP process, each with its own
            model and store connection (``ranking.service``).
        max_batch_candidates: most candidates one worker ranks in one batch of waiting requests.
        max_body_bytes: largest request body; a larger one gets 413, decided from
            Content-Length before the body is read (while streaming when chunked).
        header_timeout: seconds a connection may take to send a request's head,
            counted from its opening or its previous response; also the keep-alive idle limit.
        body_timeout: seconds a request may take to send its body (then 408).
        max_header_bytes: largest request head (more: 400).
        limit_concurrency: open connections beyond which requests get 503.
        backlog: listen backlog of the server socket.
        worker_timeout: seconds a worker process may take to start (at launch and at every
            restart): it imports torch, TorchRec and Feast and loads the model (tens of
            seconds on two busy cores); a worker past it is killed.
        batch_timeout: seconds a worker may take over one batch; past it the worker is
            killed (its batch answers 503) and replaced, so a hung store read cannot hold
            clients forever.
    """

    ranker: ServeConfig
    port: int = 8765
    workers: int = 2
    max_batch_candidates: int = 2000
    max_body_bytes: int = 1 << 20
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    max_header_bytes: int = 16 << 10
    limit_concurrency: int = 256
    backlog: int = 4096
    worker_timeout: float = 180.0
    batch_timeout: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.ranker, dict):
            self.ranker = ServeConfig(**self.ranker)
        if not 0 <= self.port < 2**16:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("workers", "max_batch_candidates", "max_body_bytes", "max_header_bytes", "limit_concurrency",
                     "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "worker_timeout", "batch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def uvicorn_options(self) -> dict:
        """uvicorn's settings for this config: the one place the limits reach the server."""
        return {
            "host": HOST,
            "port": self.port,
            "backlog": self.backlog,
            "limit_concurrency": self.limit_concurrency,
            "timeout_keep_alive": self.header_timeout,
            "h11_max_incomplete_event_size": self.max_header_bytes,
            # By name: ranking.service imports this module.
            "http": "ranking.service:BoundedH11Protocol",
            "access_log": False,
        }


class RequestError(ValueError):
    """A request the service refuses; ``status`` is its HTTP status, the message says what to send instead."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(RuntimeError):
    """The service cannot rank now (HTTP 503 with Retry-After); the message is safe to show a client."""


class StoreUnavailable(ServiceUnavailable):
    """The online store cannot be read now."""


EntityId = Annotated[int, Field(ge=1, le=MAX_ID)]


class RankRequest(BaseModel):
    """``{"user_id": int, "item_ids": [int, ...], "sid_version": str (optional)}``; strict: no strings or bools as ids."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: EntityId
    item_ids: list[EntityId] = Field(min_length=1)
    sid_version: str | None = None


def _describe(error: ValidationError) -> str:
    """Pydantic's errors as one short line: ``field.index: message; ...``."""
    parts = []
    for item in error.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)


def parse_request(body: bytes | dict, max_candidates: int, sid_version: str) -> tuple[int, list[int]]:
    """Validate a JSON body (bytes) or an already decoded object; returns (user id, item ids).

    Duplicate item ids are refused, not merged: the response has one entry per
    requested id, so a client never has to guess which of its entries were dropped.

    Raises:
        RequestError: 400 for a body that is not JSON (nesting too deep included),
            413 for more than ``max_candidates`` ids, 422 for anything else.
    """
    try:
        if isinstance(body, bytes):
            request = RankRequest.model_validate_json(body)
        else:
            request = RankRequest.model_validate(body)
    except ValidationError as exc:
        invalid_json = any(item["type"] == "json_invalid" for item in exc.errors())
        raise RequestError(_describe(exc), 400 if invalid_json else 422) from None
    items = request.item_ids
    if len(items) > max_candidates:
        raise RequestError(f"{len(items)} candidates exceed the limit of {max_candidates} (--max-candidates)", 413)
    repeated = [item for item, count in Counter(items).items() if count > 1]
    if repeated:
        raise RequestError(f"item_ids holds duplicates {repeated[:10]}; send each candidate once")
    if request.sid_version is not None and request.sid_version != sid_version:
        raise RequestError(f"sid_version {request.sid_version!r}: this server ranks with {sid_version!r}; "
                           f"omit it or ask the server of that version")
    return request.user_id, items


class Candidates(NamedTuple):
    """The rows of a batch of requests in the training-row contract, plus what the store knew about them.

    Rows follow the requests, each request's items in its order.
    """

    rows: dict[str, np.ndarray | pa.Array]  # column -> [N], for build_split
    cold_users: np.ndarray  # [R] bool
    cold_items: np.ndarray  # [N] bool
    features: np.ndarray  # [N] FEATURE_FLAGS values
    has_sid: np.ndarray  # [N] bool


def _present(columns: dict[str, np.ndarray], names: list[str] | tuple[str, ...]) -> np.ndarray:
    """[n] bool: any of ``names`` holds a value, i.e. the store had a row."""
    return np.logical_or.reduce([pd.notna(columns[name]) for name in names])


def candidate_rows(tables: OnlineTables, requests: list[Query], meta: contract.FeatureMeta) -> Candidates:
    """One read's users and items joined into the rows ``build_split`` encodes: unknown ids -> 0.

    ``tables`` holds the distinct users and items of ``requests`` in first-seen order
    (:func:`distinct_ids`). Everything per user or per item is decided once and then
    gathered onto the rows.
    """
    users, items = tables.users, tables.items
    user_ids, item_ids = users["user_id"].astype(np.int64), items["item_id"].astype(np.int64)
    cold_user = (user_ids > meta.n_users) | ~_present(users, [*USER_COLUMNS, *meta.user_profile])
    behaviour, content = _present(items, contract.ITEM_COUNT_COLUMNS), _present(items, ITEM_CONTENT_COLUMNS)
    cold_item = (item_ids > meta.n_items) | ~(behaviour | content)
    # Items published after training have no id row in the model, in the history either.
    history = object_array([None if seen is None else [0 if item > meta.n_items else item for item in seen]
                            for seen in users[contract.HIST_ITEMS]])
    user_at = {user: i for i, user in enumerate(user_ids.tolist())}
    item_at = {item: i for i, item in enumerate(item_ids.tolist())}
    request_user = [user_at[user] for user, _ in requests]
    row_user = np.repeat(request_user, [len(ids) for _, ids in requests])
    row_item = np.fromiter((item_at[item] for _, ids in requests for item in ids), np.int64, len(row_user))
    flags = np.array([FEATURE_FLAGS[(bool(b), bool(c))] for b, c in zip(behaviour, content)], dtype=object)
    rows = {
        **{name: _gather(column, row_user) for name, column in users.items()},
        **{name: _gather(column, row_item) for name, column in items.items()},
        "row_id": np.arange(len(row_user)),
        "label": np.zeros(len(row_user), np.int64),
        "user_id": np.where(cold_user, 0, user_ids).take(row_user),
        "item_id": np.where(cold_item, 0, item_ids).take(row_item),
        contract.HIST_ITEMS: _gather(history, row_user),
    }
    has_sid = _present(items, [contract.SID_CODES])
    return Candidates(rows, cold_user.take(request_user), cold_item.take(row_item),
                      flags.take(row_item), has_sid.take(row_item))


def _gather(column: np.ndarray, rows: np.ndarray) -> np.ndarray | pa.Array:
    """``column[rows]``; a list column as an Arrow list array, converted once per distinct id, not per row."""
    if column.dtype == object and any(isinstance(value, list) for value in column):
        return pa.array(column, type=pa.list_(pa.int64())).take(pa.array(rows))
    return column.take(rows)


def distinct_ids(requests: list[Query]) -> tuple[list[int], list[int]]:
    """The distinct users and items of ``requests``, in first-seen order."""
    users = list(dict.fromkeys(user for user, _ in requests))
    items = list(dict.fromkeys(item for _, ids in requests for item in ids))
    return users, items


def load_model(run: Path, meta: contract.FeatureMeta) -> Loaded:
    """The run's trained model, built unsharded on CPU for the store's table sizes.

    Only the weights-only export, its sha256 checked against the run's unit.json (never DCP's pickles).
    """
    return load_export(run, meta)


class Ranker:
    """A run's model and its feature service, loaded once; :meth:`rank` scores one request.

    Thread-safe: one batch at a time per process (the store connection and
    the model are shared; ``--workers`` adds processes for parallelism).

    Args:
        cfg: serving configuration.

    Raises:
        DataError: missing run files, a store of another SID version or
            vocabulary, an unknown feature service.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        start = time.perf_counter()
        torch.set_num_threads(cfg.threads)
        metrics = read_run(cfg.run, with_export=True)
        self.cfg, self.sid_version = cfg, metrics["sid_version"]
        self.service = cfg.service or metrics["service"]
        loaded = load_model(cfg.run, contract.RepoPaths(cfg.repo).feature_meta(self.sid_version))
        if loaded.config != metrics["config"]:
            raise DataError(
                f"{cfg.run / 'metrics.json'}: its config differs from the model's, so they come from different "
                f"training runs (one interrupted?); retrain into a fresh --out"
            )
        self.model, self.meta, self.features = loaded.model, loaded.meta, loaded.features
        # DataError here (unknown service, unpublished version) is a configuration error, not an outage.
        self.online: OnlineFeatures | None = OnlineFeatures(cfg.repo, self.service, self.sid_version)
        self._lock = threading.Lock()
        try:
            self.rank(PROBE_USER, [PROBE_ITEM])  # warm-up, and the service's columns are checked before any request
        except StoreUnavailable:
            log.warning("the online store cannot be read yet: requests get 503 until it can")
        log.info("ready in %.1fs: run %s, service %s, SID version %s", time.perf_counter() - start, cfg.run,
                 self.service, self.sid_version)

    def _read_once(self, users: list[int], items: list[int]) -> OnlineTables:
        if self.online is None:
            try:
                self.online = OnlineFeatures(self.cfg.repo, self.service, self.sid_version)
            except DataError:
                raise  # the repository no longer serves this run: a configuration error, not an outage
            except Exception as exc:  # a registry or store being rewritten under us
                raise StoreReadError(f"{self.cfg.repo}: the feature store cannot be opened: {exc}") from exc
        return self.online.read(users, items)

    def read(self, users: list[int], items: list[int]) -> OnlineTables:
        """The online store's latest features of distinct ``users`` and ``items``.

        The SIDs are those of the model's version: it is a key of every request.
        Only the store's own failures are retried and turned into 503s; a bug in
        decoding its answer stays a bug (HTTP 500, in the log).

        Raises:
            StoreUnavailable: the read failed on the current connection and on a fresh one.
        """
        for attempt in (1, 2):
            try:
                return self._read_once(users, items)
            except StoreReadError as exc:
                # A fresh FeatureStore opens a fresh connection (cheap once feast is imported).
                self.online = None
                log.warning("online read failed (attempt %d): %s", attempt, exc)
        raise StoreUnavailable("the online feature store cannot be read; retry later")

    def encode(self, tables: OnlineTables, requests: list[Query]) -> tuple[Candidates, RankerBatch]:
        """Online features -> cold-start flags and one batch of every request's candidates, encoded as in training."""
        cand = candidate_rows(tables, requests, self.meta)
        split = build_split(cand.rows, self.meta, self.features, f"{self.cfg.repo} online features",
                            allow_missing_sid=True)
        return cand, split.whole()

    def score(self, batch: Batch) -> np.ndarray:
        """[B] click probabilities."""
        # no_grad, not inference_mode: TorchRec's modules break on inference tensors.
        with torch.no_grad():
            _, (_, logits, _) = self.model(batch)
        return torch.sigmoid(logits).numpy()

    def rank_batch(self, requests: list[Query]) -> list[dict]:
        """Score several requests with one online read and one forward; one answer per request.

        Each answer lists its items best first, with cold-start flags, and the
        batch's stage timings (shared by the requests ranked together).

        Raises:
            StoreUnavailable: the online store cannot be read.
        """
        with self._lock:
            t0 = time.perf_counter()
            tables = self.read(*distinct_ids(requests))
            t1 = time.perf_counter()
            cand, batch = self.encode(tables, requests)
            t2 = time.perf_counter()
            scores = self.score(batch)
            t3 = time.perf_counter()
        timings = {k: round(v * 1e3, 3) for k, v in
                   {"feast": t1 - t0, "tensors": t2 - t1, "forward": t3 - t2, "total": t3 - t0}.items()}
        answers, start = [], 0
        for r, (user_id, item_ids) in enumerate(requests):
            end = start + len(item_ids)
            order = start + np.argsort(-scores[start:end], kind="stable")
            items = [
                {"item_id": item_ids[i - start], "score": float(scores[i]), "cold_item": bool(cand.cold_items[i]),
                 "features": cand.features[i], "sid": bool(cand.has_sid[i])}
                for i in order
            ]
            answers.append({"user_id": user_id, "cold_user": bool(cand.cold_users[r]), "sid_version": self.sid_version,
                            "items": items, "batch": {"requests": len(requests), "candidates": len(scores)},
                            "timings_ms": dict(timings)})
            start = end
        return answers

    def rank(self, user_id: int, item_ids: list[int]) -> dict:
        """:meth:`rank_batch` of one request."""
        return self.rank_batch([(user_id, item_ids)])[0]


def health_answer(probe: dict, service: str) -> dict:
    """``/health``'s answer from the ranking of the probe user and item, which every store of this run holds.

    Raises:
        StoreUnavailable: the store lacks the probe item's rows (an emptied table reads as "no row", not as an error).
    """
    if probe["items"][0]["features"] == "none":
        raise StoreUnavailable("the online feature store holds no features for known items; re-materialize it")
    return {"status": "ok", "service": service, "sid_version": probe["sid_version"]}


def preflight(cfg: ServeConfig) -> None:
    """The run and the store exist and match, checked before worker processes start (each loads the model).

    Raises:
        DataError: as :class:`Ranker` would, without loading the model.
    """
    contract.RepoPaths(cfg.repo).feature_meta(read_run(cfg.run, with_export=True)["sid_version"])


def _parser() -> argparse.ArgumentParser:
    parser = parser_for("python -m ranking.serve", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", allow_abbrev=False, formatter_class=parser.formatter_class,
                          help="rank once and print JSON", description="Rank one user's candidates once and print JSON.")
    # SUPPRESS keeps "(default: None)" out of the help of a required flag.
    rank.add_argument("--user", type=int, required=True, default=argparse.SUPPRESS, help="user id")
    rank.add_argument("--items", type=int, nargs="+", required=True, default=argparse.SUPPRESS,
                      help="candidate item ids")
    add_config_arguments(rank, ServeConfig)
    http = sub.add_parser("http", allow_abbrev=False, formatter_class=parser.formatter_class,
                          help="serve POST /rank and GET /health",
                          description="Serve POST /rank and GET /health on 127.0.0.1 until interrupted.")
    add_config_arguments(http, HttpConfig)
    return parser


def serve_http(cfg: HttpConfig) -> None:
    """Run the service (``ranking.service``) with ``cfg.workers`` ranking processes until interrupted."""
    import uvicorn

    from ranking.service import create_app  # imported here: the service builds on this module

    preflight(cfg.ranker)
    uvicorn.run(create_app(cfg), **cfg.uvicorn_options())


def main(argv: list[str] | None = None) -> None:
    """CLI entry: ``rank`` prints one ranking as JSON, ``http`` serves until interrupted."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command, user, items = args.pop("command"), args.pop("user", None), args.pop("items", None)
    if command == "http":
        serve_http(build_config(HttpConfig, args))
        return
    cfg = build_config(ServeConfig, args)
    metrics = read_run(cfg.run, with_export=True)
    try:
        request = parse_request({"user_id": user, "item_ids": items}, cfg.max_candidates, metrics["sid_version"])
    except RequestError as exc:
        parser.error(str(exc))
    try:
        print(json.dumps(Ranker(cfg).rank(*request), indent=2))
    except StoreUnavailable as exc:
        raise DataError(f"{cfg.repo}: {exc}") from None


if __name__ == "__main__":
    log_to_stderr("ranking")
    run_main(main, "python -m ranking.serve")
