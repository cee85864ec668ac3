"""The serial link to the mesh's root node: one owner of one port (a serial device, a pty, or a
`socket://host:port` serial server) that decodes UART frames as bytes arrive and sends frames
the other way. Used by the `mesh` adapter and, without any gateway config, by the simulator.

The port is opened with pyserial in a thread (a `socket://` URL connects blocking); reading
waits on the port's file descriptor with `loop.add_reader`, so nothing blocks the event loop;
writes run in a thread, bounded by `write_timeout_s`. Every pyserial or OS error leaves as
`DeviceError` (raised from the original), and a link whose port failed stays failed: `recv()`
hands out the frames that arrived before the failure, then raises; `close()` and a new
`open()` start over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import serial

from gateway.errors import DeviceError, DeviceTimeout
from retrofit_adapters.mesh import uart

__all__ = ["DEFAULT_BAUDRATE", "LinkStats", "MeshLink"]

log = logging.getLogger("fogmesh.mesh")

DEFAULT_BAUDRATE: Final = 115200
_READ_CHUNK: Final = 4096
_MAX_QUEUE: Final = 4096  # decoded frames waiting for recv(); the oldest go first when full


@dataclass(slots=True)
class LinkStats:
    """Counters of one link, across reopens."""

    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0  # good frames decoded
    frames_out: int = 0
    bad_crc: int = 0
    bad_cobs: int = 0  # bad COBS, or too short to be a frame
    oversize: int = 0
    overflow: int = 0  # frames dropped because nobody called recv() for too long
    opens: int = 0
    failures: int = 0  # the port failed while open (unplugged, pty closed, socket closed)

    @property
    def bad_frames(self) -> int:
        return self.bad_crc + self.bad_cobs + self.oversize


class MeshLink:
    """`MeshLink(port, baudrate)`: `await open()`, then `await recv()` -> (type, body) and
    `await send(type, body)`; `await close()` (idempotent, never hangs). Also an async context
    manager. Not shareable: one process, one owner of the port (opened with an exclusive lock
    where the platform has one)."""

    def __init__(
        self,
        port: str,
        baudrate: int = DEFAULT_BAUDRATE,
        *,
        write_timeout_s: float = 1.0,
        max_queue: int = _MAX_QUEUE,
    ) -> None:
        # No I/O here.
        self.port = port
        self.baudrate = baudrate
        self.write_timeout_s = write_timeout_s
        self._max_queue = max_queue
        self._serial: Any = None  # serial.Serial (pyserial is untyped)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._decoder = uart.Decoder()
        self._frames: deque[tuple[int, bytes]] = deque()
        self._wake = asyncio.Event()
        self._error: DeviceError | None = None
        self._write_lock = asyncio.Lock()
        self._writing: asyncio.Future[None] | None = None
        self._resync = False  # a write timed out part-way: the next frame starts with 0x00
        self._stats = LinkStats()

    # --- state -------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._serial is not None and self._error is None

    @property
    def error(self) -> DeviceError | None:
        """Why the link failed, while it stays failed (until close)."""
        return self._error

    @property
    def stats(self) -> LinkStats:
        """A snapshot of the counters."""
        s = self._stats
        d = self._decoder
        s.bad_crc, s.bad_cobs, s.oversize = d.bad_crc, d.bad_cobs, d.oversize
        return dataclasses.replace(s)

    def queued(self) -> int:
        """Frames received and not yet taken by recv()."""
        return len(self._frames)

    # --- open / close --------------------------------------------------------------------

    async def open(self) -> None:
        """Open the port; DeviceError when it cannot be opened. A link already open stays so."""
        if self._serial is not None:
            if self._error is None:
                return
            await self.close()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._open_blocking)
        try:
            ser = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread goes on; whatever it opens is closed as soon as it is done.
            fut.add_done_callback(_close_result)
            raise
        try:
            fd = int(ser.fileno())
        except Exception as exc:
            _close_quietly(ser)
            raise DeviceError(
                f"{self.port}: the port has no file descriptor to wait on; use a serial "
                "device or socket://host:port"
            ) from exc
        self._serial = ser
        self._loop = loop
        self._fd = fd
        self._error = None
        self._decoder.reset()
        self._frames.clear()
        self._resync = False  # open() writes a 0x00 anyway
        self._wake = asyncio.Event()
        self._stats.opens += 1
        loop.add_reader(fd, self._readable)
        log.debug("mesh link %s open at %d baud", self.port, self.baudrate)

    def _open_blocking(self) -> Any:
        try:
            ser = serial.serial_for_url(
                self.port,
                baudrate=self.baudrate,
                timeout=0,  # reads take what is there; add_reader says when
                write_timeout=self.write_timeout_s,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(f"cannot open {self.port}: {exc}") from exc
        try:
            # A lone delimiter ends whatever partial frame the root's decoder holds from before.
            ser.write(b"\x00")
        except (serial.SerialException, OSError) as exc:
            _close_quietly(ser)
            raise DeviceError(f"cannot write to {self.port}: {exc}") from exc
        self._stats.bytes_out += 1
        return ser

    async def close(self) -> None:
        """Stop reading and close the port. Idempotent; wakes recv() with DeviceError."""
        ser, self._serial = self._serial, None
        self._stop_reading()
        if ser is None:
            return
        writing = self._writing
        try:
            if writing is not None and not writing.done():
                # Interrupt a write waiting for room (posix pyserial); it ends within its
                # timeout anyway. The port is closed only after, so that the thread never
                # writes to a file descriptor number that was reused meanwhile.
                with contextlib.suppress(Exception):
                    ser.cancel_write()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(writing), self.write_timeout_s + 1.0)
        finally:
            _close_quietly(ser)
            self._error = None  # closed now, not failed; recv() says so
            self._wake.set()
            log.debug("mesh link %s closed", self.port)

    def _stop_reading(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(fd)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- reading -------------------------------------------------------------------------

    def _readable(self) -> None:
        ser = self._serial
        if ser is None:
            return
        try:
            data = ser.read(_READ_CHUNK)
        except (serial.SerialException, OSError) as exc:
            self._fail(DeviceError(f"{self.port}: {exc}"), exc)
            return
        if not data:
            return
        self._stats.bytes_in += len(data)
        frames = self._decoder.feed(data)
        if not frames:
            return
        q = self._frames
        for f in frames:
            if len(q) >= self._max_queue:
                q.popleft()
                self._stats.overflow += 1
            q.append(f)
        self._stats.frames_in += len(frames)
        self._wake.set()

    def _fail(self, error: DeviceError, cause: BaseException) -> None:
        if self._error is not None:
            return
        error.__cause__ = cause
        self._error = error
        self._stats.failures += 1
        self._stop_reading()
        log.warning("mesh link %s failed: %s", self.port, error)
        self._wake.set()

    async def recv(self) -> tuple[int, bytes]:
        """The next frame (type, body), waiting for one. DeviceError when the link failed or
        is closed (frames that arrived before a failure are handed out first)."""
        while True:
            if self._frames:
                return self._frames.popleft()
            if self._error is not None:
                raise DeviceError(str(self._error)) from self._error
            if self._serial is None:
                raise DeviceError(f"mesh link {self.port} is closed")
            self._wake.clear()
            await self._wake.wait()

    def recv_nowait(self) -> tuple[int, bytes] | None:
        """The next frame if one is waiting, else None."""
        return self._frames.popleft() if self._frames else None

    # --- writing -------------------------------------------------------------------------

    async def send(self, typ: int, body: bytes) -> None:
        """Encode and write one frame. UartError (a DeviceError) if it cannot be framed;
        DeviceTimeout if the port takes no bytes for `write_timeout_s`; DeviceError if the
        link is closed or failed (the link then stays failed)."""
        frame = uart.encode(typ, body)
        async with self._write_lock:
            ser = self._require()
            if self._resync:
                # The last write stopped part-way: end that half frame at the root first.
                frame = b"\x00" + frame
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.run_in_executor(None, self._write_blocking, ser, frame)
            self._writing = fut
            fut.add_done_callback(self._written)
            try:
                await asyncio.shield(fut)
            except serial.SerialTimeoutException as exc:
                self._resync = True
                raise DeviceTimeout(
                    f"{self.port}: could not write a frame within {self.write_timeout_s:g} s"
                ) from exc
            except (serial.SerialException, OSError, ValueError, TypeError) as exc:
                if self._serial is None:
                    raise DeviceError(f"mesh link {self.port} is closed") from exc
                error = DeviceError(f"{self.port}: write failed: {exc}")
                self._fail(error, exc)
                raise DeviceError(str(error)) from exc
        self._resync = False
        self._stats.frames_out += 1
        self._stats.bytes_out += len(frame)

    def _written(self, fut: asyncio.Future[None]) -> None:
        if self._writing is fut:
            self._writing = None
        if not fut.cancelled():
            fut.exception()  # retrieved here when the caller was cancelled and never awaits it

    def _write_blocking(self, ser: Any, frame: bytes) -> None:
        n = ser.write(frame)
        if n is not None and n != len(frame):
            # pyserial returns what it wrote; a short write after the timeout is a timeout
            raise serial.SerialTimeoutException(f"wrote {n} of {len(frame)} B")

    def _require(self) -> Any:
        if self._error is not None:
            raise DeviceError(str(self._error)) from self._error
        if self._serial is None:
            raise DeviceError(f"mesh link {self.port} is not open")
        return self._serial


def _close_quietly(ser: Any) -> None:
    with contextlib.suppress(Exception):
        ser.close()


def _close_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        _close_quietly(fut.result())
