"""The virtual PLC's Modbus side: pymodbus servers (TCP, RTU over TCP, RTU on a pseudo-terminal)
serving one register image, with faults injected through pymodbus' public hooks.

How each fault is made (pymodbus 3.16 server API):

- every request is counted in `trace_pdu` (received side);
- `exception` and the refusal of bad writes: the `SimDevice.action` callback returns an
  exception code, and pymodbus answers with an exception response;
- `stop_answering`, `slow` and `garbage` act on the finished reply bytes in a per-connection
  `trace_packet` hook: the reply is dropped (b""), sent later with `call_later` straight on the
  transport, or mangled before it is written;
- an unknown unit id is answered with exception 0x0B over TCP (what a gateway does) and not at
  all over RTU (what a multidrop line does), by replacing the reply in `trace_pdu`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import tty
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from tools.virtual_plc.registers import PlainValue, Point, VirtualPlcError, decode, encode

__all__ = [
    "EXCEPTION_CODES",
    "GARBAGE_MODES",
    "MODBUS_FAULTS",
    "Fault",
    "FaultTable",
    "ModbusEndpoint",
    "PtyLink",
    "RegisterImage",
]

MODBUS_FAULTS = ("stop_answering", "exception", "slow", "garbage")
GARBAGE_MODES = ("truncated", "short_count", "noise")
EXCEPTION_CODES: dict[str, int] = {
    "illegal_function": 0x01,
    "illegal_data_address": 0x02,
    "illegal_data_value": 0x03,
    "server_device_failure": 0x04,
    "acknowledge": 0x05,
    "server_device_busy": 0x06,
    "gateway_path_unavailable": 0x0A,
    "gateway_target_failed": 0x0B,
}

_FC_TABLE: dict[int, str] = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
_FC_TABLE.update({5: "coil", 15: "coil", 6: "holding", 16: "holding", 22: "holding", 23: "holding"})
_BIT_TABLES = ("coil", "discrete")
_TABLES = ("coil", "discrete", "holding", "input")  # the order of SimDevice's block tuple


# --- faults ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Fault:
    """A fault in force for `start_s <= t < end_s` of process time, for one unit or all (None)."""

    kind: str
    unit: int | None
    start_s: float
    end_s: float = math.inf
    params: dict[str, Any] = field(default_factory=dict)
    scheduled: bool = False

    def active(self, unit: int | None, t: float) -> bool:
        return (self.unit is None or unit is None or self.unit == unit) and (
            self.start_s <= t < self.end_s
        )


@dataclass(frozen=True, slots=True)
class UnitFaults:
    """What a request to one unit meets right now."""

    stop: bool = False
    exception: int = 0
    delay_s: float = 0.0
    garbage: str = ""


NO_FAULTS = UnitFaults()


class FaultTable:
    """Faults of every kind the PLC knows, looked up by unit on each request (cheap when empty)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock  # process time in seconds
        self.faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear(self, kind: str | None = None, unit: int | None = None) -> int:
        keep = [
            f
            for f in self.faults
            if not ((kind is None or f.kind == kind) and (unit is None or f.unit == unit))
        ]
        removed = len(self.faults) - len(keep)
        self.faults = keep
        return removed

    def active(self, kind: str, unit: int | None = None) -> list[Fault]:
        t = self.clock()
        return [f for f in self.faults if f.kind == kind and f.active(unit, t)]

    def for_unit(self, unit: int) -> UnitFaults:
        if not self.faults:
            return NO_FAULTS
        t = self.clock()
        stop, exc, delay, garbage = False, 0, 0.0, ""
        for f in self.faults:
            if not f.active(unit, t):
                continue
            if f.kind == "stop_answering":
                stop = True
            elif f.kind == "exception":
                exc = exc or int(f.params.get("code", 0x06))
            elif f.kind == "slow":
                delay = max(delay, float(f.params.get("delay_ms", 1000)) / 1000.0)
            elif f.kind == "garbage":
                garbage = garbage or str(f.params.get("mode", "truncated"))
        if not (stop or exc or delay or garbage):
            return NO_FAULTS
        return UnitFaults(stop, exc, delay, garbage)


# --- the register image ----------------------------------------------------------------------


class RegisterImage:
    """Every unit's registers and bits, written by the PLC's process loop and read (and written)
    by every Modbus endpoint through the `SimDevice.action` hook."""

    def __init__(
        self,
        units: Mapping[int, tuple[Point, ...]],
        faults: FaultTable,
        on_write: Callable[[int, str, PlainValue], None] | None = None,
    ) -> None:
        self.faults = faults
        self.on_write = on_write
        self.points: dict[int, dict[str, Point]] = {}
        self.regs: dict[int, dict[str, list[int]]] = {}
        self.bits: dict[int, dict[str, list[bool]]] = {}
        self._at: dict[int, dict[str, dict[int, Point]]] = {}  # address → point, per table
        for unit, points in units.items():
            self.points[unit] = {p.name: p for p in points}
            self._at[unit] = {t: {} for t in _TABLES}
            for p in points:
                for a in range(p.address, p.address + p.count):
                    self._at[unit][p.table][a] = p
            size = {t: max((a + 1 for a in self._at[unit][t]), default=0) for t in _TABLES}
            self.regs[unit] = {t: [0] * size[t] for t in ("holding", "input")}
            self.bits[unit] = {t: [False] * (-(-size[t] // 16) * 16) for t in _BIT_TABLES}

    @property
    def units(self) -> list[int]:
        return list(self.points)

    def set(self, unit: int, name: str, value: PlainValue) -> None:
        p = self.points[unit][name]
        words = encode(p, value)
        if p.table in _BIT_TABLES:
            self.bits[unit][p.table][p.address] = bool(words[0])
        else:
            self.regs[unit][p.table][p.address : p.address + p.count] = words

    def get(self, unit: int, name: str) -> PlainValue:
        p = self.points[unit][name]
        if p.table in _BIT_TABLES:
            return self.bits[unit][p.table][p.address]
        return decode(p, self.regs[unit][p.table][p.address : p.address + p.count])

    def sim_device(self, unit: int) -> SimDevice:
        """The pymodbus device for `unit`: separate tables, each address valid only if published."""
        blocks: list[list[SimData]] = []
        for table in _TABLES:
            entries = []
            for p in sorted(self._points_in(unit, table), key=lambda p: p.address):
                if table in _BIT_TABLES:
                    entries.append(SimData(p.address, values=[False], datatype=DataType.BITS))
                else:
                    entries.append(
                        SimData(
                            p.address,
                            count=p.count,
                            datatype=DataType.REGISTERS,
                            readonly=not p.writable,
                        )
                    )
            if not entries:  # pymodbus needs one entry per table; the action refuses access
                bits = table in _BIT_TABLES
                dt = DataType.BITS if bits else DataType.REGISTERS
                entries.append(SimData(0, values=[False] if bits else 0, datatype=dt))
            blocks.append(entries)
        return SimDevice(
            unit,
            simdata=(blocks[0], blocks[1], blocks[2], blocks[3]),
            action=functools.partial(self._action, unit),
        )

    def _points_in(self, unit: int, table: str) -> list[Point]:
        return [p for p in self.points[unit].values() if p.table == table]

    async def _action(
        self,
        unit: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # Called by pymodbus for every valid-address access, before it reads or writes its own
        # copy of the registers: refresh that copy from the image, or validate and apply a write.
        f = self.faults.for_unit(unit)
        if f.stop:
            return ExcCodes.DEVICE_BUSY  # never seen: trace_packet drops the reply
        if f.exception:
            return ExcCodes(f.exception)
        table = _FC_TABLE.get(function_code)
        if table is None or not self._at[unit][table]:
            return ExcCodes.ILLEGAL_FUNCTION
        if table in _BIT_TABLES:
            bits = self.bits[unit][table]
            if set_values is not None:
                code = self._write_bits(unit, table, address, [bool(v) for v in set_values])
                if code is not None:
                    return code
            packed = [
                sum(1 << i for i, b in enumerate(bits[k : k + 16]) if b)
                for k in range(0, len(bits), 16)
            ]
            registers[0 : len(packed)] = packed
            return None
        if set_values is not None:
            return self._write_regs(unit, address, [int(v) for v in set_values])
        off = address - start_address
        registers[off : off + count] = self.regs[unit][table][address : address + count]
        return None

    def _write_bits(
        self, unit: int, table: str, address: int, values: list[bool]
    ) -> ExcCodes | None:
        at = self._at[unit][table]
        points = [at.get(a) for a in range(address, address + len(values))]
        if any(p is None or not p.writable for p in points):
            return ExcCodes.ILLEGAL_ADDRESS
        for a, v in zip(range(address, address + len(values)), values, strict=True):
            self.bits[unit][table][a] = v
            if self.on_write is not None:
                self.on_write(unit, at[a].name, v)
        return None

    def _write_regs(self, unit: int, address: int, values: list[int]) -> ExcCodes | None:
        at = self._at[unit]["holding"]
        end = address + len(values)
        changes: list[tuple[Point, PlainValue]] = []
        seen: set[str] = set()
        for a in range(address, end):
            p = at.get(a)
            if p is None or not p.writable:
                return ExcCodes.ILLEGAL_ADDRESS
            if p.name in seen:
                continue
            seen.add(p.name)
            if p.address < address or p.address + p.count > end:
                return ExcCodes.ILLEGAL_ADDRESS  # a multi-register value is written whole or not
            v = decode(p, values[p.address - address : p.address - address + p.count])
            if isinstance(v, float | int) and not isinstance(v, bool):
                if not math.isfinite(v):
                    return ExcCodes.ILLEGAL_VALUE
                if (p.low is not None and v < p.low) or (p.high is not None and v > p.high):
                    return ExcCodes.ILLEGAL_VALUE
            changes.append((p, v))
        self.regs[unit]["holding"][address:end] = values
        if self.on_write is not None:
            for p, v in changes:
                self.on_write(unit, p.name, v)
        return None


# --- garbage ---------------------------------------------------------------------------------

_noise = random.Random(0xF06)  # deterministic junk, the same in every run


def garble(frame: bytes, mode: str, *, rtu: bool) -> bytes:
    """A mangled copy of a reply frame (see GARBAGE_MODES and docs/virtual-plc.md)."""
    if mode == "noise":
        return _noise.randbytes(len(frame))
    head, pdu = (frame[:1], frame[1:-2]) if rtu else (frame[:7], frame[7:])
    fc = pdu[0] if pdu else 0
    if mode == "short_count" and fc in (1, 2, 3, 4) and len(pdu) >= 2:
        cut = 1 if fc in (1, 2) else 2
        n = max(pdu[1] - cut, 0)
        pdu = bytes([fc, n]) + pdu[2 : 2 + n]
    else:  # truncated: the byte count no longer matches the data
        pdu = pdu[:-2] if len(pdu) > 2 else pdu[:1]
    if rtu:
        body = head + pdu
        return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")
    return frame[:4] + (len(pdu) + 1).to_bytes(2, "big") + frame[6:7] + pdu


# --- servers ---------------------------------------------------------------------------------


class _TcpServer(ModbusTcpServer):
    endpoint: ModbusEndpoint

    def callback_new_connection(self) -> Any:
        return self.endpoint.hook_connection(super().callback_new_connection())  # type: ignore[no-untyped-call]


class _SerialServer(ModbusSerialServer):
    endpoint: ModbusEndpoint

    def callback_new_connection(self) -> Any:
        return self.endpoint.hook_connection(super().callback_new_connection())  # type: ignore[no-untyped-call]


Transport = Literal["tcp", "rtu_tcp", "rtu_serial"]


class ModbusEndpoint:
    """One pymodbus server over the shared image: Modbus TCP, RTU framing over TCP, or RTU on a
    serial device (a pty). Restartable on the same port."""

    def __init__(
        self,
        image: RegisterImage,
        counts: Counter[int],
        transport: Transport,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_path: str = "",
    ) -> None:
        self.image = image
        self.counts = counts
        self.transport = transport
        self.host = host
        self.port = port
        self.serial_path = serial_path
        self.rtu = transport != "tcp"
        self._server: _TcpServer | _SerialServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        devices = [self.image.sim_device(u) for u in self.image.units]
        # A catch-all device 0: pymodbus routes unknown unit ids to it; trace_pdu and
        # trace_packet then turn its replies into what a real device would send.
        devices.append(self._catch_all())
        server: _TcpServer | _SerialServer
        if self.transport == "rtu_serial":
            server = _SerialServer(
                devices,
                framer=FramerType.RTU,
                port=self.serial_path,
                baudrate=115200,
                trace_pdu=self._trace_pdu,
            )
        else:
            server = _TcpServer(
                devices,
                framer=FramerType.RTU if self.rtu else FramerType.SOCKET,
                address=(self.host, self.port),
                trace_pdu=self._trace_pdu,
            )
        server.endpoint = self
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            where = (
                self.serial_path if self.transport == "rtu_serial" else f"{self.host}:{self.port}"
            )
            raise VirtualPlcError(f"virtual PLC: cannot serve Modbus on {where}") from exc
        if self.transport != "rtu_serial":
            listener: Any = server.transport
            self.port = int(listener.sockets[0].getsockname()[1])
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    @staticmethod
    def _catch_all() -> SimDevice:
        bits = [SimData(0, values=[False], datatype=DataType.BITS)]
        regs = [SimData(0, datatype=DataType.REGISTERS)]
        return SimDevice(0, simdata=(bits, list(bits), regs, list(regs)))

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.counts[pdu.dev_id] += 1
            return pdu
        if pdu.dev_id not in self.image.points and not self.rtu:
            return ExceptionResponse(
                pdu.function_code & 0x7F,
                ExcCodes.GATEWAY_NO_RESPONSE,
                device_id=pdu.dev_id,
                transaction=pdu.transaction_id,
            )
        return pdu

    def hook_connection(self, handler: Any) -> Any:
        handler.trace_packet = functools.partial(self._trace_packet, handler)
        return handler

    def _trace_packet(self, handler: Any, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        unit = data[0] if self.rtu else data[6]
        if unit not in self.image.points:
            return b"" if self.rtu else data
        f = self.image.faults.for_unit(unit)
        if f is NO_FAULTS:
            return data
        if f.stop:
            return b""
        if f.garbage:
            data = garble(data, f.garbage, rtu=self.rtu)
        if f.delay_s > 0 and self._loop is not None:
            self._loop.call_later(f.delay_s, _write_late, handler, data)
            return b""
        return data


def _write_late(handler: Any, data: bytes) -> None:
    transport = handler.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.write(data)


# --- the serial line -------------------------------------------------------------------------


class PtyLink:
    """Two pseudo-terminals joined back to back, standing in for an RS-485 line.

    The pymodbus serial server opens `server_path`; a client opens `client_path`; the PLC copies
    bytes between the two master sides. While `passing` is False (the server is down) bytes from
    the client are dropped, as a dead slave would ignore them.
    """

    def __init__(self) -> None:
        self._srv_master, self._srv_slave = os.openpty()
        self._cli_master, self._cli_slave = os.openpty()
        # The slaves stay open here so a master never reads EIO while nobody else has the
        # device open; raw mode from the start so nothing is echoed or translated.
        for fd in (self._srv_slave, self._cli_slave):
            tty.setraw(fd)
        for fd in (self._srv_master, self._cli_master):
            os.set_blocking(fd, False)
        self.server_path = os.ttyname(self._srv_slave)
        self.client_path = os.ttyname(self._cli_slave)
        self.passing = True
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(
            self._cli_master, self._copy, self._cli_master, self._srv_master, True
        )
        self._loop.add_reader(
            self._srv_master, self._copy, self._srv_master, self._cli_master, False
        )

    def _copy(self, src: int, dst: int, from_client: bool) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if data and (self.passing or not from_client):
            with contextlib.suppress(OSError):
                os.write(dst, data)

    def close(self) -> None:
        if self._loop is not None:
            for fd in (self._cli_master, self._srv_master):
                self._loop.remove_reader(fd)
            self._loop = None
        for fd in (self._srv_master, self._srv_slave, self._cli_master, self._cli_slave):
            with contextlib.suppress(OSError):
                os.close(fd)
