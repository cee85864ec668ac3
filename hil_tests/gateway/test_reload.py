"""Granular hot reload: the config diff, the per-device edge stage, and reloads of a running gateway
through POST /api/v1/reload and SIGHUP — only what changed restarts, nothing is lost or summarized
twice, and a bad or restart-only change applies nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config import load_config, loader, parse_config
from gateway.config.loader import LoadedConfig
from gateway.config.models import GatewayConfig
from gateway.edge import EdgeStage
from gateway.fog import FogStore
from gateway.model import Outgoing, Quality, Sample
from gateway.reload import EdgeSet, diff_configs
from gateway.runtime import Gateway
from hil_tests.gateway.gateway_runner import running
from hil_tests.gateway.http_client import Addr, fetch, fetch_sync
from hil_tests.gateway.test_api import conforms
from hil_tests.gateway.test_config import TwoTypeConfig

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "reload-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

HEAD = """
[gateway]
id = "gw1"
site = "test"

[http]
port = 0
token = {{ file = "token" }}

[uplink]
url = "sqlite:///var/fog.db"

[edge]
window_s = {window_s}
grace_s = 1
"""


def device(dev_id: str, seed: int = 0, extra: str = "") -> str:
    return f"""
[[devices]]
id = "{dev_id}"
type = "simulated"
period_ms = 20
seed = {seed}
{extra}
"""


def config(*devices: str, window_s: float = 1, rules: str = "", head: str = HEAD) -> str:
    return head.format(window_s=window_s) + "".join(devices) + rules


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(main())


# --- the diff ------------------------------------------------------------------------------


def cfg(text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    return parse_config(text, env=env or {"T": TOKEN}).config


BASE = """
[gateway]
id = "gw1"
site = "test"
[http]
token = { env = "T" }
"""


def test_diff_sorts_devices_into_added_removed_changed_unchanged() -> None:
    old = cfg(
        BASE
        + device("a")
        + device("b")
        + device("c")
        + device("off", extra="enabled = false")
        + device("goes_off")
    )
    new = cfg(
        BASE
        + device("b", seed=1)
        + device("a")
        + device("d")
        + device("off", seed=5, extra="enabled = false")
        + device("goes_off", extra="enabled = false")
    )
    d = diff_configs(old, new)
    assert (d.added, d.removed, d.changed, d.unchanged) == (
        ("d",),
        ("c", "goes_off"),
        ("b",),
        ("a",),
    )
    assert d.restart == ("c", "goes_off", "b")
    assert not d.restart_required and not d.edge_changed and not d.tokens_changed
    same = diff_configs(old, old)
    assert same.unchanged == ("a", "b", "c", "goes_off") and not same.changed


def test_diff_names_what_only_a_restart_can_apply() -> None:
    old = cfg(BASE)
    new = cfg(
        BASE.replace('site = "test"', 'site = "other"').replace("[http]", "[http]\nport = 9000")
        + '[uplink]\nurl = "mqtt://127.0.0.1:1883"\n[uplink.queue]\nmax_bytes = 1000\n'
    )
    assert diff_configs(old, new).restart_required == (
        "gateway.site",
        "http.port",
        "uplink.url",
        "uplink.queue.max_bytes",
    )
    # A changed secret counts even when its reference did not change.
    mqtt = BASE + '[uplink]\nurl = "mqtt://h:1883"\n[uplink.mqtt]\npassword = { env = "P" }\n'
    a = parse_config(mqtt, env={"T": TOKEN, "P": "one"})
    b = parse_config(mqtt, env={"T": TOKEN, "P": "two"})
    diff = diff_configs(a.config, b.config, old_secrets=a.secrets, new_secrets=b.secrets)
    assert diff.restart_required == ("uplink.mqtt.password",)


def test_diff_tokens_rules_and_edge_apply_live() -> None:
    rule = '[[rules]]\nname = "{n}"\ndevice = "a"\ntag = "flow_m3h"\nabove = {x}\n'
    old = parse_config(
        BASE + device("a") + rule.format(n="r1", x=50) + rule.format(n="r2", x=60),
        env={"T": TOKEN},
    )
    new = parse_config(
        BASE.replace("[http]", "[edge]\nwindow_s = 5\n[http]")
        + device("a")
        + rule.format(n="r2", x=61)
        + rule.format(n="r3", x=70),
        env={"T": TOKEN[::-1]},
    )
    d = diff_configs(old.config, new.config, old_secrets=old.secrets, new_secrets=new.secrets)
    assert (d.rules_added, d.rules_removed, d.rules_changed) == (("r3",), ("r1",), ("r2",))
    assert d.edge_changed and d.tokens_changed and not d.restart_required
    assert d.unchanged == ("a",)


def test_diff_restarts_a_device_whose_secret_changed() -> None:
    # Secrets are keyed by position; the diff follows the device by id wherever it moved.
    m1 = '[[devices]]\nid = "m1"\ntype = "modbus"\nhost = "h"\npassword = { env = "MB" }\n'

    def load(before: str, pw: str) -> LoadedConfig:
        return loader._parse(
            BASE + before + m1,
            source="<t>",
            base_dir=Path.cwd(),
            path=None,
            env={"T": TOKEN, "MB": pw},
            model=TwoTypeConfig,
        )

    a = load("", "one")
    b = load(device("first"), "one")
    c = load(device("first"), "two")
    same = diff_configs(a.config, b.config, old_secrets=a.secrets, new_secrets=b.secrets)
    assert same.unchanged == ("m1",) and same.added == ("first",)
    moved = diff_configs(a.config, c.config, old_secrets=a.secrets, new_secrets=c.secrets)
    assert moved.changed == ("m1",)


# --- the edge stage per device and per rule --------------------------------------------------


EDGE = """
[gateway]
id = "gw1"
site = "test"
[edge]
window_s = 10
grace_s = 0
[[devices]]
id = "p1"
type = "simulated"
[[devices.tags]]
name = "flow_m3h"
forward = "raw"
deadband = 0.5
[[devices.tags]]
name = "pressure_bar"
[[devices]]
id = "p2"
type = "simulated"
{p2_tags}
[[rules]]
name = "high"
device = "p1"
tag = "flow_m3h"
above = {limit}
[[rules]]
name = "low"
device = "p2"
tag = "pressure_bar"
below = 3.9
"""


def edge_cfg(limit: float = 42.0, p2_tags: str = "") -> GatewayConfig:
    return parse_config(EDGE.format(limit=limit, p2_tags=p2_tags)).config


def samples(t0: float, t1: float, step: float = 0.5) -> list[list[Sample]]:
    """Polls of both devices: a flow ramp on p1 crossing 42 and back, pressure dips on p2."""
    out: list[list[Sample]] = []
    t = t0
    while t < t1:
        flow = 40.0 + 4.0 * ((t % 20.0) / 20.0)  # 40 .. 44 every 20 s
        pressure = 3.85 if int(t) % 7 == 0 else 4.0
        out.append(
            [
                Sample("p1", "flow_m3h", flow, Quality.GOOD, t),
                Sample("p1", "pressure_bar", 4.0, Quality.GOOD, t),
            ]
        )
        out.append(
            [
                Sample("p2", name, pressure if name == "pressure_bar" else 1.0, Quality.GOOD, t)
                for name in ("flow_m3h", "pressure_bar", "temperature_c", "vibration_mm_s")
            ]
        )
        t += step
    return out


def drive(stage: EdgeStage | EdgeSet, polls: list[list[Sample]]) -> list[Outgoing]:
    out: list[Outgoing] = []
    for batch in polls:
        out += stage.process(batch)
        out += stage.tick(batch[0].ts)
    return out


def key(m: Outgoing) -> str:
    return json.dumps([m.device, m.kind, m.ts_ms, m.data], sort_keys=True)


def test_edge_set_says_what_one_edge_stage_says() -> None:
    c = edge_cfg()
    polls = samples(1000.0, 1100.0)
    one = EdgeStage(c, started=1000.0)
    many = EdgeSet(c, started=1000.0)
    a = drive(one, polls) + one.flush(1100.0)
    b = drive(many, polls) + many.flush(1100.0)
    assert Counter(map(key, a)) == Counter(map(key, b))
    # Summaries come in the same order; only events follow the raw forwards of their poll.
    assert [key(m) for m in a if m.kind == "summary"] == [key(m) for m in b if m.kind == "summary"]
    assert {m.kind for m in a} == {"summary", "raw", "event"}
    sa, sb = one.stats(), many.stats()
    assert sa == sb
    many.process([Sample("ghost", "x", 1.0, Quality.GOOD, 1200.0)])
    assert many.stats().unknown_tag_samples == sa.unknown_tag_samples + 1
    assert many.unbound_rules == ()


def test_reconfigure_keeps_what_did_not_change() -> None:
    stage = EdgeSet(edge_cfg(), started=1000.0)
    before = drive(stage, samples(1000.0, 1015.0))  # p1 flow passes 42 at t = 1010
    assert [m.data["state"] for m in before if m.kind == "event" and m.device == "p1"] == ["active"]
    # p2's tags change (its windows are rebuilt); p1 and its rule do not change at all.
    new = edge_cfg(p2_tags='[[devices.tags]]\nname = "pressure_bar"\n')
    flushed, rebuilt = stage.reconfigure(new, 1015.0)
    assert rebuilt == ["p2"]
    assert {m.device for m in flushed} == {"p2"}
    assert [m.data["partial"] for m in flushed if m.kind == "summary"] == [True]
    after = drive(stage, samples(1015.0, 1030.0)) + stage.flush(1030.0)
    p1 = [m for m in before + after if m.device == "p1" and m.kind == "summary"]
    # p1's window [1010, 1020) was open across the reload and is summarized once, whole.
    starts = [m.data["start_ms"] for m in p1]
    assert len(starts) == len(set(starts))
    across = next(m for m in p1 if m.data["start_ms"] == 1_010_000)
    assert not across.data["partial"] and across.data["tags"]["flow_m3h"]["count"] == 20
    # The unchanged rule kept its state: still active, so no second "active".
    p1_events = [m.data["state"] for m in after if m.kind == "event" and m.device == "p1"]
    assert p1_events[:1] == ["cleared"]
    # p2's cut window: two partial summaries, together every sample once.
    p2 = [m for m in flushed + after if m.device == "p2" and m.data.get("start_ms") == 1_010_000]
    assert [m.data["partial"] for m in p2] == [True, True]
    assert sum(m.data["tags"]["pressure_bar"]["count"] for m in p2) == 20
    assert stage.stats().samples_in == 6 * 60  # 60 polls of each device, 2 + 4 tags


def test_reconfigure_restarts_a_changed_rule_and_drops_a_removed_device() -> None:
    stage = EdgeSet(edge_cfg(), started=1000.0)
    drive(stage, samples(1000.0, 1015.0))
    events_before = stage.stats().events_out
    lower = edge_cfg(limit=41.0)
    stage.reconfigure(lower, 1015.0)
    after = drive(stage, samples(1015.0, 1016.0))
    events = [m.data for m in after if m.kind == "event"]
    # A changed rule starts afresh, inactive: it fires again at once.
    assert [e["state"] for e in events if e["rule"] == "high"] == ["active"]
    assert stage.stats().events_out == events_before + len(events)  # retired counts kept
    no_p2 = parse_config(
        EDGE.format(limit=41.0, p2_tags="").split('[[devices]]\nid = "p2"')[0]
        + '[[rules]]\nname = "high"\ndevice = "p1"\ntag = "flow_m3h"\nabove = 41.0\n'
    ).config
    flushed, rebuilt = stage.reconfigure(no_p2, 1016.0)
    assert rebuilt == [] and {m.device for m in flushed} == {"p2"}
    assert stage.process([Sample("p2", "pressure_bar", 4.0, Quality.GOOD, 1017.0)]) == []
    assert stage.stats().unknown_tag_samples == 1


# --- a running gateway ---------------------------------------------------------------------


async def reload(addr: Addr, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = await fetch(
        addr, "POST", "/api/v1/reload", headers=AUTH if headers is None else headers
    )
    return status, json.loads(body)


async def until(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def write(path: Path, text: str) -> None:
    # A new file renamed into place, as editors and config management do.
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def setup(tmp_path: Path, text: str) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


TAGGED = '[[devices.tags]]\nname = "flow_m3h"\ndeadband = 0.1\n'


def test_only_the_devices_that_changed_restart(tmp_path: Path) -> None:
    path = setup(
        tmp_path, config(device("p1"), device("p2"), device("p3"), device("p5"), window_s=0.5)
    )
    gw = Gateway(load_config(path))

    async def scenario() -> dict[str, Any]:
        async with running(gw) as addr:
            await until(lambda: all(s.status.polls_total >= 30 for s in gw.services.values()))
            tasks = gw.device_tasks
            old = {d: s.status for d, s in gw.services.items()}
            p1_polls = old["p1"].polls_total
            queue, sink, reconnects = (
                gw.uplink.queue,
                gw.uplink.sink,
                gw.uplink_stats().reconnects_total,
            )
            write(
                path,
                config(
                    device("p4"),
                    device("p1"),
                    device("p2", seed=7),
                    device("p5", extra=TAGGED),
                    window_s=0.5,
                ),
            )
            reloaded_ms = time.time() * 1000
            status, report = await reload(addr)
            assert status == 200, report
            assert gw.device_tasks["p1"] is tasks["p1"]  # the same task, never stopped
            assert gw.services["p1"].status is old["p1"]
            assert tasks["p2"].done() and tasks["p3"].done() and tasks["p5"].done()
            assert gw.device_tasks["p2"] is not tasks["p2"]
            # The queue and the fog connection are never recreated by a reload.
            assert gw.uplink.queue is queue and gw.uplink.sink is sink
            assert gw.uplink_stats().reconnects_total == reconnects
            await until(lambda: gw.services["p4"].status.polls_total >= 40)
            assert old["p1"].polls_total > p1_polls + 5  # kept counting, never reset
            assert gw.services["p2"].status.polls_total < old["p1"].polls_total
            _, _, listed = await fetch(addr, "GET", "/api/v1/devices")
            ids = [d["id"] for d in json.loads(listed)]
            _, _, page = await fetch(addr, "GET", "/metrics")
            return {
                "report": report,
                "ids": ids,
                "old": old,
                "metrics": page.decode(),
                "reloaded_ms": reloaded_ms,
            }

    out = run(scenario())
    conforms(out["report"], "/api/v1/reload", 200, "post")
    assert out["report"] == {
        "added": ["p4"],
        "removed": ["p3"],
        "restarted": ["p2", "p5"],
        "unchanged": ["p1"],
        "rules": {"added": [], "removed": [], "changed": []},
        "windows_rebuilt": ["p5"],  # p2's tags are the same: its windows carried on
    }
    assert out["ids"] == ["p4", "p1", "p2", "p5"]  # the new file's order
    assert 'fogmesh_reloads_total{result="ok"} 1' in out["metrics"]

    # Nothing lost, nothing summarized twice: every sample published is in exactly one summary.
    old = out["old"]
    with FogStore(tmp_path / "var" / "fog.db").open(create=False) as fog:
        rows = [r for r in fog.rows(limit=100_000) if r["kind"] == "summary"]
    assert gw.bus.stats.dropped_samples == 0 and gw.edge.stats().samples_late == 0

    def counted(dev: str) -> int:
        return sum(
            t["count"] + t["bad"]
            for r in rows
            if r["device"] == dev
            for t in r["data"]["tags"].values()
        )

    def windows(dev: str) -> list[int]:
        return [r["data"]["start_ms"] for r in rows if r["device"] == dev]

    now = {s.id: s for s in gw.device_statuses()}
    assert counted("p1") == 4 * old["p1"].polls_total
    assert counted("p3") == 4 * old["p3"].polls_total  # flushed when it was removed
    assert counted("p2") == 4 * (old["p2"].polls_total + now["p2"].polls_total)
    assert counted("p4") == 4 * now["p4"].polls_total
    # p5 had all four tags before, only flow_m3h after.
    assert counted("p5") == 4 * old["p5"].polls_total + now["p5"].polls_total
    for dev in ("p1", "p2"):  # windows kept across the reload: each summarized once, whole
        assert len(windows(dev)) == len(set(windows(dev)))
        across = [
            r
            for r in rows
            if r["device"] == dev
            and r["data"]["start_ms"] <= out["reloaded_ms"] < r["data"]["end_ms"] + 20
        ]
        assert across and not any(r["data"]["partial"] for r in across)
    repeated = [w for w, n in Counter(windows("p5")).items() if n > 1]
    assert len(repeated) <= 1  # the one window cut by the reload: two partial halves
    for r in rows:
        if r["device"] == "p5" and r["data"]["start_ms"] in repeated:
            assert r["data"]["partial"] is True


def test_a_bad_or_restart_only_config_changes_nothing(tmp_path: Path) -> None:
    path = setup(tmp_path, config(device("p1"), device("p2")))
    gw = Gateway(load_config(path))

    async def scenario() -> list[tuple[int, Any]]:
        out = []
        async with running(gw) as addr:
            await until(lambda: gw.services["p1"].status.polls_total > 3)
            tasks = gw.device_tasks
            write(
                path,
                config(device("p1", extra="timeout_ms = 0"), device("p2", extra='enabled = "yes"')),
            )
            out.append(await reload(addr))
            write(path, config(device("p1"), device("p2", seed=3)).replace("port = 0", "port = 1"))
            out.append(await reload(addr))
            write(path, "[gateway\n")
            out.append(await reload(addr))
            out.append(await reload(addr, {}))
            out.append(await reload(addr, {"Authorization": "Bearer nope-nope-nope-nope"}))
            assert gw.device_tasks == tasks  # not one device was touched
            assert [s.cfg.seed for s in gw.services.values()] == [0, 0]  # type: ignore[attr-defined]
            _, _, page = await fetch(addr, "GET", "/metrics")
            out.append((0, page.decode()))
        return out

    bad, restart, syntax, anonymous, wrong, (_, page) = run(scenario())
    for status, body in (bad, restart, syntax, anonymous, wrong):
        conforms(body, "/api/v1/reload", status, "post")
    assert bad == (
        422,
        {
            "error": "invalid config, nothing changed: 2 problem(s)",
            "status": 422,
            "problems": [
                "devices[0].timeout_ms: must be greater than 0",
                "devices[1].enabled: must be a boolean (got string 'yes')",
            ],
        },
    )
    assert restart == (
        409,
        {
            "error": "restart required for: http.port; nothing changed",
            "status": 409,
            "restart_required": ["http.port"],
        },
    )
    assert syntax[0] == 422 and syntax[1]["problems"][0].startswith("TOML syntax error at line 1")
    assert anonymous[0] == 401 and wrong[0] == 401
    for line in (
        'fogmesh_reloads_total{result="ok"} 0',
        'fogmesh_reloads_total{result="invalid"} 2',
        'fogmesh_reloads_total{result="restart_required"} 1',
    ):
        assert line in page


def test_a_reload_rotates_tokens_and_applies_rules_without_restarting(tmp_path: Path) -> None:
    rule = '[[rules]]\nname = "hot"\ndevice = "p1"\ntag = "temperature_c"\nabove = {x}\n'
    path = setup(tmp_path, config(device("p1"), rules=rule.format(x=100)))
    gw = Gateway(load_config(path))
    new_token = "rotated-token-0123456789abcdef"

    async def scenario() -> dict[str, Any]:
        async with running(gw) as addr:
            await until(lambda: gw.services["p1"].status.polls_total > 3)
            task = gw.device_tasks["p1"]
            (tmp_path / "token").write_text(new_token)
            write(path, config(device("p1"), rules=rule.format(x=10)))  # fires at once
            status, report = await reload(addr)
            assert status == 200, report
            assert gw.device_tasks["p1"] is task
            status, _ = await reload(addr)  # the old token is no longer accepted
            assert status == 401
            status, again = await reload(addr, {"Authorization": f"Bearer {new_token}"})
            assert status == 200 and again["unchanged"] == ["p1"]
            await until(lambda: gw.edge.stats().events_out >= 1)
            return dict(report)

    report = run(scenario())
    assert report["rules"] == {"added": [], "removed": [], "changed": ["hot"]}
    assert report["restarted"] == [] and report["unchanged"] == ["p1"]
    with FogStore(tmp_path / "var" / "fog.db").open(create=False) as fog:
        events = [r for r in fog.rows(limit=100_000) if r["kind"] == "event"]
    assert events and events[0]["data"]["rule"] == "hot" and events[0]["data"]["limit"] == 10


def test_a_config_from_a_string_cannot_be_reloaded(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    gw = Gateway(parse_config(config(device("p1")), base_dir=tmp_path))

    async def scenario() -> tuple[int, Any]:
        async with running(gw) as addr:
            return await reload(addr)

    status, body = run(scenario())
    assert status == 409 and "did not come from a file" in body["error"]


# --- SIGHUP --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sighup_reloads_a_running_gateway_process(tmp_path: Path) -> None:
    path = setup(tmp_path, config(device("p1")))
    log = tmp_path / "gateway.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "gateway", "run", str(path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        addr = _wait_for_address(log, proc)

        def devices() -> list[str]:
            _, _, body = fetch_sync(addr, "GET", "/api/v1/devices")
            return [d["id"] for d in json.loads(body)]

        assert devices() == ["p1"]
        write(path, config(device("p1"), device("p2")))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while devices() != ["p1", "p2"]:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        write(path, config(device("p1"), device("p2")).replace('site = "test"', 'site = "x"'))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "restart required for: gateway.site" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert devices() == ["p1", "p2"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "reload by SIGHUP: added ['p2']" in text
    assert TOKEN not in text


def _wait_for_address(log: Path, proc: subprocess.Popen[bytes]) -> Addr:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"HTTP API on http://([\d.]+):(\d+)/", log.read_text())
        if m:
            return m[1], int(m[2])
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError("the gateway did not start: " + log.read_text()[-3000:])
