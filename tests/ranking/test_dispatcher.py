"""The service's request queue (ranking.service.Dispatcher) against stand-in workers: batching, order, failures."""

from __future__ import annotations

import asyncio

import pytest

from ranking.serve import ServiceUnavailable, StoreUnavailable
from ranking.service import Dispatcher


class StandInWorker:
    """Records the batches it is given; the test answers them."""

    def __init__(self) -> None:
        self.alive = True
        self.batches: list[list] = []
        self.futures: list[asyncio.Future] = []

    def submit(self, batch: list) -> asyncio.Future:
        self.batches.append(batch)
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]

    def answer(self, index: int = -1) -> None:
        self.futures[index].set_result([{"user_id": user, "timings_ms": {}} for user, _ in self.batches[index]])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(test) -> None:
    asyncio.run(test())


def test_a_lone_request_is_dispatched_at_once_and_answered_with_its_queue_time() -> None:
    async def test() -> None:
        dispatcher, worker = Dispatcher(max_batch_candidates=100), StandInWorker()
        dispatcher.worker_ready(worker)
        pending = asyncio.create_task(dispatcher.rank((1, [1, 2])))
        await settle()
        assert worker.batches == [[(1, [1, 2])]]  # nothing waited for company
        worker.answer()
        answer = await pending
        assert answer["user_id"] == 1 and answer["timings_ms"]["queue"] >= 0

    run(test)


def test_requests_waiting_for_a_busy_worker_go_together_in_arrival_order_up_to_the_cap() -> None:
    async def test() -> None:
        dispatcher, worker = Dispatcher(max_batch_candidates=5), StandInWorker()
        dispatcher.worker_ready(worker)
        first = asyncio.create_task(dispatcher.rank((1, [1])))
        await settle()
        waiting = [asyncio.create_task(dispatcher.rank((user, [1, 2]))) for user in (2, 3, 4)]
        await settle()
        assert len(worker.batches) == 1  # the worker is busy: the three wait
        worker.answer(0)
        await settle()
        # 2 + 2 candidates fit under the cap of 5, the third request would not.
        assert worker.batches[1] == [(2, [1, 2]), (3, [1, 2])]
        worker.answer(1)
        await settle()
        assert worker.batches[2] == [(4, [1, 2])]
        worker.answer(2)
        answers = await asyncio.gather(first, *waiting)
        assert [answer["user_id"] for answer in answers] == [1, 2, 3, 4]

    run(test)


def test_whichever_worker_is_free_takes_the_next_batch() -> None:
    async def test() -> None:
        dispatcher, slow, fast = Dispatcher(max_batch_candidates=100), StandInWorker(), StandInWorker()
        dispatcher.worker_ready(slow)
        dispatcher.worker_ready(fast)
        tasks = [asyncio.create_task(dispatcher.rank((user, [1]))) for user in (1, 2)]
        await settle()
        assert len(slow.batches) == len(fast.batches) == 1  # one request each, no batching while a worker idles
        busy, free = (slow, fast) if slow.batches[0] == [(1, [1])] else (fast, slow)
        free.answer()
        later = asyncio.create_task(dispatcher.rank((3, [1])))
        await settle()
        assert free.batches[-1] == [(3, [1])] and len(busy.batches) == 1
        free.answer()
        busy.answer()
        assert [a["user_id"] for a in await asyncio.gather(*tasks, later)] == [1, 2, 3]

    run(test)


def test_a_failed_batch_fails_each_of_its_requests_and_the_queue_goes_on() -> None:
    async def test() -> None:
        dispatcher, worker = Dispatcher(max_batch_candidates=100), StandInWorker()
        dispatcher.worker_ready(worker)
        doomed = [asyncio.create_task(dispatcher.rank((user, [1]))) for user in (1, 2)]
        await settle()
        worker.futures[0].set_exception(StoreUnavailable("store down"))
        await settle()
        worker.answer(1)  # the second request went in the next batch and is served
        with pytest.raises(StoreUnavailable, match="store down"):
            await doomed[0]
        assert (await doomed[1])["user_id"] == 2

    run(test)


def test_a_client_that_went_away_is_not_ranked() -> None:
    async def test() -> None:
        dispatcher, worker = Dispatcher(max_batch_candidates=100), StandInWorker()
        dispatcher.worker_ready(worker)
        first = asyncio.create_task(dispatcher.rank((1, [1])))
        await settle()
        gone, kept = (asyncio.create_task(dispatcher.rank((user, [1]))) for user in (2, 3))
        await settle()
        gone.cancel()
        worker.answer(0)
        await settle()
        assert worker.batches[1] == [(3, [1])]
        worker.answer(1)
        assert (await first)["user_id"] == 1 and (await kept)["user_id"] == 3

    run(test)


def test_without_a_ready_worker_requests_get_503_at_once_and_waiting_ones_are_released() -> None:
    async def test() -> None:
        dispatcher, worker = Dispatcher(max_batch_candidates=100), StandInWorker()
        with pytest.raises(ServiceUnavailable, match="no ranking worker is ready"):
            await dispatcher.rank((1, [1]))
        dispatcher.worker_ready(worker)
        in_flight = asyncio.create_task(dispatcher.rank((1, [1])))
        await settle()
        waiting = asyncio.create_task(dispatcher.rank((2, [1])))
        await settle()
        worker.alive = False  # it died: the process worker fails its in-flight batch itself
        dispatcher.worker_lost(worker)
        worker.futures[0].set_exception(ServiceUnavailable("a ranking worker stopped during the request; retry"))
        for task in (in_flight, waiting):
            with pytest.raises(ServiceUnavailable):
                await task
        dispatcher.worker_ready(worker)  # restarted
        worker.alive = True
        again = asyncio.create_task(dispatcher.rank((3, [1])))
        await settle()
        worker.answer()
        assert (await again)["user_id"] == 3

    run(test)


def test_a_worker_that_cannot_take_or_finish_a_batch_fails_that_batch_alone() -> None:
    async def test() -> None:
        dispatcher, worker = Dispatcher(max_batch_candidates=1), StandInWorker()  # one request per batch
        dispatcher.worker_ready(worker)
        cancelled, short, refused, fine = (asyncio.create_task(dispatcher.rank((user, [1]))) for user in (1, 2, 3, 4))
        await settle()
        worker.futures[0].cancel()  # e.g. the worker stopped at shutdown
        await settle()
        real_submit, broken = worker.submit, []

        def submit_once_broken(batch: list) -> asyncio.Future:
            if not broken:
                broken.append(batch)
                raise OSError("socket closed")
            return real_submit(batch)

        worker.submit = submit_once_broken
        worker.futures[1].set_result([])  # answers missing
        await settle()
        with pytest.raises(ServiceUnavailable, match="stopped"):
            await cancelled
        with pytest.raises(RuntimeError, match="answered 0 of a batch of 1"):
            await short
        with pytest.raises(OSError, match="socket closed"):
            await refused
        assert broken == [[(3, [1])]] and worker.batches[-1] == [(4, [1])]  # the queue went on
        worker.answer()
        assert (await fine)["user_id"] == 4

    run(test)
