"""The opcua adapter against real asyncua servers on 127.0.0.1: subscriptions with timestamps and
quality, polling, node resolution, writes, a server restart and a frozen server under the
supervisor, Basic256Sha256 with generated certificates, user names, and unusable values.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import asyncua.ua
import pytest
from asyncua.client.ua_session import UaSession

from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError, DeviceTimeout
from gateway.model import Health, Quality, Sample
from gateway.supervisor import DeviceService
from hil_tests.retrofit_adapters.opcua_server import (
    BROWSE_PREFIX,
    SERVER_URI,
    CertPair,
    OpcUaTestServer,
    free_port,
    make_cert_pair,
)
from retrofit_adapters.base import CAP_READ, CAP_SUBSCRIBE, CAP_WRITE, Reading
from retrofit_adapters.opcua.adapter import OpcUaAdapter
from retrofit_adapters.opcua.config import OpcUaDevice

_T = TypeVar("_T")
ua: Any = asyncua.ua  # asyncua's annotations do not pass strict mypy
TEST_TIMEOUT_S = 20.0
UTC = dt.UTC


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    async def bounded() -> _T:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            return await coro

    return asyncio.run(bounded())


def device(endpoint: str, tags: list[dict[str, Any]], **kw: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "id": "pump1",
        "type": "opcua",
        "endpoint": endpoint,
        "period_ms": 100,
        "timeout_ms": 2000,
        "publishing_interval_ms": 50,
        "keepalive_s": 1,
        "tags": tags,
    }
    data.update(kw)
    return OpcUaDevice.model_validate(data)


def tag(name: str, node: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "node": node, **kw}


FLOW = tag("flow", "ns=2;s=Pump1.Flow")
LEVEL = tag("level", "ns=2;i=1001")


async def collect(
    adapter: OpcUaAdapter,
    until: Callable[[list[Reading]], bool],
    within_s: float = 5.0,
) -> list[Reading]:
    """Read every 50 ms until `until(all readings so far)` holds; fail after `within_s`."""
    got: list[Reading] = []
    deadline = time.monotonic() + within_s
    while True:
        got += await adapter.read()
        if until(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s} s; got {got}")
        await asyncio.sleep(0.05)


def values(readings: list[Reading], name: str) -> list[Any]:
    return [r.value for r in readings if r.tag == name]


def has(name: str, value: Any) -> Callable[[list[Reading]], bool]:
    return lambda rs: value in values(rs, name)


async def wait_for(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def server() -> Iterator[OpcUaTestServer]:
    with OpcUaTestServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPair]:
    d = tmp_path_factory.mktemp("pki")
    return {
        "server": make_cert_pair(d, "server", SERVER_URI),
        "client": make_cert_pair(d, "gateway", "urn:fogmesh:gateway:test"),
        "client_der": make_cert_pair(d, "gateway-der", "urn:fogmesh:gateway:der", der=True),
        "stranger": make_cert_pair(d, "stranger", "urn:someone:else"),
    }


@pytest.fixture(scope="module")
def secure_server(certs: dict[str, CertPair]) -> Iterator[OpcUaTestServer]:
    with OpcUaTestServer(
        security=("Sign", "SignAndEncrypt"),
        certificate=certs["server"],
        trusted_clients=[certs["client"], certs["client_der"]],
    ) as srv:
        yield srv


# --- contract ------------------------------------------------------------------------------


def test_declares_the_contract() -> None:
    assert OpcUaAdapter.type_name == "opcua"
    assert OpcUaAdapter.config_model is OpcUaDevice
    assert OpcUaAdapter.capabilities == {CAP_READ, CAP_WRITE, CAP_SUBSCRIBE}
    adapter = OpcUaAdapter(device("opc.tcp://127.0.0.1:1", [FLOW, LEVEL]))  # no I/O here
    assert adapter.tag_names() == ["flow", "level"]
    with pytest.raises(TypeError):
        OpcUaAdapter(DeviceBase(id="x"))


def test_construction_refusals() -> None:
    dup = device("opc.tcp://127.0.0.1:1", [FLOW, tag("flow", "i=2258")])
    with pytest.raises(DeviceError, match=r"duplicate tag 'flow'"):
        OpcUaAdapter(dup)
    with_pw = device("opc.tcp://127.0.0.1:1", [FLOW], username="op", password={"env": "PW"})
    with pytest.raises(DeviceError, match=r"`password` is configured but was not passed"):
        OpcUaAdapter(with_pw)
    OpcUaAdapter(with_pw, password="pw")


def test_unreachable_server_and_close_after_failed_open() -> None:
    adapter = OpcUaAdapter(device(f"opc.tcp://127.0.0.1:{free_port()}", [FLOW]))

    async def body() -> None:
        with pytest.raises(DeviceError) as exc:
            await adapter.open()
        assert str(exc.value) == f"connect to {adapter._dev.endpoint}: connection refused"
        assert isinstance(exc.value.__cause__, ConnectionRefusedError)
        await adapter.close()
        await adapter.close()  # idempotent
        with pytest.raises(DeviceError, match=r"^not connected$"):
            await adapter.read()

    run(body())


# --- subscribe ----------------------------------------------------------------------------


def test_subscribe_delivers_initial_values_with_timestamps_and_quality(
    server: OpcUaTestServer,
) -> None:
    stamp = dt.datetime(2031, 5, 6, 7, 8, 9, 500000, tzinfo=UTC)
    server.set("Level", 2.5, source_ts=stamp)
    tags = [
        LEVEL,
        tag("pressure", "ns=2;s=Pump1.Pressure"),
        tag("running", "ns=2;s=Pump1.Running"),
        tag("starts", "ns=2;s=Pump1.Starts"),
        tag("total", "ns=2;s=Pump1.Total"),
        tag("serial", "ns=2;s=Pump1.Serial"),
        tag("serviced", "ns=2;s=Pump1.Serviced"),
    ]
    adapter = OpcUaAdapter(device(server.endpoint, tags))

    async def body() -> list[Reading]:
        async with adapter:
            return await collect(adapter, lambda rs: len({r.tag for r in rs}) == len(tags))

    got = {r.tag: r for r in run(body())}
    assert got["level"] == Reading("level", 2.5, Quality.GOOD, stamp.timestamp())
    assert got["pressure"].value == 4.0 and isinstance(got["pressure"].value, float)
    assert got["running"].value is True
    assert got["starts"].value == 7 and got["total"].value == 2**40
    assert got["serial"].value == "01ab"  # ByteString as hex
    assert got["serviced"].value == "2024-05-01T12:00:00+00:00"
    assert all(r.quality is Quality.GOOD and r.ts is not None for r in got.values())
    stamps = [r.ts for r in got.values() if r.tag != "level"]
    assert all(ts is not None and abs(ts - time.time()) < 60 for ts in stamps)


def test_subscribe_delivers_every_change_with_its_own_timestamp(server: OpcUaTestServer) -> None:
    adapter = OpcUaAdapter(device(server.endpoint, [FLOW]))
    t0 = dt.datetime(2030, 1, 1, tzinfo=UTC)
    changes = [41.0, 42.5, 40.25, 43.0, 39.5, 44.0]

    async def body() -> list[Reading]:
        async with adapter:
            await collect(adapter, lambda rs: bool(values(rs, "flow")))  # the initial value
            for i, v in enumerate(changes):
                await server.aset("Flow", v, source_ts=t0 + dt.timedelta(seconds=i))
            # several reads' worth arrives in one read: nothing is collapsed to the last value
            await asyncio.sleep(0.3)
            return await adapter.read()

    got = run(body())
    assert [r.value for r in got] == changes
    assert [r.ts for r in got] == [(t0 + dt.timedelta(seconds=i)).timestamp() for i in range(6)]


def test_quality_from_status_codes(server: OpcUaTestServer) -> None:
    adapter = OpcUaAdapter(device(server.endpoint, [tag("p", "ns=2;s=Pump1.Pressure")]))

    async def body() -> list[Reading]:
        async with adapter:
            await server.aset("Pressure", 4.0)
            await collect(adapter, has("p", 4.0))
            await server.aset("Pressure", 4.5, status=ua.StatusCodes.UncertainLastUsableValue)
            # A Bad DataValue carries no value (the server nulls it, as the spec says): it is
            # reported with the last value known, flagged BAD, so that the edge stage counts it.
            await server.aset("Pressure", 0.0, status=ua.StatusCodes.BadSensorFailure)
            await server.aset("Pressure", None, status=ua.StatusCodes.BadCommunicationError)
            await server.aset("Pressure", 4.125)
            return await collect(adapter, has("p", 4.125))

    got = [(r.value, r.quality) for r in run(body())]
    assert got[-4:] == [
        (4.5, Quality.UNCERTAIN),
        (4.5, Quality.BAD),
        (4.5, Quality.BAD),
        (4.125, Quality.GOOD),
    ]


def test_a_status_without_any_value_is_counted_not_invented(server: OpcUaTestServer) -> None:
    server.set("Trim", None, status=ua.StatusCodes.BadWaitingForInitialData)
    adapter = OpcUaAdapter(device(server.endpoint, [tag("trim", "ns=2;s=Pump1.Trim")]))

    async def body() -> list[Reading]:
        async with adapter:
            await wait_for(lambda: adapter.no_value_total == 1, 3, "no-value count")
            await server.aset("Trim", 0.25)
            return await collect(adapter, has("trim", 0.25))

    try:
        assert values(run(body()), "trim") == [0.25]
    finally:
        server.set("Trim", 0.5)


def test_server_deadband_filters_on_the_server(server: OpcUaTestServer) -> None:
    adapter = OpcUaAdapter(
        device(server.endpoint, [tag("level", "ns=2;i=1001", server_deadband=1.0)])
    )

    async def body() -> list[Reading]:
        async with adapter:
            await server.aset("Level", 2.5)
            await collect(adapter, has("level", 2.5))
            for v in (2.9, 4.0, 4.5, 6.0):  # 2.9 and 4.5 move less than 1.0
                await server.aset("Level", v)
            return await collect(adapter, has("level", 6.0))

    try:
        assert values(run(body()), "level") == [4.0, 6.0]
    finally:
        server.set("Level", 2.5)


def test_buffer_is_bounded_and_counts_overflow(server: OpcUaTestServer) -> None:
    adapter = OpcUaAdapter(device(server.endpoint, [FLOW]), max_buffered=3)

    async def body() -> list[Reading]:
        async with adapter:
            await collect(adapter, lambda rs: bool(rs))
            for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
                await server.aset("Flow", v)
            await wait_for(lambda: adapter.buffer_overflow_total == 3, 3, "overflow")
            return await adapter.read()

    assert values(run(body()), "flow") == [4.0, 5.0, 6.0]
    assert adapter.buffer_overflow_total == 3


# --- poll ----------------------------------------------------------------------------------


def test_poll_reads_every_node_in_one_read_call(server: OpcUaTestServer) -> None:
    server.set("Flow", 40.0)
    server.set("Level", 2.5)
    tags = [FLOW, LEVEL, tag("mode", "ns=2;s=Pump1.Mode"), tag("speed", "ns=2;s=Pump1.Speed")]
    adapter = OpcUaAdapter(device(server.endpoint, tags, mode="poll"))

    async def body() -> tuple[list[Reading], list[Reading], int]:
        async with adapter:
            assert adapter._subscription is None
            uaclient = adapter._client.uaclient
            calls = 0
            real = uaclient.read

            async def counting(params: Any) -> Any:
                nonlocal calls
                calls += 1
                return await real(params)

            uaclient.read = counting
            first = await adapter.read()
            await server.aset("Flow", 41.5, status=ua.StatusCodes.UncertainInitialValue)
            await server.aset("Flow", 42.5)
            second = await adapter.read()
            return first, second, calls

    first, second, calls = run(body())
    assert calls == 2
    assert [r.tag for r in first] == ["flow", "level", "mode", "speed"]
    assert [r.value for r in first] == [40.0, 2.5, "auto", 1500]
    assert all(r.quality is Quality.GOOD and r.ts is not None for r in first)
    assert values(second, "flow") == [42.5]  # polling sees the present value only


def test_requests_respect_the_servers_operation_limits(
    server: OpcUaTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PLC may take a few nodes per request only; it says so in its OperationLimits."""
    sizes: dict[str, list[int]] = {"translate": [], "monitor": []}
    translate = UaSession.translate_browsepaths_to_nodeids
    monitor = UaSession.create_monitored_items

    async def counting_translate(self: Any, paths: list[Any]) -> Any:
        sizes["translate"].append(len(paths))
        return await translate(self, paths)

    async def counting_monitor(self: Any, params: Any) -> Any:
        sizes["monitor"].append(len(params.ItemsToCreate))
        return await monitor(self, params)

    monkeypatch.setattr(UaSession, "translate_browsepaths_to_nodeids", counting_translate)
    monkeypatch.setattr(UaSession, "create_monitored_items", counting_monitor)
    names = ["Flow", "Pressure", "Running", "Starts", "Total"]
    tags = [tag(n.lower(), BROWSE_PREFIX + n) for n in names]
    limits = {"MaxNodesPerRead": 2, "MaxNodesPerTranslateBrowsePathsToNodeIds": 2}
    limits["MaxMonitoredItemsPerCall"] = 2
    for which, n in limits.items():
        server.set_operation_limit(which, n)

    async def body() -> tuple[list[Reading], list[Reading], dict[str, int]]:
        calls = {"read": 0}
        polled = OpcUaAdapter(device(server.endpoint, tags, mode="poll"))
        async with polled:
            uaclient = polled._client.uaclient
            read = uaclient.read

            async def counting(params: Any) -> Any:
                calls["read"] += 1
                assert len(params.NodesToRead) <= 2
                return await read(params)

            uaclient.read = counting
            polls = await polled.read()
        subscribed = OpcUaAdapter(device(server.endpoint, tags))
        async with subscribed:
            changes = await collect(subscribed, lambda rs: len(rs) == len(tags))
        return polls, changes, calls

    try:
        polls, changes, calls = run(body())
    finally:
        for which in limits:
            server.set_operation_limit(which, 10000)
    assert calls["read"] == 3  # 5 nodes, 2 at a time
    assert sizes == {"translate": [2, 2, 1, 2, 2, 1], "monitor": [2, 2, 1]}
    assert [r.tag for r in polls] == [t["name"] for t in tags]
    assert {r.tag for r in changes} == {t["name"] for t in tags}


def test_poll_raises_when_the_server_is_gone() -> None:
    with OpcUaTestServer() as srv:
        adapter = OpcUaAdapter(device(srv.endpoint, [FLOW], mode="poll"))

        async def body() -> DeviceError:
            await adapter.open()
            assert values(await adapter.read(), "flow") == [40.0]
            await srv.astop()
            try:
                with pytest.raises(DeviceError) as exc:
                    await adapter.read()
                return exc.value
            finally:
                await adapter.close()

        err = run(body())
    # the session noticed first, or the request met the closed socket
    assert str(err) in (
        "connection lost: the server closed the connection, or the network dropped it",
        "read: connection lost (Connection is closed)",
    )


# --- nodes ---------------------------------------------------------------------------------


def test_nodes_by_nodeid_browse_path_and_namespace_uri(server: OpcUaTestServer) -> None:
    server.set("Level", 2.5)
    tags = [
        tag("by_string", "ns=2;s=Pump1.Mode"),
        tag("by_number", "ns=2;i=1001"),
        tag("by_path", BROWSE_PREFIX + "Level"),
        tag("by_uri", "nsu=urn:fogmesh:test:plant;i=1001"),
        tag("server_state", "i=2259"),  # Server_ServerStatus_State, namespace 0
        tag("uri_path", "/Objects/Server/ServerStatus/BuildInfo/ProductUri"),
    ]
    adapter = OpcUaAdapter(device(server.endpoint, tags, mode="poll"))

    async def body() -> dict[str, Any]:
        async with adapter:
            return {r.tag: r.value for r in await adapter.read()}

    got = run(body())
    assert got["by_number"] == got["by_path"] == got["by_uri"] == 2.5
    assert got["by_string"] == "auto"
    assert got["server_state"] == 0  # Running, an enumeration as its integer
    assert got["uri_path"] == "urn:freeopcua.github.io:python:server"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            "ns=2;s=Pump1.Nope",
            "tag 'x': no node ns=2;s=Pump1.Nope (BadNodeIdUnknown (",
        ),
        (
            "/Objects/2:Plant/2:Flow",
            "tag 'x': no node at /Objects/2:Plant/2:Flow (BadNoMatch (",
        ),
        (
            "nsu=urn:nobody;s=Pump1.Flow",
            "tag 'x': the server has no namespace 'urn:nobody'",
        ),
        (
            "/Objects/2:Plant/2:Pump1",
            "tag 'x': node /Objects/2:Plant/2:Pump1 is an Object node, not a Variable",
        ),
    ],
)
def test_a_missing_node_fails_open_clearly(
    server: OpcUaTestServer, node: str, message: str
) -> None:
    adapter = OpcUaAdapter(device(server.endpoint, [FLOW, tag("x", node)]))

    async def body() -> DeviceError:
        with pytest.raises(DeviceError) as exc:
            await adapter.open()
        assert adapter._client is None  # the failed open closed its session itself
        with pytest.raises(DeviceError, match=r"^not connected$"):
            await adapter.read()
        await adapter.close()
        return exc.value

    assert str(run(body())).startswith(message)


# --- writes --------------------------------------------------------------------------------

WRITABLE = [
    FLOW,
    tag("sp", "ns=2;s=Pump1.Setpoint", writable=True, min=0, max=100),
    tag("speed", "ns=2;s=Pump1.Speed", writable=True),
    tag("trim", "ns=2;s=Pump1.Trim", writable=True),
    tag("enabled", "ns=2;s=Pump1.Enabled", writable=True),
    tag("mode", "ns=2;s=Pump1.Mode", writable=True),
    tag("locked", "ns=2;s=Pump1.Locked", writable=True),
    tag("curve", "ns=2;s=Pump1.Curve", writable=True),
    tag("stamp", "ns=2;s=Pump1.Stamp", writable=True),
]


def test_writes_convert_to_the_node_type_and_read_back(server: OpcUaTestServer) -> None:
    adapter = OpcUaAdapter(device(server.endpoint, WRITABLE))

    async def body() -> list[Reading]:
        async with adapter:
            await adapter.write("sp", 42)  # an int to a Double node
            await adapter.write("speed", 1200.0)  # an integral float to UInt16
            await adapter.write("trim", 0.75)
            await adapter.write("enabled", 1)  # 0/1 to Boolean
            await adapter.write("mode", "manual")
            return await collect(adapter, has("mode", "manual"))

    try:
        got = run(body())
        assert server.get("Setpoint") == 42.0
        assert server.get_variant_type("Setpoint") == ua.VariantType.Double
        assert server.get("Speed") == 1200
        assert server.get_variant_type("Speed") == ua.VariantType.UInt16
        assert (
            server.get("Trim") == 0.75 and server.get_variant_type("Trim") == ua.VariantType.Float
        )
        assert server.get("Enabled") is True
        # the subscription reports the written values back
        assert values(got, "sp")[-1] == 42.0 and values(got, "speed")[-1] == 1200
        assert values(got, "enabled")[-1] is True
    finally:
        server.set("Setpoint", 50.0)
        server.set("Speed", 1500)
        server.set("Mode", "auto")
        server.set("Enabled", False)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("flow", 1.0, "tag 'flow' is not writable"),
        ("nope", 1.0, "no tag 'nope'; tags are: flow, sp, speed, trim, enabled, mode, locked, "),
        ("sp", 100.5, "tag 'sp': 100.5 is out of range 0..100"),
        ("sp", -1, "tag 'sp': -1 is out of range 0..100"),
        ("sp", math.nan, "tag 'sp': nan is out of range 0..100"),
        ("sp", "50", "tag 'sp': expected a number within its limits, got str"),
        ("sp", True, "tag 'sp': expected a number within its limits, got bool"),
        (
            "speed",
            1.5,
            "tag 'speed': node type UInt16 needs an integer, got 1.5",
        ),
        (
            "speed",
            70000,
            "tag 'speed': 70000 does not fit node type UInt16 (0..65535)",
        ),
        (
            "speed",
            -1,
            "tag 'speed': -1 does not fit node type UInt16 (0..65535)",
        ),
        (
            "speed",
            "fast",
            "tag 'speed': node type UInt16 needs an integer, got 'fast'",
        ),
        ("trim", 1e39, "tag 'trim': 1e+39 does not fit node type Float"),
        ("trim", math.inf, "tag 'trim': inf does not fit node type Float"),
        (
            "enabled",
            2,
            "tag 'enabled': node type Boolean needs true or false, got 2",
        ),
        ("mode", 3, "tag 'mode': node type String needs a string, got 3"),
        ("curve", 1.0, "tag 'curve': the node holds an array; writing arrays is not supported"),
        (
            "stamp",
            "2024-01-01",
            "tag 'stamp': writing node type DateTime is not supported",
        ),
        ("locked", 2.0, "tag 'locked': the server refused the write: Bad"),
    ],
)
def test_writes_refused(server: OpcUaTestServer, name: str, value: Any, message: str) -> None:
    adapter = OpcUaAdapter(device(server.endpoint, WRITABLE))

    async def body() -> DeviceError:
        async with adapter:
            with pytest.raises(DeviceError) as exc:
                await adapter.write(name, value)
            return exc.value

    assert str(run(body())).startswith(message)
    assert server.get("Setpoint") == 50.0 and server.get("Locked") == 1.0


def test_write_needs_a_session_only_after_the_checks() -> None:
    adapter = OpcUaAdapter(device("opc.tcp://127.0.0.1:1", WRITABLE))

    async def body() -> None:
        with pytest.raises(DeviceError, match=r"^tag 'flow' is not writable$"):
            await adapter.write("flow", 1.0)
        with pytest.raises(DeviceError, match="out of range"):
            await adapter.write("sp", 500)
        with pytest.raises(DeviceError, match=r"^not connected$"):
            await adapter.write("sp", 5)

    run(body())


# --- unusable values -----------------------------------------------------------------------


def test_unexpected_values_never_crash_the_adapter(server: OpcUaTestServer) -> None:
    """What a broken or odd device might send, all on one node, under the supervisor: what
    can travel does, the rest becomes a BAD reading of the last value; no failure, no flapping."""
    tags = [tag("raw", "ns=2;s=Pump1.Raw"), tag("level", "ns=2;i=1001")]
    cfg = device(server.endpoint, tags)
    samples: list[Sample] = []
    adapters: list[OpcUaAdapter] = []

    async def publish(batch: list[Sample]) -> bool:
        samples.extend(batch)
        return True

    def factory(c: DeviceBase) -> OpcUaAdapter:
        adapters.append(OpcUaAdapter(c))
        return adapters[-1]

    def raw() -> list[tuple[Any, Quality]]:
        return [(s.value, s.quality) for s in samples if s.tag == "raw"]

    def more_than(n: int) -> bool:
        return len(raw()) > n

    sent: list[tuple[Any, Any]] = [  # (value, variant type)
        (math.nan, ua.VariantType.Double),
        ([1, 2], ua.VariantType.Int32),
        ("eight", ua.VariantType.String),
        (ua.LocalizedText("neun", "de"), ua.VariantType.LocalizedText),
        (ua.NodeId(5, 3), ua.VariantType.NodeId),
        (math.inf, ua.VariantType.Float),
        (None, None),  # a Good status without a value
        (dt.datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC), ua.VariantType.DateTime),
        (uuid.UUID(int=1), ua.VariantType.Guid),
        (ua.QualifiedName("Pump", 2), ua.VariantType.QualifiedName),
        (-(2**63), ua.VariantType.Int64),
    ]

    async def body() -> DeviceService:
        service = DeviceService(cfg, factory, publish)
        task = asyncio.create_task(service.run())
        try:
            await wait_for(lambda: (7, Quality.GOOD) in raw(), 5, "first sample")
            for value, variant in sent:
                # one at a time, so that each lands in a read of its own
                n = len(raw())
                await server.aset("Raw", value, variant=variant)
                await wait_for(partial(more_than, n), 3, f"reading of {value!r}")
            return service
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        service = run(body())
    finally:
        server.set("Raw", 7, variant=ua.VariantType.Int32)
    bad, good = Quality.BAD, Quality.GOOD
    assert raw() == [
        (7, good),
        (7, bad),  # NaN
        (7, bad),  # an array
        ("eight", good),
        ("neun", good),
        ("ns=3;i=5", good),
        ("ns=3;i=5", bad),  # inf
        ("ns=3;i=5", bad),  # nothing
        ("2024-02-03T04:05:06+00:00", good),
        ("00000000-0000-0000-0000-000000000001", good),
        ("2:Pump", good),
        (-(2**63), good),
    ]
    (adapter,) = adapters
    assert adapter.unusable_values_total == 4
    st = service.status
    assert (st.errors_total, st.bad_data_total, st.reconnects_total) == (0, 0, 0)
    assert st.health is Health.OK


# --- recovery ------------------------------------------------------------------------------


def test_subscription_resumes_after_a_server_restart_under_the_supervisor() -> None:
    """The top complaint about gateways: after the OPC-UA server restarts, values stop. Here
    the server goes away and comes back on the same port with a fresh address space; the same
    adapter, closed and reopened by its device service, delivers the new values."""
    samples: list[Sample] = []
    health: list[Health] = []

    async def publish(batch: list[Sample]) -> bool:
        samples.extend(batch)
        return True

    with OpcUaTestServer() as srv:
        cfg = device(
            srv.endpoint,
            [FLOW, LEVEL],
            supervisor={"backoff_initial_ms": 100, "backoff_max_ms": 400, "breaker_failures": 100},
        )
        adapters: list[OpcUaAdapter] = []

        def factory(c: DeviceBase) -> OpcUaAdapter:
            adapters.append(OpcUaAdapter(c))
            return adapters[-1]

        async def body() -> DeviceService:
            service = DeviceService(
                cfg, factory, publish, on_health=lambda st, old: health.append(st.health)
            )
            task = asyncio.create_task(service.run())
            try:
                await wait_for(lambda: any(s.value == 40.0 for s in samples), 5, "first value")
                await srv.aset("Flow", 41.0)
                await wait_for(lambda: any(s.value == 41.0 for s in samples), 5, "a change")
                await srv.astop()
                await wait_for(lambda: service.status.errors_total >= 1, 5, "loss noticed")
                # the loss, or already the first reconnect that found nobody listening
                assert service.status.last_error in (
                    "connection lost: the server closed the connection, or the network dropped it",
                    f"connect to {srv.endpoint}: connection refused",
                )
                await asyncio.sleep(0.5)  # a few reconnects fail: connection refused
                await srv.astart()
                await wait_for(lambda: service.status.reconnects_total >= 1, 10, "reconnect")
                await srv.aset("Flow", 77.0)
                await wait_for(lambda: any(s.value == 77.0 for s in samples), 5, "new value")
                return service
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        service = run(body())
    assert len(adapters) == 1  # one adapter, reopened
    assert srv.starts == 2
    assert service.status.reconnects_total >= 1
    assert Health.OK in health and Health.DEGRADED in health


def test_resubscribe_by_close_and_open(caplog: pytest.LogCaptureFixture) -> None:
    with OpcUaTestServer() as srv:
        adapter = OpcUaAdapter(device(srv.endpoint, [FLOW]))

        async def body() -> list[Reading]:
            await adapter.open()
            await collect(adapter, has("flow", 40.0))
            with caplog.at_level(logging.INFO, logger="asyncua"):
                caplog.clear()
                await srv.astop()
                with pytest.raises(DeviceError) as exc:
                    await collect(adapter, lambda rs: False, within_s=5)
                assert str(exc.value) == (
                    "connection lost: the server closed the connection, or the network dropped it"
                )
                await adapter.close()
                with pytest.raises(DeviceError, match="connection refused"):
                    await adapter.open()
                await adapter.close()
                await asyncio.sleep(1.1)  # asyncua's publish loop would retry once a second
            # no traceback at ERROR from asyncua's publish loop for an ordinary disconnect
            noise = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert noise == [], [r.getMessage() for r in noise]
            await srv.astart()
            await adapter.open()
            await srv.aset("Flow", 12.5)
            try:
                return await collect(adapter, has("flow", 12.5))
            finally:
                await adapter.close()

        assert values(run(body()), "flow")[-1] == 12.5


def test_a_frozen_server_is_noticed_by_the_keepalive() -> None:
    with OpcUaTestServer() as srv:
        adapter = OpcUaAdapter(device(srv.endpoint, [FLOW], keepalive_s=0.5))

        async def body() -> tuple[DeviceError, float, list[Reading]]:
            await adapter.open()
            await collect(adapter, has("flow", 40.0))
            srv.freeze(3.0)
            t0 = time.monotonic()
            with pytest.raises(DeviceError) as exc:
                await collect(adapter, lambda rs: False, within_s=5)
            noticed = time.monotonic() - t0
            t1 = time.monotonic()
            await adapter.close()  # does not wait for the frozen server
            assert time.monotonic() - t1 < 1.5
            await asyncio.sleep(max(0.0, 3.2 - (time.monotonic() - t0)))
            await adapter.open()
            try:
                return exc.value, noticed, await collect(adapter, has("flow", 40.0))
            finally:
                await adapter.close()

        err, noticed, after = run(body())
    assert noticed < 2.9  # before the server thawed
    text = str(err)
    assert "keep-alive" in text, text
    assert values(after, "flow") == [40.0]


def test_a_read_timeout_is_a_device_timeout() -> None:
    with OpcUaTestServer() as srv:
        adapter = OpcUaAdapter(device(srv.endpoint, [FLOW], mode="poll", timeout_ms=500))

        async def body() -> DeviceError:
            await adapter.open()
            srv.freeze(1.5)
            try:
                with pytest.raises(DeviceTimeout) as exc:
                    await adapter.read()
                return exc.value
            finally:
                await adapter.close()
                await asyncio.sleep(1.2)

        assert str(run(body())) == "read: no answer within 450 ms"


# --- security ------------------------------------------------------------------------------


def secure(srv: OpcUaTestServer, mode: str, pair: CertPair, **kw: Any) -> OpcUaDevice:
    sec = {
        "policy": "Basic256Sha256",
        "mode": mode,
        "certificate_file": str(pair.cert),
        "private_key_file": str(pair.key),
        **kw,
    }
    return device(srv.endpoint, [FLOW], mode="poll", security=sec)


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
def test_basic256sha256(
    secure_server: OpcUaTestServer, certs: dict[str, CertPair], mode: str
) -> None:
    pinned = secure(
        secure_server, mode, certs["client"], server_certificate_file=str(certs["server"].cert)
    )
    der = secure(secure_server, mode, certs["client_der"])

    async def body() -> list[Any]:
        out = []
        for cfg in (pinned, der):
            async with OpcUaAdapter(cfg) as adapter:
                out.append(values(await adapter.read(), "flow"))
                assert adapter._client.security_policy.Mode == getattr(ua.MessageSecurityMode, mode)
        return out

    assert run(body()) == [[40.0], [40.0]]


def test_security_refusals_are_clear(
    secure_server: OpcUaTestServer, certs: dict[str, CertPair], tmp_path: Path
) -> None:
    def opened(cfg: OpcUaDevice) -> str:
        adapter = OpcUaAdapter(cfg)

        async def body() -> str:
            with pytest.raises(DeviceError) as exc:
                await adapter.open()
            await adapter.close()
            assert exc.value.__cause__ is None or not isinstance(exc.value, DeviceTimeout)
            return str(exc.value)

        return run(body())

    prefix = f"connect to {secure_server.endpoint}: "
    # a client without certificates
    assert opened(device(secure_server.endpoint, [FLOW])) == prefix + (
        "the server offers no endpoint with security None/None (it offers "
        "Basic256Sha256/Sign, Basic256Sha256/SignAndEncrypt); set [devices.security] to one of them"
    )
    # a certificate the server does not trust
    assert opened(secure(secure_server, "Sign", certs["stranger"])) == prefix + (
        "BadCertificateUntrusted (The certificate is not trusted); the server does not trust "
        "the client certificate; add it to the server's trusted certificates"
    )
    # a server that is not the one pinned
    text = opened(
        secure(
            secure_server,
            "Sign",
            certs["client"],
            server_certificate_file=str(certs["stranger"].cert),
        )
    )
    assert text.startswith(
        prefix + "the server's certificate does not match `server_certificate_file` "
        "(the server presents O=fogmesh tests,CN=server, SHA-1 thumbprint "
    )
    # files that are not there or not what they should be
    missing = tmp_path / "missing.der"
    assert opened(secure(secure_server, "Sign", CertPair(missing, certs["client"].key, ""))) == (
        prefix + f"security.certificate_file '{missing}': No such file or directory"
    )
    assert (
        opened(
            secure(secure_server, "Sign", CertPair(certs["client"].key, certs["client"].key, ""))
        )
        == prefix
        + f"security.certificate_file '{certs['client'].key}': "
        + "not an X.509 certificate (PEM or DER)"
    )


def test_user_name_and_password(caplog: pytest.LogCaptureFixture) -> None:
    with OpcUaTestServer(users={"operator": "s3cret"}) as srv:

        def attempt(secret: str | None, **kw: Any) -> str:
            cfg = device(srv.endpoint, [FLOW], mode="poll", **kw)
            adapter = OpcUaAdapter(cfg, password=secret)

            async def body() -> str:
                try:
                    async with adapter:
                        return f"ok {values(await adapter.read(), 'flow')}"
                except DeviceError as exc:
                    return str(exc)

            return run(body())

        prefix = f"connect to {srv.endpoint}: "
        user = {"username": "operator", "password": {"env": "PW"}}
        with caplog.at_level(logging.WARNING, logger="fogmesh.opcua"):
            assert attempt("s3cret", **user) == "ok [40.0]"
        assert [r.getMessage() for r in caplog.records if r.name == "fogmesh.opcua"] == [
            "device pump1: the password travels unencrypted on this endpoint; use security "
            "Basic256Sha256 with mode SignAndEncrypt"
        ]
        assert attempt("wrong", **user) == prefix + (
            "BadUserAccessDenied (User does not have permission to perform the requested "
            "operation); check `username` and `password`"
        )
        assert attempt(None) == prefix + (
            "the server refuses anonymous sessions (it accepts UserName); set `username` and "
            "`password`"
        )
