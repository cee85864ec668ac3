"""Connection owners for Modbus: one pymodbus client per TCP endpoint or serial line, shared by
every device behind it, that serializes requests (with the RTU inter-frame delay), bounds each by
the calling device's timeout and retries, maps every vendor failure to a project error, and
reconnects on demand after a failure. Semantics: docs/modbus.md ("Connection owners").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from gateway.errors import BadData, DeviceError, DeviceTimeout

__all__ = [
    "ConnectionOwner",
    "Endpoint",
    "ReadOp",
    "Table",
    "acquire",
    "owners",
    "rtu_endpoint",
    "tcp_endpoint",
]

Table = Literal["holding", "input", "coil", "discrete"]
Client = AsyncModbusTcpClient | AsyncModbusSerialClient

# The read request of each table.
_READ_PDU: Final[dict[str, type[ModbusPDU]]] = {
    "coil": ReadCoilsRequest,
    "discrete": ReadDiscreteInputsRequest,
    "holding": ReadHoldingRegistersRequest,
    "input": ReadInputRegistersRequest,
}
_MAX_READ: Final = {"coil": 2000, "discrete": 2000, "holding": 125, "input": 125}
_MAX_WRITE_REGISTERS: Final = 123  # FC16
_MAX_WRITE_COILS: Final = 1968  # FC15

# Modbus Application Protocol v1.1b3 §7.
_EXCEPTION_NAMES: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

# pymodbus' own request timeout and retries stay out of the way: each attempt is bounded here by
# the calling device's budget, and pymodbus' retry path would close the connection behind us.
_LIBRARY_TIMEOUT_S: Final = 3600.0
# A TCP connection that timed out this many requests in a row without a single answer in between
# is dropped, so that a half-open connection (a PLC that restarted without a RST) is replaced.
_DROP_AFTER_SILENT: Final = 2


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a connection goes. Devices whose endpoints have the same `key` share one owner; their
    settings must then agree (one serial line has one baud rate)."""

    kind: Literal["tcp", "rtu", "rtu_tcp"]  # rtu_tcp: RTU frames over TCP (a socket:// URL)
    host: str  # TCP host, or the serial port's path or pyserial URL
    port: int = 0  # TCP port (tcp, rtu_tcp)
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # "N", "E", "O"
    stopbits: float = 1

    @property
    def key(self) -> str:
        if self.kind == "tcp":
            return f"tcp://{_host_port(self.host, self.port)}"
        if self.kind == "rtu_tcp":
            return f"rtu+socket://{_host_port(self.host, self.port)}"
        return f"rtu:{self.host}"

    def describe(self) -> str:
        if self.kind == "tcp":
            return _host_port(self.host, self.port)
        stop = int(self.stopbits) if self.stopbits == int(self.stopbits) else self.stopbits
        line = f"{self.baudrate} {self.bytesize}{self.parity}{stop}"
        if self.kind == "rtu_tcp":
            return f"socket://{_host_port(self.host, self.port)} (RTU, {line})"
        return f"{self.host} ({line})"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_endpoint(host: str, port: int) -> Endpoint:
    return Endpoint("tcp", host, port)


def rtu_endpoint(
    port: str, baudrate: int = 9600, bytesize: int = 8, parity: str = "N", stopbits: float = 1
) -> Endpoint:
    """A serial line, or RTU over TCP when `port` is a pyserial `socket://host:port` URL (then
    spoken over an asyncio socket: pyserial's socket handler would connect blocking the loop)."""
    if port.startswith("socket://"):
        rest = port[len("socket://") :].split("?", 1)[0].rstrip("/")
        host, sep, num = rest.rpartition(":")
        if not sep or not num.isdigit() or not host:
            raise DeviceError(f"serial port URL {port!r}: expected socket://host:port")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        return Endpoint("rtu_tcp", host, int(num), baudrate, bytesize, parity, stopbits)
    return Endpoint("rtu", port, 0, baudrate, bytesize, parity, stopbits)


class ReadOp:
    """One prepared read (unit, table, range), reused every poll: its request PDU is built once
    and the text of its error messages too."""

    __slots__ = ("bit_len", "count", "fc", "pdu", "start", "table", "unit", "what")

    def __init__(self, unit: int, table: Table, start: int, count: int) -> None:
        limit = _MAX_READ[table]
        if not 1 <= count <= limit:
            raise DeviceError(f"cannot read {count} {table} values in one request (1..{limit})")
        if start < 0 or start + count > 65536:
            raise DeviceError(f"{table} {start}..{start + count - 1} is outside 0..65535")
        self.unit = unit
        self.table = table
        self.start = start
        self.count = count
        cls = _READ_PDU[table]
        self.fc: int = cls.function_code
        self.pdu: ModbusPDU = cls(address=start, count=count, dev_id=unit)
        # A bit response carries whole bytes; pymodbus unpacks all of them.
        self.bit_len = 8 * ((count + 7) // 8) if table in ("coil", "discrete") else 0
        self.what = f"reading {table} {start}..{start + count - 1} on unit {unit}"


class _Malformed(Exception):
    """Bytes on the connection that are not a valid response; always mapped to BadData."""


class ConnectionOwner:
    """The single owner of one TCP endpoint or serial line. Each attempt of a request holds the
    line's lock, so devices sharing it take turns (FIFO) and never interleave frames; for RTU the
    silent interval is kept between frames. Get one with `acquire()`, give it back with
    `release()`; the last release closes the connection.
    """

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.loop = loop
        self.refs = 0
        self.inter_frame_s = 0.0  # RTU silent interval; the largest any user asked for
        # Counters for tests and metrics.
        self.requests_total = 0
        self.timeouts_total = 0
        self.connects_total = 0
        self._lock = asyncio.Lock()
        self._client: Client | None = None
        self._quiet_until = 0.0  # loop time before which no frame may start (RTU)
        self._silent = 0  # consecutive timeouts without any answer
        self._network = endpoint.kind != "rtu"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    # --- requests ----------------------------------------------------------------------

    async def connect(self, timeout_s: float) -> None:
        """Connect now unless connected; DeviceError if the endpoint cannot be reached."""
        if self.connected:
            return
        async with self._lock:
            if not self.connected:
                await self._connect(timeout_s)

    async def read(
        self, op: ReadOp, timeout_s: float, retries: int
    ) -> Sequence[int] | Sequence[bool]:
        """The registers (or bits, whole bytes of them) `op` asks for."""
        response = await self._exchange(op.pdu, timeout_s, retries, op.what)
        return _check_read(op, response)

    async def write_registers(
        self, unit: int, address: int, values: Sequence[int], timeout_s: float, retries: int
    ) -> None:
        """FC6 for one register, FC16 for several."""
        await self._write_registers(unit, address, values, timeout_s, retries, held=False)

    async def write_coils(
        self, unit: int, address: int, values: Sequence[bool], timeout_s: float, retries: int
    ) -> None:
        """FC5 for one coil, FC15 for several."""
        n = len(values)
        what = f"writing coil {address}..{address + n - 1} on unit {unit}"
        if not 1 <= n <= _MAX_WRITE_COILS:
            raise DeviceError(f"cannot write {n} coils in one request {what}")
        if n == 1:
            pdu: ModbusPDU = WriteSingleCoilRequest(address=address, bits=[values[0]], dev_id=unit)
        else:
            pdu = WriteMultipleCoilsRequest(address=address, bits=list(values), dev_id=unit)
        response = await self._exchange(pdu, timeout_s, retries, what)
        ok = response.address == address and (
            list(response.bits[:1]) == [bool(values[0])] if n == 1 else response.count == n
        )
        _check_echo(response, pdu, ok, what)

    async def modify_register(
        self,
        unit: int,
        address: int,
        change: Callable[[int], int],
        timeout_s: float,
        retries: int,
    ) -> None:
        """Read one holding register, apply `change`, write it back (FC3 then FC6), holding the
        line for both so that no other request of this gateway lands in between."""
        op = ReadOp(unit, "holding", address, 1)
        async with self._lock:
            response = await self._exchange(op.pdu, timeout_s, retries, op.what, held=True)
            current = _check_read(op, response)[0]
            new = change(int(current))
            await self._write_registers(unit, address, [new], timeout_s, retries, held=True)

    async def _write_registers(
        self,
        unit: int,
        address: int,
        values: Sequence[int],
        timeout_s: float,
        retries: int,
        *,
        held: bool,
    ) -> None:
        n = len(values)
        what = f"writing holding {address}..{address + n - 1} on unit {unit}"
        if not 1 <= n <= _MAX_WRITE_REGISTERS:
            raise DeviceError(f"cannot write {n} registers in one request {what}")
        if n == 1:
            pdu: ModbusPDU = WriteSingleRegisterRequest(
                address=address, registers=[values[0]], dev_id=unit
            )
        else:
            pdu = WriteMultipleRegistersRequest(
                address=address, registers=list(values), dev_id=unit
            )
        response = await self._exchange(pdu, timeout_s, retries, what, held=held)
        ok = response.address == address and (
            list(response.registers[:1]) == [values[0]] if n == 1 else response.count == n
        )
        _check_echo(response, pdu, ok, what)

    async def _exchange(
        self, request: ModbusPDU, timeout_s: float, retries: int, what: str, *, held: bool = False
    ) -> ModbusPDU:
        """One request/response: up to `retries + 1` attempts sharing `timeout_s`; a missing
        answer is retried, anything else is not. Each attempt takes the line for itself (unless
        the caller `held` it already), so that a dead slave holds up the others for one attempt
        at a time, never for all of its retries."""
        attempts = retries + 1
        per_try = timeout_s / attempts
        for _ in range(attempts):
            if held:
                response = await self._attempt(request, per_try, what)
            else:
                async with self._lock:
                    response = await self._attempt(request, per_try, what)
            if response is not None:
                if response.isError():
                    code = int(getattr(response, "exception_code", 0))
                    name = _EXCEPTION_NAMES.get(code, "exception")
                    raise DeviceError(f"{name} ({code}) {what}")
                return response
        raise DeviceTimeout(
            f"no response {what} within {per_try * 1000:.0f} ms"
            + (f" ({attempts} attempts)" if attempts > 1 else "")
        )

    async def _attempt(self, request: ModbusPDU, timeout_s: float, what: str) -> ModbusPDU | None:
        """One attempt with the lock held; None when no answer came in time."""
        client = self._client
        if client is None or not client.connected:
            client = await self._connect(timeout_s)
        loop = self.loop
        if self.inter_frame_s:
            wait = self._quiet_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        self.requests_total += 1
        try:
            async with asyncio.timeout(timeout_s):
                response: ModbusPDU = await client.execute(False, request)
        except TimeoutError:
            self.timeouts_total += 1
            self._silent += 1
            if self._network and self._silent >= _DROP_AFTER_SILENT:
                self._drop()
            return None
        except _Malformed as exc:
            if self._network:
                self._drop()  # the stream may be out of step: start a clean one
            raise BadData(f"malformed response {what}: {exc}") from exc
        except ConnectionException as exc:
            self._drop()
            raise DeviceError(f"connection to {self.endpoint.describe()} lost {what}") from exc
        except Exception as exc:
            # Anything else pymodbus raises (ModbusIOException, ValueError from encoding, an
            # OSError from the transport): the request failed, the connection is suspect.
            self._drop()
            raise DeviceError(f"{what}: {type(exc).__name__}: {exc}") from exc
        finally:
            if self.inter_frame_s:
                self._quiet_until = loop.time() + self.inter_frame_s
        self._silent = 0
        return response

    # --- the connection ----------------------------------------------------------------

    async def _connect(self, timeout_s: float) -> Client:
        self._drop()
        ep = self.endpoint
        client = self._make_client()
        try:
            async with asyncio.timeout(timeout_s):
                ok = await client.connect()
        except TimeoutError:
            client.close()
            raise DeviceTimeout(
                f"cannot connect to {ep.describe()} within {timeout_s * 1000:.0f} ms"
            ) from None
        except Exception as exc:
            client.close()
            raise DeviceError(f"cannot connect to {ep.describe()}: {exc}") from exc
        if not ok:
            client.close()
            what = "open serial port" if ep.kind == "rtu" else "connect to"
            raise DeviceError(f"cannot {what} {ep.describe()}")
        self._client = client
        self._silent = 0
        self.connects_total += 1
        return client

    def _make_client(self) -> Client:
        ep = self.endpoint
        client: Client
        # reconnect_delay=0: no background reconnects; the next request reconnects on demand.
        if ep.kind == "rtu":
            client = AsyncModbusSerialClient(
                ep.host,
                framer=FramerType.RTU,
                baudrate=ep.baudrate,
                bytesize=ep.bytesize,
                parity=ep.parity,
                stopbits=int(ep.stopbits),
                reconnect_delay=0,
                timeout=_LIBRARY_TIMEOUT_S,
                retries=0,
            )
        else:
            client = AsyncModbusTcpClient(
                ep.host,
                port=ep.port,
                framer=FramerType.SOCKET if ep.kind == "tcp" else FramerType.RTU,
                reconnect_delay=0,
                timeout=_LIBRARY_TIMEOUT_S,
                retries=0,
            )
        _guard(client, mbap=ep.kind == "tcp", on_lost=self._lost)
        return client

    def _lost(self, client: Client) -> None:
        if client is self._client:
            self._client = None
            with contextlib.suppress(Exception):
                client.close()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # --- ownership -----------------------------------------------------------------------

    def release(self) -> None:
        """Give back one reference; the last one closes the connection."""
        if self.refs <= 0:
            return
        self.refs -= 1
        if self.refs == 0:
            self._drop()
            if _owners.get(self.endpoint.key) is self:
                del _owners[self.endpoint.key]


def _check_read(op: ReadOp, response: ModbusPDU) -> Sequence[int] | Sequence[bool]:
    if response.function_code != op.fc:
        raise BadData(f"function code {response.function_code} in the response {op.what}")
    if op.bit_len:
        bits = response.bits
        if len(bits) != op.bit_len:
            raise BadData(
                f"{len(bits) // 8} bytes of bits in the response {op.what}, "
                f"expected {op.bit_len // 8}"
            )
        return bits
    registers = response.registers
    if len(registers) != op.count:
        raise BadData(f"{len(registers)} registers in the response {op.what}, expected {op.count}")
    return registers


def _check_echo(response: ModbusPDU, request: ModbusPDU, ok: bool, what: str) -> None:
    if response.function_code != request.function_code:
        raise BadData(f"function code {response.function_code} in the response {what}")
    if not ok:
        raise BadData(f"the response {what} does not echo the request")


def _guard(client: Client, *, mbap: bool, on_lost: Callable[[Client], None]) -> None:
    """Make pymodbus fail the pending request, instead of leaving it to time out, when the
    connection drops or the bytes received cannot be a response (pymodbus raises inside
    `data_received`, and asyncio then closes the connection and logs a traceback)."""
    ctx = client.ctx
    original = ctx.callback_data

    def fail(exc: Exception) -> None:
        future: asyncio.Future[Any] = ctx.response_future
        if not future.done():
            future.set_exception(exc)

    def callback_data(data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        # MBAP: protocol id 0, length 2..254 (unit + PDU); otherwise pymodbus waits for ever.
        if (
            mbap
            and len(data) >= 6
            and (data[2] or data[3] or not 2 <= (data[4] << 8 | data[5]) <= 254)
        ):
            fail(_Malformed(f"not a Modbus TCP header: {data[:8].hex(' ')}"))
            return len(data)
        try:
            return original(data, addr)
        except Exception as exc:
            fail(_Malformed(str(exc) or type(exc).__name__))
            return len(data)

    def trace_connect(connected: bool) -> None:
        if not connected:
            fail(ConnectionException("connection lost"))
            on_lost(client)

    # Instance attributes shadow the methods pymodbus calls; setattr keeps mypy out of it.
    setattr(ctx, "callback_data", callback_data)  # noqa: B010
    ctx.trace_connect = trace_connect


# --- the registry of owners -------------------------------------------------------------

_owners: dict[str, ConnectionOwner] = {}


def acquire(endpoint: Endpoint, *, inter_frame_s: float = 0.0) -> ConnectionOwner:
    """The owner of `endpoint` (made on first use) with one more reference. DeviceError if a
    device already holds the same line with other settings."""
    loop = asyncio.get_running_loop()
    key = endpoint.key
    owner = _owners.get(key)
    if owner is not None and owner.loop is not loop:
        # Left behind by an event loop that has ended; its client cannot be used here.
        owner._drop()
        owner = None
    if owner is None:
        owner = ConnectionOwner(endpoint, loop)
        _owners[key] = owner
    elif owner.endpoint != endpoint:
        raise DeviceError(
            f"{endpoint.describe()}: the line is already open as {owner.endpoint.describe()}"
        )
    owner.refs += 1
    owner.inter_frame_s = max(owner.inter_frame_s, inter_frame_s)
    return owner


def owners() -> dict[str, ConnectionOwner]:
    """The live owners by endpoint key (a copy), for tests and metrics."""
    return dict(_owners)
