"""The Modbus TCP adapter against real pymodbus servers on loopback: every type in every byte
order read and written back, hand-computed vectors, coalesced requests counted at the server,
per-tag periods, exception responses, malformed responses through a mangling proxy, a server
restart under the supervisor, and devices sharing one endpoint through one connection owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.errors import BadData, DeviceError, DeviceTimeout, FogmeshError
from gateway.model import Health, Sample
from gateway.supervisor import DeviceService
from hil_tests.aio import eventually, run
from retrofit_adapters.base import CAP_READ, CAP_WRITE, Reading
from retrofit_adapters.modbus.adapter import ModbusTcpAdapter
from retrofit_adapters.modbus.codec import encode_tag
from retrofit_adapters.modbus.config import ModbusTag, ModbusTcpDevice
from retrofit_adapters.modbus.plan import plan_reads
from retrofit_adapters.modbus.transport import acquire, owners, tcp_endpoint
from tools.net import free_port

HOST = "127.0.0.1"
SIZE = 400  # registers per table; bits per bit table (a multiple of 16)
ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
# (type, value read first, value written after): signed values negative, extremes included
VALUES: list[tuple[str, Any, Any]] = [
    ("int16", -12345, 321),
    ("uint16", 54321, 7),
    ("int32", -123456789, 2_000_000_001),
    ("uint32", 3_000_000_000, 17),
    ("int64", -(2**62) + 12345, 2**53 + 1),
    ("uint64", 2**64 - 2, 12_345_678_901_234_567),
    ("float32", 123.456, -0.15625),
    ("float64", -1234.5678901234, 6.02214076e23),
    ("string(9)", "PUMP-7A", "fogmesh"),
    ("bool", True, False),
]


class Server:
    """A pymodbus TCP server on loopback with units 1.. holding SIZE registers/bits per table,
    logging every request it receives (unit, function code, address, count)."""

    def __init__(self, port: int, units: tuple[int, ...] = (1,)) -> None:
        self.port = port
        self.units = units
        self.requests: list[tuple[int, int, int, int]] = []
        self.connections = 0
        self._server: ModbusTcpServer | None = None

    def _device(self, unit: int) -> SimDevice:
        def bits() -> list[SimData]:
            return [SimData(0, count=SIZE, values=False, datatype=DataType.BITS)]

        def regs() -> list[SimData]:
            return [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(id=unit, simdata=(bits(), bits(), regs(), regs()))

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append((pdu.dev_id, pdu.function_code, pdu.address, pdu.count))
        return pdu

    def _trace_connect(self, connected: bool) -> None:
        self.connections += connected

    async def start(self) -> Server:
        self._server = ModbusTcpServer(
            [self._device(u) for u in self.units],
            address=(HOST, self.port),
            trace_pdu=self._trace_pdu,
            trace_connect=self._trace_connect,
        )
        await self._server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
            await asyncio.sleep(0.05)  # let the closed connections reach the clients

    @property
    def live(self) -> ModbusTcpServer:
        assert self._server is not None
        return self._server

    # The server's datastore API, for setting up and checking values without a request.
    async def set(
        self, unit: int, table: str, address: int, values: list[int] | list[bool]
    ) -> None:
        fc = {"holding": 16, "input": 4, "coil": 15, "discrete": 2}[table]
        await self.live.async_setValues(unit, fc, address, values)

    async def get(self, unit: int, table: str, address: int, count: int) -> list[Any]:
        fc = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}[table]
        return list(await self.live.async_getValues(unit, fc, address, count))

    def reads(self) -> list[tuple[int, int, int, int]]:
        return [r for r in self.requests if r[1] in (1, 2, 3, 4)]


class ManglingProxy:
    """A Modbus TCP proxy in front of a server that replaces the next responses with what
    `mangles` make of them (b"" sends nothing); counts the connections it accepts."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mangles: list[Callable[[bytes], bytes]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.close()  # the handlers see EOF and end by themselves
            await eventually(lambda: not self._writers)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        up_r, up_w = await asyncio.open_connection(HOST, self.upstream_port)
        try:
            while True:
                up_w.write(await _frame(reader))
                response = await _frame(up_r)
                if self.mangles:
                    response = self.mangles.pop(0)(response)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_w.close()
            writer.close()
            self._writers.discard(writer)


async def _frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(6)
    return head + await reader.readexactly(int.from_bytes(head[4:6], "big"))


def _with_pdu(frame: bytes, pdu: bytes) -> bytes:
    """The frame's MBAP header (length fixed up) around another PDU."""
    return frame[:4] + (len(pdu) + 1).to_bytes(2, "big") + frame[6:7] + pdu


def device(port: int, tags: list[dict[str, Any]], **kw: Any) -> ModbusTcpDevice:
    return ModbusTcpDevice.model_validate(
        {
            "id": kw.pop("id", "plc1"),
            "type": "modbus_tcp",
            "host": HOST,
            "port": port,
            "tags": tags,
            **kw,
        }
    )


def health(service: DeviceService) -> Health:
    return service.status.health  # a call, so that mypy does not pin it across awaits


def values_of(readings: list[Reading]) -> dict[str, Any]:
    return {r.tag: r.value for r in readings}


def type_order_tags() -> list[dict[str, Any]]:
    tags: list[dict[str, Any]] = []
    address = 0
    for dtype, _, _ in VALUES:
        for order in ORDERS:
            name = f"{dtype.replace('(', '').replace(')', '')}_{order}"
            tags.append(
                {"name": name, "address": address, "type": dtype, "order": order, "writable": True}
            )
            address += ModbusTag.model_validate(tags[-1]).register_count() + 1
    return tags


# --- contract ------------------------------------------------------------------------------


def test_contract_metadata_and_no_io_in_init() -> None:
    assert ModbusTcpAdapter.type_name == "modbus_tcp"
    assert ModbusTcpAdapter.config_model is ModbusTcpDevice
    assert ModbusTcpAdapter.capabilities == frozenset({CAP_READ, CAP_WRITE})
    cfg = device(free_port(), [{"name": "a", "address": 0}, {"name": "b", "address": 1}])
    adapter = ModbusTcpAdapter(cfg)  # nothing listens there: construction must still succeed
    assert adapter.tag_names() == ["a", "b"]
    assert adapter.owner is None

    async def main() -> None:
        with pytest.raises(DeviceError, match="not open"):
            await adapter.read()
        await adapter.close()  # idempotent before any open

    run(main())


# --- values --------------------------------------------------------------------------------


def test_every_type_and_order_reads_encoded_values_and_writes_read_back_identically() -> None:
    port = free_port()
    tags = type_order_tags()
    first = {
        t["name"]: v1
        for t, (_, v1, _) in zip(tags, [v for v in VALUES for _ in ORDERS], strict=True)
    }
    second = {
        t["name"]: v2
        for t, (_, _, v2) in zip(tags, [v for v in VALUES for _ in ORDERS], strict=True)
    }
    cfg = device(port, tags)
    by_name = {t.name: t for t in cfg.tags}

    async def main() -> None:
        server = await Server(port).start()
        try:
            for name, tag in by_name.items():
                regs = encode_tag(tag, first[name])
                await server.set(1, "holding", tag.offset_address(0), list(regs))
            async with ModbusTcpAdapter(cfg) as adapter:
                assert values_of(await adapter.read()) == first
                for name, value in second.items():
                    await adapter.write(name, value)
                assert values_of(await adapter.read()) == second
                # On the wire, a write lays out exactly what the codec encodes (and reads decode).
                for name, tag in by_name.items():
                    n = tag.register_count()
                    raw = await server.get(1, "holding", tag.offset_address(0), n)
                    assert raw == encode_tag(tag, second[name]), name
            # 16-bit values go out with FC6, wider ones with FC16.
            writes = [r for r in server.requests if r[1] in (6, 16)]
            single = {r[2] for r in writes if r[1] == 6}
            multi = {r[2] for r in writes if r[1] == 16}
            assert single == {
                by_name[n].offset_address(0) for n in by_name if by_name[n].register_count() == 1
            }
            assert multi == {
                by_name[n].offset_address(0) for n in by_name if by_name[n].register_count() > 1
            }
        finally:
            await server.stop()

    run(main())


# Hand-computed from the IEEE 754 and two's complement layouts, independent of the codec:
# e.g. 230.0 V as float32 is 0x43660000, which a meter with low word first (CDAB) sends as
# 0x0000 0x4366.
HAND_VECTORS: list[tuple[dict[str, Any], list[int], Any]] = [
    ({"type": "float32", "order": "ABCD"}, [0x4366, 0x0000], 230.0),
    ({"type": "float32", "order": "CDAB"}, [0x0000, 0x4366], 230.0),
    ({"type": "float32", "order": "CDAB"}, [0xE979, 0x42F6], 123.456),
    ({"type": "float32", "order": "BADC"}, [0xF642, 0x79E9], 123.456),
    ({"type": "float32", "order": "DCBA"}, [0x79E9, 0xF642], 123.456),
    ({"type": "float64", "order": "ABCD"}, [0x4009, 0x21FB, 0x5444, 0x2D18], 3.141592653589793),
    ({"type": "int32", "order": "CDAB"}, [0x5678, 0x1234], 0x12345678),
    ({"type": "int32", "order": "ABCD"}, [0xFFFF, 0xFFFE], -2),
    ({"type": "uint32", "order": "DCBA"}, [0x7856, 0x3412], 0x12345678),
    ({"type": "int16"}, [0xFF85], -123),
    ({"type": "uint16", "scale": 0.1}, [2345], 234.5),
    ({"type": "int16", "scale": 0.01, "offset": -40.0}, [0x1388], 10.0),
    ({"type": "string(4)", "order": "ABCD"}, [0x4142, 0x4344], "ABCD"),
    ({"type": "string(4)", "order": "BADC"}, [0x4241, 0x4443], "ABCD"),
    ({"type": "uint16", "bit": 2}, [0b1010_0000_0000_0101], True),
    ({"type": "uint16", "bit": 1}, [0b1010_0000_0000_0101], False),
]


def test_hand_computed_vectors_from_input_registers() -> None:
    port = free_port()
    tags = []
    raw: list[tuple[int, list[int]]] = []
    address = 10
    for i, (spec, regs, _) in enumerate(HAND_VECTORS):
        tags.append({"name": f"v{i}", "table": "input", "address": address, **spec})
        raw.append((address, regs))
        address += len(regs) + 3
    cfg = device(port, tags)

    async def main() -> None:
        server = await Server(port).start()
        try:
            for addr, regs in raw:
                await server.set(1, "input", addr, regs)
            async with ModbusTcpAdapter(cfg) as adapter:
                got = values_of(await adapter.read())
            assert got == {f"v{i}": v for i, (_, _, v) in enumerate(HAND_VECTORS)}
            assert {r[1] for r in server.reads()} == {4}
        finally:
            await server.stop()

    run(main())


def test_coils_discretes_and_register_bits_read_and_write() -> None:
    port = free_port()
    tags = [
        {"name": "run", "table": "coil", "address": 3, "writable": True},
        {"name": "alarm", "table": "discrete", "address": 17},
        {"name": "b0", "address": 20, "bit": 0, "writable": True},
        {"name": "b9", "address": 20, "bit": 9, "writable": True},
        {"name": "b9_swapped", "address": 21, "bit": 9, "order": "BADC", "writable": True},
        {"name": "word", "address": 20, "type": "uint16"},
    ]
    cfg = device(port, tags)

    async def main() -> None:
        server = await Server(port).start()
        try:
            await server.set(1, "discrete", 17, [True])
            await server.set(1, "holding", 20, [0x8001, 0x0000])
            async with ModbusTcpAdapter(cfg) as adapter:
                got = values_of(await adapter.read())
                assert got == {
                    "run": False,
                    "alarm": True,
                    "b0": True,
                    "b9": False,
                    "b9_swapped": False,
                    "word": 0x8001,
                }
                await adapter.write("run", True)
                await adapter.write("b9", True)
                await adapter.write("b0", False)
                await adapter.write("b9_swapped", True)
                got = values_of(await adapter.read())
            # Read-modify-write keeps the other bits: 0x8001 -> 0x8200; BADC bit 9 is wire bit 1.
            assert await server.get(1, "holding", 20, 2) == [0x8200, 0x0002]
            assert await server.get(1, "coil", 3, 1) == [True]
            assert got["run"] is True and got["b9"] is True and got["b0"] is False
            assert got["b9_swapped"] is True and got["word"] == 0x8200
            fcs = [r[1] for r in server.requests if r[1] not in (1, 2)]
            # each bit write: FC3 of the one register, then FC6
            assert fcs.count(5) == 1 and fcs.count(6) == 3 and 16 not in fcs
        finally:
            await server.stop()

    run(main())


def test_owner_writes_several_coils_with_fc15_and_registers_with_fc16() -> None:
    port = free_port()

    async def main() -> None:
        server = await Server(port).start()
        owner = acquire(tcp_endpoint(HOST, port))
        try:
            await owner.write_coils(1, 8, [True, False, True], 1.0, 0)
            await owner.write_registers(1, 30, [1, 2, 3], 1.0, 0)
            assert await server.get(1, "coil", 8, 3) == [True, False, True]
            assert await server.get(1, "holding", 30, 3) == [1, 2, 3]
            assert [r[1] for r in server.requests] == [15, 16]
        finally:
            owner.release()
            await server.stop()
        assert owners() == {}

    run(main())


# --- requests ------------------------------------------------------------------------------


def test_reads_are_coalesced_as_planned_and_counted_at_the_server() -> None:
    port = free_port()
    tags = [
        {"name": "h0", "address": 0},
        {"name": "h1", "address": 1},
        {"name": "h2", "address": 2, "type": "float32"},
        {"name": "h10", "address": 10, "type": "int16"},
        {"name": "h100", "address": 100},
        {"name": "i0", "table": "input", "address": 0},
        {"name": "i5", "table": "input", "address": 5, "type": "int32"},
        {"name": "c0", "table": "coil", "address": 0},
        {"name": "c3", "table": "coil", "address": 3},
        {"name": "c7", "table": "coil", "address": 7},
        {"name": "d1", "table": "discrete", "address": 1},
    ]
    cfg = device(port, tags)
    planned = [
        (1, {"holding": 3, "input": 4, "coil": 1, "discrete": 2}[r.table], r.start, r.count)
        for r in plan_reads(cfg.tags, 0, cfg.limits)
    ]
    # 11 tags, 5 requests: holding 0..10, holding 100, input 0..6, coils 0..7, discrete 1
    assert len(planned) == 5

    async def main() -> None:
        server = await Server(port).start()
        try:
            async with ModbusTcpAdapter(cfg) as adapter:
                for _ in range(3):
                    assert len(await adapter.read()) == len(tags)
            assert server.reads() == planned * 3
        finally:
            await server.stop()

    run(main())


def test_tags_with_their_own_period_are_read_only_when_due() -> None:
    port = free_port()
    tags = [
        {"name": "fast", "address": 0},
        {"name": "slow", "address": 200, "period_ms": 3000},
    ]
    cfg = device(port, tags, period_ms=1000)
    now = [0.0]

    async def main() -> None:
        server = await Server(port).start()
        try:
            async with ModbusTcpAdapter(cfg, clock=lambda: now[0]) as adapter:
                seen = []
                # the supervisor's grid jitters: a poll a little early still finds the tag due
                for t in (0.0, 1.0, 2.0, 2.98, 4.0, 5.0, 6.01, 7.0):
                    now[0] = t
                    seen.append(sorted(values_of(await adapter.read())))
            assert seen == [
                ["fast", "slow"],
                ["fast"],
                ["fast"],
                ["fast", "slow"],
                ["fast"],
                ["fast"],
                ["fast", "slow"],
                ["fast"],
            ]
            slow_reads = [r for r in server.reads() if r[2] == 200]
            assert len(slow_reads) == 3 and len(server.reads()) == 8 + 3
        finally:
            await server.stop()

    run(main())


# --- failures ------------------------------------------------------------------------------


def test_exception_response_is_a_device_error_naming_the_code_and_range() -> None:
    port = free_port()
    cfg = device(
        port,
        [
            {"name": "ok", "address": 0},
            {"name": "beyond", "address": SIZE + 100, "type": "float32"},
        ],
        limits={"max_gap": 0},
    )

    async def main() -> None:
        server = await Server(port).start()
        try:
            async with ModbusTcpAdapter(cfg) as adapter:
                with pytest.raises(DeviceError) as info:
                    await adapter.read()
                assert type(info.value) is DeviceError
                assert str(info.value) == (
                    f"illegal data address (2) reading holding {SIZE + 100}..{SIZE + 101} on unit 1"
                )
                with pytest.raises(DeviceError, match=r"illegal data address \(2\)"):
                    await _write(adapter)
        finally:
            await server.stop()

    async def _write(adapter: ModbusTcpAdapter) -> None:
        owner = adapter.owner
        assert owner is not None
        await owner.write_registers(1, SIZE + 5, [1], 1.0, 0)

    run(main())


def test_unknown_and_non_writable_tags_and_bad_values_are_refused_before_any_request() -> None:
    port = free_port()
    cfg = device(
        port,
        [
            {"name": "ro", "address": 0},
            {"name": "sp", "address": 1, "type": "int16", "writable": True, "min": 0, "max": 100},
            {"name": "bit", "address": 2, "bit": 3, "writable": True},
        ],
    )

    async def main() -> None:
        server = await Server(port).start()
        try:
            async with ModbusTcpAdapter(cfg) as adapter:
                with pytest.raises(DeviceError, match="has no tag 'nope'"):
                    await adapter.write("nope", 1)
                with pytest.raises(DeviceError, match=r"^tag 'ro' is not writable$"):
                    await adapter.write("ro", 1)
                with pytest.raises(DeviceError, match="out of range"):
                    await adapter.write("sp", 101)
                with pytest.raises(DeviceError, match="true or false"):
                    await adapter.write("bit", 7)
                assert server.requests == []
                await adapter.write("sp", 42)
                assert [r[1] for r in server.requests] == [6]
        finally:
            await server.stop()

    run(main())


MANGLES: list[tuple[str, Callable[[bytes], bytes], type[DeviceError], str]] = [
    # a register short: byte count and data agree, but it is not what was asked
    (
        "short",
        lambda f: _with_pdu(f, b"\x03\x02" + f[9:11]),
        BadData,
        "1 registers in the response",
    ),
    ("long", lambda f: _with_pdu(f, b"\x03\x06" + f[9:13] + b"\x00\x01"), BadData, "3 registers"),
    ("wrong function", lambda f: _with_pdu(f, b"\x04" + f[8:]), BadData, "function code 4"),
    ("byte count past the end", lambda f: _with_pdu(f, b"\x03\xc8" + f[9:]), BadData, "malformed"),
    ("odd byte count", lambda f: _with_pdu(f, b"\x03\x03" + f[9:12]), BadData, "1 registers"),
    ("unknown function", lambda f: _with_pdu(f, b"\x42\x00"), BadData, "malformed"),
    ("protocol id", lambda f: f[:2] + b"\x00\x07" + f[4:], BadData, "not a Modbus TCP header"),
    ("exception", lambda f: _with_pdu(f, b"\x83\x04"), DeviceError, r"server device failure \(4\)"),
]


@pytest.mark.parametrize(
    ("case", "mangle", "error", "message"), MANGLES, ids=[m[0] for m in MANGLES]
)
def test_a_malformed_response_is_bad_data_and_the_next_read_works(
    case: str, mangle: Callable[[bytes], bytes], error: type[DeviceError], message: str
) -> None:
    port = free_port()

    async def main() -> None:
        server = await Server(port).start()
        await server.set(1, "holding", 0, [11, 22])
        proxy = ManglingProxy(port)
        cfg = device(
            await proxy.start(),
            [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
            timeout_ms=600,
        )
        try:
            async with ModbusTcpAdapter(cfg) as adapter:
                assert values_of(await adapter.read()) == {"a": 11, "b": 22}
                proxy.mangles.append(mangle)
                with pytest.raises(error, match=message) as info:
                    await adapter.read()
                if error is DeviceError:
                    assert type(info.value) is DeviceError
                for _ in range(3):
                    assert values_of(await adapter.read()) == {"a": 11, "b": 22}
        finally:
            await proxy.close()
            await server.stop()

    run(main())


def test_a_lost_response_is_retried_within_the_budget() -> None:
    port = free_port()

    async def main() -> None:
        server = await Server(port).start()
        await server.set(1, "holding", 0, [5])
        proxy = ManglingProxy(port)
        cfg = device(await proxy.start(), [{"name": "a", "address": 0}], timeout_ms=400)
        try:
            async with ModbusTcpAdapter(cfg) as adapter:
                proxy.mangles.append(lambda f: b"")
                started = time.monotonic()
                assert values_of(await adapter.read()) == {"a": 5}
                # the first attempt had 0.9 * 400 ms / 2 before the retry
                assert 0.15 <= time.monotonic() - started < 0.4
                assert len(server.reads()) == 2 and proxy.connections == 1
        finally:
            await proxy.close()
            await server.stop()

    run(main())


def test_a_connection_that_stays_silent_is_replaced() -> None:
    # A half-open connection (a PLC restarted without a RST) answers nothing; after two silent
    # requests in a row the owner drops it and the next request connects afresh.
    port = free_port()

    async def main() -> None:
        server = await Server(port).start()
        await server.set(1, "holding", 0, [5])
        proxy = ManglingProxy(port)
        cfg = device(
            await proxy.start(),
            [{"name": "a", "address": 0}],
            timeout_ms=300,
            limits={"retries": 1},
        )
        try:
            async with ModbusTcpAdapter(cfg) as adapter:
                assert values_of(await adapter.read()) == {"a": 5}
                proxy.mangles.extend([lambda f: b"", lambda f: b""])
                with pytest.raises(DeviceTimeout, match="2 attempts"):
                    await adapter.read()
                assert values_of(await adapter.read()) == {"a": 5}
                assert proxy.connections == 2
        finally:
            await proxy.close()
            await server.stop()

    run(main())


def test_server_stopped_is_a_device_error_and_reads_resume_after_restart() -> None:
    port = free_port()
    cfg = device(port, [{"name": "a", "address": 0, "type": "float32"}])

    async def main() -> None:
        server = await Server(port).start()
        await server.set(1, "holding", 0, [0x4366, 0])
        adapter = ModbusTcpAdapter(cfg)
        await adapter.open()
        try:
            assert values_of(await adapter.read()) == {"a": 230.0}
            await server.stop()
            for _ in range(2):
                with pytest.raises(DeviceError) as info:
                    await adapter.read()
                assert "cannot connect to 127.0.0.1" in str(info.value)
            await adapter.close()
            with pytest.raises(DeviceError, match="cannot connect"):
                await adapter.open()  # a failed open, then close: both safe
            await adapter.close()
            await adapter.close()
            server = await Server(port).start()
            await server.set(1, "holding", 0, [0x4366, 0])
            await adapter.open()
            assert values_of(await adapter.read()) == {"a": 230.0}
            # no reopen needed either: the owner reconnects on demand
            await server.stop()
            server = await Server(port).start()
            await server.set(1, "holding", 0, [0x4248, 0])
            assert values_of(await adapter.read()) == {"a": 50.0}
        finally:
            await adapter.close()
            await server.stop()
        assert owners() == {}

    run(main())


def test_supervised_device_recovers_after_the_server_restarts() -> None:
    port = free_port()
    cfg = device(
        port,
        [{"name": "a", "address": 0}],
        period_ms=50,
        timeout_ms=500,
        supervisor={"backoff_initial_ms": 20, "backoff_max_ms": 100, "breaker_failures": 1000},
    )
    published: list[Sample] = []

    async def publish(samples: list[Sample]) -> bool:
        published.extend(samples)
        return True

    async def main() -> None:
        server = await Server(port).start()
        await server.set(1, "holding", 0, [1])
        service = DeviceService(cfg, ModbusTcpAdapter, publish)
        task = asyncio.create_task(service.run())
        try:
            await eventually(lambda: service.status.polls_total >= 3)
            assert health(service) is Health.OK
            await server.stop()
            await eventually(lambda: service.status.errors_total >= 2)
            assert "cannot connect" in (service.status.last_error or "")
            server = await Server(port).start()
            await server.set(1, "holding", 0, [2])
            await eventually(lambda: bool(published) and published[-1].value == 2)
            polls = service.status.polls_total
            await eventually(lambda: service.status.polls_total >= polls + 3)
            assert service.status.reconnects_total >= 1
            assert health(service) is Health.DEGRADED
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await server.stop()
        assert owners() == {}

    run(main())


# --- one owner per endpoint ----------------------------------------------------------------


def test_devices_behind_one_endpoint_share_one_connection_and_take_turns() -> None:
    port = free_port()
    tag = [{"name": "v", "address": 7, "type": "uint32", "order": "CDAB"}]
    one = device(port, tag, id="unit1", unit=1)
    two = device(port, tag, id="unit2", unit=2)

    async def main() -> None:
        server = await Server(port, units=(1, 2)).start()
        await server.set(1, "holding", 7, [0x0001, 0x0000])
        await server.set(2, "holding", 7, [0x0002, 0x0000])
        a, b = ModbusTcpAdapter(one), ModbusTcpAdapter(two)
        try:
            await asyncio.gather(a.open(), b.open())
            assert a.owner is not None and a.owner is b.owner
            results = await asyncio.gather(*(x.read() for _ in range(40) for x in (a, b)))
            assert [values_of(r)["v"] for r in results] == [1, 2] * 40
            assert server.connections == 1
            await a.close()
            assert values_of(await b.read()) == {"v": 2}  # the other device keeps the line
            assert len(owners()) == 1
        finally:
            await a.close()
            await b.close()
            await server.stop()
        assert owners() == {}

    run(main())


def test_nothing_but_project_errors_leaves_the_adapter() -> None:
    # A port where nothing listens, an address beyond the table, a dead connection: each
    # failure is a FogmeshError, whichever layer of pymodbus it started in.
    port = free_port()
    cfg = device(port, [{"name": "a", "address": 0, "writable": True}])

    async def attempt(op: Callable[[], Awaitable[object]]) -> None:
        with pytest.raises(FogmeshError):
            await op()

    async def main() -> None:
        adapter = ModbusTcpAdapter(cfg)
        await attempt(adapter.open)
        await attempt(adapter.read)
        await attempt(lambda: adapter.write("a", 1))
        await adapter.close()

    run(main())
