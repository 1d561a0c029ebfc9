"""The ranking service over HTTP: FastAPI on uvicorn, one :class:`ranking.serve.Ranker` per worker process.

    python -m ranking.serve http --run artifacts/demo --repo feature_repo --workers 2

Routes: ``POST /rank`` (``ranking.serve.RankRequest``) and ``GET /health`` (a
real online read and forward). Every answer the app gives is JSON, errors as
``{"error": "<short reason>"}``: 400 a body that is not JSON (or nested too
deep), 404 / 405 an unknown route or method, 408 a body slower than
``--body-timeout``, 413 a body over ``--max-body-bytes`` or more than
``--max-candidates`` ids, 422 a request against the schema (duplicate ids,
another ``sid_version``), 503 the online store cannot be read (``/health``
too; the service reconnects by itself, see ``ranking.serve``), 500 a bug
(details only in the server log). uvicorn itself answers a malformed or
oversized head (400) and a worker over ``--limit-concurrency`` (503) in plain text.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidrank.cli import log_to_stderr
from ranking.serve import CONFIG_ENV, HttpConfig, Ranker, RequestError, StoreUnavailable, parse_request


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, at most ``limit`` bytes, received within ``timeout`` seconds.

    A declared Content-Length over the limit is refused before any of the body
    is read; uvicorn then discards what the client still sends, so it reads the
    413 instead of a reset connection.

    Raises:
        RequestError: 413 over the limit, 408 too slow.
    """
    declared = request.headers.get("content-length")  # h11 has checked it is a number
    too_large = RequestError(f"the body exceeds the limit of {limit} bytes (--max-body-bytes)", 413)
    if declared is not None and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:  # chunked bodies declare no length
                    raise too_large
    except TimeoutError:
        raise RequestError(f"the body took longer than {timeout:g} s to arrive (--body-timeout)", 408) from None
    return bytes(body)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(cfg: HttpConfig, ranker: Ranker) -> FastAPI:
    """The ASGI app serving ``ranker`` under ``cfg``'s limits."""
    app = FastAPI(title="sidrank ranking service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's 404 and 405 (with its Allow header), as JSON like every other answer.
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so uvicorn logs the traceback; the client learns nothing internal.
        return _error(500, "internal error; see the server log")

    # JSONResponse, not a dict: FastAPI would walk every item of the answer through jsonable_encoder first.
    @app.post("/rank")
    async def rank(request: Request) -> JSONResponse:
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout)
        user_id, item_ids = parse_request(body, cfg.ranker.max_candidates, ranker.sid_version)
        return JSONResponse(await run_in_threadpool(ranker.rank, user_id, item_ids))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(ranker.health))

    return app


def app_from_environment() -> FastAPI:
    """uvicorn's app factory in each worker: the config ``ranking.serve.serve_http`` put in the environment."""
    log_to_stderr("ranking")
    cfg = HttpConfig.from_json(os.environ[CONFIG_ENV])
    return create_app(cfg, Ranker(cfg.ranker))


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on every request head.

    uvicorn bounds only the idle time between requests (``timeout_keep_alive``)
    and any received byte cancels that timer, so a client trickling a head a
    byte at a time held its connection forever. Here each request's head must
    be complete within ``timeout_keep_alive`` seconds of the connection opening
    or of the previous response; otherwise the connection is closed.
    """

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head was complete
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        # Armed first: the base class may start a pipelined request at once, which cancels it.
        self._arm_head_deadline()
        super().on_response_complete()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
