"""Online ranking (ranking/serve.py) against a real published Feast repository and a trained checkpoint.

A small random dataset is published into a tmp copy of feature_repo (real
``feast apply`` / ``materialize``) and ranked by a 1-process ``ranking.train``
run; the served scores must equal the offline model's scores of the same rows.
"""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from feast import FeatureStore
from builders import TEST_SID_VERSION, publish_to_repo_copy, random_tied_events, write_feature_dataset

from features import publish
from sidrank.protocol import assign_protocol_split
from sidrank.schema import DataError
from ranking import serve, train
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
    "payload, message",
    [
        ([1, 2], "JSON object"),
        ({"user_id": "5", "item_ids": [1]}, "user_id must be an integer"),
        ({"user_id": True, "item_ids": [1]}, "user_id must be an integer"),
        ({"user_id": 5, "item_ids": [1, 2.5]}, r"item_ids\[1\] must be an integer"),
        ({"user_id": 5, "item_ids": [0]}, r"item_ids\[0\] must be an integer id >= 1"),
        ({"user_id": 5, "item_ids": []}, "non-empty list"),
        ({"user_id": 5}, "non-empty list"),
        ({"user_id": 5, "item_ids": list(range(1, 12))}, "11 candidates exceed the limit of 10"),
        ({"user_id": 5, "item_ids": [1], "k": 3}, r"unknown field\(s\) \['k'\]"),
    ],
)
def test_malformed_requests_are_refused(payload: object, message: str) -> None:
    with pytest.raises(serve.RequestError, match=message):
        serve.parse_request(payload, max_candidates=10)
    assert serve.parse_request({"user_id": 5, "item_ids": [3, 1]}, max_candidates=10) == (5, [3, 1])


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(serve.HOST, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_http_round_trip_and_bad_requests(served: Served) -> None:
    server = serve.make_server(served.ranker, port=0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _request(port, "GET", "/health") == (200, {"status": "ok", "service": served.ranker.service,
                                                          "sid_version": TEST_SID_VERSION})
        status, body = _request(port, "POST", "/rank", json.dumps({"user_id": 2, "item_ids": [4, 5, 6]}).encode())
        assert status == 200
        assert scores_by_item(body) == scores_by_item(served.ranker.rank(2, [4, 5, 6]))
        for bad, message in ((b"{not json", "Expecting property name"), (b'{"user_id": 2, "item_ids": "4"}',
                             "non-empty list"), (b"", "JSON object")):
            status, body = _request(port, "POST", "/rank", bad)
            assert status == 400 and message in body["error"], body
        assert _request(port, "POST", "/nope", b"{}")[0] == 404
        assert _request(port, "GET", "/health")[0] == 200  # still serving after the bad requests
    finally:
        server.shutdown()
        server.server_close()


def test_cli_rank_prints_the_ranking(served: Served, capsys: pytest.CaptureFixture) -> None:
    serve.main(["rank", "--run", str(served.run), "--repo", str(served.repo), "--user", "3", "--items", "7", "8"])
    printed = json.loads(capsys.readouterr().out)
    assert scores_by_item(printed) == pytest.approx(scores_by_item(served.ranker.rank(3, [7, 8])), abs=1e-7)
    with pytest.raises(SystemExit):
        serve.main(["rank", "--run", str(served.run), "--repo", str(served.repo), "--user", "0", "--items", "7"])


def test_store_of_another_sid_version_or_missing_run_is_refused(served: Served, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"SID version 'other-v9' is not published .*\['{TEST_SID_VERSION}'\]"):
        contract.RepoPaths(served.repo).feature_meta("other-v9")
    with pytest.raises(DataError, match="metrics.json: not found"):
        serve.Ranker(serve.ServeConfig(run=tmp_path, repo=served.repo))
    with pytest.raises(DataError, match="no checkpoint"):
        serve.load_checkpoint(tmp_path / "checkpoint", served.ranker.meta)


def test_serving_benchmark_writes_its_table(served: Served, tmp_path: Path) -> None:
    from benchmarks import serving

    payload = serving.main(["--run", str(served.run), "--repo", str(served.repo), "--requests", "4", "--warmup", "1",
                            "--candidates", "10", "--results-dir", str(tmp_path)])
    assert set(payload["stats"]) == set(serving.LABELS)
    assert all(stat["n"] == 4 and stat["p50_ms"] > 0 for stat in payload["stats"].values())
    assert payload["target"]["met"] == (payload["stats"]["end_to_end_http"]["p99_ms"] < 50)
    assert "end to end: POST /rank" in (tmp_path / "serving.md").read_text()
    assert json.loads((tmp_path / "serving.json").read_text())["command"].startswith("python -m benchmarks.serving")
