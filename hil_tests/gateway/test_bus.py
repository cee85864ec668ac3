"""The bounded bus: order, bounds, backpressure, drop counting, and draining without waiting."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.bus import Bus, BusStats
from gateway.model import Quality, Sample


def batch(n: int, start: int = 0, device: str = "d1") -> list[Sample]:
    return [Sample(device, "t", float(start + i), Quality.GOOD, 1.0e9 + i) for i in range(n)]


def values(samples: list[Sample]) -> list[float]:
    return [float(s.value) for s in samples]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_batches_come_out_whole_and_in_order() -> None:
    async def go() -> None:
        bus = Bus(max_samples=100)
        assert await bus.publish(batch(3, 0))
        assert await bus.publish(batch(2, 10))
        assert bus.stats == BusStats(
            published=5,
            delivered=0,
            dropped_batches=0,
            dropped_samples=0,
            depth_samples=5,
            capacity=100,
        )
        assert values(await bus.get()) == [0.0, 1.0, 2.0]
        assert values(await bus.get()) == [10.0, 11.0]
        s = bus.stats
        assert (s.published, s.delivered, s.depth_samples) == (5, 5, 0)

    asyncio.run(go())


def test_published_batch_is_copied() -> None:
    async def go() -> None:
        bus = Bus()
        mine = batch(2)
        await bus.publish(mine)
        mine.clear()  # a publisher reusing its list must not change what is on the bus
        assert len(await bus.get()) == 2

    asyncio.run(go())


def test_empty_batch_is_a_no_op() -> None:
    async def go() -> None:
        bus = Bus(max_samples=1)
        assert await bus.publish([])
        assert bus.stats.published == 0
        assert bus.get_nowait_many(10) == []

    asyncio.run(go())


def test_full_bus_waits_then_drops_and_counts() -> None:
    async def go() -> None:
        bus = Bus(max_samples=10, publish_timeout_s=0.03)
        assert await bus.publish(batch(6))
        t0 = time.monotonic()
        assert not await bus.publish(batch(5, 100))  # 6 + 5 > 10: waits, nobody drains
        waited = time.monotonic() - t0
        assert 0.025 <= waited < 1.0
        assert await bus.publish(batch(4, 200))  # still fits exactly
        s = bus.stats
        assert (s.dropped_batches, s.dropped_samples, s.depth_samples, s.published) == (
            1,
            5,
            10,
            10,
        )
        assert values(bus.get_nowait_many(100)) == [0, 1, 2, 3, 4, 5, 200, 201, 202, 203]

    asyncio.run(go())


def test_zero_timeout_drops_at_once() -> None:
    async def go() -> None:
        bus = Bus(max_samples=2, publish_timeout_s=0.0)
        assert await bus.publish(batch(2))
        assert not await bus.publish(batch(1))
        assert bus.stats.dropped_samples == 1

    asyncio.run(go())


def test_batch_larger_than_the_bus_is_dropped_without_waiting() -> None:
    async def go() -> None:
        bus = Bus(max_samples=4, publish_timeout_s=10.0)
        assert not await asyncio.wait_for(bus.publish(batch(5)), 0.5)
        assert (bus.stats.dropped_batches, bus.stats.dropped_samples) == (1, 5)
        assert bus.stats.depth_samples == 0

    asyncio.run(go())


def test_backpressure_publisher_resumes_when_the_consumer_makes_room() -> None:
    async def go() -> None:
        bus = Bus(max_samples=4, publish_timeout_s=5.0)
        await bus.publish(batch(3))
        waiting = asyncio.create_task(bus.publish(batch(2, 50)))
        await settle()
        assert not waiting.done()  # held back, not dropped
        assert bus.stats.depth_samples == 3
        assert values(await bus.get()) == [0.0, 1.0, 2.0]
        assert await asyncio.wait_for(waiting, 0.5)
        assert values(await bus.get()) == [50.0, 51.0]
        assert bus.stats.dropped_batches == 0

    asyncio.run(go())


def test_cancelled_publisher_leaves_nothing_behind() -> None:
    async def go() -> None:
        bus = Bus(max_samples=2, publish_timeout_s=5.0)
        await bus.publish(batch(2))
        waiting = asyncio.create_task(bus.publish(batch(1, 9)))
        await settle()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(bus.get_nowait_many(10)) == 2
        assert bus.get_nowait_many(10) == []
        s = bus.stats
        assert (s.published, s.dropped_batches, s.delivered) == (2, 0, 2)

    asyncio.run(go())


def test_get_waits_for_the_next_batch() -> None:
    async def go() -> None:
        bus = Bus()
        getter = asyncio.create_task(bus.get())
        await settle()
        assert not getter.done()
        await bus.publish(batch(2, 7))
        assert values(await asyncio.wait_for(getter, 0.5)) == [7.0, 8.0]

    asyncio.run(go())


def test_get_nowait_many_takes_whole_batches_and_splits_the_last() -> None:
    async def go() -> None:
        bus = Bus()
        await bus.publish(batch(3, 0))
        await bus.publish(batch(3, 10))
        await bus.publish(batch(3, 20))
        assert values(bus.get_nowait_many(5)) == [0, 1, 2, 10, 11]
        assert bus.stats.depth_samples == 4
        assert values(await bus.get()) == [12.0]  # the remainder stays at the head
        assert values(bus.get_nowait_many(100)) == [20, 21, 22]
        assert bus.get_nowait_many(100) == []
        s = bus.stats
        assert (s.published, s.delivered, s.depth_samples) == (9, 9, 0)

    asyncio.run(go())


def test_draining_wakes_publishers_too() -> None:
    async def go() -> None:
        bus = Bus(max_samples=3, publish_timeout_s=5.0)
        await bus.publish(batch(3))
        waiting = asyncio.create_task(bus.publish(batch(2, 40)))
        await settle()
        bus.get_nowait_many(2)
        assert await asyncio.wait_for(waiting, 0.5)
        assert values(bus.get_nowait_many(10)) == [2.0, 40.0, 41.0]

    asyncio.run(go())


def test_many_devices_publishing_into_a_slow_consumer_stay_bounded() -> None:
    async def go() -> None:
        bus = Bus(max_samples=50, publish_timeout_s=0.01)
        max_depth = 0

        async def device(i: int) -> None:
            for k in range(20):
                await bus.publish(batch(5, k * 10, device=f"d{i}"))
                await asyncio.sleep(0)

        async def consumer() -> None:
            nonlocal max_depth
            while True:
                max_depth = max(max_depth, bus.stats.depth_samples)
                await bus.get()
                await asyncio.sleep(0.002)  # slower than the devices

        c = asyncio.create_task(consumer())
        await asyncio.gather(*(device(i) for i in range(10)))
        c.cancel()
        s = bus.stats
        assert max_depth <= 50
        assert s.dropped_batches > 0  # the consumer could not keep up
        assert s.published + s.dropped_samples == 10 * 20 * 5  # every sample accounted for
        assert s.delivered + s.depth_samples == s.published

    asyncio.run(go())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_samples": 0}, "max_samples"), ({"publish_timeout_s": -1.0}, "publish_timeout_s")],
)
def test_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bus(**kwargs)  # type: ignore[arg-type]
