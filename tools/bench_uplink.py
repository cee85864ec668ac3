"""`fogmesh bench uplink`: store-and-forward through broker outages, measured end to end.

An Uplink (real SQLite queue, real MQTT sink) is fed live messages at a steady rate while a
Mosquitto it starts itself is stopped and restarted; a subscriber in a separate process
(persistent session, QoS 1) records every seq it receives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from gateway.config.models import MqttOptions, QueueConfig, UplinkSection
from gateway.model import Outgoing
from gateway.stats import percentile
from gateway.uplink import Uplink
from tools.mosquitto import Mosquitto

__all__ = ["main", "run_uplink_bench"]

_TICK_S = 0.002
_OUTAGE_GAP_S = 1.5  # at least this long connected between outages


def _quiet() -> None:
    """Keep the library's connection warnings off stderr (expected here: outages are the point)."""
    logging.getLogger("fogmesh").addHandler(logging.NullHandler())
    logging.getLogger("fogmesh").propagate = False


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


class _Subscriber:
    """The receiving side in its own process; reports its unique count on stdout."""

    def __init__(self, url: str, out: Path, version: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench_uplink", "--subscriber", url, str(out), version],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.unique = 0
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready"):
                self.ready.set()
            elif line.startswith("unique "):
                self.unique = int(line.split()[1])

    def stop(self) -> tuple[array[int], array[int], array[float]]:
        """SIGTERM, then read what it recorded: seqs, historical flags, receive times."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        seqs, hist, times = array("q"), array("b"), array("d")
        with contextlib.suppress(FileNotFoundError), open(self.out, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            seqs.fromfile(f, n)
            hist.fromfile(f, n)
            times.fromfile(f, n)
        return seqs, hist, times


def _subscriber_main(url: str, out: str, version: str) -> int:
    """Entry of the subscriber process: tail the broker until SIGTERM, then dump the records."""
    from gateway.fog import tail

    _quiet()
    seqs, hist, times = array("q"), array("b"), array("d")
    seen: set[int] = set()

    def record(msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if seq is None:
            return
        seqs.append(seq)
        hist.append(1 if msg["historical"] else 0)
        times.append(time.time())
        seen.add(seq)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def report() -> None:
            print("ready", flush=True)
            while not stop.is_set():
                print(f"unique {len(seen)}", flush=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await stop.wait()

        reporter = asyncio.create_task(report())
        await tail(
            url,
            on_message=record,
            follow=True,
            stop=stop,
            options=MqttOptions(version="5" if version == "5" else "3.1.1"),
            client_id=f"fogmesh-bench-sub-{os.getpid()}",
            retry_max_s=0.05,  # back quickly after a broker restart: latency is the gateway's
        )
        await reporter

    # The tail is subscribed before "ready" only once its session exists; connect first.
    asyncio.run(run())
    with open(out, "wb") as f:
        f.write(len(seqs).to_bytes(8, "little"))
        seqs.tofile(f)
        hist.tofile(f)
        times.tofile(f)
    return 0


async def _bench(
    broker: Mosquitto,
    workdir: Path,
    *,
    messages: int,
    outages: int,
    rate: float,
    outage_s: float,
    drain_rate: float,
    inflight: int,
    version: str,
    progress: bool,
) -> dict[str, Any]:
    sub = _Subscriber(broker.url, workdir / "received.bin", version)
    if not await asyncio.to_thread(sub.ready.wait, 30):
        raise RuntimeError("the subscriber process did not start")
    await asyncio.sleep(0.5)  # its subscription must exist before the first publish

    cfg = UplinkSection(
        url=broker.url,
        drain_rate_msgs_per_s=drain_rate,
        retry_initial_ms=50,
        retry_max_ms=500,
        flush_timeout_s=0.0,
        mqtt=MqttOptions(version="5" if version == "5" else "3.1.1", inflight=inflight),
        queue=QueueConfig(),
    )
    submit_at: dict[int, float] = {}
    backlogs: list[int] = []
    drain_s: list[float] = []
    outage_durations: list[float] = []
    broker_up_at: list[float] = []  # wall clock, when each restarted broker accepted connections
    reconnect_at: list[float] = []
    boundaries: list[int] = []  # last seq at each reconnect: the backlog lies at or below it
    cpu0, wall0 = time.process_time(), time.monotonic()

    async with Uplink(
        cfg,
        site="bench",
        gateway_id="gw1",
        queue_path=workdir / "queue.db",
        sink_url=broker.url,
    ) as up:

        async def watch_drains() -> None:
            """Time each reconnect until its backlog is acknowledged."""
            was = up.stats().connected
            while True:
                st = up.stats()
                if st.connected and not was:
                    t0 = time.monotonic()
                    reconnect_at.append(time.time())
                    boundaries.append(st.last_seq)
                    backlogs.append(st.backlog)
                    # Polling is the measurement here (1 ms resolution on a ~100 ms drain).
                    while up.stats().backlog > 0 and up.stats().connected:  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
                    drain_s.append(time.monotonic() - t0)
                    _log(progress, f"drained {backlogs[-1]} in {drain_s[-1]:.3f} s")
                was = st.connected
                await asyncio.sleep(0.001)

        async def outage_plan() -> None:
            not_before = 0.0
            for k in range(1, outages + 1):
                # Evenly spread, but apart: back-to-back outages would measure one long one.
                due = max(k * messages / (outages + 1) / rate, not_before)
                await asyncio.sleep(max(0.0, due - (time.monotonic() - t_start)))
                t0 = time.monotonic()
                await asyncio.to_thread(broker.stop)
                _log(progress, f"broker down at seq {up.stats().last_seq}")
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(broker.start)
                broker_up_at.append(time.time())
                outage_durations.append(time.monotonic() - t0)
                not_before = time.monotonic() - t_start + _OUTAGE_GAP_S
                _log(progress, f"broker up after {outage_durations[-1]:.2f} s")

        for _ in range(500):  # first connection
            if up.stats().connected:
                break
            await asyncio.sleep(0.01)
        watcher = asyncio.create_task(watch_drains())
        t_start = time.monotonic()
        planner = asyncio.create_task(outage_plan())
        sent = 0
        while sent < messages:
            due = min(messages, int((time.monotonic() - t_start) * rate) + 1)
            if due > sent:
                now = time.time()
                ts_ms = int(now * 1000)
                batch = [
                    Outgoing("sensor", "event", ts_ms, {"n": i, "value": i * 0.5})
                    for i in range(sent, due)
                ]
                for seq in up.submit(batch):
                    submit_at[seq] = now
                sent = due
            await asyncio.sleep(_TICK_S)
        await planner
        stream_s = time.monotonic() - t_start
        _log(progress, f"submitted {sent} in {stream_s:.1f} s; waiting for the queue to drain")
        drained = await up.wait_drained(120)
        # The subscriber's own backlog (broker -> subscriber) may still be in flight.
        deadline = time.monotonic() + 60
        while sub.unique < sent and time.monotonic() < deadline:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        stats = up.stats()
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0

    seqs, hist, times = await asyncio.to_thread(sub.stop)
    first: dict[int, tuple[bool, float]] = {}
    for seq, h, t in zip(seqs, hist, times, strict=True):
        if seq not in first:
            first[seq] = (bool(h), t)
    expected = set(range(1, stats.last_seq + 1))
    unique = len(expected & first.keys())
    live = [(submit_at[s], (t - submit_at[s]) * 1000.0) for s, (h, t) in first.items() if not h]
    live_ms = [ms for _, ms in live]
    total_backlog = sum(backlogs)
    total_drain = sum(drain_s)
    # End to end: from the reconnect until the subscriber has the last message of that backlog.
    e2e_n, e2e_s = 0, 0.0
    lower = 0
    recovery: list[tuple[float, float]] = []  # broker back up .. subscriber has that backlog
    for i, (at, upper) in enumerate(zip(reconnect_at, boundaries, strict=True)):
        backfill = [t for s, (h, t) in first.items() if h and lower < s <= upper]
        if backfill:
            e2e_n += len(backfill)
            e2e_s += max(backfill) - at
            start = broker_up_at[i] if i < len(broker_up_at) else at
            recovery.append((start, max(backfill)))
        lower = upper

    def in_recovery(t: float) -> bool:
        return any(a <= t <= b for a, b in recovery)

    steady_ms = [ms for t, ms in live if not in_recovery(t)]
    recovery_ms = [ms for t, ms in live if in_recovery(t)]
    return {
        "sent": stats.last_seq,
        "received_unique": unique,
        "lost": len(expected) - unique,
        "duplicates": len(seqs) - len(first),
        "drain_msgs_per_s": round(total_backlog / total_drain, 1) if total_drain else None,
        "drain_e2e_msgs_per_s": round(e2e_n / e2e_s, 1) if e2e_s > 0 else None,
        "live_p99_latency_ms": _round(percentile(live_ms, 99)),
        "live_p50_latency_ms": _round(percentile(live_ms, 50)),
        "live_max_latency_ms": _round(max(live_ms) if live_ms else None),
        # Live messages submitted while a backlog was being recovered wait behind it in the
        # broker's queue for the subscriber (FIFO); the drain rate limit is the knob for that.
        "live_p99_steady_ms": _round(percentile(steady_ms, 99)),
        "live_p99_during_recovery_ms": _round(percentile(recovery_ms, 99)),
        "live_during_recovery": len(recovery_ms),
        "live_messages": len(live_ms),
        "historical_messages": sum(1 for h, _ in first.values() if h),
        "backlog_sizes": backlogs,
        "drain_s": [round(d, 3) for d in drain_s],
        "outage_s": [round(d, 2) for d in outage_durations],
        "queue_drained": drained,
        "rate_msgs_per_s": rate,
        "drain_rate_limit_msgs_per_s": drain_rate,
        "inflight": inflight,
        "mqtt_version": version,
        "stream_s": round(stream_s, 2),
        "elapsed_s": round(wall, 2),
        "gateway_cpu_percent": round(100.0 * cpu / wall, 1),
        "gateway_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "reconnects": stats.reconnects_total,
        "uplink_sent_total": stats.sent_total,
        "uplink_acked_total": stats.acked_total,
        "drops": stats.drops,
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def run_uplink_bench(
    messages: int = 20000,
    outages: int = 3,
    *,
    rate_msgs_per_s: float = 1000.0,
    outage_s: float = 2.0,
    drain_rate_msgs_per_s: float = 100_000.0,
    inflight: int = 1000,
    mqtt_version: str = "3.1.1",
    progress: bool = False,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark against a Mosquitto it starts itself; returns the measurements.

    `drain_rate_msgs_per_s` is the uplink's configured backlog limit: high by default, so the
    result shows what the machine can drain (a site sets its own limit to protect its fog).
    """
    if messages < 1 or outages < 0:
        raise ValueError("messages must be >= 1 and outages >= 0")
    if not progress:
        _quiet()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fogmesh-bench-"))
            )
        broker = stack.enter_context(Mosquitto(workdir=workdir / "broker"))
        _log(progress, f"broker {broker.url}; {messages} messages at {rate_msgs_per_s}/s")
        return asyncio.run(
            _bench(
                broker,
                workdir,
                messages=messages,
                outages=outages,
                rate=rate_msgs_per_s,
                outage_s=outage_s,
                drain_rate=drain_rate_msgs_per_s,
                inflight=inflight,
                version=mqtt_version,
                progress=progress,
            )
        )
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--subscriber"]:
        return _subscriber_main(*args[1:4])
    p = argparse.ArgumentParser(prog="fogmesh bench uplink", description=__doc__)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--outages", type=int, default=3)
    p.add_argument("--rate", type=float, default=1000.0, help="live messages per second")
    p.add_argument("--outage-s", type=float, default=2.0)
    p.add_argument("--drain-rate", type=float, default=100_000.0)
    p.add_argument("--inflight", type=int, default=1000)
    p.add_argument("--mqtt-version", choices=["3.1.1", "5"], default="3.1.1")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    ns = p.parse_args(args)
    result = run_uplink_bench(
        ns.messages,
        ns.outages,
        rate_msgs_per_s=ns.rate,
        outage_s=ns.outage_s,
        drain_rate_msgs_per_s=ns.drain_rate,
        inflight=ns.inflight,
        mqtt_version=ns.mqtt_version,
        progress=ns.verbose,
    )
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
