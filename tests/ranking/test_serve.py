"""Online ranking (ranking/serve.py, ranking/service.py) against a real published Feast repository and a trained checkpoint.

A small random dataset is published into a tmp copy of feature_repo (real
``feast apply`` / ``materialize``) and ranked by a 1-process ``ranking.train``
run; the served scores must equal the offline model's scores of the same rows.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn
from feast import FeatureStore
from builders import TEST_SID_VERSION, publish_to_repo_copy, random_tied_events, write_feature_dataset

from features import publish
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from ranking import serve, service, train
from sidrank import contract
from sidrank.contract import DatasetPaths
from ranking.batches import build_split
from ranking.rows import load_training_rows

N_USERS, N_ITEMS = 20, 30
TRAIN_ARGS = ["--epochs", "2", "--batch-size", "64", "--lr-sparse", "0.5", "--seed", "0"]


class Served(NamedTuple):
    dataset: Path
    repo: Path
    run: Path
    events: pd.DataFrame
    ranker: serve.Ranker


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    frame = random_tied_events(N_USERS, N_ITEMS, n_events=800, n_times=80, seed=3)
    events = assign_protocol_split(frame, "serve events")
    paths = write_feature_dataset(root / "data", events, N_USERS, N_ITEMS)
    repo = publish_to_repo_copy(paths, root / "repo", materialize=False)
    # Feast's own materialize, in-process: the `feast materialize` CLI would add a ~10 s interpreter start.
    start, end = publish.stamp_range(repo)
    FeatureStore(repo_path=str(repo)).materialize(start.to_pydatetime(), end.to_pydatetime())
    run = root / "run"
    train.main(["--dataset", str(paths.root), "--repo", str(repo), "--out", str(run), *TRAIN_ARGS])
    return Served(paths.root, repo, run, events, serve.Ranker(serve.ServeConfig(run=run, repo=repo)))


def offline_scores(ranker: serve.Ranker, rows: pd.DataFrame) -> np.ndarray:
    """The loaded model on rows from the offline store, encoded as in training."""
    split = build_split(rows, ranker.meta, ranker.features, "offline rows")
    return ranker.score(split.batch(torch.arange(len(split)))).astype(np.float64)


def scores_by_item(result: dict) -> dict[int, float]:
    return {item["item_id"]: item["score"] for item in result["items"]}


def test_loaded_checkpoint_reproduces_the_runs_test_predictions(served: Served) -> None:
    rows = pd.read_parquet(DatasetPaths(served.dataset).rows_cache(TEST_SID_VERSION, served.ranker.service))
    test_ids = served.events.loc[served.events["split"] == "test", "row_id"]
    rows = rows[rows["row_id"].isin(test_ids)].sort_values("row_id")
    predictions = pd.read_parquet(served.run / "predictions_test.parquet")
    assert predictions["row_id"].tolist() == rows["row_id"].tolist()
    # The sharded DMP scored these during training; the unsharded reload must agree.
    np.testing.assert_allclose(offline_scores(served.ranker, rows), predictions["score"], atol=1e-6)


def test_served_scores_equal_the_offline_models_for_the_same_rows(served: Served) -> None:
    user, items = int(served.events["user_id"].mode()[0]), list(range(1, N_ITEMS + 1))
    result = served.ranker.rank(user, items)
    # After the last event the point-in-time join returns the rows the online store holds.
    later = served.events["event_timestamp"].max() + pd.Timedelta(days=1)
    entity = pd.DataFrame({"row_id": np.arange(len(items)), "user_id": user, "item_id": items,
                           "event_timestamp": later, "label": 0})
    rows = load_training_rows(served.repo, entity, service=served.ranker.service, sid_version=TEST_SID_VERSION)
    expected = dict(zip(items, offline_scores(served.ranker, rows)))
    got = scores_by_item(result)
    assert sorted(got) == items
    assert max(abs(got[i] - expected[i]) for i in items) < 1e-6
    scores = [item["score"] for item in result["items"]]
    assert scores == sorted(scores, reverse=True)
    assert not result["cold_user"] and not any(item["cold_item"] for item in result["items"])
    assert {item["features"] for item in result["items"]} <= {"full", "content"}
    assert all(item["sid"] for item in result["items"])
    assert set(result["timings_ms"]) == {"feast", "tensors", "forward", "total"}


def test_online_read_equals_feasts_own_answer(served: Served) -> None:
    store, service = served.ranker.online.store, served.ranker.online.service
    for user, items in ((2, [5, 1, 9]), (N_USERS + 50, [3, N_ITEMS + 7, 4])):  # an unknown user, an unknown item
        rows = [{"user_id": user, "item_id": item, "sid_version": TEST_SID_VERSION} for item in items]
        expected = store.get_online_features(features=service, entity_rows=rows).to_df()
        got = served.ranker.online(user, items)
        assert sorted(got.columns) == sorted(expected.columns)
        pd.testing.assert_frame_equal(got[expected.columns], expected)


def test_a_batch_ranks_each_request_as_if_alone(served: Served) -> None:
    # Shared users and items, a cold user and an item the store does not hold, in one read and one forward.
    requests = [(2, [4, 5, 6]), (3, [6, 1]), (2, [7]), (N_USERS + 50, [5, N_ITEMS + 2, 2])]
    together = served.ranker.rank_batch(requests)
    for (user, items), answer in zip(requests, together):
        alone = served.ranker.rank(user, items)
        assert [item["item_id"] for item in answer["items"]] == [item["item_id"] for item in alone["items"]]
        for got, expected in zip(answer["items"], alone["items"]):
            assert got["score"] == pytest.approx(expected["score"], abs=1e-6)
            assert {k: got[k] for k in ("cold_item", "features", "sid")} == {
                k: expected[k] for k in ("cold_item", "features", "sid")}
        assert answer["cold_user"] == alone["cold_user"] and answer["user_id"] == user
        assert answer["batch"] == {"requests": 4, "candidates": 9} and alone["batch"] == {"requests": 1, "candidates": len(items)}
    assert together[3]["cold_user"] and not together[0]["cold_user"]


def test_unknown_user_is_scored_as_cold(served: Served) -> None:
    known = served.ranker.rank(1, [1, 2, 3])
    cold = served.ranker.rank(N_USERS + 50, [1, 2, 3])
    assert cold["cold_user"] and not known["cold_user"]
    assert len(cold["items"]) == 3 and all(0 < item["score"] < 1 for item in cold["items"])
    assert scores_by_item(cold) != scores_by_item(known)


def test_new_item_is_scored_through_its_sid_and_a_featureless_item_is_flagged(served: Served) -> None:
    ranker, new, absent = served.ranker, N_ITEMS + 1, N_ITEMS + 2
    view = "item_sid_fv"
    stamp = served.events["event_timestamp"].max() + pd.Timedelta(days=2)

    def publish_sid(codes: list[int], at: pd.Timestamp) -> dict[int, dict]:
        # A new item published after training: SID and content in the store, no id row in the model.
        sid = pd.DataFrame({"item_id": [new], "sid_codes": [codes], "sid_version": [TEST_SID_VERSION],
                            "event_timestamp": [at]})
        ranker.online.store.write_to_online_store(view, sid)
        content = pd.DataFrame({"item_id": [new], "tag_ids": [[1, 2]], "year_bucket": [1], "event_timestamp": [at]})
        ranker.online.store.write_to_online_store("item_content_fv", content)
        return {item["item_id"]: item for item in ranker.rank(1, [new, absent, 1])["items"]}

    first = publish_sid([0, 1, 2], stamp)
    assert first[new]["cold_item"] and first[new]["features"] == "content" and first[new]["sid"]
    assert first[absent]["cold_item"] and first[absent]["features"] == "none" and not first[absent]["sid"]
    assert not first[1]["cold_item"]
    assert first[new]["score"] != first[absent]["score"]
    second = publish_sid([3, 2, 1], stamp + pd.Timedelta(seconds=1))
    assert second[new]["score"] != first[new]["score"]  # the SID, not the id, carries the new item
    assert second[absent]["score"] == pytest.approx(first[absent]["score"], abs=1e-7)


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ([1, 2], 422, "Input should be a valid dictionary"),
        (b"[1, 2]", 422, "Input should be an object"),
        ({"user_id": "5", "item_ids": [1]}, 422, "user_id: Input should be a valid integer"),
        ({"user_id": True, "item_ids": [1]}, 422, "user_id: Input should be a valid integer"),
        ({"user_id": 5, "item_ids": [1, 2.5]}, 422, "item_ids.1: Input should be a valid integer"),
        ({"user_id": 5, "item_ids": [0]}, 422, "item_ids.0: Input should be greater than or equal to 1"),
        ({"user_id": 5, "item_ids": []}, 422, "item_ids: List should have at least 1 item"),
        ({"user_id": 5}, 422, "item_ids: Field required"),
        ({"user_id": 5, "item_ids": list(range(1, 12))}, 413, "11 candidates exceed the limit of 10"),
        ({"user_id": 5, "item_ids": [1], "k": 3}, 422, "k: Extra inputs are not permitted"),
        ({"user_id": 5, "item_ids": [3, 1, 3, 1, 3]}, 422, r"item_ids holds duplicates \[3, 1\]"),
        ({"user_id": 5, "item_ids": [1], "sid_version": "other"}, 422, "this server ranks with 'test-v1'"),
        (b"{not json", 400, "Invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "recursion limit exceeded"),
    ],
)
def test_malformed_requests_are_refused(payload: object, status: int, message: str) -> None:
    with pytest.raises(serve.RequestError, match=message) as refused:
        serve.parse_request(payload, max_candidates=10, sid_version=TEST_SID_VERSION)
    assert refused.value.status == status
    for good in ({"user_id": 5, "item_ids": [3, 1]}, b'{"user_id": 5, "item_ids": [3, 1], "sid_version": "test-v1"}'):
        assert serve.parse_request(good, max_candidates=10, sid_version=TEST_SID_VERSION) == (5, [3, 1])


# Small limits so that each hostile client is cut off within a second or two.
LIMITS = {"max_body_bytes": 4096, "header_timeout": 1.0, "body_timeout": 1.0}


@contextmanager
def running(cfg: serve.HttpConfig, ranker: serve.Ranker) -> Iterator[int]:
    """The service on uvicorn in a thread of this process, with ``cfg``'s options; yields its port."""
    sock = socket.socket()
    sock.bind((serve.HOST, 0))
    options = {k: v for k, v in cfg.uvicorn_options().items() if k not in ("host", "port", "workers")}
    server = uvicorn.Server(uvicorn.Config(service.create_app(cfg, ranker), log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def port(served: Served) -> Iterator[int]:
    cfg = serve.HttpConfig(ranker=serve.ServeConfig(run=served.run, repo=served.repo, max_candidates=10), **LIMITS)
    with running(cfg, served.ranker) as bound:
        yield bound


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             ) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(serve.HOST, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _rank_body(user: int, items: list[int]) -> bytes:
    return json.dumps({"user_id": user, "item_ids": items}).encode()


def test_http_round_trip_and_bad_requests(served: Served, port: int) -> None:
    assert _request(port, "GET", "/health") == (200, {"status": "ok", "service": served.ranker.service,
                                                      "sid_version": TEST_SID_VERSION})
    status, body = _request(port, "POST", "/rank", _rank_body(2, [4, 5, 6]))
    assert status == 200
    assert scores_by_item(body) == scores_by_item(served.ranker.rank(2, [4, 5, 6]))
    for bad, code, message in (
        (b"{not json", 400, "Invalid JSON"),
        (b'{"user_id": 2, "item_ids": "4"}', 422, "item_ids: Input should be a valid array"),
        (b"", 400, "Invalid JSON"),
        (_rank_body(2, [4, 4]), 422, "duplicates [4]"),
        (_rank_body(2, list(range(1, 12))), 413, "limit of 10"),
    ):
        status, body = _request(port, "POST", "/rank", bad)
        assert status == code and message in body["error"], body
    assert _request(port, "POST", "/nope", b"{}") == (404, {"error": "Not Found"})
    for method, path in (("GET", "/rank"), ("PUT", "/rank"), ("DELETE", "/health"), ("BREW", "/health")):
        assert _request(port, method, path) == (405, {"error": "Method Not Allowed"}), (method, path)
    assert _request(port, "GET", "/health")[0] == 200  # still serving after the bad requests


def test_a_failing_request_answers_500_without_internals(served: Served, port: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise KeyError("sidrank_item_sid_fv column sid_codes")

    monkeypatch.setattr(served.ranker, "encode", broken)
    assert _request(port, "POST", "/rank", _rank_body(2, [4])) == (500, {"error": "internal error; see the server log"})


def test_hostile_bodies_get_an_answer_not_a_dropped_connection(served: Served, port: int) -> None:
    nested = b'{"user_id": ' + b"[" * 1000 + b"]" * 1000 + b', "item_ids": [1]}'
    status, body = _request(port, "POST", "/rank", nested)
    assert status == 400 and "recursion limit exceeded" in body["error"]
    # 50 MB with its Content-Length: refused from the header; the rest is read and discarded, so the
    # client, which sends the whole body before reading, gets the 413 instead of a broken pipe.
    status, body = _request(port, "POST", "/rank", b"x" * (50 << 20))
    assert status == 413 and "limit of 4096 bytes" in body["error"]
    chunked = iter([b"[" * 3000, b"1" * 3000])  # no Content-Length: counted while it streams
    status, body = _request(port, "POST", "/rank", chunked)
    assert status == 413 and "limit of 4096 bytes" in body["error"]


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends before it closes ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_slow_clients_are_cut_off(port: int) -> None:
    # A head trickled a byte at a time: closed once the header timeout (1 s) has passed since the connection opened.
    with socket.create_connection((serve.HOST, port)) as sock:
        sock.sendall(b"P")
        time.sleep(0.5)
        sock.sendall(b"O")
        # Held forever before; the 5 s wait is the bound, not a timing claim on a busy machine.
        assert _closed_within(sock, 5) == b""
    # A body slower than the body timeout (1 s): 408 with a JSON reason.
    with socket.create_connection((serve.HOST, port)) as sock:
        sock.sendall(b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = _closed_within(sock, 5)
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
    # An idle keep-alive connection after a full request is closed too.
    with socket.create_connection((serve.HOST, port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_within(sock, 5).startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_concurrency_limit_get_503(served: Served) -> None:
    cfg = serve.HttpConfig(ranker=serve.ServeConfig(run=served.run, repo=served.repo), limit_concurrency=2,
                           backlog=64)
    assert cfg.uvicorn_options()["backlog"] == 64 and cfg.uvicorn_options()["limit_concurrency"] == 2
    with running(cfg, served.ranker) as bound:
        held = [socket.create_connection((serve.HOST, bound)) for _ in range(2)]
        try:
            # Polled, not slept: the held connections are accepted (and later released) when the loop gets to it.
            assert _status_within(bound, 503, seconds=10)
        finally:
            for sock in held:
                sock.close()
        assert _status_within(bound, 200, seconds=10)


def _status_within(port: int, status: int, seconds: float) -> bool:
    """Whether GET /health answers ``status`` at some point within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(serve.HOST, port, timeout=30)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == status:
                return True
        except (ConnectionError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    return False


def test_store_outage_answers_503_and_recovers_without_restart(served: Served, tmp_path: Path) -> None:
    repo = shutil.copytree(served.repo, tmp_path / "repo")
    ranker = serve.Ranker(serve.ServeConfig(run=served.run, repo=repo))
    database, backup = repo / "data" / "online_store.db", tmp_path / "online_store.db"
    shutil.copy(database, backup)
    cfg = serve.HttpConfig(ranker=ranker.cfg)
    request = _rank_body(2, [4, 5, 6])
    with running(cfg, ranker) as bound:
        expected = _request(bound, "POST", "/rank", request)
        assert expected[0] == 200
        # The online tables vanish under the running server (the file truncated in place).
        database.write_bytes(b"")
        for path, body in (("/rank", request), ("/health", None)):
            status, answer = _request(bound, "POST" if body else "GET", path, body)
            assert status == 503, answer
            assert answer == {"error": "the online feature store cannot be read; retry later"}
        # Restored as a new file (the way a copy or a rebuild replaces it): no restart needed.
        shutil.copy(backup, tmp_path / "restored.db")
        os.replace(tmp_path / "restored.db", database)
        assert _request(bound, "GET", "/health")[0] == 200
        status, answer = _request(bound, "POST", "/rank", request)
        assert status == 200 and scores_by_item(answer) == scores_by_item(expected[1])
        # Emptied tables read as "no rows", not as an error: /health still refuses them.
        with sqlite3.connect(database) as conn:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                conn.execute(f'DELETE FROM "{table}"')
        status, answer = _request(bound, "GET", "/health")
        assert status == 503 and "re-materialize" in answer["error"]


def test_cli_rank_prints_the_ranking(served: Served, capsys: pytest.CaptureFixture) -> None:
    serve.main(["rank", "--run", str(served.run), "--repo", str(served.repo), "--user", "3", "--items", "7", "8"])
    printed = json.loads(capsys.readouterr().out)
    assert scores_by_item(printed) == pytest.approx(scores_by_item(served.ranker.rank(3, [7, 8])), abs=1e-7)
    with pytest.raises(SystemExit):
        serve.main(["rank", "--run", str(served.run), "--repo", str(served.repo), "--user", "0", "--items", "7"])


def test_store_of_another_sid_version_or_missing_run_is_refused(served: Served, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"SID version 'other-v9' is not published .*\['{TEST_SID_VERSION}'\]"):
        contract.RepoPaths(served.repo).feature_meta("other-v9")
    with pytest.raises(DataError, match="incomplete or missing .no unit.json"):
        serve.Ranker(serve.ServeConfig(run=tmp_path, repo=served.repo))
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        serve.load_model(tmp_path, served.ranker.meta)


def test_serving_benchmark_runs_the_service_under_load(served: Served, tmp_path: Path) -> None:
    from benchmarks import serving

    payload = serving.main(["--run", str(served.run), "--repo", str(served.repo), "--requests", "6", "--warmup", "1",
                            "--candidates", "10", "--clients", "1", "2", "--workers", "2",
                            "--results-dir", str(tmp_path)])
    measured = payload["stores"]["sqlite"]
    assert set(measured["levels"]) == {"1", "2"}
    assert all(level["n"] == 6 and level["throughput_rps"] > 0 and level["server_cpu_ms_per_request"] > 0
               for level in measured["levels"].values())
    assert set(measured["baselines"]) == {"feast_read", "forward"}
    assert set(measured["targets"]) == {"speedup", "p99_ratio", "overhead"}
    text = (tmp_path / "serving.md").read_text()
    assert "POST /rank, 2 client(s)" in text and ("PASS" in text or "FAIL" in text)
    assert json.loads((tmp_path / "serving.json").read_text())["command"].startswith("python -m benchmarks.serving")


def test_a_killed_worker_answers_503_and_is_replaced(served: Served, tmp_path: Path) -> None:
    import psutil

    from benchmarks import serving

    def workers(pid: int) -> list[psutil.Process]:
        return [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]

    cfg = serving.ServingBenchConfig(run=served.run, repo=served.repo, workers=1, results_dir=tmp_path)
    with serving.server(cfg) as running:
        request = _rank_body(2, [4, 5, 6])
        status, before = _request(running.port, "POST", "/rank", request)
        assert status == 200
        (worker,) = workers(running.pid)
        worker.kill()
        worker.wait(10)
        status, answer = _request(running.port, "POST", "/rank", request)
        assert status == 503 and "retry" in answer["error"], answer
        assert _status_within(running.port, 200, seconds=120)  # restarted: a fresh process loads the ranker
        (replacement,) = workers(running.pid)
        assert replacement.pid != worker.pid
        status, after = _request(running.port, "POST", "/rank", request)
        assert status == 200 and scores_by_item(after) == scores_by_item(before)


def test_a_worker_past_the_batch_timeout_is_killed_and_its_batch_answers_503(served: Served, tmp_path: Path) -> None:
    import subprocess
    import sys

    from sidrank.net import free_port

    port, log_path = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "ranking.serve", "http", "--run", str(served.run), "--repo", str(served.repo),
               "--port", str(port), "--workers", "1", "--batch-timeout", "0.001"]  # no batch can be that fast
    with open(log_path, "wb") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:  # uvicorn listens once the worker is ready
            assert child.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                status, answer = _request(port, "POST", "/rank", _rank_body(2, [4, 5, 6]))
                break
            except ConnectionError:
                time.sleep(0.5)
        assert status == 503 and answer == {"error": "a ranking worker stopped during the request; retry"}
        assert "took longer than 0.001 s over a batch (--batch-timeout); killing it" in log_path.read_text()
    finally:
        child.terminate()
        child.wait(30)
