"""The /metrics page (gateway.metrics), read back with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import http.client
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import ApiServer
from gateway.metrics import CONTENT_TYPE, escape_help, escape_label_value, format_value, render
from gateway.model import Counter, DeviceStatus, Health, UplinkStats
from gateway.stats import DEFAULT_BUCKETS_S

T = TypeVar("T")
NOW = time.time()
ODD_ID = 'pump "7"\\east\nline'  # every character the label syntax must escape


class FakeView:
    """An in-memory GatewayView over real DeviceStatus and UplinkStats objects."""

    def __init__(self) -> None:
        self.site = "plant-a"
        self.gateway_id = "gw-1"
        self.started_ts = NOW - 100.0
        plc = DeviceStatus("plc1", "modbus_tcp", Health.OK, last_success_ts=NOW - 1.0)
        plc.polls_total, plc.errors_total, plc.reconnects_total, plc.bad_data_total = 100, 2, 1, 3
        for seconds in (0.0004, 0.003, 0.003, 0.3, 30.0):
            plc.poll_latency.observe(seconds)
        odd = DeviceStatus(ODD_ID, "simulated", Health.DEGRADED, last_success_ts=NOW - 5.0)
        odd.consecutive_failures = 2
        dead = DeviceStatus("meter", "serial", Health.DOWN)
        new = DeviceStatus("ble1", "ble")
        self.devices = [plc, odd, dead, new]
        self.uplink = UplinkStats(
            url="mqtt://broker:1883",
            connected=True,
            queue_depth=12,
            queue_bytes=3400,
            backlog=10,
            last_seq=512,
            drops={"drop_oldest": 4, "expired": 1},
            sent_total=600,
            acked_total=588,
            reconnects_total=3,
            last_ack_ts=NOW - 0.5,
        )
        self.extra = [
            Counter(
                "fogmesh_bus_dropped_samples_total", "Samples dropped.\nSee \\docs.", "counter", 7
            ),
            Counter("fogmesh_bus_depth_samples", "Samples on the bus.", "gauge", 3.5),
            Counter("fogmesh_edge_odd", "A kind the page does not know.", "summary", 1),
            Counter("bad name", "Not a metric name.", "counter", 1),
            Counter("fogmesh_queue_bytes", "Collides with a built-in family.", "gauge", 99),
        ]

    def device_statuses(self) -> list[DeviceStatus]:
        return list(self.devices)

    def uplink_stats(self) -> UplinkStats:
        return self.uplink

    def counters(self) -> list[Counter]:
        return list(self.extra)


def parse(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Metric, sample: str, **labels: str) -> float:
    hits = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    assert len(hits) == 1, (sample, labels, family.samples)
    return hits[0]


def by_device(family: Metric, sample: str) -> dict[str, float]:
    return {s.labels["device"]: s.value for s in family.samples if s.name == sample}


EXPECTED_TYPES = {
    "fogmesh_gateway_info": "gauge",
    "fogmesh_gateway_start_time_seconds": "gauge",
    "fogmesh_device_up": "gauge",
    "fogmesh_device_health": "gauge",
    "fogmesh_device_polls": "counter",  # the parser names a counter family without "_total"
    "fogmesh_device_errors": "counter",
    "fogmesh_device_reconnects": "counter",
    "fogmesh_device_bad_data": "counter",
    "fogmesh_device_skipped_polls": "counter",
    "fogmesh_device_consecutive_failures": "gauge",
    "fogmesh_device_last_success_timestamp_seconds": "gauge",
    "fogmesh_device_poll_latency_seconds": "histogram",
    "fogmesh_uplink_connected": "gauge",
    "fogmesh_queue_depth_messages": "gauge",
    "fogmesh_queue_bytes": "gauge",
    "fogmesh_queue_backlog_messages": "gauge",
    "fogmesh_queue_drops": "counter",
    "fogmesh_uplink_sent": "counter",
    "fogmesh_uplink_acked": "counter",
    "fogmesh_uplink_reconnects": "counter",
    "fogmesh_uplink_last_ack_timestamp_seconds": "gauge",
    "fogmesh_queue_last_seq": "gauge",
    "fogmesh_bus_dropped_samples": "counter",
    "fogmesh_bus_depth_samples": "gauge",
    "fogmesh_edge_odd": "unknown",  # exported as "untyped"
}


def test_families_and_types(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        families = parse(render(FakeView()))
    assert {name: f.type for name, f in families.items()} == EXPECTED_TYPES
    # The bad name and the collision are skipped, each with a warning, and the page stays valid.
    assert "'bad name'" in caplog.text
    assert "'fogmesh_queue_bytes'" in caplog.text
    assert value(families["fogmesh_queue_bytes"], "fogmesh_queue_bytes") == 3400


def test_per_device_values() -> None:
    view = FakeView()
    f = parse(render(view))
    devices = ["plc1", ODD_ID, "meter", "ble1"]
    assert by_device(f["fogmesh_device_up"], "fogmesh_device_up") == dict(
        zip(devices, [1, 1, 0, 0], strict=True)
    )
    assert by_device(f["fogmesh_device_polls"], "fogmesh_device_polls_total")["plc1"] == 100
    assert by_device(f["fogmesh_device_errors"], "fogmesh_device_errors_total")["plc1"] == 2
    reconnects = by_device(f["fogmesh_device_reconnects"], "fogmesh_device_reconnects_total")
    assert reconnects == dict(zip(devices, [1, 0, 0, 0], strict=True))
    assert by_device(f["fogmesh_device_bad_data"], "fogmesh_device_bad_data_total")["plc1"] == 3
    failures = f["fogmesh_device_consecutive_failures"]
    assert by_device(failures, "fogmesh_device_consecutive_failures")[ODD_ID] == 2
    name = "fogmesh_device_last_success_timestamp_seconds"
    last = by_device(f[name], name)
    assert last["plc1"] == pytest.approx(NOW - 1.0)
    assert last["ble1"] == 0  # never
    for s in f["fogmesh_device_polls"].samples:
        device_type = next(d.type for d in view.devices if d.id == s.labels["device"])
        assert s.labels == {"device": s.labels["device"], "type": device_type}


def test_health_is_one_hot() -> None:
    view = FakeView()
    samples = parse(render(view))["fogmesh_device_health"].samples
    for d in view.devices:
        states = {s.labels["state"]: s.value for s in samples if s.labels["device"] == d.id}
        assert states == {h.value: float(h is d.health) for h in Health}


def test_latency_histogram() -> None:
    fam = parse(render(FakeView()))["fogmesh_device_poll_latency_seconds"]
    name = "fogmesh_device_poll_latency_seconds"
    buckets = [
        (s.labels["le"], s.value)
        for s in fam.samples
        if s.name == f"{name}_bucket" and s.labels["device"] == "plc1"
    ]
    assert [le for le, _ in buckets] == [repr(b) for b in DEFAULT_BUCKETS_S] + ["+Inf"]
    counts = dict(buckets)
    # Observations: 0.4 ms, 3 ms, 3 ms, 300 ms, 30 s.
    assert (counts["0.0005"], counts["0.002"], counts["0.005"], counts["0.2"]) == (1, 1, 3, 3)
    assert (counts["0.5"], counts["10.0"], counts["+Inf"]) == (4, 4, 5)
    assert value(fam, f"{name}_count", device="plc1", type="modbus_tcp") == 5
    assert value(fam, f"{name}_sum", device="plc1", type="modbus_tcp") == pytest.approx(30.3064)
    assert value(fam, f"{name}_count", device="ble1", type="ble") == 0


def test_uplink_and_queue() -> None:
    f = parse(render(FakeView()))

    def one(family: str, sample: str | None = None) -> float:
        return value(f[family], sample or family)

    assert one("fogmesh_uplink_connected") == 1
    assert one("fogmesh_queue_depth_messages") == 12
    assert one("fogmesh_queue_backlog_messages") == 10
    assert one("fogmesh_queue_last_seq") == 512
    assert one("fogmesh_uplink_sent", "fogmesh_uplink_sent_total") == 600
    assert one("fogmesh_uplink_acked", "fogmesh_uplink_acked_total") == 588
    assert one("fogmesh_uplink_reconnects", "fogmesh_uplink_reconnects_total") == 3
    last_ack = one("fogmesh_uplink_last_ack_timestamp_seconds")
    assert last_ack == pytest.approx(NOW - 0.5)
    drops = {s.labels["reason"]: s.value for s in f["fogmesh_queue_drops"].samples}
    assert drops == {"drop_oldest": 4, "reject_new": 0, "expired": 1}  # policy reasons always
    info = f["fogmesh_gateway_info"].samples[0]
    assert (info.labels, info.value) == ({"site": "plant-a", "gateway": "gw-1"}, 1)
    assert one("fogmesh_gateway_start_time_seconds") == pytest.approx(NOW - 100.0)


def test_uplink_never_acked_exports_zero() -> None:
    view = FakeView()
    view.uplink = UplinkStats()
    f = parse(render(view))
    assert (
        value(
            f["fogmesh_uplink_last_ack_timestamp_seconds"],
            "fogmesh_uplink_last_ack_timestamp_seconds",
        )
        == 0
    )
    assert value(f["fogmesh_uplink_connected"], "fogmesh_uplink_connected") == 0


def test_extra_counters_keep_their_help() -> None:
    f = parse(render(FakeView()))
    dropped = f["fogmesh_bus_dropped_samples"]
    assert dropped.documentation == "Samples dropped.\nSee \\docs."
    assert value(dropped, "fogmesh_bus_dropped_samples_total") == 7
    assert value(f["fogmesh_bus_depth_samples"], "fogmesh_bus_depth_samples") == 3.5


def test_odd_device_id_round_trips() -> None:
    text = render(FakeView())
    assert 'device="pump \\"7\\"\\\\east\\nline"' in text
    f = parse(text)
    assert ODD_ID in by_device(f["fogmesh_device_up"], "fogmesh_device_up")
    fam = f["fogmesh_device_poll_latency_seconds"]
    assert any(s.labels.get("device") == ODD_ID for s in fam.samples)


def test_every_family_has_help_and_type_and_is_contiguous() -> None:
    lines = render(FakeView()).splitlines()
    helps = [ln.split(" ")[2] for ln in lines if ln.startswith("# HELP ")]
    types = [ln.split(" ")[2] for ln in lines if ln.startswith("# TYPE ")]
    assert helps == types  # HELP then TYPE, once per family, in the same order
    assert len(set(types)) == len(types)
    current = None
    seen: set[str] = set()
    for ln in lines:
        if ln.startswith("# TYPE "):
            current = ln.split(" ")[2]
            assert current not in seen
            seen.add(current)
        elif not ln.startswith("#"):
            name = ln.split("{")[0].split(" ")[0]
            assert current is not None
            assert name == current or name.removeprefix(current) in {"_bucket", "_sum", "_count"}


def test_escaping_and_formatting() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'  # quotes stay as they are in HELP
    assert format_value(float("nan")) == "NaN"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(-float("inf")) == "-Inf"
    assert format_value(True) == "1"
    assert format_value(False) == "0"
    assert format_value(12) == "12"
    assert format_value(0.0005) == "0.0005"
    assert format_value(1e21) == "1e+21"


def test_non_finite_values_are_valid_exposition() -> None:
    view = FakeView()
    view.extra = [Counter("fogmesh_weird", "h", "gauge", float("nan"))]
    view.devices[0].poll_latency.sum_s = float("inf")
    f = parse(render(view))
    assert value(f["fogmesh_weird"], "fogmesh_weird") != value(f["fogmesh_weird"], "fogmesh_weird")
    fam = f["fogmesh_device_poll_latency_seconds"]
    name = "fogmesh_device_poll_latency_seconds_sum"
    assert value(fam, name, device="plc1", type="modbus_tcp") == float("inf")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(main())


def test_metrics_over_http() -> None:
    def scrape(addr: tuple[str, int]) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection(*addr, timeout=5)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
        finally:
            conn.close()

    async def go() -> None:
        async with ApiServer(FakeView(), "127.0.0.1", 0) as api:
            status, ctype, text = await asyncio.to_thread(scrape, api.address)
        assert status == 200
        assert ctype == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert set(parse(text)) == set(EXPECTED_TYPES)

    run(go())
