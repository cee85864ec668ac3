"""The uplink end to end: durable submit, ack-only deletion, backlog flagged historical, live first.

Most tests run through the real sqlite fog sink; a small in-memory sink makes acks, refusals and
publish order observable where the real sinks would hide them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.config.models import QueueConfig, UplinkSection
from gateway.errors import StoreError, UplinkError
from gateway.fog import FogStore
from gateway.model import Outgoing
from gateway.queue import DurableQueue
from gateway.sinks import OutMessage, Sink, SinkListener
from gateway.stats import percentile
from gateway.uplink import Uplink

pytestmark = pytest.mark.timeout(60)


def out(i: int, kind: str = "raw") -> Outgoing:
    return Outgoing("pump", kind, 1_600_000_000_000 + i, {"i": i})


def config(**over: Any) -> UplinkSection:
    base: dict[str, Any] = {
        "retry_initial_ms": 20,
        "retry_max_ms": 100,
        "flush_timeout_s": 2.0,
        "drain_rate_msgs_per_s": 10_000.0,
    }
    base.update(over)
    return UplinkSection(**base)


def uplink(tmp_path: Path, sink_url: str, cfg: UplinkSection | None = None, **kw: Any) -> Uplink:
    return Uplink(
        cfg or config(),
        site="s1",
        gateway_id="gw1",
        queue_path=tmp_path / "var" / "queue.db",
        sink_url=sink_url,
        **kw,
    )


def unreachable(tmp_path: Path) -> str:
    """A sqlite fog URL whose directory can't be created (a file is in the way)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    return f"sqlite:///{blocker}/fog.db"


async def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def fog_rows(path: Path) -> list[dict[str, Any]]:
    with FogStore(path).open(create=False) as fog:
        return fog.rows(limit=100_000)


# ---- through the sqlite fog store ------------------------------------------------------------


def test_backlog_is_flagged_historical_and_live_goes_first(tmp_path: Path) -> None:
    fog = tmp_path / "fog.db"

    async def run() -> None:
        async with uplink(tmp_path, unreachable(tmp_path)) as up:
            seqs = up.submit([out(i) for i in range(300)])
            assert seqs == list(range(1, 301))
            await asyncio.sleep(0.1)
            st = up.stats()
            assert not st.connected and st.queue_depth == 300 and st.backlog == 300
            assert st.last_error and "fog store" in st.last_error
        # Restart towards a reachable fog, with a drain rate that makes the backlog take a while.
        cfg = config(drain_rate_msgs_per_s=600.0)
        async with uplink(tmp_path, f"sqlite:///{fog}", cfg) as up:
            await until(lambda: up.stats().connected)
            live: list[int] = []
            for i in range(20):
                live += up.submit([out(1000 + i, "event")])
                await asyncio.sleep(0.01)
            assert await up.wait_drained(10)
            st = up.stats()
            assert (st.queue_depth, st.backlog, st.last_seq) == (0, 0, 320)
            assert st.acked_total == 320

    asyncio.run(run())
    rows = fog_rows(fog)
    by_seq = {r["seq"]: r for r in rows}
    assert sorted(by_seq) == list(range(1, 321))
    assert all(by_seq[s]["historical"] for s in range(1, 301))
    assert not any(by_seq[s]["historical"] for s in range(301, 321))
    assert all(by_seq[s]["ts_ms"] == 1_600_000_000_000 + s - 1 for s in range(1, 301))
    order = [r["seq"] for r in rows]  # arrival order
    # Live messages did not wait behind the backlog: each arrived before the backlog finished.
    assert max(order.index(s) for s in range(301, 321)) < order.index(300)
    # The backlog itself went out oldest first.
    backlog_order = [s for s in order if s <= 300]
    assert backlog_order == sorted(backlog_order)


def test_no_outage_no_backfill_even_for_messages_submitted_while_connecting(
    tmp_path: Path,
) -> None:
    fog = tmp_path / "fog.db"

    async def run() -> None:
        async with uplink(tmp_path, f"sqlite:///{fog}") as up:
            assert not up.stats().connected  # the fog store opens in a worker thread
            assert up.submit([out(i) for i in range(5)]) == [1, 2, 3, 4, 5]
            await until(lambda: up.stats().connected)
            up.submit([out(5)])
            assert await up.wait_drained(5)

    asyncio.run(run())
    rows = fog_rows(fog)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not any(r["historical"] for r in rows)


def test_live_events_reach_the_fog_store_in_milliseconds(tmp_path: Path) -> None:
    fog = tmp_path / "fog.db"
    sent: dict[int, float] = {}

    async def run() -> None:
        async with uplink(tmp_path, f"sqlite:///{fog}") as up:
            await until(lambda: up.stats().connected)
            for i in range(200):
                (seq,) = up.submit([out(i, "event")])
                sent[seq] = time.time()
                await asyncio.sleep(0.002)
            assert await up.wait_drained(5)

    asyncio.run(run())
    latency_ms = [r["received_ms"] - sent[r["seq"]] * 1000 for r in fog_rows(fog)]
    assert len(latency_ms) == 200
    p99 = percentile(latency_ms, 99)
    assert p99 is not None and p99 < 100, f"p99 {p99:.1f} ms"  # typically ~1 ms here


def test_queue_survives_a_restart_with_the_fog_down(tmp_path: Path) -> None:
    async def run() -> None:
        async with uplink(tmp_path, unreachable(tmp_path), config(flush_timeout_s=0.2)) as up:
            up.submit([out(i) for i in range(5)])
            assert not await up.wait_drained(0.2)

    asyncio.run(run())
    q = DurableQueue(tmp_path / "var" / "queue.db", QueueConfig(), site="s1", gateway_id="gw1")
    with q:
        assert q.seqs() == [1, 2, 3, 4, 5]


def test_expired_backlog_is_declared_so_the_fog_sees_no_loss(tmp_path: Path) -> None:
    fog = tmp_path / "fog.db"
    now = [1_000_000.0]
    cfg = config(queue=QueueConfig(max_age_s=60.0))

    async def run() -> None:
        async with uplink(tmp_path, unreachable(tmp_path), cfg, clock=lambda: now[0]) as up:
            up.submit([out(i) for i in range(10)])
            now[0] += 30
            up.submit([out(i) for i in range(10, 15)])
            now[0] += 45  # the first ten are 75 s old
            await until(lambda: up.stats().drops.get("expired") == 10, 5)
            await until(lambda: up.stats().queue_depth == 6, 5)  # 5 left + the gap message
        async with uplink(tmp_path, f"sqlite:///{fog}", cfg, clock=lambda: now[0]) as up:
            assert await up.wait_drained(5)

    asyncio.run(run())
    with FogStore(fog).open(create=False) as store:
        (g,) = store.gap_report()["gateways"]
    assert g["missing"] == [[1, 10]]
    assert g["declared"] == [[1, 10, "expired"]]
    assert g["lost_count"] == 0 and g["complete"]


def test_drop_oldest_is_declared_and_reject_new_is_reported(tmp_path: Path) -> None:
    async def run(policy: str, fog: Path) -> dict[str, int]:
        m = out(1)
        size = len(
            wire.encode(wire.Envelope("s1", "gw1", "pump", "raw", 1, m.ts_ms, False, m.data))
        )
        cfg = config(queue=QueueConfig(max_bytes=10 * size, full_policy=policy))  # type: ignore[arg-type]
        base = tmp_path / policy
        base.mkdir()
        async with uplink(base, unreachable(base), cfg) as up:
            for i in range(15):
                up.submit([out(i)])
            drops = up.stats().drops
        async with uplink(base, f"sqlite:///{fog}", cfg) as up:
            await until(lambda: up.stats().connected)
            await asyncio.sleep(1.2)  # housekeeping emits the pending gap message
            assert await up.wait_drained(5)
        return drops

    fog1, fog2 = tmp_path / "fog1.db", tmp_path / "fog2.db"
    assert asyncio.run(run("drop_oldest", fog1)) == {"drop_oldest": 5}
    with FogStore(fog1).open(create=False) as store:
        (g,) = store.gap_report()["gateways"]
    assert g["declared"] == [[1, 5, "drop_oldest"]] and g["lost_count"] == 0 and g["complete"]

    assert asyncio.run(run("reject_new", fog2)) == {"reject_new": 5}
    with FogStore(fog2).open(create=False) as store:
        (g,) = store.gap_report()["gateways"]
        seqs = store.seqs("s1", "gw1")
    assert seqs == list(range(1, 12))  # 10 kept + the gap message: no holes
    assert g["rejected"] == {"reject_new": 5} and g["complete"]


def test_stats_hide_credentials_and_submit_needs_an_open_uplink(tmp_path: Path) -> None:
    up = uplink(tmp_path, "mqtt://alice@127.0.0.1:1883")
    assert up.stats().url == "mqtt://127.0.0.1:1883"
    with pytest.raises(StoreError, match="not open"):
        up.submit([out(1)])


def test_a_message_the_wire_cannot_carry_fails_the_submit_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        async with uplink(tmp_path, unreachable(tmp_path), config(flush_timeout_s=0)) as up:
            with pytest.raises(wire.WireError):
                up.submit([out(1), Outgoing("pump", "raw", 0, {"x": object()})])
            assert up.stats().last_seq == 0
            assert up.submit([out(2)]) == [1]

    asyncio.run(run())


# ---- with an in-memory sink: acks, refusals and order made visible ---------------------------


class MemorySink(Sink):
    """An honest fake fog: records every publish and acks (or refuses) on the next loop turn."""

    def __init__(self, listener: SinkListener, *, window: int = 8) -> None:
        super().__init__("memory://fog", listener)
        self._window = window
        self.up = True
        self.is_connected = False
        self.connects = 0
        self.published: list[wire.Envelope] = []
        self.ack_if: Callable[[int], bool] = lambda _seq: True
        self.refuse_if: Callable[[int], bool] = lambda _seq: False
        self.hold = False  # keep acks back (messages stay in flight)
        self.held: list[int] = []

    @property
    def window(self) -> int:
        return self._window

    @property
    def connected(self) -> bool:
        return self.is_connected

    async def connect(self) -> None:
        if not self.up:
            raise UplinkError("memory fog is down")
        self.is_connected = True
        self.connects += 1

    def publish(self, batch: Sequence[OutMessage]) -> None:
        if not self.is_connected:
            raise UplinkError("not connected")
        acked: list[int] = []
        refused: list[int] = []
        for seq, topic, payload in batch:
            env = wire.decode(payload)
            assert topic == wire.topic_for(env.site, env.gateway, env.device, env.kind)
            self.published.append(env)
            if self.refuse_if(seq):
                refused.append(seq)
            elif self.hold:
                self.held.append(seq)
            elif self.ack_if(seq):
                acked.append(seq)
        loop = asyncio.get_running_loop()
        if acked:
            loop.call_soon(self.listener.sink_acked, acked)
        if refused:
            loop.call_soon(self.listener.sink_refused, refused, "Not authorized")

    def drop(self) -> None:
        self.is_connected = False
        self.listener.sink_lost("memory fog dropped us")

    async def close(self) -> None:
        self.is_connected = False


def memory_uplink(
    tmp_path: Path, cfg: UplinkSection | None = None, window: int = 8
) -> tuple[Uplink, MemorySink]:
    up = uplink(tmp_path, "sqlite:////unused/fog.db", cfg)
    sink = MemorySink(up, window=window)
    up.sink = sink
    return up, sink


def test_only_acknowledged_seqs_are_deleted_and_the_rest_resent_as_backlog(tmp_path: Path) -> None:
    async def run() -> None:
        up, sink = memory_uplink(tmp_path)
        sink.ack_if = lambda seq: seq % 2 == 0
        async with up:
            await until(lambda: sink.connected)
            up.submit([out(i) for i in range(10)])
            await until(lambda: up.stats().acked_total == 5)
            await asyncio.sleep(0.05)
            assert up.stats().queue_depth == 5
            assert up.queue.seqs() == [1, 3, 5, 7, 9]
            sink.ack_if = lambda _seq: True
            sink.drop()  # reconnect: what was in flight goes again, flagged historical
            assert await up.wait_drained(5)
            assert up.stats().reconnects_total == 1
        resent = [e for e in sink.published[10:]]
        assert [e.seq for e in resent] == [1, 3, 5, 7, 9]
        assert all(e.historical for e in resent)
        assert not any(e.historical for e in sink.published[:10])

    asyncio.run(run())


def test_a_refusal_is_not_an_ack(tmp_path: Path) -> None:
    async def run() -> None:
        up, sink = memory_uplink(tmp_path)
        sink.refuse_if = lambda seq: seq == 3
        async with up:
            await until(lambda: sink.connected)
            up.submit([out(i) for i in range(5)])
            await until(lambda: sink.connects >= 2)  # refused: reconnect with backoff
            st = up.stats()
            assert (
                st.last_error and "refused" in st.last_error and "Not authorized" in st.last_error
            )
            assert 3 in up.queue.seqs()
            sink.refuse_if = lambda _seq: False
            assert await up.wait_drained(5)
        assert [e.seq for e in sink.published].count(3) >= 2

    asyncio.run(run())


def test_window_bounds_unacknowledged_messages(tmp_path: Path) -> None:
    async def run() -> None:
        up, sink = memory_uplink(tmp_path, window=4)
        sink.hold = True
        async with up:
            await until(lambda: sink.connected)
            up.submit([out(i) for i in range(10)])
            await asyncio.sleep(0.1)
            assert [e.seq for e in sink.published] == [1, 2, 3, 4]
            held, sink.held, sink.hold = sink.held, [], False
            up.sink_acked(held)
            assert await up.wait_drained(5)
        assert [e.seq for e in sink.published] == list(range(1, 11))

    asyncio.run(run())


def test_live_messages_overtake_a_rate_limited_backlog(tmp_path: Path) -> None:
    async def run() -> None:
        up, sink = memory_uplink(tmp_path, config(drain_rate_msgs_per_s=100.0), window=8)
        sink.up = False
        async with up:
            await until(lambda: up.stats().last_error is not None)  # an outage, seen
            up.submit([out(i) for i in range(40)])  # backlog
            sink.up = True
            await until(lambda: sink.connected, 5)
            await asyncio.sleep(0.05)
            live = up.submit([out(100 + i, "event") for i in range(5)])
            assert await up.wait_drained(5)
        seqs = [e.seq for e in sink.published]
        assert sorted(seqs) == list(range(1, 46))
        first_live = min(seqs.index(s) for s in live)
        assert max(seqs.index(s) for s in live) - first_live == 4  # sent together
        assert first_live < seqs.index(40)  # before the backlog finished
        assert all(e.historical == (e.seq <= 40) for e in sink.published)

    asyncio.run(run())


def test_shutdown_flushes_within_the_timeout_and_keeps_the_rest(tmp_path: Path) -> None:
    async def run() -> tuple[int, float]:
        up, sink = memory_uplink(tmp_path, config(flush_timeout_s=0.3))
        sink.hold = True
        async with up:
            await until(lambda: sink.connected)
            up.submit([out(i) for i in range(3)])
            t0 = time.monotonic()
        return up.stats().queue_depth, time.monotonic() - t0

    depth, took = asyncio.run(run())
    assert 0.25 < took < 2.5  # waited for acks that never came, then stopped
    q = DurableQueue(tmp_path / "var" / "queue.db", QueueConfig(), site="s1", gateway_id="gw1")
    with q:
        assert q.seqs() == [1, 2, 3]
    assert depth == 3
