"""The gateway retrofitting the virtual PLC over real Modbus TCP and OPC-UA: values, safe writes
over the HTTP API, the audit trail, and recovery after the PLC restarts."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.model import Health
from gateway.runtime import Gateway
from hil_tests.gateway.http_client import fetch
from tools.demo import demo_config_for
from tools.virtual_plc.plc import VirtualPlc

TOKEN = "s3cret-token-for-tests-only"


def _config(plc: VirtualPlc) -> str:
    assert plc.opcua_endpoint is not None
    text = demo_config_for(plc.modbus_port, plc.opcua_endpoint)
    return text.replace("[http]\n", '[http]\ntoken = { env = "FOGMESH_TEST_TOKEN" }\n', 1)


async def _put(
    addr: tuple[str, int], path: str, value: Any, token: str | None = TOKEN
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, _, body = await fetch(addr, "PUT", path, json.dumps({"value": value}).encode(), headers)
    return status, json.loads(body)


async def _wait_value(
    gw: Gateway, device: str, tag: str, want: float, timeout_s: float = 5.0
) -> float:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        st = {s.id: s for s in gw.device_statuses()}[device]
        got = st.last_values.get(tag)
        if got is not None and abs(float(got.value) - want) < 1e-3:
            return float(got.value)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{device}.{tag} never read back {want}")


@pytest.mark.slow
def test_retrofit_writes_audit_and_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with VirtualPlc(pumps=4, seed=1, update_ms=50) as plc:
            loaded = parse_config(
                _config(plc), base_dir=tmp_path, env={"FOGMESH_TEST_TOKEN": TOKEN}
            )
            gw = Gateway(loaded)
            stop = asyncio.Event()
            task = asyncio.create_task(gw.serve(stop))
            try:
                await asyncio.sleep(2.0)
                st = {s.id: s for s in gw.device_statuses()}
                assert all(s.health is Health.OK for s in st.values()), {
                    k: (s.health, s.last_error) for k, s in st.items()
                }
                # The meter's float32 CDAB registers decode to plausible mains values.
                volts = float(st["meter"].last_values["voltage_v"].value)
                assert 200.0 < volts < 260.0
                assert gw.api is not None
                addr = gw.api.address

                # Writes: Modbus float32 CDAB setpoint, OPC-UA Double setpoint; both read back.
                code, body = await _put(addr, "/api/v1/devices/pump1/tags/setpoint_m3h", 25.5)
                assert code == 200, body
                assert body["result"] == "ok" and body["new_value"] == 25.5
                assert plc.values(1)["setpoint_m3h"] == pytest.approx(25.5)
                await _wait_value(gw, "pump1", "setpoint_m3h", 25.5)
                code, body = await _put(addr, "/api/v1/devices/pump2/tags/setpoint_m3h", 31.0)
                assert code == 200, body
                assert plc.values(2)["setpoint_m3h"] == pytest.approx(31.0)

                # Refusals: out of range, not writable, no token, unknown tag.
                code, body = await _put(addr, "/api/v1/devices/pump1/tags/setpoint_m3h", 99)
                assert code == 422 and "0" in body["error"] and "60" in body["error"]
                code, body = await _put(addr, "/api/v1/devices/pump1/tags/flow_m3h", 1.0)
                assert code == 403 and "not writable" in body["error"]
                code, _ = await _put(
                    addr, "/api/v1/devices/pump1/tags/setpoint_m3h", 20.0, token=None
                )
                assert code == 401
                code, _ = await _put(addr, "/api/v1/devices/pump1/tags/no_such_tag", 1.0)
                assert code == 404
                assert plc.values(1)["setpoint_m3h"] == pytest.approx(
                    25.5
                )  # refusals touched nothing

                status, _, raw = await fetch(
                    addr,
                    "GET",
                    "/api/v1/audit?limit=50",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert status == 200
                audit = json.loads(raw)
                entries = audit["entries"] if isinstance(audit, dict) else audit
                results = [(e["device"], e["tag"], e["result"]) for e in entries]
                assert ("pump1", "setpoint_m3h", "ok") in results
                assert ("pump2", "setpoint_m3h", "ok") in results
                assert any(r[2] != "ok" and r[1] == "flow_m3h" for r in results)

                # The PLC restarts: devices fail, back off, and resume without a gateway restart.
                before = st["pump1"].polls_total
                await plc.restart_modbus(down_s=1.0)
                back_at = time.time()
                await asyncio.sleep(3.0)
                st = {s.id: s for s in gw.device_statuses()}
                assert st["pump1"].errors_total >= 1
                assert st["pump1"].polls_total > before
                assert st["pump1"].health in (Health.OK, Health.DEGRADED)
                last_ok = st["pump1"].last_success_ts
                assert last_ok is not None and last_ok > back_at + 0.5
            finally:
                stop.set()
                await task

    asyncio.run(scenario())


def test_an_opcua_password_from_the_environment_reaches_the_adapter(tmp_path: Path) -> None:
    from hil_tests.retrofit_adapters.opcua_server import OpcUaTestServer

    text = """
[gateway]
id = "gw"
site = "s"

[http]
enabled = false

[uplink]
url = "sqlite:///var/fog.db"

[[devices]]
id = "pump"
type = "opcua"
endpoint = "{endpoint}"
period_ms = 50
username = "operator"
password = {{ env = "OPCUA_PW" }}

[[devices.tags]]
name = "flow"
node = "ns=2;s=Pump1.Flow"
"""

    async def scenario(endpoint: str, password: str) -> Gateway:
        loaded = parse_config(
            text.format(endpoint=endpoint), base_dir=tmp_path, env={"OPCUA_PW": password}
        )
        gw = Gateway(loaded)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.serve(stop))
        await asyncio.sleep(1.5)
        stop.set()
        await task
        return gw

    with OpcUaTestServer(users={"operator": "right-password"}) as server:
        good = asyncio.run(scenario(server.endpoint, "right-password"))
        (st,) = good.device_statuses()
        assert st.health is Health.OK and "flow" in st.last_values
