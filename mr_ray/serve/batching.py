"""Batching for the search ingress: a batch runs as soon as the last one ends, with everything that queued meanwhile.

Ray Serve's `serve.batch` closes a batch when its wait timeout ends, even while
the previous batch still runs (finished batches then queue for its concurrency
semaphore). With no timeout every batch under load holds one request (measured:
1,962 of 1,981 batches at concurrency 32); with a timeout an idle replica makes
every request wait it out. Here one batch runs at a time and the next takes all
that queued while it ran: an idle replica adds no wait, a busy one batches as
deep as its queue.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class WhileBusyBatcher:
    """`await batcher(item)` gives `process(items)[i]` for the batch `items` that `item` joined.

    `process` is an async function from a list of items to a list of results of
    the same length; at most `max_batch_size` items go into one call. A batch
    that raises is split in halves and each half tried again, down to single
    items, so the exception reaches only the callers whose own item raises it:
    one poison request costs its neighbours about log2(batch) extra calls,
    never their answers.
    """

    def __init__(self, process: Callable[[list], Awaitable[list]], max_batch_size: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.process = process
        self.max_batch_size = max_batch_size
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if self.drainer is None:
            self.drainer = asyncio.create_task(self.drain())
        return await future

    async def drain(self) -> None:
        try:
            while self.pending:
                batch = self.pending[: self.max_batch_size]
                del self.pending[: self.max_batch_size]
                await self.settle(batch)
        finally:
            self.drainer = None

    async def settle(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        """Process `batch` and give each caller its result; on an exception, settle each half on its own."""
        try:
            results = await self.process([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except Exception as err:
            if len(batch) > 1:
                middle = len(batch) // 2
                await self.settle(batch[:middle])
                await self.settle(batch[middle:])
                return
            _, future = batch[0]
            if not future.done():
                future.set_exception(err)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():  # its caller may be gone (client disconnected)
                    future.set_result(result)
