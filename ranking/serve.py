"""Online ranking: one user's candidate items, features from the Feast online store, one trained checkpoint.

    python -m ranking.serve rank --run artifacts/demo --repo feature_repo --user 5 --items 1 2 3
    python -m ranking.serve http --run artifacts/demo --repo feature_repo --port 8765
    curl -s 127.0.0.1:8765/rank -d '{"user_id": 5, "item_ids": [1, 2, 3]}'      # GET /health too

The model is the run's best checkpoint (``<run>/checkpoint``, saved sharded by
``ranking.train``), loaded once into the same model built unsharded on CPU.
Features are the latest rows of the run's feature service, read through one
FeatureStore kept for the process lifetime and encoded by the training code
(``ranking.batches.build_split``), so a served score equals the offline
model's score of the same row (tests/test_serve.py).

Cold start: a user or item the model has no id row for (an id beyond the
checkpoint's tables, e.g. an item published after training) or that the
store does not know is looked up as the unknown id 0; its SID, content and
counts still come from the store, so a new item is scored through its SID.
An item without any row in the store is scored on unknown features
throughout and flagged ``"features": "none"``. The response lists the items
best first: ``{"item_id", "score", "cold_item", "features", "sid"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torchrec.datasets.utils import Batch

from sidrank.cli import add_config_arguments, build_config, log_to_stderr, parser_for, run_main
from sidrank.io import read_json
from sidrank.schema import DataError
from sidrank import contract
from ranking.batches import build_split
from ranking.checkpoint import load_checkpoint
from ranking.rows import OnlineFeatures

log = logging.getLogger("ranking.serve")

# Loopback only: the service has no authentication.
HOST = "127.0.0.1"
MAX_BODY_BYTES = 1 << 20
MAX_ID = 2**63 - 1  # Feast's int64 entity keys
USER_COLUMNS = (*contract.USER_COUNT_COLUMNS, contract.HIST_ITEMS, *contract.HIST_SID_PREFIXES)
ITEM_CONTENT_COLUMNS = (contract.ITEM_TAGS, *contract.ITEM_SCALAR_COLUMNS, contract.SID_CODES)
# (has behaviour counts, has content or SID) -> the response's "features" flag.
FEATURE_FLAGS = {(True, True): "full", (False, True): "content", (True, False): "behaviour", (False, False): "none"}


@dataclass
class ServeConfig:
    """The serving process.

    Args:
        run: run folder of ``ranking.train`` (``metrics.json`` and ``checkpoint/``).
        repo: the Feast repository, published and materialized.
        service: feature service; None means the one the run was trained on.
        max_candidates: most item ids one request may rank.
        port: HTTP port on 127.0.0.1 (0 picks a free one).
        threads: torch intra-op threads.
    """

    run: Path
    repo: Path
    service: str | None = None
    max_candidates: int = 1000
    port: int = 8765
    threads: int = 1

    def __post_init__(self) -> None:
        self.run, self.repo = Path(self.run), Path(self.repo)
        for name in ("max_candidates", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 2**16:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


class RequestError(ValueError):
    """A malformed request (HTTP 400); the message says what to send instead."""


def _require_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise RequestError(f"{what} must be an integer id >= 1, got {value!r}")
    return value


def parse_request(payload: object, max_candidates: int) -> tuple[int, list[int]]:
    """Validate ``{"user_id": int, "item_ids": [int, ...]}``; returns (user id, item ids).

    Raises:
        RequestError: not an object, unknown or missing fields, ids that are
            not positive integers, no candidates or more than ``max_candidates``.
    """
    if not isinstance(payload, dict):
        raise RequestError('the body must be a JSON object {"user_id": int, "item_ids": [int, ...]}')
    unknown = sorted(set(payload) - {"user_id", "item_ids"})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; send only user_id and item_ids")
    user_id = _require_id(payload.get("user_id"), "user_id")
    items = payload.get("item_ids")
    if not isinstance(items, list) or not items:
        raise RequestError(f"item_ids must be a non-empty list of item ids, got {items!r}")
    if len(items) > max_candidates:
        raise RequestError(f"{len(items)} candidates exceed the limit of {max_candidates} (--max-candidates)")
    return user_id, [_require_id(item, f"item_ids[{i}]") for i, item in enumerate(items)]


class Candidates(NamedTuple):
    """Online rows in the training-row contract, plus what the store knew about them."""

    rows: pd.DataFrame
    cold_user: bool
    cold_items: np.ndarray  # [N] bool
    features: list[str]  # [N] FEATURE_FLAGS values
    has_sid: np.ndarray  # [N] bool


def _present(frame: pd.DataFrame, columns: list[str] | tuple[str, ...]) -> np.ndarray:
    """[N] bool: any of ``columns`` holds a value, i.e. the store had a row (numpy: pandas' any() costs ms)."""
    return np.logical_or.reduce([pd.notna(frame[column].to_numpy()) for column in columns])


def candidate_rows(online: pd.DataFrame, user_id: int, meta: contract.FeatureMeta) -> Candidates:
    """Turn ``OnlineFeatures`` output into rows ``build_split`` encodes: unknown ids -> 0, request order kept."""
    cold_user = user_id > meta.n_users or not _present(online, [*USER_COLUMNS, *meta.user_profile]).any()
    behaviour, content = _present(online, contract.ITEM_COUNT_COLUMNS), _present(online, ITEM_CONTENT_COLUMNS)
    item_ids = online["item_id"].to_numpy(np.int64)
    cold_items = (item_ids > meta.n_items) | ~(behaviour | content)
    # History items published after training have no id row either.
    history = [None if h is None else np.where(np.asarray(h) > meta.n_items, 0, h) for h in online[contract.HIST_ITEMS]]
    rows = online.assign(
        row_id=np.arange(len(online)),  # build_split orders by row_id: this keeps the request's order
        label=0,
        user_id=0 if cold_user else user_id,
        item_id=np.where(cold_items, 0, item_ids),
        **{contract.HIST_ITEMS: history},
    )
    flags = [FEATURE_FLAGS[(bool(b), bool(c))] for b, c in zip(behaviour, content)]
    return Candidates(rows, bool(cold_user), cold_items, flags, _present(online, [contract.SID_CODES]))


class Ranker:
    """A run's checkpoint and its feature service, loaded once; :meth:`rank` scores one request.

    Args:
        cfg: serving configuration.

    Raises:
        DataError: missing run files, a store of another SID version or
            vocabulary, an unknown feature service.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        start = time.perf_counter()
        torch.set_num_threads(cfg.threads)
        metrics_path = cfg.run / "metrics.json"
        if not metrics_path.exists():
            raise DataError(f"{metrics_path}: not found; pass the --out folder of `python -m ranking.train` as --run")
        metrics = read_json(metrics_path)
        self.cfg, self.sid_version = cfg, metrics["sid_version"]
        self.service = cfg.service or metrics["service"]
        loaded = load_checkpoint(cfg.run / "checkpoint", contract.RepoPaths(cfg.repo).feature_meta(self.sid_version))
        if loaded.config != metrics["config"]:
            raise DataError(
                f"{metrics_path}: its config differs from the checkpoint's, so they come from different training "
                f"runs (one interrupted?); retrain into a fresh --out"
            )
        self.model, self.meta, self.features = loaded.model, loaded.meta, loaded.features
        self.online = OnlineFeatures(cfg.repo, self.service, self.sid_version)
        # One request at a time: the sqlite store and the model are shared, and 2 cores gain nothing from overlap.
        self._lock = threading.Lock()
        self.rank(1, [1])  # warm-up, and the service's columns are checked before the first real request
        log.info("ready in %.1fs: run %s, service %s, SID version %s", time.perf_counter() - start, cfg.run,
                 self.service, self.sid_version)

    def read(self, user_id: int, item_ids: list[int]) -> pd.DataFrame:
        """The online store's latest features of ``user_id`` against ``item_ids`` (one row per item).

        The SIDs are those of the checkpoint's version: it is a key of every request.
        """
        return self.online(user_id, item_ids)

    def encode(self, online: pd.DataFrame, user_id: int) -> tuple[Candidates, Batch]:
        """Online rows -> cold-start flags and one batch of all candidates, encoded as in training."""
        cand = candidate_rows(online, user_id, self.meta)
        split = build_split(cand.rows, self.meta, self.features, f"{self.cfg.repo} online features",
                            allow_missing_sid=True)
        return cand, split.batch(torch.arange(len(split)))

    def score(self, batch: Batch) -> np.ndarray:
        """[B] click probabilities."""
        # no_grad, not inference_mode: TorchRec's modules break on inference tensors.
        with torch.no_grad():
            _, (_, logits, _) = self.model(batch)
        return torch.sigmoid(logits).numpy()

    def rank(self, user_id: int, item_ids: list[int]) -> dict:
        """Score ``item_ids`` for ``user_id``; the items best first, with cold-start flags and stage timings."""
        with self._lock:
            t0 = time.perf_counter()
            online = self.read(user_id, item_ids)
            t1 = time.perf_counter()
            cand, batch = self.encode(online, user_id)
            t2 = time.perf_counter()
            scores = self.score(batch)
            t3 = time.perf_counter()
        order = np.argsort(-scores, kind="stable")
        items = [
            {"item_id": int(item_ids[i]), "score": float(scores[i]), "cold_item": bool(cand.cold_items[i]),
             "features": cand.features[i], "sid": bool(cand.has_sid[i])}
            for i in order
        ]
        timings = {"feast": t1 - t0, "tensors": t2 - t1, "forward": t3 - t2, "total": t3 - t0}
        return {"user_id": user_id, "cold_user": cand.cold_user, "sid_version": self.sid_version, "items": items,
                "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()}}


def _handler(ranker: Ranker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds: a client that sends less than its Content-Length must not hold a thread forever

        def _send(self, status: HTTPStatus, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}; try /health"})
            self._send(HTTPStatus.OK, {"status": "ok", "service": ranker.service, "sid_version": ranker.sid_version})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/rank":
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}; try /rank"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= MAX_BODY_BYTES:
                    raise RequestError(f"Content-Length {length}: expected 0..{MAX_BODY_BYTES} bytes")
                request = parse_request(json.loads(self.rfile.read(length) or b"null"), ranker.cfg.max_candidates)
            except ValueError as exc:  # RequestError, bad JSON or UTF-8, bad Content-Length
                return self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            try:
                self._send(HTTPStatus.OK, ranker.rank(*request))
            except Exception as exc:  # the server outlives any one request
                log.exception("rank %s failed", request)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def make_server(ranker: Ranker, port: int) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: a free port, see ``server_address``); call ``serve_forever``."""
    server = ThreadingHTTPServer((HOST, port), _handler(ranker))
    server.daemon_threads = True
    return server


def _parser() -> argparse.ArgumentParser:
    parser = parser_for("python -m ranking.serve", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", allow_abbrev=False, formatter_class=parser.formatter_class,
                          help="rank once and print JSON", description="Rank one user's candidates once and print JSON.")
    # SUPPRESS keeps "(default: None)" out of the help of a required flag.
    rank.add_argument("--user", type=int, required=True, default=argparse.SUPPRESS, help="user id")
    rank.add_argument("--items", type=int, nargs="+", required=True, default=argparse.SUPPRESS,
                      help="candidate item ids")
    add_config_arguments(rank, ServeConfig, skip=("port",))
    http = sub.add_parser("http", allow_abbrev=False, formatter_class=parser.formatter_class,
                          help="serve POST /rank and GET /health",
                          description="Serve POST /rank and GET /health on 127.0.0.1 until interrupted.")
    add_config_arguments(http, ServeConfig)
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI entry: ``rank`` prints one ranking as JSON, ``http`` serves until interrupted."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command, user, items = args.pop("command"), args.pop("user", None), args.pop("items", None)
    cfg = build_config(ServeConfig, args)
    if command == "rank":
        try:
            request = parse_request({"user_id": user, "item_ids": items}, cfg.max_candidates)
        except RequestError as exc:
            parser.error(str(exc))
        print(json.dumps(Ranker(cfg).rank(*request), indent=2))
        return
    server = make_server(Ranker(cfg), cfg.port)
    log.info("serving on http://%s:%d (POST /rank, GET /health)", *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    log_to_stderr("ranking")
    run_main(main, "python -m ranking.serve")
