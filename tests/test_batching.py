"""WhileBusyBatcher: no wait when idle, everything that queued while busy goes into the next batch."""

import asyncio

import pytest

from mr_ray.serve.batching import WhileBusyBatcher


class SlowDouble:
    """process(items) -> [2 * item], taking `seconds`; records every batch it got."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None):
        self.seconds, self.fail_on, self.batches = seconds, fail_on, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * item for item in items]


def test_an_idle_batcher_runs_a_lone_call_at_once():
    async def main():
        process = SlowDouble(seconds=0.0)
        batcher = WhileBusyBatcher(process, max_batch_size=8)
        call = asyncio.create_task(batcher(21))
        for _ in range(3):  # a few turns of the event loop, no time: no batch wait timeout to sit out
            await asyncio.sleep(0)
        started = list(process.batches)
        return started, await call

    started, result = asyncio.run(main())
    assert started == [[21]] and result == 42


def test_calls_that_queue_while_a_batch_runs_go_together_into_the_next():
    async def main():
        process = SlowDouble(seconds=0.05)
        batcher = WhileBusyBatcher(process, max_batch_size=8)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.01)  # the first batch is running now
        rest = [asyncio.create_task(batcher(i)) for i in range(1, 11)]
        return await first, await asyncio.gather(*rest), process.batches

    first, rest, batches = asyncio.run(main())
    assert first == 0 and rest == [2 * i for i in range(1, 11)]
    # 10 queued while [0] ran: the next batch takes max_batch_size of them, then the remainder.
    assert batches == [[0], list(range(1, 9)), [9, 10]]


def test_a_failing_batch_fails_its_callers_only_and_the_batcher_keeps_going():
    async def main():
        process = SlowDouble(seconds=0.02, fail_on=3)
        batcher = WhileBusyBatcher(process, max_batch_size=2)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.005)
        queued = [asyncio.create_task(batcher(i)) for i in (2, 3, 4)]
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        return outcomes, await batcher(5), process.batches

    outcomes, after, batches = asyncio.run(main())
    assert batches == [[1], [2, 3], [2], [3], [4], [5]]  # the failing batch is split: 2 is answered, 3 alone fails
    assert outcomes[0] == 2 and outcomes[1] == 4 and outcomes[3] == 8
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad item 3"
    assert after == 10


def test_a_poison_item_among_fifty_fails_alone():
    async def main():
        process = SlowDouble(seconds=0.01, fail_on=-1)
        batcher = WhileBusyBatcher(process, max_batch_size=64)
        first = asyncio.create_task(batcher(1000))
        await asyncio.sleep(0.002)  # the rest queue while the first batch runs, and go together into one batch
        items = list(range(25)) + [-1] + list(range(25, 50))
        outcomes = await asyncio.gather(*(batcher(i) for i in items), return_exceptions=True)
        return await first, items, outcomes, process.batches

    first, items, outcomes, batches = asyncio.run(main())
    assert first == 2000 and len(batches[1]) == 51
    assert [o for i, o in zip(items, outcomes) if i != -1] == [2 * i for i in range(50)]  # all 50 good answered
    assert isinstance(outcomes[items.index(-1)], ValueError)
    assert len(batches) <= 2 + 2 * 6 + 1  # bisection: about two calls per halving, not one per item


def test_a_cancelled_caller_does_not_disturb_its_batch():
    async def main():
        process = SlowDouble(seconds=0.03)
        batcher = WhileBusyBatcher(process, max_batch_size=8)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.005)
        gone, stays = asyncio.create_task(batcher(2)), asyncio.create_task(batcher(3))
        await asyncio.sleep(0.005)
        gone.cancel()  # its client disconnected while the batch waited
        return await first, await stays, gone.cancelled(), process.batches

    first, stays, cancelled, batches = asyncio.run(main())
    assert (first, stays, cancelled) == (2, 6, True)
    assert batches == [[1], [2, 3]]


def test_a_batch_must_give_one_result_per_item():
    async def wrong(items):
        return items[:-1]

    async def main():
        batcher = WhileBusyBatcher(wrong, max_batch_size=4)
        return await batcher(1)

    with pytest.raises(RuntimeError, match="a batch of 1 items gave 0 results"):
        asyncio.run(main())
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        WhileBusyBatcher(wrong, max_batch_size=0)
