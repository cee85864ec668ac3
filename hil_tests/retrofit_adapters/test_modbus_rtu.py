"""The Modbus RTU adapter on a pty pair (an honest RTU slave on the other side, built from
pymodbus' RTU framer with its CRC and the pymodbus simulator's datastore) and over TCP with
pymodbus' RTU-framed TCP server: reads and writes, the inter-frame silence, a dead slave sharing
the line with a live one under two supervisors, malformed frames, and line ownership.
"""

from __future__ import annotations

import asyncio
import os
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymodbus.framer import FramerRTU, FramerType
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from gateway.errors import BadData, DeviceError, DeviceTimeout
from gateway.model import Health, Sample, Value
from gateway.supervisor import DeviceService
from hil_tests.aio import eventually, run
from retrofit_adapters.base import Reading
from retrofit_adapters.modbus.adapter import ModbusRtuAdapter
from retrofit_adapters.modbus.codec import encode_tag
from retrofit_adapters.modbus.config import ModbusRtuDevice
from retrofit_adapters.modbus.transport import owners
from tools.net import free_port

HOST = "127.0.0.1"
SIZE = 160  # registers per table; bits per bit table (a multiple of 16)


def sim_device(unit: int) -> SimDevice:
    def bits() -> list[SimData]:
        return [SimData(0, count=SIZE, values=False, datatype=DataType.BITS)]

    def regs() -> list[SimData]:
        return [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)]

    return SimDevice(id=unit, simdata=(bits(), bits(), regs(), regs()))


@pytest.fixture
def pty_path() -> Iterator[tuple[int, str]]:
    """(master fd, slave path) of a fresh pty pair in raw mode."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


class RtuSlave:
    """RTU slaves on the master side of a pty: pymodbus' RTU framer decodes each request (CRC
    checked), the simulator datastore answers it, and only `units` answer at all. Logs each
    request (unit, function code, address, arrival time) and the time of each response."""

    def __init__(self, fd: int, units: tuple[int, ...] = (1,)) -> None:
        self.fd = fd
        self.units = units
        self.core = SimCore([sim_device(u) for u in units])
        self.framer = FramerRTU(DecodePDU(True))
        self.requests: list[tuple[int, int, int, float]] = []
        self.answered: list[float] = []
        self.mangles: list[Callable[[bytes], bytes]] = []
        self._buffer = b""
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def close(self) -> None:
        self._loop.remove_reader(self.fd)

    def _readable(self) -> None:
        try:
            self._buffer += os.read(self.fd, 1024)
        except OSError:
            return  # no reader on the slave side right now
        while self._buffer:
            used, pdu = self.framer.handleFrame(self._buffer, 0, 0)
            self._buffer = self._buffer[used:]
            if pdu is None:
                return
            self.requests.append((pdu.dev_id, pdu.function_code, pdu.address, time.monotonic()))
            if pdu.dev_id in self.units:
                task = self._loop.create_task(self._answer(pdu))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, pdu: ModbusPDU) -> None:
        response = await pdu.datastore_update(self.core, pdu.dev_id)  # type: ignore[arg-type]
        response.dev_id = pdu.dev_id
        frame = self.framer.buildFrame(response)
        if self.mangles:
            frame = self.mangles.pop(0)(frame)
        os.write(self.fd, frame)
        self.answered.append(time.monotonic())

    async def set(self, unit: int, address: int, values: list[int]) -> None:
        await self.core.async_setValues(unit, 16, address, values)

    async def get(self, unit: int, table: str, address: int, count: int) -> list[Any]:
        fc = {"holding": 3, "coil": 1}[table]
        return list(await self.core.async_getValues(unit, fc, address, count))  # type: ignore[arg-type]


def crc(frame: bytes) -> bytes:
    return FramerRTU.compute_CRC(frame).to_bytes(2, "big")


def device(port: str, tags: list[dict[str, Any]], **kw: Any) -> ModbusRtuDevice:
    return ModbusRtuDevice.model_validate(
        {"id": kw.pop("id", "rtu1"), "type": "modbus_rtu", "port": port, "tags": tags, **kw}
    )


def values_of(readings: list[Reading]) -> dict[str, Any]:
    return {r.tag: r.value for r in readings}


TAGS: list[dict[str, Any]] = [
    {"name": "flow", "address": 0, "type": "float32", "order": "CDAB", "writable": True},
    {"name": "count", "address": 2, "type": "int32", "order": "DCBA", "writable": True},
    {"name": "label", "address": 4, "type": "string(6)", "order": "BADC", "writable": True},
    {"name": "level", "address": 7, "type": "uint16", "scale": 0.5, "writable": True},
    {"name": "flag", "address": 8, "bit": 4, "writable": True},
    {"name": "pump", "table": "coil", "address": 5, "writable": True},
]
FIRST: dict[str, Value] = {
    "flow": 230.0,
    "count": -7,
    "label": "P-12",
    "level": 12.5,
    "flag": True,
    "pump": False,
}
SECOND: dict[str, Value] = {
    "flow": -0.15625,
    "count": 123456,
    "label": "valve",
    "level": 3.0,
    "flag": False,
    "pump": True,
}


# --- serial line ---------------------------------------------------------------------------


def test_reads_and_writes_over_a_serial_line(pty_path: tuple[int, str]) -> None:
    master, path = pty_path
    cfg = device(path, TAGS)
    tags = {t.name: t for t in cfg.tags}

    async def main() -> None:
        slave = RtuSlave(master)
        try:
            for name in ("flow", "count", "label", "level"):
                regs = encode_tag(tags[name], FIRST[name])
                await slave.set(1, tags[name].offset_address(0), list(regs))
            await slave.set(1, 8, [0x0010])
            async with ModbusRtuAdapter(cfg) as adapter:
                assert values_of(await adapter.read()) == FIRST
                for name, value in SECOND.items():
                    await adapter.write(name, value)
                assert values_of(await adapter.read()) == SECOND
            assert await slave.get(1, "holding", 0, 2) == encode_tag(tags["flow"], -0.15625)
            assert await slave.get(1, "coil", 5, 1) == [True]
        finally:
            slave.close()
        assert owners() == {}

    run(main())


@pytest.mark.parametrize(
    ("settings", "gap_s"),
    [
        ({"baudrate": 1200}, 3.5 * 10 / 1200),  # t3.5 from the line: 29.2 ms at 1200 8N1
        ({"baudrate": 9600, "limits": {"inter_frame_delay_ms": 25}}, 0.025),  # configured
    ],
    ids=["t3.5 of 1200 baud", "configured 25 ms"],
)
def test_the_inter_frame_silence_is_kept_between_frames(
    pty_path: tuple[int, str], settings: dict[str, Any], gap_s: float
) -> None:
    master, path = pty_path
    cfg = device(path, [{"name": "a", "address": 0}, {"name": "b", "address": 100}], **settings)

    async def main() -> None:
        slave = RtuSlave(master)
        try:
            async with ModbusRtuAdapter(cfg) as adapter:
                for _ in range(3):
                    await adapter.read()  # two requests each: 0..0 and 100..100
            arrivals = [r[3] for r in slave.requests]
            assert len(arrivals) == 6 and len(slave.answered) == 6
            # from each answer to the next request: at least the silence (less a little slack
            # for the pty's own latency, which only makes the measured gap shorter)
            gaps = [
                nxt - answered for answered, nxt in zip(slave.answered, arrivals[1:], strict=False)
            ]
            assert min(gaps) >= 0.9 * gap_s, gaps
        finally:
            slave.close()

    run(main())


def test_a_dead_slave_on_the_line_does_not_stall_the_live_one(pty_path: tuple[int, str]) -> None:
    master, path = pty_path
    sup = {
        "backoff_initial_ms": 50,
        "backoff_max_ms": 200,
        "breaker_failures": 3,
        "breaker_cooldown_s": 60.0,
    }
    live_cfg = device(
        path,
        [{"name": "a", "address": 0}],
        id="live",
        unit=1,
        period_ms=100,
        timeout_ms=1000,
        supervisor=sup,
    )
    # one attempt (0.9 * 150 ms / 2) holds the line for less than the live device's period
    dead_cfg = device(
        path,
        [{"name": "a", "address": 0}],
        id="dead",
        unit=2,
        period_ms=100,
        timeout_ms=150,
        supervisor=sup,
    )
    published: dict[str, list[float]] = {"live": [], "dead": []}

    async def publish(samples: list[Sample]) -> bool:
        for s in samples:
            published[s.device].append(time.monotonic())
        return True

    async def main() -> None:
        slave = RtuSlave(master, units=(1,))
        await slave.set(1, 0, [42])
        live = DeviceService(live_cfg, ModbusRtuAdapter, publish)
        dead = DeviceService(dead_cfg, ModbusRtuAdapter, publish)
        tasks = [asyncio.create_task(s.run()) for s in (live, dead)]
        started = time.monotonic()
        try:
            await eventually(lambda: dead.status.health is Health.DOWN, timeout_s=5.0)
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
            elapsed = time.monotonic() - started
            # the live device keeps (at least half) its rate, before and after the breaker
            assert live.status.polls_total >= elapsed / 0.1 / 2
            assert live.status.errors_total == 0
            assert live.status.last_values["a"].value == 42
            last_second = [t for t in published["live"] if t > time.monotonic() - 1.0]
            assert len(last_second) >= 5
            # the dead one failed on time (DeviceTimeout from the adapter), and then stopped
            assert published["dead"] == []
            assert dead.status.consecutive_failures == 3
            assert "no response reading holding 0..0 on unit 2" in (dead.status.last_error or "")
            unit2 = [r for r in slave.requests if r[0] == 2]
            assert len(unit2) == 3 * 2  # 3 failures of 2 attempts, then the breaker holds
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            slave.close()
        assert owners() == {}

    run(main())


def test_a_garbled_frame_is_retried_and_a_wrong_count_is_bad_data(
    pty_path: tuple[int, str],
) -> None:
    master, path = pty_path
    cfg = device(path, [{"name": "a", "address": 0}, {"name": "b", "address": 1}], timeout_ms=400)

    def bad_crc(frame: bytes) -> bytes:
        return frame[:-1] + bytes([frame[-1] ^ 0xFF])

    def one_register_short(frame: bytes) -> bytes:
        body = frame[:2] + b"\x02" + frame[3:5]
        return body + crc(body)

    async def main() -> None:
        slave = RtuSlave(master)
        await slave.set(1, 0, [11, 22])
        try:
            async with ModbusRtuAdapter(cfg) as adapter:
                slave.mangles.append(bad_crc)  # line noise: dropped by the CRC, then retried
                assert values_of(await adapter.read()) == {"a": 11, "b": 22}
                assert len(slave.requests) == 2
                slave.mangles.extend([bad_crc, bad_crc])
                with pytest.raises(DeviceTimeout, match="2 attempts"):
                    await adapter.read()
                slave.mangles.append(one_register_short)
                with pytest.raises(BadData, match="1 registers in the response"):
                    await adapter.read()
                assert values_of(await adapter.read()) == {"a": 11, "b": 22}
        finally:
            slave.close()

    run(main())


def test_devices_on_one_line_share_it_and_must_agree_on_its_settings(
    pty_path: tuple[int, str],
) -> None:
    master, path = pty_path
    one = device(path, [{"name": "a", "address": 0}], id="one", unit=1)
    two = device(path, [{"name": "a", "address": 1}], id="two", unit=1)
    other = device(path, [{"name": "a", "address": 0}], id="fast", unit=3, baudrate=19200)

    async def main() -> None:
        slave = RtuSlave(master)
        await slave.set(1, 0, [1, 2])
        a, b, c = ModbusRtuAdapter(one), ModbusRtuAdapter(two), ModbusRtuAdapter(other)
        try:
            await a.open()
            await b.open()
            assert a.owner is b.owner and a.owner is not None
            results = await asyncio.gather(*(x.read() for _ in range(10) for x in (a, b)))
            assert [values_of(r)["a"] for r in results] == [1, 2] * 10
            with pytest.raises(DeviceError, match=r"already open as .* \(9600 8N1\)"):
                await c.open()
            await c.close()
            assert a.owner.refs == 2
        finally:
            for x in (a, b, c):
                await x.close()
            slave.close()
        assert owners() == {}

    run(main())


def test_a_missing_serial_port_is_a_device_error() -> None:
    cfg = device("/dev/fogmesh-no-such-tty", [{"name": "a", "address": 0}])

    async def main() -> None:
        adapter = ModbusRtuAdapter(cfg)
        with pytest.raises(DeviceError, match="cannot open serial port /dev/fogmesh-no-such-tty"):
            await adapter.open()
        await adapter.close()
        await adapter.close()
        assert owners() == {}

    run(main())


# --- RTU over TCP --------------------------------------------------------------------------


class RtuTcpServer:
    """pymodbus' TCP server speaking RTU frames, as a raw serial-to-TCP converter would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: ModbusTcpServer | None = None

    async def start(self) -> RtuTcpServer:
        self._server = ModbusTcpServer(
            [sim_device(1)], address=(HOST, self.port), framer=FramerType.RTU
        )
        await self._server.serve_forever(background=True)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
            await asyncio.sleep(0.05)

    async def set(self, address: int, values: list[int]) -> None:
        assert self._server is not None
        await self._server.async_setValues(1, 16, address, values)


def test_rtu_over_tcp_reads_writes_and_recovers_after_a_restart() -> None:
    port = free_port()
    cfg = device(f"socket://{HOST}:{port}", TAGS, baudrate=115200)
    tags = {t.name: t for t in cfg.tags}

    async def main() -> None:
        server = await RtuTcpServer(port).start()
        adapter = ModbusRtuAdapter(cfg)
        try:
            await server.set(0, list(encode_tag(tags["flow"], 230.0)))
            await adapter.open()
            assert values_of(await adapter.read())["flow"] == 230.0
            for name, value in SECOND.items():
                await adapter.write(name, value)
            assert values_of(await adapter.read()) == SECOND
            await server.stop()
            with pytest.raises(DeviceError, match=rf"socket://{HOST}:{port} \(RTU"):
                await adapter.read()
            server = await RtuTcpServer(port).start()
            await server.set(0, list(encode_tag(tags["flow"], 50.0)))
            assert values_of(await adapter.read())["flow"] == 50.0
        finally:
            await adapter.close()
            await server.stop()
        assert owners() == {}

    run(main())
