"""Coalescing: concurrent operations on one replica share one database call.

Group commit, as TigerBeetle batches transfers and PostgreSQL batches WAL
flushes: at most `max_in_flight` calls run at once; a request that arrives
while they are all busy waits in a queue, and the next call to finish sends
the whole queue (up to `max_batch` items) as one array to the set-based SQL
function `tl_execute_batch`. A lone request never waits for company: it
starts its call at once. What a queued request waits for is the call ahead of
it, which is what it would have waited for at the pool anyway; the wait is
bounded by the statement timeout and the pool's acquire timeout.

Each request still gets its own result or its own error. The SQL function
isolates business rejections and operating errors per item; when a batch as
a whole fails for any other reason, its items are run again one by one, so
one bad request never fails the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Item:
    """One state-changing request, as tl_execute takes it."""

    caller: str
    key: str | None
    fingerprint: bytes | None
    op: str
    success_status: int
    args: dict[str, Any]
    ctx: dict[str, Any]


# A batch runner returns, for each item in order, its result or the
# exception that item raised.
BatchRunner = Callable[[list[Item]], Awaitable[list[Any]]]


class Coalescer:
    """Queues items and runs them in batches, `max_in_flight` at a time."""

    def __init__(self, run: BatchRunner, *, max_batch: int, max_in_flight: int) -> None:
        assert max_batch >= 1 and max_in_flight >= 1
        self._run = run
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[Item, asyncio.Future[Any]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Any:
        """The item's result; raises what the item raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._take()
            self._in_flight += 1
            task = asyncio.create_task(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[Item, asyncio.Future[Any]]]:
        """Up to max_batch queued items in arrival order. An item whose key
        is already in the batch stays queued for the next one, so that it is
        answered as the replay it is."""
        batch: list[tuple[Item, asyncio.Future[Any]]] = []
        keys: set[tuple[str, str]] = set()
        deferred: list[tuple[Item, asyncio.Future[Any]]] = []
        while self._queue and len(batch) < self.max_batch:
            entry = self._queue.popleft()
            item = entry[0]
            if item.key is not None:
                if (item.caller, item.key) in keys:
                    deferred.append(entry)
                    continue
                keys.add((item.caller, item.key))
            batch.append(entry)
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _call(self, batch: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        try:
            try:
                results = await self._run([item for item, _ in batch])
                assert len(results) == len(batch), "a batch answered the wrong number of items"
            except BaseException as exc:  # noqa: BLE001  # why: every waiter must hear of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._start()
