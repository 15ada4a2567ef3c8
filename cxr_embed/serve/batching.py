"""Micro-batching: concurrent requests share one model forward.

Each request submits its items and awaits their futures. One collector task takes the first
waiting item, then keeps taking until ``max_batch`` items are in hand or ``max_wait_ms`` has
passed since that first item, and runs the batch function on a single worker thread (so the event
loop never blocks and the model never runs two forwards at once). At concurrency 1 a request waits
at most ``max_wait_ms`` extra; under load the GPU (or BLAS) sees batches instead of single images.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchConfig:
    """``max_batch`` 1 (or ``max_wait_ms`` 0 with no waiting company) means one-at-a-time."""

    max_batch: int = 16
    max_wait_ms: float = 5.0


class MicroBatcher(Generic[T, R]):
    """Collects items from many coroutines into calls of ``fn(list[T]) -> list[R]``."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        config: BatchConfig,
        executor: ThreadPoolExecutor,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.fn = fn
        self.config = config
        self.executor = executor
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the collector on the running loop (the app's lifespan calls this)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items``, in order; an exception in the batch function is raised here."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures, strict=True):
            self._queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [
                (item, fut) for item, fut in batch if not fut.done()
            ]  # timed-out callers cancelled theirs
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 - delivered to every caller of this batch
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - start)
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
