"""Device services: fixed-rate polling, timeouts, backoff with jitter, the circuit breaker, health,
bad-data handling, cancellation, and isolation of bad devices from good ones under one loop.

Most tests run in virtual time (an injected clock and sleep), so schedules are checked exactly
and instantly; the isolation and timeout tests run in real time with periods of tens of ms.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pytest

from gateway.bus import Bus
from gateway.config.fragments import DeviceBase, SupervisorConfig
from gateway.errors import DeviceError, DeviceTimeout
from gateway.model import DeviceStatus, Health, Quality, Sample
from gateway.supervisor import DeviceService, DeviceUnavailable, WriteNotSupported
from retrofit_adapters.base import Adapter, Reading
from retrofit_adapters.registry import adapter_class
from retrofit_adapters.simulated.config import SimulatedDevice
from retrofit_adapters.simulated.process import MODELS

WALL0 = 1.7e9  # virtual wall clock = WALL0 + virtual monotonic


class VirtualTime:
    """A monotonic clock and a sleep that advances it instantly; a sleep that would pass
    `until` parks forever instead, which is where a test stops the service."""

    def __init__(self, until: float, start: float = 100.0) -> None:
        self.now = start
        self.until = until
        self.reached = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now

    async def sleep(self, delay: float) -> None:
        assert delay >= 0
        if self.now + delay > self.until:
            self.reached.set()
            await asyncio.Event().wait()
        self.now += delay
        await asyncio.sleep(0)


class Scripted(Adapter):
    """A fake device driven by a script of read outcomes; records every call with its time.

    Steps: "ok", "raise", "bug", "hang", "garbage", "mixed", "dict", "cancelled",
    "vendor_timeout"; "<step>@<seconds>" makes the read take that long in virtual time.
    After the script ends every read is "ok".
    """

    type_name = "scripted"
    config_model = DeviceBase
    capabilities: ClassVar[frozenset[str]] = frozenset({"read"})

    def __init__(
        self,
        cfg: DeviceBase,
        vt: VirtualTime | None = None,
        steps: Iterable[str] = (),
        *,
        open_steps: Iterable[str] = (),
        close_step: str = "ok",
    ) -> None:
        super().__init__(cfg)
        self.vt = vt
        self.steps: Iterator[str] = iter(steps)
        self.open_steps: Iterator[str] = iter(open_steps)
        self.close_step = close_step
        self.events: list[tuple[str, float]] = []
        self.read_started = asyncio.Event()

    def _now(self) -> float:
        return self.vt.now if self.vt is not None else time.monotonic()

    def tag_names(self) -> list[str]:
        return ["a", "b"]

    def calls(self, name: str) -> list[float]:
        return [t for n, t in self.events if n == name]

    async def open(self) -> None:
        self.events.append(("open", self._now()))
        step = next(self.open_steps, "ok")
        if step == "raise":
            raise DeviceError("connection refused")
        if step == "hang":
            await asyncio.Event().wait()

    async def read(self) -> list[Reading]:
        self.events.append(("read", self._now()))
        self.read_started.set()
        step, _, took = next(self.steps, "ok").partition("@")
        if took and self.vt is not None:
            self.vt.now += float(took)
        if step == "raise":
            raise DeviceError("boom")
        if step == "bug":
            raise ZeroDivisionError("division by zero")
        if step == "vendor_timeout":
            raise TimeoutError("vendor said so")
        if step == "cancelled":
            raise asyncio.CancelledError
        if step == "hang":
            await asyncio.Event().wait()
        junk: Any
        if step == "garbage":
            return [Reading("a", math.nan), Reading("b", math.inf)]
        if step == "dict":
            junk = {"a": 1.0}
            return junk  # type: ignore[no-any-return]
        if step == "mixed":
            junk = b"\x00"
            return [
                Reading("a", 1.5),
                Reading("a", math.nan),
                Reading("zzz", 1.0),
                Reading("b", junk),
                junk,
                Reading("b", 2, Quality.UNCERTAIN, ts=5.0),
            ]
        assert step == "ok", step
        return [Reading("a", 1.0), Reading("b", 2)]

    async def close(self) -> None:
        self.events.append(("close", self._now()))
        if self.close_step == "raise":
            raise DeviceError("close failed badly")
        if self.close_step == "hang":
            await asyncio.Event().wait()


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []

    async def __call__(self, samples: list[Sample]) -> bool:
        self.batches.append(samples)
        return True


class HealthLog:
    def __init__(self, vt: VirtualTime | None = None) -> None:
        self.vt = vt
        self.changes: list[tuple[Health, Health]] = []
        self.times: list[float] = []
        self.statuses: list[DeviceStatus] = []

    def __call__(self, status: DeviceStatus, old: Health) -> None:
        self.changes.append((old, status.health))
        self.times.append(self.vt.now if self.vt is not None else 0.0)
        self.statuses.append(status)


def device(period_ms: int = 1000, timeout_ms: int = 500, **sup: Any) -> DeviceBase:
    return DeviceBase(
        id="dev", period_ms=period_ms, timeout_ms=timeout_ms, supervisor=SupervisorConfig(**sup)
    )


def service(
    cfg: DeviceBase,
    adapter: Adapter,
    vt: VirtualTime,
    sink: Sink | None = None,
    health: HealthLog | None = None,
    rng: random.Random | None = None,
) -> DeviceService:
    return DeviceService(
        cfg,
        lambda _cfg: adapter,
        sink if sink is not None else Sink(),
        on_health=health,
        clock=vt.wall,
        monotonic=vt.monotonic,
        rng=rng if rng is not None else random.Random(0),
        sleep=vt.sleep,
    )


async def run_to_horizon(svc: DeviceService, vt: VirtualTime, real_limit_s: float = 5.0) -> None:
    """Run the service until virtual time reaches the horizon, then cancel it."""
    task = asyncio.create_task(svc.run())
    reached = asyncio.create_task(vt.reached.wait())
    done, _ = await asyncio.wait(
        {task, reached}, timeout=real_limit_s, return_when="FIRST_COMPLETED"
    )
    reached.cancel()
    assert task not in done, f"run() ended on its own: {task.exception()!r}"
    assert reached in done, "virtual horizon not reached in time"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 9) for a, b in itertools.pairwise(times)]


# --- scheduling ----------------------------------------------------------------------


def test_healthy_device_polls_on_a_drift_free_grid() -> None:
    async def go() -> None:
        vt = VirtualTime(until=110.5)
        adapter = Scripted(device(), vt, ["ok@0.3"] * 20)
        sink, health = Sink(), HealthLog(vt)
        svc = service(device(), adapter, vt, sink, health)
        assert svc.status.health is Health.STARTING
        await run_to_horizon(svc, vt)
        # Each read takes 0.3 s, yet reads start on the 1 s grid, not every 1.3 s.
        assert adapter.calls("read") == pytest.approx([100.0 + k for k in range(11)])
        st = svc.status
        assert st.polls_total == 11 and st.errors_total == 0 and svc.skipped_polls_total == 0
        assert st.health is Health.OK and health.changes == [(Health.STARTING, Health.OK)]
        assert health.statuses[0] is st
        assert st.poll_latency.total == 11
        assert st.poll_latency.sum_s == pytest.approx(3.3)
        assert len(sink.batches) == 11
        first = sink.batches[0]
        assert [(s.device, s.tag, s.value, s.quality) for s in first] == [
            ("dev", "a", 1.0, Quality.GOOD),
            ("dev", "b", 2, Quality.GOOD),
        ]
        assert first[0].ts == pytest.approx(WALL0 + 100.3)  # stamped when the read returned
        assert st.last_values["a"] == sink.batches[-1][0]
        assert st.last_success_ts == pytest.approx(WALL0 + 110.3)
        assert adapter.calls("open") == [100.0]
        assert adapter.events[-1][0] == "close"  # cancellation closed it

    asyncio.run(go())


def test_overrun_skips_missed_deadlines_instead_of_bursting() -> None:
    async def go() -> None:
        vt = VirtualTime(until=106.5)
        adapter = Scripted(device(), vt, ["ok", "ok@2.5", "ok", "ok@1.0"])
        svc = service(device(), adapter, vt)
        await run_to_horizon(svc, vt)
        # 101 ran until 103.5: 102 and 103 are skipped; 104 ended exactly on 105 (on time).
        assert adapter.calls("read") == pytest.approx([100.0, 101.0, 104.0, 105.0, 106.0])
        assert svc.skipped_polls_total == 2
        assert svc.status.poll_latency.sum_s == pytest.approx(3.5)

    asyncio.run(go())


# --- backoff and the breaker ---------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    async def go() -> None:
        cfg = device(backoff_initial_ms=100, backoff_max_ms=1000, jitter=0.0, breaker_failures=100)
        vt = VirtualTime(until=104.0)
        adapter = Scripted(cfg, vt, ["raise"] * 100)
        health = HealthLog(vt)
        svc = service(cfg, adapter, vt, health=health)
        await run_to_horizon(svc, vt)
        opens = adapter.calls("open")
        assert gaps(opens) == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        st = svc.status
        assert st.errors_total == st.consecutive_failures == len(opens) == 7
        assert st.reconnects_total == 6  # every re-open after the first
        # closed after each failure; nothing was open to close at cancellation
        assert adapter.calls("close") == opens
        assert st.last_error == "boom"
        assert st.last_error_ts == pytest.approx(WALL0 + opens[-1])
        assert st.polls_total == 0 and st.health is Health.STARTING and health.changes == []

    asyncio.run(go())


def jittered_gaps(seed: int, cfg: DeviceBase) -> list[float]:
    async def go() -> list[float]:
        vt = VirtualTime(until=104.0)
        adapter = Scripted(cfg, vt, ["raise"] * 100)
        await run_to_horizon(service(cfg, adapter, vt, rng=random.Random(seed)), vt)
        return gaps(adapter.calls("open"))

    return asyncio.run(go())


def test_backoff_jitter_comes_from_the_injected_rng() -> None:
    cfg = device(backoff_initial_ms=100, backoff_max_ms=1000, jitter=0.5, breaker_failures=100)
    got = jittered_gaps(42, cfg)
    rng = random.Random(42)
    expected = [min(0.1 * 2**k, 1.0) * (1 + 0.5 * rng.uniform(-1.0, 1.0)) for k in range(len(got))]
    assert got == pytest.approx(expected, abs=1e-6)
    for k, g in enumerate(got):
        base = min(0.1 * 2**k, 1.0)
        assert 0.5 * base <= g <= 1.5 * base
    assert got == jittered_gaps(42, cfg)  # same seed, same schedule
    assert got[:4] != pytest.approx(jittered_gaps(43, cfg)[:4], abs=1e-6)


def test_breaker_opens_after_n_failures_then_half_open_trials() -> None:
    async def go() -> None:
        cfg = device(
            backoff_initial_ms=100,
            jitter=0.0,
            breaker_failures=3,
            breaker_cooldown_s=10.0,
            degraded_window_s=29.5,
        )
        vt = VirtualTime(until=141.0)
        # three failures open it; the first half-open trial fails; the second succeeds
        adapter = Scripted(cfg, vt, ["raise", "raise", "raise", "raise"])
        health = HealthLog(vt)
        seen: list[tuple[Health, bool, int]] = []

        def on_health(status: DeviceStatus, old: Health) -> None:
            health(status, old)
            seen.append((status.health, svc.breaker_open, status.consecutive_failures))

        svc = DeviceService(
            cfg,
            lambda _c: adapter,
            Sink(),
            on_health=on_health,
            clock=vt.wall,
            monotonic=vt.monotonic,
            rng=random.Random(0),
            sleep=vt.sleep,
        )
        await run_to_horizon(svc, vt)
        # No attempt at all while the breaker is open.
        assert adapter.calls("open") == pytest.approx([100.0, 100.1, 100.3, 110.3, 120.3])
        assert health.changes == [
            (Health.STARTING, Health.DOWN),
            (Health.DOWN, Health.DEGRADED),  # trial succeeded; the errors are recent
            (Health.DEGRADED, Health.OK),  # the degraded window passed without trouble
        ]
        assert seen[0] == (Health.DOWN, True, 3)
        assert health.times[1] == pytest.approx(120.3)
        assert health.times[2] == pytest.approx(140.3)  # first read 29.5 s after 110.3
        st = svc.status
        assert st.errors_total == 4 and st.consecutive_failures == 0 and not svc.breaker_open
        # Polling resumes on a grid anchored at the successful trial.
        assert adapter.calls("read")[-3:] == pytest.approx([138.3, 139.3, 140.3])

    asyncio.run(go())


def test_failure_after_success_degrades_and_recovery_returns_to_ok() -> None:
    async def go() -> None:
        cfg = device(backoff_initial_ms=500, jitter=0.0, degraded_window_s=3.0)
        vt = VirtualTime(until=110.5)
        adapter = Scripted(cfg, vt, ["ok", "ok", "raise"])
        health = HealthLog(vt)
        svc = service(cfg, adapter, vt, health=health)
        await run_to_horizon(svc, vt)
        assert health.changes == [
            (Health.STARTING, Health.OK),
            (Health.OK, Health.DEGRADED),
            (Health.DEGRADED, Health.OK),
        ]
        # failed at 102, reopened 0.5 s later, OK again once 3 s had passed without trouble
        assert health.times == pytest.approx([100.0, 102.0, 105.5])
        assert adapter.calls("open") == pytest.approx([100.0, 102.5])
        assert svc.status.reconnects_total == 1

    asyncio.run(go())


def test_failing_open_counts_like_a_failing_read() -> None:
    async def go() -> None:
        cfg = device(backoff_initial_ms=100, jitter=0.0, breaker_failures=2, breaker_cooldown_s=5.0)
        vt = VirtualTime(until=108.0)
        adapter = Scripted(cfg, vt, open_steps=["raise", "raise", "raise"])
        health = HealthLog(vt)
        svc = service(cfg, adapter, vt, health=health)
        await run_to_horizon(svc, vt)
        assert adapter.calls("open") == pytest.approx([100.0, 100.1, 105.1])
        assert adapter.calls("read") == []
        assert adapter.calls("close") == adapter.calls("open")  # after a failed open too
        st = svc.status
        assert st.last_error == "connection refused" and st.reconnects_total == 0
        assert st.health is Health.DOWN and health.changes == [(Health.STARTING, Health.DOWN)]

    asyncio.run(go())


# --- bad data and bugs ---------------------------------------------------------------


def test_garbage_is_dropped_and_the_good_readings_still_published() -> None:
    async def go() -> None:
        vt = VirtualTime(until=101.5)
        adapter = Scripted(device(), vt, ["mixed", "mixed"])
        sink, health = Sink(), HealthLog(vt)
        svc = service(device(), adapter, vt, sink, health)
        await run_to_horizon(svc, vt)
        assert [[(s.tag, s.value) for s in b] for b in sink.batches] == [[("a", 1.5), ("b", 2)]] * 2
        good_b = sink.batches[0][1]
        assert (good_b.ts, good_b.quality) == (5.0, Quality.UNCERTAIN)  # the adapter's own stamp
        st = svc.status
        assert st.bad_data_total == 8 and st.errors_total == 0 and st.polls_total == 2
        assert st.last_error == "bad data: tag 'a' value nan (and 3 more)"
        assert st.health is Health.DEGRADED
        assert health.changes == [(Health.STARTING, Health.DEGRADED)]
        assert adapter.calls("open") == [100.0]  # partly bad data is not a connection failure

    asyncio.run(go())


@pytest.mark.parametrize(
    ("step", "error"),
    [
        ("garbage", "bad data: tag 'a' value nan (and 1 more)"),
        ("dict", "bad data: read returned dict, not a list of Reading"),
        ("bug", "unexpected ZeroDivisionError: division by zero"),
        ("vendor_timeout", "unexpected TimeoutError: vendor said so"),
        ("cancelled", "read was cancelled inside the adapter"),
    ],
)
def test_reads_that_yield_nothing_usable_are_failures(step: str, error: str) -> None:
    async def go() -> None:
        cfg = device(backoff_initial_ms=100, jitter=0.0, breaker_failures=3, breaker_cooldown_s=60)
        vt = VirtualTime(until=105.0)
        adapter = Scripted(cfg, vt, [step] * 10)
        sink, health = Sink(), HealthLog(vt)
        svc = service(cfg, adapter, vt, sink, health)
        await run_to_horizon(svc, vt)
        st = svc.status
        assert st.errors_total == 3 and st.polls_total == 0 and sink.batches == []
        assert st.last_error == error
        assert st.health is Health.DOWN and svc.breaker_open
        assert st.bad_data_total == {"garbage": 6, "dict": 3}.get(step, 0)

    asyncio.run(go())


def test_factory_publish_and_callback_bugs_are_contained(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        cfg = device(backoff_initial_ms=100, jitter=0.0)
        vt = VirtualTime(until=103.5)
        adapter = Scripted(cfg, vt)
        made = 0

        def factory(_cfg: DeviceBase) -> Adapter:
            nonlocal made
            made += 1
            if made == 1:
                raise RuntimeError("factory exploded")
            return adapter

        async def bad_publish(samples: list[Sample]) -> bool:
            raise RuntimeError("bus exploded")

        def bad_callback(status: DeviceStatus, old: Health) -> None:
            raise RuntimeError("callback exploded")

        svc = DeviceService(
            cfg,
            factory,
            bad_publish,
            on_health=bad_callback,
            clock=vt.wall,
            monotonic=vt.monotonic,
            rng=random.Random(0),
            sleep=vt.sleep,
        )
        await run_to_horizon(svc, vt)
        st = svc.status
        assert made == 2  # made again after failing, then kept
        assert st.errors_total == 1
        assert st.last_error == "unexpected RuntimeError: factory exploded"
        # publishing failed every time, yet polling went on without reconnecting
        assert st.polls_total == 4 and adapter.calls("open") == pytest.approx([100.1])
        assert st.health is Health.DEGRADED  # the callback's failure did not stop the update

    with caplog.at_level(logging.DEBUG, logger="fogmesh.supervisor"):
        asyncio.run(go())
    assert "bus exploded" in caplog.text and "callback exploded" in caplog.text


# --- timeouts and cancellation (real time) -------------------------------------------


def test_hanging_read_and_open_time_out() -> None:
    async def go() -> None:
        cfg = device(
            timeout_ms=20,
            backoff_initial_ms=1,
            jitter=0.0,
            breaker_failures=2,
            breaker_cooldown_s=60,
        )
        vt = VirtualTime(until=150.0)
        adapter = Scripted(cfg, vt, ["hang"], open_steps=["ok", "hang"])
        health = HealthLog(vt)
        svc = service(cfg, adapter, vt, health=health)
        t0 = time.monotonic()
        await run_to_horizon(svc, vt)
        assert time.monotonic() - t0 < 2.0
        st = svc.status
        assert st.errors_total == 2 and st.health is Health.DOWN
        assert st.last_error == "timeout: open took more than 20 ms"
        assert health.changes == [(Health.STARTING, Health.DOWN)]

    asyncio.run(go())


def test_cancellation_during_a_hanging_read_closes_the_adapter() -> None:
    async def go() -> None:
        cfg = device(timeout_ms=10_000)
        adapter = Scripted(cfg, None, ["hang"])
        svc = DeviceService(cfg, lambda _c: adapter, Sink())
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(adapter.read_started.wait(), 1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
        assert [e for e, _ in adapter.events] == ["open", "read", "close"]
        assert svc.status.errors_total == 0  # being stopped is not a device failure

    asyncio.run(go())


def test_cancellation_survives_a_close_that_raises_or_hangs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go(close_step: str) -> None:
        cfg = device(timeout_ms=30)
        adapter = Scripted(cfg, None, close_step=close_step)
        svc = DeviceService(cfg, lambda _c: adapter, Sink())
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(adapter.read_started.wait(), 1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
        assert adapter.events[-1][0] == "close"

    with caplog.at_level(logging.WARNING, logger="fogmesh.supervisor"):
        asyncio.run(go("raise"))
        asyncio.run(go("hang"))
    assert "close failed badly" in caplog.text
    assert "timeout: close took more than 30 ms" in caplog.text


# --- isolation: bad devices beside a good one, under one event loop ------------------


def sim(device_id: str, faults: list[dict[str, Any]], **sup: Any) -> SimulatedDevice:
    return SimulatedDevice.model_validate(
        {
            "id": device_id,
            "type": "simulated",
            "seed": len(device_id),
            "period_ms": 20,
            "timeout_ms": 30,
            "supervisor": {
                "backoff_initial_ms": 5,
                "backoff_max_ms": 20,
                "breaker_failures": 3,
                "breaker_cooldown_s": 60.0,
                **sup,
            },
            "faults": faults,
        }
    )


def test_bad_devices_never_stall_or_crash_a_healthy_one() -> None:
    long = {"at_s": 0.0, "duration_s": 1000.0}
    configs = [
        sim("healthy", []),
        sim("raises", [{"kind": "raise", **long}]),
        sim("hangs", [{"kind": "hang", **long}]),
        sim("garbage", [{"kind": "garbage", **long}]),
        sim("gone", [{"kind": "disconnect", **long}]),
        # fails for a while, then recovers (its breaker is too patient to open meanwhile)
        sim("flaky", [{"kind": "raise", "at_s": 0.1, "duration_s": 0.1}], breaker_failures=1000),
    ]
    run_s = 0.5

    async def go() -> tuple[dict[str, DeviceService], Bus, float]:
        bus = Bus()
        changes: list[tuple[str, Health, Health]] = []
        services = {
            c.id: DeviceService(
                c,
                lambda cfg: adapter_class("simulated")(cfg),
                bus.publish,
                on_health=lambda s, old: changes.append((s.id, old, s.health)),
                rng=random.Random(1),
            )
            for c in configs
        }
        t0 = time.monotonic()
        tasks = [asyncio.create_task(s.run()) for s in services.values()]
        await asyncio.sleep(run_s)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - t0
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert ("healthy", Health.STARTING, Health.OK) in changes
        return services, bus, elapsed

    services, bus, elapsed = asyncio.run(go())
    healthy = services["healthy"].status
    expected = elapsed / 0.020
    assert 0.6 * expected <= healthy.polls_total <= expected + 2, (healthy.polls_total, expected)
    assert healthy.health is Health.OK and healthy.errors_total == 0
    assert healthy.type == "simulated"

    samples = bus.get_nowait_many(100_000)
    by_device: dict[str, list[Sample]] = {}
    for s in samples:
        by_device.setdefault(s.device, []).append(s)
    assert len(by_device["healthy"]) == 4 * healthy.polls_total
    for s in by_device["healthy"]:
        sig = MODELS["pump"][s.tag]
        assert isinstance(s.value, float) and sig.low <= s.value <= sig.high
    assert not {"raises", "hangs", "garbage", "gone"} & by_device.keys()

    for dev_id, error in [
        ("raises", "read failed (raise fault)"),
        ("hangs", "timeout: read took more than 30 ms"),
        ("garbage", "bad data: tag 'flow_m3h' value nan"),
        ("gone", "connection refused (disconnect)"),
    ]:
        st = services[dev_id].status
        assert st.health is Health.DOWN, dev_id
        assert st.errors_total >= 3 and st.polls_total == 0, dev_id
        assert st.last_error is not None and error in st.last_error, (dev_id, st.last_error)
    assert services["garbage"].status.bad_data_total >= 3 * 6

    flaky = services["flaky"].status
    assert flaky.health is Health.DEGRADED  # recovered; the errors are recent
    assert flaky.errors_total >= 1 and flaky.reconnects_total >= 1
    assert flaky.polls_total >= 0.3 * expected


# --- writes through the service ---------------------------------------------------------------


class Writable(Scripted):
    """Scripted reads, plus writes that record, raise, hang or fail as a bug, on request."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"read", "write"})

    def __init__(self, cfg: DeviceBase, write_step: str = "ok", **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.write_step = write_step
        self.written: list[tuple[str, Any]] = []
        self.busy = 0
        self.overlap = False

    async def read(self) -> list[Reading]:
        self.busy += 1
        self.overlap |= self.busy > 1
        try:
            await asyncio.sleep(0.005)
            return await super().read()
        finally:
            self.busy -= 1

    async def write(self, tag: str, value: Any) -> None:
        self.busy += 1
        self.overlap |= self.busy > 1
        try:
            await asyncio.sleep(0.005)
            if self.write_step == "raise":
                raise DeviceError("exception 2: illegal data address")
            if self.write_step == "bug":
                raise KeyError(tag)
            if self.write_step == "hang":
                await asyncio.Event().wait()
            self.written.append((tag, value))
        finally:
            self.busy -= 1


def real_service(adapter: Adapter, cfg: DeviceBase) -> DeviceService:
    return DeviceService(cfg, lambda _cfg: adapter, Sink(), rng=random.Random(0))


def test_a_write_waits_for_the_connection_and_takes_turns_with_reads() -> None:
    cfg = device(period_ms=5, timeout_ms=500)
    adapter = Writable(cfg)

    async def go() -> None:
        svc = real_service(adapter, cfg)
        early = asyncio.create_task(svc.write("a", 1.0))  # before the service even runs
        task = asyncio.create_task(svc.run())
        await early
        await asyncio.gather(*(svc.write("a", float(v)) for v in range(2, 12)))
        await asyncio.sleep(0.05)  # queued behind the writes, polls resume
        errors = svc.status.errors_total
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert errors == 0 and svc.status.health is Health.OK
        with pytest.raises(DeviceUnavailable, match="'dev' is stopped"):
            await svc.write("a", 0.0)

    asyncio.run(go())
    assert [v for _, v in adapter.written] == [1.0, *[float(v) for v in range(2, 12)]]
    assert not adapter.overlap
    assert len(adapter.calls("read")) > 5


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        ("raise", DeviceError, "exception 2: illegal data address"),
        ("bug", DeviceError, "unexpected KeyError: 'a'"),
        ("hang", DeviceTimeout, "timeout: write took more than 100 ms"),
    ],
)
def test_a_failed_write_is_reported_and_polling_carries_on(
    step: str, error: type[Exception], message: str
) -> None:
    cfg = device(period_ms=5, timeout_ms=100)
    adapter = Writable(cfg, write_step=step)

    async def go() -> None:
        svc = real_service(adapter, cfg)
        task = asyncio.create_task(svc.run())
        with pytest.raises(error) as exc:
            await svc.write("a", 1.0)
        assert str(exc.value) == message
        polls = svc.status.polls_total
        await asyncio.sleep(0.05)
        assert svc.status.polls_total > polls  # still connected, still polling
        assert svc.status.errors_total == 0 and svc.status.last_error is None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())


def test_writes_are_refused_when_the_device_is_down_or_takes_no_writes() -> None:
    cfg = device(period_ms=5, timeout_ms=100, breaker_failures=1, breaker_cooldown_s=60)

    async def go() -> None:
        down = real_service(Writable(cfg, open_steps=["raise"]), cfg)
        task = asyncio.create_task(down.run())
        for _ in range(200):
            if down.breaker_open:
                break
            await asyncio.sleep(0.005)
        with pytest.raises(DeviceUnavailable, match=r"down \(circuit breaker open\): connection"):
            await down.write("a", 1.0)
        task.cancel()
        read_only = real_service(Scripted(cfg), cfg)
        task2 = asyncio.create_task(read_only.run())
        with pytest.raises(WriteNotSupported, match="does not support writes"):
            await read_only.write("a", 1.0)
        task2.cancel()
        await asyncio.gather(task, task2, return_exceptions=True)

    asyncio.run(go())


def test_a_write_gives_up_waiting_for_a_device_that_does_not_connect() -> None:
    cfg = device(period_ms=5, timeout_ms=100, backoff_initial_ms=10_000)

    async def go() -> None:
        svc = real_service(Writable(cfg, open_steps=["raise"]), cfg)
        task = asyncio.create_task(svc.run())
        t0 = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="not connected \\(connection refused\\)"):
            await svc.write("a", 1.0)
        assert 0.09 < time.monotonic() - t0 < 1.0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())
