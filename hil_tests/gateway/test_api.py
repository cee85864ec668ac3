"""The /api/v1 routes (gateway.api) over real loopback HTTP, and their OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate as validate_spec

from gateway.api import ApiServer, Assessment, DropWatch, assess, build_router
from gateway.http import Limits
from gateway.model import Counter, DeviceStatus, Health, Quality, Sample, UplinkStats
from gateway.openapi import openapi_document
from hil_tests.gateway.http_client import Addr, fetch

T = TypeVar("T")
NOW = time.time()
ODD_ID = 'line "A"\\B/\u00e9'  # quote, backslash, slash and non-ASCII in one id


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(main())


class FakeView:
    """An in-memory GatewayView over real DeviceStatus and UplinkStats objects."""

    def __init__(self, devices: list[DeviceStatus], uplink: UplinkStats) -> None:
        self.site = "plant-a"
        self.gateway_id = "gw-1"
        self.started_ts = time.time() - 100.0  # not NOW: collection may precede the test by minutes
        self.devices = devices
        self.uplink = uplink
        self.extra: list[Counter] = []
        self.broken = False

    def device_statuses(self) -> list[DeviceStatus]:
        if self.broken:
            raise RuntimeError("view broke")
        return list(self.devices)

    def uplink_stats(self) -> UplinkStats:
        return self.uplink

    def counters(self) -> list[Counter]:
        return list(self.extra)


def make_devices() -> list[DeviceStatus]:
    plc = DeviceStatus("plc1", "modbus_tcp", Health.OK, last_success_ts=NOW - 1.0)
    plc.polls_total, plc.errors_total, plc.reconnects_total, plc.bad_data_total = 100, 2, 1, 3
    plc.skipped_polls_total = 4
    for _ in range(98):
        plc.poll_latency.observe(0.003)
    for _ in range(2):
        plc.poll_latency.observe(0.3)
    plc.last_values = {
        "temp": Sample("plc1", "temp", 21.5, Quality.GOOD, NOW - 1.0),
        "running": Sample("plc1", "running", True, Quality.GOOD, NOW - 1.0),
        "mode": Sample("plc1", "mode", "auto", Quality.UNCERTAIN, NOW - 2.0),
        "count": Sample("plc1", "count", 7, Quality.GOOD, NOW - 2.0),
        "broken": Sample("plc1", "broken", float("nan"), Quality.BAD, NOW - 3.0),
    }
    flaky = DeviceStatus(ODD_ID, "simulated", Health.DEGRADED, last_success_ts=NOW - 5.0)
    flaky.poll_latency.observe(20.0)  # beyond the last bucket: p99 is infinite
    flaky.last_error, flaky.last_error_ts = "bad CRC", NOW - 3.0
    dead = DeviceStatus("meter", "serial", Health.DOWN, last_error="timeout", last_error_ts=NOW)
    dead.consecutive_failures = 9
    new = DeviceStatus("ble1", "ble")  # STARTING, never polled
    return [plc, flaky, dead, new]


def make_view() -> FakeView:
    uplink = UplinkStats(
        url="mqtt://broker:1883",
        connected=False,
        queue_depth=12,
        queue_bytes=3400,
        backlog=10,
        last_seq=512,
        drops={"drop_oldest": 4},
    )
    return FakeView(make_devices(), uplink)


def healthy_view() -> FakeView:
    view = make_view()
    view.devices = [d for d in view.devices if d.health is Health.OK]
    view.uplink.connected = True
    return view


@asynccontextmanager
async def serve(view: FakeView, limits: Limits | None = None) -> AsyncIterator[Addr]:
    async with ApiServer(view, "127.0.0.1", 0, limits=limits) as api:
        yield api.address


async def get_json(addr: Addr, path: str) -> tuple[int, Any]:
    status, headers, body = await fetch(addr, "GET", path)
    assert headers["content-type"] == "application/json"

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return status, json.loads(body, parse_constant=refuse)


async def raw(addr: Addr, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


def _closed(schema: Any) -> Any:
    # Documented objects admit no undocumented keys: the document must say all we send.
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def conforms(instance: Any, path: str, status: int, method: str = "get") -> None:
    """The instance matches the documented JSON schema of the answer `status` to `method path`."""
    doc = openapi_document()
    answer = doc["paths"][path][method]["responses"][str(status)]
    if "$ref" in answer:
        answer = doc["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    schema = {**answer["content"]["application/json"]["schema"], "components": doc["components"]}
    validate_instance(instance, _closed(schema), cls=OAS31Validator)


# --- health -----------------------------------------------------------------------------


def test_health_ok() -> None:
    async def go() -> None:
        async with serve(healthy_view()) as addr:
            status, body = await get_json(addr, "/api/v1/health")
        assert status == 200
        conforms(body, "/api/v1/health", 200)
        assert body["status"] == "ok"
        assert body["reasons"] == []
        assert (body["site"], body["gateway"]) == ("plant-a", "gw-1")
        assert 100.0 <= body["uptime_s"] < 110.0
        assert body["devices"] == {"ok": 1, "degraded": 0, "down": 0, "starting": 0}
        assert body["uplink"] == {
            "connected": True,
            "queue_depth": 12,
            "backlog": 10,
            "drops_total": 4,
        }

    run(go())


def test_health_degraded_names_its_reasons() -> None:
    async def go() -> None:
        async with serve(make_view()) as addr:
            status, body = await get_json(addr, "/api/v1/health")
        assert status == 200
        conforms(body, "/api/v1/health", 200)
        assert body["status"] == "degraded"
        assert body["devices"] == {"ok": 1, "degraded": 1, "down": 1, "starting": 1}
        assert body["reasons"] == [
            "devices down: meter",
            f"devices degraded: {ODD_ID}",
            "devices starting: ble1",
            "uplink disconnected",
        ]

    run(go())


def test_health_down_when_every_device_is_down_is_503() -> None:
    view = healthy_view()
    view.devices = [DeviceStatus("a", "x", Health.DOWN), DeviceStatus("b", "x", Health.DOWN)]

    async def go() -> None:
        async with serve(view) as addr:
            status, body = await get_json(addr, "/api/v1/health")
        assert status == 503
        conforms(body, "/api/v1/health", 503)
        assert body["status"] == "down"
        assert body["reasons"][0] == "all 2 devices down"

    run(go())


def test_health_down_while_the_queue_rejects_new_messages() -> None:
    view = healthy_view()

    async def go() -> None:
        async with serve(view) as addr:
            status, body = await get_json(addr, "/api/v1/health")  # baseline
            assert (status, body["status"]) == (200, "ok")
            view.uplink.drops["reject_new"] = 3
            status, body = await get_json(addr, "/api/v1/health")
            assert (status, body["status"]) == (503, "down")
            assert body["reasons"] == ["queue full: new messages are rejected"]
            assert body["uplink"]["drops_total"] == 7
            view.uplink.drops["drop_oldest"] = 5
            # /metrics reads feed the same watch: the rise is seen by the scrape, not by health.
            status, _, _ = await fetch(addr, "GET", "/metrics")
            assert status == 200
            status, body = await get_json(addr, "/api/v1/health")
            assert status == 503  # the reject_new rise still counts for a minute
            assert "queue dropping messages (drop_oldest)" in body["reasons"]

    run(go())


@pytest.mark.parametrize(
    ("healths", "connected", "dropping", "expected"),
    [
        ([], True, (), Health.OK),
        ([Health.OK, Health.OK], True, (), Health.OK),
        ([Health.OK, Health.STARTING], True, (), Health.DEGRADED),
        ([Health.OK, Health.DEGRADED], True, (), Health.DEGRADED),
        ([Health.OK, Health.DOWN], True, (), Health.DEGRADED),
        ([Health.OK], False, (), Health.DEGRADED),
        ([Health.OK], True, ("drop_oldest",), Health.DEGRADED),
        ([], False, (), Health.DEGRADED),
        ([Health.DOWN], True, (), Health.DOWN),
        ([Health.DOWN, Health.DOWN], False, (), Health.DOWN),
        ([Health.OK], True, ("reject_new",), Health.DOWN),
    ],
)
def test_assess(
    healths: list[Health], connected: bool, dropping: tuple[str, ...], expected: Health
) -> None:
    devices = [DeviceStatus(f"d{i}", "x", h) for i, h in enumerate(healths)]
    verdict = assess(devices, UplinkStats(connected=connected), dropping)
    assert verdict.status is expected
    assert (verdict.reasons == ()) == (expected is Health.OK)


def test_assess_caps_the_ids_it_names() -> None:
    devices = [DeviceStatus(f"d{i:02}", "x", Health.DEGRADED) for i in range(25)]
    verdict = assess(devices, UplinkStats(connected=True))
    ids = ", ".join(f"d{i:02}" for i in range(10))
    assert verdict == Assessment(Health.DEGRADED, (f"devices degraded: {ids} and 15 more",))


def test_drop_watch() -> None:
    watch = DropWatch(window_s=60.0)
    assert watch.observe({"reject_new": 5}, now=0.0) == frozenset()  # first read: a baseline
    assert watch.observe({"reject_new": 5}, now=10.0) == frozenset()
    assert watch.observe({"reject_new": 6}, now=20.0) == {"reject_new"}
    assert watch.observe({"reject_new": 6, "drop_oldest": 1}, now=79.0) == {
        "reject_new",
        "drop_oldest",
    }
    assert watch.observe({"reject_new": 6, "drop_oldest": 1}, now=80.0) == {"drop_oldest"}
    assert watch.observe({"reject_new": 6, "drop_oldest": 1}, now=139.0) == frozenset()


# --- devices ----------------------------------------------------------------------------


def test_devices_list() -> None:
    view = make_view()

    async def go() -> None:
        async with serve(view) as addr:
            status, body = await get_json(addr, "/api/v1/devices")
        assert status == 200
        conforms(body, "/api/v1/devices", 200)
        assert [d["id"] for d in body] == ["plc1", ODD_ID, "meter", "ble1"]  # config order
        assert body[0] == {
            "id": "plc1",
            "type": "modbus_tcp",
            "health": "ok",
            "last_success_ts": NOW - 1.0,
            "last_error": None,
        }
        assert body[2]["health"] == "down"
        assert body[2]["last_error"] == "timeout"
        assert body[3]["last_success_ts"] is None

    run(go())


def test_device_detail() -> None:
    async def go() -> None:
        async with serve(make_view()) as addr:
            status, body = await get_json(addr, "/api/v1/devices/plc1")
        assert status == 200
        conforms(body, "/api/v1/devices/{id}", 200)
        assert body["counters"] == {
            "polls": 100,
            "errors": 2,
            "reconnects": 1,
            "bad_data": 3,
            "skipped_polls": 4,
        }
        # 98 polls of 3 ms and 2 of 300 ms: buckets (2, 5] ms and (200, 500] ms.
        latency = body["poll_latency_s"]
        assert (latency["p50"], latency["p99"], latency["count"]) == (0.003, 0.5, 100)
        assert latency["sum"] == pytest.approx(98 * 0.003 + 2 * 0.3)
        assert body["last_values"] == {
            "temp": {"value": 21.5, "quality": "good", "ts": NOW - 1.0},
            "running": {"value": True, "quality": "good", "ts": NOW - 1.0},
            "mode": {"value": "auto", "quality": "uncertain", "ts": NOW - 2.0},
            "count": {"value": 7, "quality": "good", "ts": NOW - 2.0},
            "broken": {"value": None, "quality": "bad", "ts": NOW - 3.0},  # NaN
        }
        assert (body["last_error"], body["last_error_ts"]) == (None, None)
        assert body["last_success_ts"] == NOW - 1.0

    run(go())


def test_device_detail_edge_cases() -> None:
    async def go() -> None:
        async with serve(make_view()) as addr:
            status, odd = await get_json(addr, "/api/v1/devices/" + quote(ODD_ID, safe=""))
            assert status == 200
            conforms(odd, "/api/v1/devices/{id}", 200)
            assert (odd["id"], odd["health"], odd["last_error"]) == (ODD_ID, "degraded", "bad CRC")
            assert odd["poll_latency_s"]["p99"] is None  # infinite: beyond the last bucket
            status, dead = await get_json(addr, "/api/v1/devices/meter")
            assert (dead["health"], dead["consecutive_failures"]) == ("down", 9)
            status, new = await get_json(addr, "/api/v1/devices/ble1")
            assert new["poll_latency_s"] == {"p50": None, "p99": None, "count": 0, "sum": 0.0}
            assert (new["health"], new["last_values"]) == ("starting", {})

    run(go())


def test_unknown_device_is_404() -> None:
    async def go() -> None:
        async with serve(make_view()) as addr:
            status, body = await get_json(addr, "/api/v1/devices/nope")
        assert status == 404
        conforms(body, "/api/v1/devices/{id}", 404)
        assert body == {"error": "no device 'nope'", "status": 404}

    run(go())


# --- errors -----------------------------------------------------------------------------


def test_protocol_errors_on_the_api() -> None:
    limits = Limits(header_timeout_s=0.3, max_header_bytes=2048)

    async def go() -> None:
        async with serve(make_view(), limits) as addr:
            status, headers, body = await fetch(addr, "POST", "/api/v1/devices", b"{}")
            assert (status, headers["allow"]) == (405, "GET, HEAD")
            conforms(json.loads(body), "/api/v1/devices", 405)
            status, _, body = await fetch(addr, "GET", "/api/v1/nothing")
            assert status == 404
            assert json.loads(body)["status"] == 404
            status, _, body = await fetch(addr, "GET", "/api/v1/health", b"x" * 10)
            assert status == 413
            conforms(json.loads(body), "/api/v1/health", 413)
            resp = await raw(addr, b"NOT HTTP AT ALL\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 400 ")
            big = b"GET /api/v1/health HTTP/1.1\r\nHost: t\r\nX: " + b"y" * 4096 + b"\r\n\r\n"
            assert (await raw(addr, big)).startswith(b"HTTP/1.1 431 ")
            t0 = time.monotonic()
            slow = await raw(addr, b"GET /api/v1/health HTTP/1.1\r\n")
            assert slow.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - t0 < 2.0

    run(go())


def test_view_failure_is_500_and_the_api_recovers(caplog: pytest.LogCaptureFixture) -> None:
    view = make_view()

    async def go() -> None:
        async with serve(view) as addr:
            view.broken = True
            with caplog.at_level(logging.ERROR, logger="gateway.http"):
                status, body = await get_json(addr, "/api/v1/devices")
                assert (status, body) == (500, {"error": "internal server error", "status": 500})
                status, headers, text = await fetch(addr, "GET", "/metrics")
                assert status == 500
                assert headers["content-type"].startswith("text/plain")  # scrapers read text
                assert text == b"500 internal server error\n"
            view.broken = False
            status, body = await get_json(addr, "/api/v1/devices")
            assert status == 200
            assert len(body) == 4

    run(go())
    assert "view broke" in caplog.text  # the traceback went to the log


# --- server lifecycle and OpenAPI -------------------------------------------------------


def test_api_server_address_and_lifecycle() -> None:
    api = ApiServer(healthy_view(), "127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        _ = api.address

    async def go() -> None:
        async with api as entered:
            assert entered is api
            host, port = api.address
            assert host == "127.0.0.1"
            assert port > 0
            status, _ = await get_json((host, port), "/api/v1/health")
            assert status == 200
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)

    run(go())


def test_openapi_document_is_valid_and_served() -> None:
    doc = openapi_document()
    validate_spec(doc)
    assert doc["openapi"].startswith("3.1")
    doc["paths"].clear()
    assert openapi_document()["paths"], "each call returns a fresh copy"

    async def go() -> None:
        async with serve(make_view()) as addr:
            status, body = await get_json(addr, "/api/v1/openapi.json")
        assert status == 200
        assert body == openapi_document()

    run(go())


def test_openapi_describes_exactly_the_routes() -> None:
    doc = openapi_document()
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch", "head", "options"}
    }
    served = {(r.method, r.pattern) for r in build_router(make_view()).routes}
    assert documented == served
    for path, item in doc["paths"].items():
        params = [p["name"] for p in item.get("parameters", []) if p["in"] == "path"]
        assert sorted(params) == sorted(s[1:-1] for s in path.split("/") if s.startswith("{"))
        for op in (v for k, v in item.items() if k != "parameters"):
            assert {"200", "400", "405", "500"} <= set(op["responses"]), path
    assert "404" in doc["paths"]["/api/v1/devices/{id}"]["get"]["responses"]
    assert "503" in doc["paths"]["/api/v1/health"]["get"]["responses"]


def test_token_guarded_routes_without_a_control_are_forbidden() -> None:
    disabled = {"error": "writes are disabled: no [http] token configured", "status": 403}

    async def go() -> None:
        async with serve(make_view()) as addr:
            headers = {
                "Authorization": "Bearer whatever-token-0123456789",
                "Content-Type": "application/json",
            }
            for method, path, body, doc_path in (
                (
                    "PUT",
                    "/api/v1/devices/plc1/tags/temp",
                    b'{"value": 1}',
                    "/api/v1/devices/{id}/tags/{tag}",
                ),
                ("GET", "/api/v1/audit", None, "/api/v1/audit"),
                ("POST", "/api/v1/reload", None, "/api/v1/reload"),
            ):
                status, _, raw = await fetch(addr, method, path, body, headers)
                assert (status, json.loads(raw)) == (403, disabled), path
                conforms(json.loads(raw), doc_path, 403, method.lower())
            status, _, _ = await fetch(
                addr, "PUT", "/api/v1/devices/plc1/tags/t", b"x" * 5000, headers
            )
            assert status == 413
            status, headers_, _ = await fetch(addr, "DELETE", "/api/v1/reload")
            assert (status, headers_["allow"]) == (405, "POST")

    run(go())


def test_the_schemas_catch_undocumented_fields() -> None:
    # The strict check used above must be able to fail, or it proves nothing.
    body = {"error": "x", "status": 404, "extra": 1}
    with pytest.raises(Exception, match="extra"):
        conforms(body, "/api/v1/devices/{id}", 404)
    health = {"status": "ok", "reasons": [], "site": "s", "gateway": "g", "uptime_s": 1.0}
    with pytest.raises(Exception, match="devices"):
        conforms(health, "/api/v1/health", 200)
