"""The ranking service over HTTP: one FastAPI/uvicorn process in front, ranking worker processes behind it.

    python -m ranking.serve http --run artifacts/demo --repo feature_repo --workers 2

Requests are batched across clients: the HTTP process queues every valid
request, and whenever a worker is free it takes all requests waiting (up to
``--max-batch-candidates`` candidates) as one batch: one Feast online read for
their distinct users and items and one forward (``ranking.serve.Ranker.rank_batch``).
Nothing waits for a batch to fill: a lone request is dispatched at once, so
batches grow only under load, when they save the per-call costs. The queue
is first come, first served and any free worker takes the next batch, so a
client's latency does not depend on which connection or worker it landed
on (uvicorn's own worker processes each keep the connections they accepted,
and a busy one starves its clients while another idles).

Workers are ``multiprocessing`` spawn processes, each with its own model and
store connection, talking to the HTTP process over a socket pair (pickled
messages, only ever between these processes). A worker that dies is
restarted, one that takes longer than ``--batch-timeout`` over a batch or
``--worker-timeout`` to start is killed and restarted; its batch answers 503,
and requests answer 503 while no worker is ready.

Routes: ``POST /rank`` (``ranking.serve.RankRequest``) and ``GET /health`` (a
real online read and forward). Every answer the app gives is JSON, errors as
``{"error": "<short reason>"}``: 400 a body that is not JSON (or nested too
deep), 404 / 405 an unknown route or method, 408 a body slower than
``--body-timeout``, 413 a body over ``--max-body-bytes`` or more than
``--max-candidates`` ids, 422 a request against the schema (duplicate ids,
another ``sid_version``), 503 the online store cannot be read (``/health``
too; the service reconnects by itself, see ``ranking.serve``) or no worker is
ready, 500 a bug (details only in the server log). uvicorn itself answers a
malformed or oversized head (400) and connections over ``--limit-concurrency`` (503) in plain text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import multiprocessing
import pickle
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidrank.cli import log_to_stderr
from ranking.serve import (
    PROBE_ITEM, PROBE_USER, HttpConfig, Query, Ranker, RequestError,
    ServeConfig, ServiceUnavailable, StoreUnavailable, health_answer, parse_request,
)

log = logging.getLogger("ranking.service")

# A crashed worker is restarted after this many seconds, doubled per failed start up to the cap.
RESTART_DELAY_S, RESTART_DELAY_MAX_S = 1.0, 30.0


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


@dataclass
class Waiting:
    """A queued request and the future its handler awaits."""

    request: Query
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Dispatcher:
    """First-come-first-served queue of requests, handed out in batches to whichever worker is free.

    Args:
        max_batch_candidates: most candidates in one batch (a larger single request goes alone).
    """

    def __init__(self, max_batch_candidates: int) -> None:
        self.max_batch_candidates = max_batch_candidates
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.idle: list = []
        self.ready = 0  # workers able to take batches, idle or busy

    async def rank(self, request: Query) -> dict:
        """The worker's answer to ``request``, with the time it waited for a worker in ``timings_ms.queue``.

        Raises:
            ServiceUnavailable: no worker is ready, or the worker died or could not read the store.
        """
        if not self.ready:
            raise ServiceUnavailable("no ranking worker is ready (one is starting); retry later")
        waiting = Waiting(request, asyncio.get_running_loop().create_future())
        self.waiting.append(waiting)
        self._dispatch()
        return await waiting.future

    def worker_ready(self, worker) -> None:
        self.ready += 1
        self.idle.append(worker)
        self._dispatch()

    def worker_lost(self, worker) -> None:
        self.ready -= 1
        if worker in self.idle:
            self.idle.remove(worker)
        if not self.ready:  # nobody left to serve the queue: fail it rather than hold clients until a restart
            while self.waiting:
                waiting = self.waiting.popleft()
                if not waiting.future.done():
                    waiting.future.set_exception(ServiceUnavailable("no ranking worker is ready; retry later"))

    def _take_batch(self) -> list[Waiting]:
        batch, candidates = [], 0
        while self.waiting:
            size = len(self.waiting[0].request[1])
            if batch and candidates + size > self.max_batch_candidates:
                break
            waiting = self.waiting.popleft()
            if not waiting.future.done():  # a client that went away is not ranked
                batch.append(waiting)
                candidates += size
        return batch

    def _dispatch(self) -> None:
        while self.idle and self.waiting:
            batch = self._take_batch()
            if not batch:
                return
            worker = self.idle.pop()
            dispatched = time.perf_counter()
            try:
                future = worker.submit([waiting.request for waiting in batch])
            except Exception as exc:  # the worker could not take it (stopped, socket gone): this batch fails alone
                log.exception("handing a batch to a ranking worker failed")
                self._settle(batch, dispatched, error=exc)
                if worker.alive:
                    self.idle.append(worker)
                continue
            future.add_done_callback(lambda done, w=worker, b=batch, t=dispatched: self._finished(w, b, t, done))

    def _finished(self, worker, batch: list[Waiting], dispatched: float, done: asyncio.Future) -> None:
        if worker.alive:
            self.idle.append(worker)
        if done.cancelled():
            self._settle(batch, dispatched, error=ServiceUnavailable("the ranking worker was stopped; retry later"))
        elif done.exception() is not None:
            self._settle(batch, dispatched, error=done.exception())
        elif len(done.result()) != len(batch):
            self._settle(batch, dispatched, error=RuntimeError(
                f"a ranking worker answered {len(done.result())} of a batch of {len(batch)} requests"))
        else:
            self._settle(batch, dispatched, answers=done.result())
        self._dispatch()

    @staticmethod
    def _settle(batch: list[Waiting], dispatched: float, *, answers: list[dict] | None = None,
                error: BaseException | None = None) -> None:
        """Every request of ``batch`` gets its answer, or ``error``; clients that went away are skipped."""
        for i, waiting in enumerate(batch):
            if waiting.future.done():
                continue
            if answers is None:
                waiting.future.set_exception(error)
            else:
                answers[i]["timings_ms"]["queue"] = round((dispatched - waiting.queued_at) * 1e3, 3)
                waiting.future.set_result(answers[i])


class LocalWorker:
    """A :class:`ranking.serve.Ranker` of this process on a thread of its own (in-process servers, tests)."""

    alive = True

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker
        self.info = {"service": ranker.service, "sid_version": ranker.sid_version}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ranker")

    async def start(self, dispatcher: Dispatcher) -> None:
        dispatcher.worker_ready(self)

    def submit(self, batch: list[Query]) -> asyncio.Future:
        return asyncio.wrap_future(self.executor.submit(self.ranker.rank_batch, batch))

    async def stop(self) -> None:
        self.executor.shutdown(wait=False)


def freeze_heap() -> None:
    """Exempt everything loaded so far (torch, TorchRec, Feast, the model) from the garbage collector.

    A full collection walks every live object: a few hundred ms in a process
    with these libraries loaded, which stalled whichever batch it hit (the
    p99 of the serving benchmark). Requests allocate little that lives long,
    so the young generations keep memory in check.
    """
    gc.collect()
    gc.freeze()


# A message between the HTTP process and a worker: its pickle's length, then the pickle.
FRAME = struct.Struct("!Q")


def frame(message: object) -> bytes:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer closed the connection")
        data += chunk
    return bytes(data)


def receive_message(sock: socket.socket) -> object:
    (size,) = FRAME.unpack(_receive_exactly(sock, FRAME.size))
    return pickle.loads(_receive_exactly(sock, size))  # only ever our own parent's messages


def worker_main(cfg_json: str, sock: socket.socket) -> None:
    """A worker process: load the ranker, say ready, then rank every batch the socket brings until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the HTTP process stops us
    log_to_stderr("ranking")
    try:
        ranker = Ranker(ServeConfig(**json.loads(cfg_json)))
    except Exception as exc:
        sock.sendall(frame(("failed", f"{type(exc).__name__}: {exc}")))
        return
    freeze_heap()
    sock.sendall(frame(("ready", {"service": ranker.service, "sid_version": ranker.sid_version})))
    while True:
        try:
            batch = receive_message(sock)
        except (EOFError, ConnectionError):  # the HTTP process closed the socket or died
            return
        try:
            answer = ("ok", ranker.rank_batch(batch))
        except ServiceUnavailable as exc:
            answer = ("unavailable", str(exc))
        except Exception:
            log.exception("ranking a batch of %d requests failed", len(batch))
            answer = ("error", None)
        sock.sendall(frame(answer))


class ProcessWorker:
    """One spawned worker process and its socket; killed when it hangs and restarted when it dies.

    Args:
        cfg: the ranker every worker loads.
        index: the worker's number, for the log.
        start_timeout: seconds a start may take (the first and every restart).
        batch_timeout: seconds a batch may take; a worker past it is killed and replaced.
    """

    def __init__(self, cfg: ServeConfig, index: int, start_timeout: float, batch_timeout: float) -> None:
        self.cfg_json = json.dumps(dataclasses.asdict(cfg), default=str)
        self.index, self.start_timeout, self.batch_timeout = index, start_timeout, batch_timeout
        self.alive, self.stopping = False, False
        self.info: dict | None = None
        self.failure: str | None = None
        self.process = self.writer = self.reading = self.in_flight = self.dispatcher = self.deadline = None
        self.started = asyncio.Event()  # set once the first start has ended, ready or failed
        self.restart_delay = RESTART_DELAY_S

    async def start(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        await self._spawn()
        await self.started.wait()

    async def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: this process runs threads and an event loop
        ours, theirs = socket.socketpair()
        try:
            self.process = context.Process(target=worker_main, args=(self.cfg_json, theirs), daemon=True,
                                           name=f"sidrank-ranker-{self.index}")
            self.process.start()
            reader, self.writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._arm(self.start_timeout, f"did not load its ranker within {self.start_timeout:g} s (--worker-timeout)")
        self.reading = asyncio.create_task(self._read(reader))

    def _arm(self, seconds: float, reason: str) -> None:
        """Kill the process unless the next message comes within ``seconds``: a hung worker is replaced."""
        self._disarm()
        self.deadline = asyncio.get_running_loop().call_later(seconds, self._kill, reason)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _kill(self, reason: str) -> None:
        log.error("ranking worker %d (pid %d) %s; killing it", self.index, self.process.pid, reason)
        if self.info is None:
            self.failure = f"worker {self.index} {reason}"
        self.process.kill()  # its socket closes: _read ends and _exited cleans up

    def submit(self, batch: list[Query]) -> asyncio.Future:
        if not self.alive:
            raise ServiceUnavailable(f"ranking worker {self.index} is not running")
        self.in_flight = asyncio.get_running_loop().create_future()
        self.writer.write(frame(batch))
        self._arm(self.batch_timeout, f"took longer than {self.batch_timeout:g} s over a batch (--batch-timeout)")
        return self.in_flight

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                self._disarm()
                self._on_message(*pickle.loads(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker exited
        except Exception:
            log.exception("ranking worker %d: handling its message failed; replacing it", self.index)
        finally:
            await self._exited()

    def _on_message(self, kind: str, payload: object) -> None:
        if kind == "ready":
            self.alive, self.info, self.failure, self.restart_delay = True, payload, None, RESTART_DELAY_S
            log.info("ranking worker %d ready (pid %d)", self.index, self.process.pid)
            self.started.set()
            self.dispatcher.worker_ready(self)
            return
        if kind == "failed":
            self.failure = payload  # the process exits next
            log.error("ranking worker %d failed to start: %s", self.index, payload)
            return
        future, self.in_flight = self.in_flight, None
        if kind == "ok":
            future.set_result(payload)
        elif kind == "unavailable":
            future.set_exception(StoreUnavailable(payload))
        else:
            future.set_exception(RuntimeError(f"ranking worker {self.index} failed on a batch; see its log"))

    async def _exited(self) -> None:
        # Out of the rotation first: nothing may be handed to it while it is reaped.
        self._disarm()
        was_alive, self.alive = self.alive, False
        if was_alive:
            self.dispatcher.worker_lost(self)
        if self.in_flight is not None:
            self.in_flight.set_exception(ServiceUnavailable("a ranking worker stopped during the request; retry"))
            self.in_flight = None
        self.writer.close()
        await asyncio.to_thread(self.process.join, 5)
        if self.process.is_alive():  # it closed its socket but did not exit
            self.process.kill()
            await asyncio.to_thread(self.process.join)
        if self.info is None and self.failure is None:
            self.failure = f"worker {self.index} exited with status {self.process.exitcode} before it was ready"
        self.started.set()
        if self.stopping or self.info is None:
            return  # shutting down, or never ready: the service refuses to start (WorkerPool.start)
        while not self.stopping:
            log.error("ranking worker %d (pid %d) exited with status %s; restarting in %.0f s", self.index,
                      self.process.pid, self.process.exitcode, self.restart_delay)
            await asyncio.sleep(self.restart_delay)
            self.restart_delay = min(2 * self.restart_delay, RESTART_DELAY_MAX_S)
            if self.stopping:
                return
            try:
                await self._spawn()
                return
            except Exception:
                log.exception("ranking worker %d could not be started", self.index)

    async def stop(self) -> None:
        self.stopping = True
        self._disarm()
        if self.process is None:
            return
        self.writer.close()  # the worker reads EOF and returns
        await asyncio.to_thread(self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join)
        if self.reading is not None and self.reading is not asyncio.current_task():
            # The reader sees the socket close and returns; one waiting out a restart delay is cancelled.
            await asyncio.wait([self.reading], timeout=5)
            self.reading.cancel()
            await asyncio.gather(self.reading, return_exceptions=True)


class WorkerPool:
    """The workers behind one app and the dispatcher that feeds them.

    Args:
        workers: :class:`LocalWorker` or :class:`ProcessWorker` instances.
        max_batch_candidates: see :class:`Dispatcher`.
    """

    def __init__(self, workers: list, max_batch_candidates: int) -> None:
        self.workers = workers
        self.dispatcher = Dispatcher(max_batch_candidates)

    @property
    def info(self) -> dict:
        """The service and SID version the workers rank with (all load the same run)."""
        return next(worker.info for worker in self.workers if worker.info is not None)

    async def start(self) -> None:
        """Start every worker; raises if one cannot load its ranker (a configuration error, not a crash)."""
        started = await asyncio.gather(*(worker.start(self.dispatcher) for worker in self.workers),
                                       return_exceptions=True)
        failures = [str(error) for error in started if isinstance(error, BaseException)]
        failures += [worker.failure for worker in self.workers if getattr(worker, "failure", None)]
        if failures:
            await self.stop()
            raise RuntimeError(f"ranking workers failed to start: {failures[0]}")

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in self.workers))


def create_app(cfg: HttpConfig, ranker: Ranker | None = None) -> FastAPI:
    """The ASGI app under ``cfg``'s limits: ``cfg.workers`` worker processes, or ``ranker`` in this process."""
    workers = [LocalWorker(ranker)] if ranker is not None else [
        ProcessWorker(cfg.ranker, index, cfg.worker_timeout, cfg.batch_timeout) for index in range(cfg.workers)]
    pool = WorkerPool(workers, cfg.max_batch_candidates)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        freeze_heap()
        try:
            yield
        finally:
            await pool.stop()

    app = FastAPI(title="sidrank ranking service", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's 404 and 405 (with its Allow header), as JSON like every other answer.
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(ServiceUnavailable)
    async def unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so uvicorn logs the traceback; the client learns nothing internal.
        return _error(500, "internal error; see the server log")

    # JSONResponse, not a dict: FastAPI would walk every item of the answer through jsonable_encoder first.
    @app.post("/rank")
    async def rank(request: Request) -> JSONResponse:
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout)
        ranked = parse_request(body, cfg.ranker.max_candidates, pool.info["sid_version"])
        return JSONResponse(await pool.dispatcher.rank(ranked))

    @app.get("/health")
    async def health() -> JSONResponse:
        probe = await pool.dispatcher.rank((PROBE_USER, [PROBE_ITEM]))
        return JSONResponse(health_answer(probe, pool.info["service"]))

    return app


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
