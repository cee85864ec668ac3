"""The bounded in-process bus that carries batches of samples from device services to the edge
stage; when it stays full, publishers wait a bounded time and then their batch is dropped and
counted, so a slow consumer can never grow memory without limit or stall a device forever.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from gateway.model import Sample


@dataclass(frozen=True, slots=True)
class BusStats:
    """A snapshot of the bus; every count is in samples except `dropped_batches`."""

    published: int  # samples accepted onto the bus
    delivered: int  # samples handed to the consumer
    dropped_batches: int
    dropped_samples: int
    depth_samples: int  # samples waiting now
    capacity: int


class Bus:
    """Single-loop, many publishers, one (or a few) consumers; batches keep their order."""

    def __init__(self, max_samples: int = 100_000, publish_timeout_s: float = 1.0) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        if publish_timeout_s < 0:
            raise ValueError("publish_timeout_s must be 0 or more")
        self._max = max_samples
        self._timeout_s = publish_timeout_s
        self._batches: deque[list[Sample]] = deque()
        self._depth = 0
        self._published = 0
        self._delivered = 0
        self._dropped_batches = 0
        self._dropped_samples = 0
        # Futures resolved on every change; waiters re-check their condition when woken.
        self._room_waiters: list[asyncio.Future[None]] = []
        self._item_waiters: list[asyncio.Future[None]] = []

    @property
    def stats(self) -> BusStats:
        return BusStats(
            published=self._published,
            delivered=self._delivered,
            dropped_batches=self._dropped_batches,
            dropped_samples=self._dropped_samples,
            depth_samples=self._depth,
            capacity=self._max,
        )

    async def publish(self, samples: list[Sample]) -> bool:
        """Put one batch on the bus, waiting up to publish_timeout_s for room.

        Returns False when the batch was dropped (the bus stayed full, or the batch is larger
        than the whole bus); the drop is counted. A batch is never split or partly dropped.
        """
        n = len(samples)
        if n == 0:
            return True
        if n > self._max:
            return self._drop(n)
        if self._depth + n > self._max:
            if self._timeout_s == 0:
                return self._drop(n)
            try:
                async with asyncio.timeout(self._timeout_s):
                    while self._depth + n > self._max:
                        await _wait(self._room_waiters)
            except TimeoutError:
                return self._drop(n)
        # Copy: the publisher may reuse its list, and the consumer must see what was published.
        self._batches.append(list(samples))
        self._depth += n
        self._published += n
        _wake(self._item_waiters)
        return True

    async def get(self) -> list[Sample]:
        """The next batch, waiting until there is one."""
        while not self._batches:
            await _wait(self._item_waiters)
        batch = self._batches.popleft()
        self._taken(len(batch))
        return batch

    def get_nowait_many(self, max_samples: int) -> list[Sample]:
        """Up to `max_samples` samples, oldest first, without waiting; [] when the bus is empty.

        Whole batches are taken while they fit; a batch that does not fit is split and its
        remainder stays at the head of the bus.
        """
        out: list[Sample] = []
        while self._batches and len(out) < max_samples:
            head = self._batches[0]
            room = max_samples - len(out)
            if len(head) <= room:
                out.extend(self._batches.popleft())
            else:
                out.extend(head[:room])
                self._batches[0] = head[room:]
        if out:
            self._taken(len(out))
        return out

    def _taken(self, n: int) -> None:
        self._depth -= n
        self._delivered += n
        _wake(self._room_waiters)

    def _drop(self, n: int) -> bool:
        self._dropped_batches += 1
        self._dropped_samples += n
        return False


async def _wait(waiters: list[asyncio.Future[None]]) -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await fut
    finally:
        # Gone already when woken; still there when cancelled or timed out.
        if fut in waiters:
            waiters.remove(fut)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)
    waiters.clear()
