"""The whole gateway: devices → bus → edge → durable queue → fog, through faults, outages and kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.config.models import QueueConfig
from gateway.fog import FogStore, tail
from gateway.model import Health
from gateway.queue import DurableQueue
from gateway.runtime import Gateway, GatewayFailed
from hil_tests.gateway.http_client import fetch
from tools.mosquitto import Mosquitto, find_mosquitto

ROOT = Path(__file__).resolve().parents[2]

PLANT = """
[gateway]
id = "gw1"
site = "test"

[http]
port = 0

[uplink]
url = "{url}"
flush_timeout_s = 10

[edge]
window_s = 1
grace_s = 0.2

[[devices]]
id = "good"
type = "simulated"
period_ms = 20
timeout_ms = 200
{good_extra}

[[devices.faults]]
kind = "spike"
tag = "vibration_mm_s"
at_s = 0.5
duration_s = 0.3
magnitude = 5.0

[[devices]]
id = "hangs"
type = "simulated"
period_ms = 20
timeout_ms = 100
supervisor = {{ backoff_initial_ms = 50, backoff_max_ms = 200, breaker_failures = 3, breaker_cooldown_s = 5 }}

[[devices.faults]]
kind = "hang"
at_s = 0
duration_s = 1000

[[devices]]
id = "raises"
type = "simulated"
period_ms = 20
supervisor = {{ backoff_initial_ms = 50, backoff_max_ms = 200, breaker_failures = 3, breaker_cooldown_s = 5 }}

[[devices.faults]]
kind = "raise"
at_s = 0
duration_s = 1000

[[devices]]
id = "garbage"
type = "simulated"
period_ms = 20
supervisor = {{ backoff_initial_ms = 50, backoff_max_ms = 200, breaker_failures = 3, breaker_cooldown_s = 5 }}

[[devices.faults]]
kind = "garbage"
at_s = 0
duration_s = 1000

[[rules]]
name = "vib-high"
device = "good"
tag = "vibration_mm_s"
above = 4.5
"""


def test_gateway_end_to_end_with_bad_devices(tmp_path: Path) -> None:
    loaded = parse_config(
        PLANT.format(url="sqlite:///var/fog.db", good_extra=""), base_dir=tmp_path
    )

    async def scenario() -> tuple[Gateway, int, dict[str, Any]]:
        gw = Gateway(loaded)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.serve(stop))
        await asyncio.sleep(2.5)
        assert gw.api is not None
        host, port = gw.api.address
        code, _, health = await fetch((host, port), "GET", "/api/v1/health")
        _, _, detail = await fetch((host, port), "GET", "/api/v1/devices/good")
        stop.set()
        await task
        return gw, code, {"health": json.loads(health), "good": json.loads(detail)}

    gw, code, api = asyncio.run(scenario())
    st = {s.id: s for s in gw.device_statuses()}
    # The healthy device kept its 20 ms rate beside three broken ones (≈125 polls in 2.5 s).
    assert st["good"].health is Health.OK
    assert st["good"].polls_total >= 80
    assert st["hangs"].health is Health.DOWN and st["hangs"].errors_total >= 3
    assert st["raises"].health is Health.DOWN and st["raises"].errors_total >= 3
    assert st["garbage"].health is Health.DOWN and st["garbage"].errors_total >= 3
    assert code == 200 and api["health"]["status"] == "degraded"
    assert api["good"]["health"] == "ok" and set(api["good"]["last_values"]) == {
        "flow_m3h",
        "pressure_bar",
        "temperature_c",
        "vibration_mm_s",
    }

    with FogStore(tmp_path / "var" / "fog.db").open(create=False) as fog:
        rows = fog.rows(limit=100_000)
        report = fog.gap_report()
    assert report["lost"] == 0 and report["complete"]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert gw.uplink_stats().queue_depth == 0  # graceful stop flushed everything
    kinds = {r["kind"] for r in rows}
    assert {"summary", "event", "status"} <= kinds and "raw" not in kinds
    events = [r for r in rows if r["kind"] == "event"]
    assert [e["data"]["state"] for e in events] == ["active", "cleared"]
    assert all(e["device"] == "good" for e in events)
    downs = {r["device"] for r in rows if r["kind"] == "status" and r["data"]["health"] == "down"}
    assert downs == {"hangs", "raises", "garbage"}
    summaries = [r for r in rows if r["kind"] == "summary"]
    assert {r["device"] for r in summaries} == {"good"}
    assert summaries[-1]["data"]["partial"] is True  # the window open at shutdown
    assert not any(r["historical"] for r in rows)


def test_a_failing_gateway_stage_stops_the_gateway_with_an_error(tmp_path: Path) -> None:
    loaded = parse_config(
        PLANT.format(url="sqlite:///var/fog.db", good_extra=""), base_dir=tmp_path
    )

    async def scenario() -> None:
        gw = Gateway(loaded)

        def broken(samples: object) -> list[object]:
            raise ValueError("edge bug")

        gw.edge.process = broken  # type: ignore[method-assign, assignment]
        await asyncio.wait_for(gw.serve(asyncio.Event()), 10)

    with pytest.raises(GatewayFailed, match="edge bug"):
        asyncio.run(scenario())


# --- against a real broker, with a real `fogmesh gateway run` process -----------------------------


class Collector:
    """A fog on its own thread: a persistent QoS 1 subscription stored into a FogStore."""

    def __init__(self, url: str, path: Path) -> None:
        self.url = url
        self.path = path
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.ready.set()
            with FogStore(self.path) as store:
                await tail(
                    self.url,
                    on_message=lambda _m: None,
                    follow=True,
                    stop=self._stop,
                    store=store,
                    client_id="fog-under-test",
                )

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def __enter__(self) -> Collector:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    try:
        find_mosquitto()
    except Exception as exc:  # make test installs it; say why instead of skipping silently
        pytest.fail(f"Mosquitto is required: {exc}")
    with Mosquitto(workdir=tmp_path / "broker") as m:
        yield m


def _start_gateway(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "gateway", "run", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(pred: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return bool(pred())


@pytest.mark.broker
@pytest.mark.slow
def test_every_seq_reaches_the_fog_through_broker_restart_and_kill_9(
    tmp_path: Path, broker: Mosquitto
) -> None:
    raw_tags = "\n".join(
        f'[[devices.tags]]\nname = "{t}"\nforward = "raw"\n'
        for t in ("flow_m3h", "pressure_bar", "temperature_c", "vibration_mm_s")
    )
    cfg = tmp_path / "gw.toml"
    cfg.write_text(PLANT.format(url=broker.url, good_extra=raw_tags))
    log = tmp_path / "gateway.log"
    fog_db = tmp_path / "fog.db"

    with Collector(broker.url, fog_db) as fog:
        gw = _start_gateway(cfg, log)
        time.sleep(2.0)
        broker.restart(down_s=1.0)  # broker outage mid-stream: the gateway queues, then backfills
        time.sleep(2.0)
        gw.send_signal(signal.SIGKILL)  # no flush, no goodbye
        assert gw.wait(10) == -signal.SIGKILL
        gw = _start_gateway(cfg, log)
        time.sleep(2.0)
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(30) == 0, log.read_text()[-3000:]

        q = DurableQueue(
            tmp_path / "var" / "queue.db", QueueConfig(), site="test", gateway_id="gw1"
        ).open()
        last_seq, left = q.last_seq, q.depth
        q.close()
        assert left == 0, "a graceful stop sends everything queued"
        assert last_seq > 500  # ≈ 200 raw values/s for ~6 s, plus summaries, events, status

        def complete() -> bool:
            with FogStore(fog_db).open(create=False) as s:
                return len(s.seqs("test", "gw1")) >= last_seq

        assert _wait_for(complete, 30), "the fog did not receive every seq"
    assert fog.error is None, fog.error
    with FogStore(fog_db).open(create=False) as s:
        seqs = s.seqs("test", "gw1")
        report = s.gap_report()
        rows = s.rows(limit=1_000_000)
    assert seqs == list(range(1, last_seq + 1))
    assert report["lost"] == 0 and report["complete"]
    assert any(r["historical"] for r in rows), "the outage backlog was flagged historical"
