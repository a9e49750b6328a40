"""Admission at the queue's edge: exactly --max-queue requests wait, the next one gets 429."""

from __future__ import annotations

import asyncio

import pytest

from hetegen_cli.serve.metrics import Metrics
from hetegen_cli.serve.protocol import ApiError
from hetegen_cli.serve.worker import Worker


@pytest.mark.parametrize("max_queue", [0, 1, 3])
def test_exactly_max_queue_requests_wait_while_one_generates(max_queue):
    async def scenario() -> tuple[int, int]:
        worker = Worker(served=None, max_queue=max_queue, metrics=Metrics(), thread=None)

        async def here() -> bool:
            return False

        await worker._lock.acquire()  # one request is generating
        waiting = [asyncio.ensure_future(worker._admit(object(), here)) for _ in range(max_queue)]
        await asyncio.sleep(0)  # let them reach the queue
        assert worker.waiting == max_queue
        with pytest.raises(ApiError) as refused:  # at once: admitted, it would wait (timeout)
            await asyncio.wait_for(worker._admit(object(), here), timeout=5)
        worker._lock.release()
        for admitted in waiting:  # each gets the model in turn
            await admitted
            worker._lock.release()
        return refused.value.status, worker.waiting

    status, left = asyncio.run(scenario())
    assert status == 429 and left == 0
