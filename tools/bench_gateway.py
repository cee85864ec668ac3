"""`fogmesh bench gateway`: N virtual Modbus TCP devices × T tags polled by the real gateway.

The server farm runs in its own process (its CPU is reported apart); the gateway runs in this
process with its real supervisors, Modbus adapters, bus, edge stage and durable uplink into an
embedded fog store. Figures are taken over a measurement window after a warm-up, so start-up
costs (imports, connects) are not counted as steady-state load.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.config.loader import LoadedConfig
from gateway.config.models import GatewayConfig
from gateway.errors import FogmeshError
from gateway.runtime import Gateway
from gateway.stats import LatencyHistogram
from retrofit_adapters.modbus.config import ModbusTcpDevice
from retrofit_adapters.modbus.plan import plan_reads


class BenchError(FogmeshError):
    pass


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _start_farm(
    devices: int, tags: int, kind: str, workdir: Path, run_s: float
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    ready = workdir / "farm.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.virtual_plc.farm",
            "--devices",
            str(devices),
            "--tags",
            str(tags),
            "--kind",
            kind,
            "--ready-file",
            str(ready),
            "--duration-s",
            str(run_s),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None:
            raise BenchError(f"the server farm exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BenchError("the server farm did not start within 120 s")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text(encoding="utf-8"))


def _stop_farm(proc: subprocess.Popen[str]) -> dict[str, Any]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if len(lines) >= 2 else {}


def bench_config(farm: dict[str, Any], period_ms: int, workdir: Path) -> LoadedConfig:
    kind, tags = farm["kind"], farm["tags"]
    width = 1 if kind == "uint16" else 2
    devices = [
        {
            "id": f"dev{d:04d}",
            "type": "modbus_tcp",
            "host": farm["host"],
            "port": port,
            "unit": 1,
            "period_ms": period_ms,
            "timeout_ms": max(200, min(2000, period_ms)),
            "tags": [
                {"name": f"t{j:02d}", "table": "holding", "address": j * width, "type": kind}
                for j in range(tags)
            ],
        }
        for d, port in enumerate(farm["ports"])
    ]
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"id": "bench", "site": "bench", "data_dir": str(workdir / "var")},
            "http": {"enabled": False},
            "uplink": {"url": f"sqlite:///{workdir}/fog.db"},
            "edge": {"window_s": 10},
            "devices": devices,
        }
    )
    return LoadedConfig(config=cfg, path=None, base_dir=workdir, secrets={})


def _merged_latency(gw: Gateway) -> LatencyHistogram:
    merged = LatencyHistogram()
    for st in gw.device_statuses():
        h = st.poll_latency
        merged.total += h.total
        merged.sum_s += h.sum_s
        merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
    return merged


def _delta(after: LatencyHistogram, before: LatencyHistogram) -> LatencyHistogram:
    d = LatencyHistogram()
    d.total = after.total - before.total
    d.sum_s = after.sum_s - before.sum_s
    d.counts = [a - b for a, b in zip(after.counts, before.counts, strict=True)]
    return d


async def _measure(gw: Gateway, warmup_s: float, seconds: float, progress: bool) -> dict[str, Any]:
    stop = asyncio.Event()
    task = asyncio.create_task(gw.serve(stop))
    try:
        await asyncio.sleep(warmup_s)
        if task.done():
            await task
        cpu0, t0 = time.process_time(), time.monotonic()
        pub0 = gw.bus.stats.published
        polls0 = sum(s.polls_total for s in gw.device_statuses())
        err0 = sum(s.errors_total for s in gw.device_statuses())
        lat0 = _merged_latency(gw)
        end = t0 + seconds
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(1.0, end - now))
            if progress:
                done = min(1.0, (time.monotonic() - t0) / seconds)
                bar = "#" * int(done * 30)
                print(
                    f"\rmeasuring [{bar:<30}] {done * 100:5.1f}%",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if progress:
            print(file=sys.stderr)
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        statuses = gw.device_statuses()
        result = {
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "samples": gw.bus.stats.published - pub0,
            "polls": sum(s.polls_total for s in statuses) - polls0,
            "errors": sum(s.errors_total for s in statuses) - err0,
            "latency": _delta(_merged_latency(gw), lat0),
            "rss_mb": _rss_mb(),
            "health": {
                h: sum(1 for s in statuses if str(s.health) == h)
                for h in ("ok", "degraded", "down", "starting")
            },
        }
    finally:
        stop.set()
        await task
    return result


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 2)


def run_gateway_bench(
    devices: int = 200,
    tags: int = 30,
    period_ms: int = 1000,
    seconds: float = 30.0,
    *,
    kind: str = "uint16",
    warmup_s: float = 5.0,
    progress: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fogmesh-bench-gw-") as tmp:
        workdir = Path(tmp)
        farm_proc, farm = _start_farm(devices, tags, kind, workdir, warmup_s + seconds + 60)
        try:
            loaded = bench_config(farm, period_ms, workdir)
            first = loaded.config.devices[0]
            assert isinstance(first, ModbusTcpDevice)
            requests_per_poll = len(plan_reads(first.tags, first.addressing, first.limits))
            gw = Gateway(loaded)
            m = asyncio.run(_measure(gw, warmup_s, seconds, progress))
        finally:
            farm_stats = _stop_farm(farm_proc)
    elapsed = m["elapsed_s"]
    lat: LatencyHistogram = m["latency"]
    expected = devices * tags * 1000.0 / period_ms
    tags_per_s = m["samples"] / elapsed
    return {
        "devices": devices,
        "tags": tags,
        "period_ms": period_ms,
        "kind": kind,
        "seconds": round(elapsed, 2),
        "expected_tags_per_s": round(expected, 1),
        "tags_per_s": round(tags_per_s, 1),
        "tags_per_s_ratio": round(tags_per_s / expected, 4) if expected else None,
        "requests_per_s": round(m["polls"] * requests_per_poll / elapsed, 1),
        "gateway_cpu_percent": round(100.0 * m["cpu_s"] / elapsed, 1),
        "gateway_rss_mb": round(m["rss_mb"], 1),
        "gateway_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1
        ),
        # Histogram bucket upper bounds: an over-estimate of each percentile, never an under-one.
        "poll_latency_p50_ms": _ms(lat.quantile(0.50)),
        "poll_latency_p99_ms": _ms(lat.quantile(0.99)),
        "poll_latency_mean_ms": _ms(lat.sum_s / lat.total) if lat.total else None,
        "errors": m["errors"],
        "device_health": m["health"],
        "server_cpu_percent": farm_stats.get("cpu_percent"),
        "server_cpu_per_request_us": farm_stats.get("cpu_per_request_us"),
        "cores": os.cpu_count(),
    }
