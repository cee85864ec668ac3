"""The ESP32 ROM serial bootloader emulated on a loopback TCP port: pyserial opens it as
`socket://127.0.0.1:PORT` and the real esptool 5 (`--before no-reset --no-stub`) talks to it
unmodified, with faults that can be injected to test how flashing tools fail."""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, fields, replace

from tools.virtual_esp32.flash_image import FLASH_SIZE, SECTOR_SIZE, FlashImage, VirtualEsp32Error

# Command numbers (esptool loader.ESP_CMDS).
_FLASH_BEGIN, _FLASH_DATA, _FLASH_END = 0x02, 0x03, 0x04
_SYNC, _WRITE_REG, _READ_REG = 0x08, 0x09, 0x0A
_SPI_SET_PARAMS, _SPI_ATTACH, _READ_FLASH_SLOW, _CHANGE_BAUDRATE = 0x0B, 0x0D, 0x0E, 0x0F
_DEFL_BEGIN, _DEFL_DATA, _DEFL_END, _SPI_FLASH_MD5 = 0x10, 0x11, 0x12, 0x13
_DATA_COMMANDS = (_FLASH_DATA, _DEFL_DATA)

# ROM loader error codes (esptool docs, serial-protocol "ROM Loader Errors").
_ERR_INVALID, _ERR_FAILED, _ERR_CHECKSUM = 0x05, 0x06, 0x07
_ERR_FLASH_WRITE, _ERR_FLASH_READ, _ERR_READ_LEN, _ERR_DEFLATE = 0x08, 0x09, 0x0A, 0x0B

_SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
_SYNC_VALUE = 0x20120707  # what ESP32 ROMs put in the value field of their sync replies
_SYNC_REPLIES = 8  # the ROM answers one SYNC eight times; esptool reads all eight
_CHECKSUM_SEED = 0xEF
_MAX_FRAME = 0x8000  # escaped bytes; esptool's largest ROM packet is about 1 KB
_MAX_BLOCK = 0x4000
_BAD_ESCAPE = re.compile(rb"\xdb(?![\xdc\xdd])")

# Registers esptool reads (esptool targets/esp32.py).
_CHIP_MAGIC_ADDR, _CHIP_MAGIC = 0x40001000, 0x00F01D83
_EFUSE_BASE, _UART_CLKDIV = 0x3FF5A000, 0x3FF40014
_APB_CTL_DATE, _RTCCALICFG1 = 0x3FF6607C, 0x3FF5F06C
_XTAL_HZ, _ROM_BAUD = 40_000_000, 115200
# The SPI0 peripheral, driven by esptool's run_spiflash_command through WRITE_REG/READ_REG.
_SPI = 0x3FF42000
_SPI_CMD, _SPI_ADDR, _SPI_USR, _SPI_USR1 = _SPI, _SPI + 0x04, _SPI + 0x1C, _SPI + 0x20
_SPI_USR2, _SPI_MISO_DLEN, _SPI_W0 = _SPI + 0x24, _SPI + 0x2C, _SPI + 0x80
_SPI_CMD_USR, _USR_ADDR, _USR_MISO = 1 << 18, 1 << 30, 1 << 28
# A GigaDevice GD25Q32 (4 MB): JEDEC id C8 40 16, and an SFDP header whose second parameter
# header names the vendor, which is what esptool's XMC check reads at SFDP address 0x10.
_JEDEC_ID = bytes([0xC8, 0x40, 0x16])
_SPI_ANSWERS = {0x9F: _JEDEC_ID, 0x05: b"\0", 0x35: b"\0", 0x15: b"\0"}  # RDID; RDSR1-3: idle
_SFDP = bytes.fromhex("53464450 060101ff 00060110 300000ff c8000103 900000ff")


@dataclass
class RomFaults:
    """Faults to inject; the counts go down as they fire. Settable while running (`inject`)."""

    drop: int = 0  # the next N requests are swallowed unanswered, as if lost on the line
    garble: int = 0  # the next N replies have their header bytes flipped inside the frame
    bad_checksum: int = 0  # the next N FLASH_DATA/FLASH_DEFL_DATA get the checksum error
    md5_mismatch: int = 0  # the next N SPI_FLASH_MD5 report a wrong digest
    delay_ms: float = 0.0  # every reply is sent this late
    command: int | None = None  # drop/garble/bad_checksum only hit this command (None: any)

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise VirtualEsp32Error(f"fault {f.name} must not be negative, got {value}")


@dataclass
class RomStats:
    """What the emulator saw; bad input is counted here instead of crashing the server."""

    connections: int = 0
    refused: int = 0  # a second client while one is served
    frames: int = 0
    replies: int = 0
    garbage_bytes: int = 0  # bytes outside any SLIP frame
    bad_frames: int = 0  # bad escape, shorter than a header, or not a request
    oversize_frames: int = 0
    truncated_frames: int = 0  # the client went away in the middle of a frame
    checksum_errors: int = 0
    invalid_commands: int = 0
    dropped: int = 0
    garbled: int = 0
    md5_mismatches: int = 0
    sessions_committed: int = 0
    sessions_aborted: int = 0


@dataclass
class _Session:
    """One FLASH_BEGIN (or DEFL_BEGIN) download, kept in a shadow until its last block arrives."""

    base: int  # first flash byte of the shadow (the erase starts here)
    data_at: int  # where data byte 0 goes, relative to base
    shadow: bytearray
    blocks: int
    block_size: int
    inflater: zlib._Decompress | None
    next_seq: int = 0
    produced: int = 0
    done: bool = False

    def program(self, pos: int, data: bytes) -> bool:
        start, end = self.data_at + pos, self.data_at + pos + len(data)
        if end > len(self.shadow):
            return False
        # NOR flash can only clear bits: programming ANDs into what the erase left.
        old = int.from_bytes(self.shadow[start:end], "big")
        self.shadow[start:end] = (old & int.from_bytes(data, "big")).to_bytes(len(data), "big")
        return True


class _SlipDecoder:
    """Splits a byte stream into SLIP frames and counts whatever is not a well-formed frame."""

    def __init__(self, stats: RomStats) -> None:
        self._stats, self._buf = stats, bytearray()
        self._in_frame = self._oversize = False

    def feed(self, chunk: bytes) -> list[bytes]:
        frames: list[bytes] = []
        for i, part in enumerate(chunk.split(b"\xc0")):
            if i > 0:  # a 0xC0 came before this part
                if not self._in_frame:
                    self._in_frame = True
                elif self._buf or self._oversize:
                    frame = self._finish()
                    if frame is not None:
                        frames.append(frame)
                # else: back-to-back delimiters, still waiting for the frame's first byte
            if not part:
                continue
            if not self._in_frame:
                self._stats.garbage_bytes += len(part)
            elif not self._oversize:
                self._buf += part
                if len(self._buf) > _MAX_FRAME:
                    self._oversize = True
                    self._buf.clear()
        return frames

    def close(self) -> None:
        if self._in_frame and (self._buf or self._oversize):
            self._stats.truncated_frames += 1

    def _finish(self) -> bytes | None:
        raw, oversize = bytes(self._buf), self._oversize
        self._buf.clear()
        self._in_frame = self._oversize = False
        if oversize:
            self._stats.oversize_frames += 1
            return None
        if _BAD_ESCAPE.search(raw):
            self._stats.bad_frames += 1
            return None
        # every 0xDB starts a pair, so undoing 0xDB 0xDC first cannot misread an 0xDB 0xDD
        return raw.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")


def _slip(packet: bytes) -> bytes:
    return b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def checksum(data: bytes) -> int:
    """The ROM's data checksum: XOR of every byte, seeded with 0xEF."""
    value = _CHECKSUM_SEED
    for byte in data:
        value ^= byte
    return value


def _parse_mac(mac: str | bytes) -> bytes:
    try:
        raw = (
            mac if isinstance(mac, bytes) else bytes.fromhex(mac.replace(":", "").replace("-", ""))
        )
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise VirtualEsp32Error(f"a MAC has 6 bytes, got {mac!r}")
    return raw


class VirtualEsp32Rom:
    """An ESP32 (D0WD-V3, 40 MHz crystal, 4 MB flash) waiting in its ROM serial bootloader.

    Flash writes are all-or-nothing per download session: a FLASH_BEGIN/DEFL_BEGIN session is
    built in a shadow (erase included) and committed to the image file when its last declared
    block has been applied, so an interrupted, failed or abandoned write leaves the image as it
    was. The ROM path of esptool never sends FLASH_END, so END cannot be the commit point.
    """

    def __init__(
        self,
        flash: FlashImage | str | os.PathLike[str] | None = None,
        *,
        mac: str | bytes | None = None,
        seed: int = 0,
        faults: RomFaults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.flash = flash if isinstance(flash, FlashImage) else FlashImage(flash)
        if mac is None:  # Espressif's OUI and three bytes that depend only on the seed
            mac = b"\x24\x0a\xc4" + hashlib.sha256(f"virtual-esp32:{seed}".encode()).digest()[:3]
        self.mac_bytes = _parse_mac(mac)
        self.mac = ":".join(f"{b:02x}" for b in self.mac_bytes)
        self.faults = faults if faults is not None else RomFaults()
        self.faults.check()
        self.stats = RomStats()
        self.flash_size = FLASH_SIZE  # as last told by SPI_SET_PARAMS
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._value = 0  # the ROM answers every command with the last value it read
        words = [
            0,
            int.from_bytes(self.mac_bytes[2:], "big"),
            int.from_bytes(self.mac_bytes[:2], "big"),
            0x0000A200,  # package D0WD, revision bit 0, rated 240 MHz
            0x00000A50,  # ADC vref calibrated; 8 MHz clock calibration 0x50
            0x00100000,  # revision bit 1; default SPI pads
            0,  # coding scheme none
        ]
        self._regs: dict[int, int] = {_EFUSE_BASE + 4 * i: w for i, w in enumerate(words)}
        self._regs.update(
            {
                _CHIP_MAGIC_ADDR: _CHIP_MAGIC,
                _APB_CTL_DATE: 0x96042000,  # bit 31: revision bit 2, so v3.0
                _UART_CLKDIV: _XTAL_HZ // _ROM_BAUD,
                # 1280 slow-clock cycles per calibration at 0x50 gives exactly 40 MHz
                _RTCCALICFG1: 1280 << 7,
            }
        )

    @property
    def port(self) -> int:
        if self._listener is None:
            raise VirtualEsp32Error("the virtual ESP32 is not started")
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"socket://{self._host}:{self.port}"

    def inject(self, **changes: int | float | None) -> None:
        """Change faults while running, e.g. `inject(drop=2, command=0x03)`."""
        unknown = set(changes) - {f.name for f in fields(RomFaults)}
        if unknown:
            raise VirtualEsp32Error(f"unknown fault {', '.join(sorted(unknown))}")
        with self._lock:
            updated = replace(self.faults, **changes)  # type: ignore[arg-type]
            updated.check()  # before any change lands, so a bad call leaves faults as they were
            for name in changes:
                setattr(self.faults, name, getattr(updated, name))

    def start(self) -> VirtualEsp32Rom:
        if self._thread is not None:
            return self
        try:
            listener = socket.create_server((self._host, self._port), backlog=4)
        except OSError as exc:
            raise VirtualEsp32Error(f"cannot listen on {self._host}:{self._port}: {exc}") from exc
        self._listener, self._wake = listener, socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="virtual-esp32-rom", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._wake is None or self._listener is None:
            return
        self._stop.set()
        self._wake[1].send(b"x")
        self._thread.join(timeout=5)
        self._listener.close()
        for sock in self._wake:
            sock.close()
        self._thread = self._listener = self._wake = None

    def __enter__(self) -> VirtualEsp32Rom:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- connection handling ---------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._wake is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener, self._wake[0]], [], [])
            if self._wake[0] in ready:
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self.stats.connections += 1
            conn.settimeout(5)  # a host that stops reading must not wedge the emulator
            # each client starts at the ROM's 115200 baud, as after the ROM auto-bauds its sync
            self._regs[_UART_CLKDIV] = _XTAL_HZ // _ROM_BAUD
            try:
                self._handle(conn)
            except (OSError, VirtualEsp32Error):
                pass  # the client vanished or the disk failed: the session is dropped below
            finally:
                conn.close()
                self._abort_session()

    def _handle(self, conn: socket.socket) -> None:
        assert self._listener is not None and self._wake is not None
        decoder = _SlipDecoder(self.stats)
        while True:
            ready, _, _ = select.select([conn, self._listener, self._wake[0]], [], [])
            if self._wake[0] in ready:
                return
            if self._listener in ready:  # a serial port has one user: turn the second away
                extra, _ = self._listener.accept()
                extra.close()
                self.stats.refused += 1
            if conn in ready:
                chunk = conn.recv(65536)
                if not chunk:
                    decoder.close()
                    return
                for frame in decoder.feed(chunk):
                    self._on_frame(conn, frame)

    def _take(self, name: str, op: int | None) -> bool:
        with self._lock:
            left = getattr(self.faults, name)
            if left <= 0 or (op is not None and self.faults.command not in (None, op)):
                return False
            setattr(self.faults, name, left - 1)
            return True

    def _on_frame(self, conn: socket.socket, frame: bytes) -> None:
        if len(frame) < 8 or frame[0] != 0x00:
            self.stats.bad_frames += 1
            return
        _, op, size, chk = struct.unpack_from("<BBHI", frame)
        payload = frame[8:]
        self.stats.frames += 1
        if self._take("drop", op):
            self.stats.dropped += 1
            return
        if size != len(payload):
            replies = [self._reply(op, error=_ERR_INVALID)]
        else:
            replies = self._dispatch(op, payload, chk)
        if self._take("garble", op):
            self.stats.garbled += 1
            replies = [bytes([p[0] ^ 0xFF, p[1] ^ 0xFF]) + p[2:] for p in replies]
        with self._lock:
            delay_s = self.faults.delay_ms / 1000
        if delay_s > 0 and self._stop.wait(delay_s):
            return
        conn.sendall(b"".join(_slip(p) for p in replies))
        self.stats.replies += len(replies)

    def _reply(self, op: int, data: bytes = b"", *, error: int = 0) -> bytes:
        body = data + bytes([1 if error else 0, error, 0, 0])
        return struct.pack("<BBHI", 0x01, op, len(body), self._value) + body

    # -- commands --------------------------------------------------------------------------

    def _dispatch(self, op: int, payload: bytes, chk: int) -> list[bytes]:
        if op == _SYNC:
            if payload != _SYNC_PAYLOAD:
                return [self._reply(op, error=_ERR_INVALID)]
            self._value = _SYNC_VALUE
            return [self._reply(op)] * _SYNC_REPLIES
        if op == _READ_REG and len(payload) == 4:
            self._value = self._regs.get(struct.unpack("<I", payload)[0], 0)
            return [self._reply(op)]
        if op == _WRITE_REG and payload and len(payload) % 16 == 0:
            for addr, value, mask, _delay_us in struct.iter_unpack("<IIII", payload):
                self._write_reg(addr, value, mask)
            return [self._reply(op)]
        if op == _SPI_ATTACH and len(payload) in (4, 8):
            return [self._reply(op)]
        if op == _SPI_SET_PARAMS and len(payload) == 24:
            self.flash_size = struct.unpack_from("<I", payload, 4)[0]
            return [self._reply(op)]
        if op == _CHANGE_BAUDRATE and len(payload) == 8:
            baud = struct.unpack_from("<I", payload)[0]
            # a socket has no baud rate; keep the divider consistent for crystal detection
            self._regs[_UART_CLKDIV] = _XTAL_HZ // max(baud, 1)
            return [self._reply(op)]
        if op in (_FLASH_BEGIN, _DEFL_BEGIN) and len(payload) in (16, 20):
            return [self._begin(op, payload)]
        if op in _DATA_COMMANDS:
            return [self._data(op, payload, chk)]
        if op in (_FLASH_END, _DEFL_END) and len(payload) == 4:
            pending = self._session is not None and not self._session.done
            self._abort_session()
            return [self._reply(op, error=_ERR_FAILED if pending else 0)]
        if op == _SPI_FLASH_MD5 and len(payload) == 16:
            return [self._md5(op, payload)]
        if op == _READ_FLASH_SLOW and len(payload) == 8:
            offset, length = struct.unpack("<II", payload)
            if length > 64 or offset + length > FLASH_SIZE:
                return [self._reply(op, error=_ERR_READ_LEN if length > 64 else _ERR_FLASH_READ)]
            return [self._reply(op, self.flash.read(offset, length).ljust(64, b"\xff"))]
        if op in (_SYNC, _READ_REG, _WRITE_REG, _SPI_ATTACH, _SPI_SET_PARAMS, _CHANGE_BAUDRATE):
            return [self._reply(op, error=_ERR_INVALID)]  # known command, malformed payload
        # Unknown (GET_SECURITY_INFO 0x14 included: the ESP32 ROM predates it). The reply does
        # not echo the command byte, which is how esptool tells "unsupported" from "failed".
        self.stats.invalid_commands += 1
        return [self._reply(0x00, error=_ERR_INVALID)]

    def _write_reg(self, addr: int, value: int, mask: int) -> None:
        self._regs[addr] = (self._regs.get(addr, 0) & ~mask) | (value & mask)
        if addr == _SPI_CMD and self._regs[addr] & _SPI_CMD_USR:
            self._spi_command()
            self._regs[addr] &= ~_SPI_CMD_USR  # done at once: esptool polls for this bit

    def _spi_command(self) -> None:
        usr, command = self._regs.get(_SPI_USR, 0), self._regs.get(_SPI_USR2, 0) & 0xFF
        addr = 0
        if usr & _USR_ADDR:
            addr_bits = ((self._regs.get(_SPI_USR1, 0) >> 26) & 0x3F) + 1
            addr = self._regs.get(_SPI_ADDR, 0) >> (32 - addr_bits)  # esptool sends it MSB-first
        answer = _SPI_ANSWERS.get(command, b"")
        if command == 0x5A:  # RDSFDP
            answer = _SFDP[addr : addr + 4].ljust(4, b"\xff")
        if usr & _USR_MISO:
            bits = self._regs.get(_SPI_MISO_DLEN, 0) + 1
            word = int.from_bytes(answer.ljust(4, b"\x00")[:4], "little")
            self._regs[_SPI_W0] = word & ((1 << min(bits, 32)) - 1)

    def _begin(self, op: int, payload: bytes) -> bytes:
        erase_size, blocks, block_size, offset = struct.unpack_from("<IIII", payload)
        self._abort_session()  # an unfinished earlier session is abandoned, not half-applied
        if not 0 < block_size <= _MAX_BLOCK:
            return self._reply(op, error=_ERR_INVALID)
        base = offset - offset % SECTOR_SIZE
        erase_end = -(-(offset + erase_size) // SECTOR_SIZE) * SECTOR_SIZE
        write_end = offset + (erase_size if op == _DEFL_BEGIN else blocks * block_size)
        end = min(max(erase_end, write_end), FLASH_SIZE)
        if offset >= FLASH_SIZE or erase_end > FLASH_SIZE:
            return self._reply(op, error=_ERR_FAILED)
        if blocks == 0:  # esptool's `run` sends an empty begin before FLASH_END
            return self._reply(op)
        shadow = bytearray(self.flash.read(base, end - base))
        shadow[: erase_end - base] = b"\xff" * (erase_end - base)  # the ROM erases up front
        inflater = zlib.decompressobj() if op == _DEFL_BEGIN else None
        self._session = _Session(base, offset - base, shadow, blocks, block_size, inflater)
        return self._reply(op)

    def _data(self, op: int, payload: bytes, chk: int) -> bytes:
        if len(payload) < 16:
            return self._reply(op, error=_ERR_INVALID)
        size, seq = struct.unpack_from("<II", payload)
        data = payload[16:]
        if size != len(data):
            return self._reply(op, error=_ERR_INVALID)
        if chk != checksum(data) or self._take("bad_checksum", op):
            self.stats.checksum_errors += 1
            return self._reply(op, error=_ERR_CHECKSUM)
        s = self._session
        if s is None or (s.inflater is not None) != (op == _DEFL_DATA):
            return self._reply(op, error=_ERR_FAILED)
        if seq == s.next_seq - 1:  # the host retrying a block whose reply it lost
            return self._reply(op)
        if s.done or seq != s.next_seq or size > s.block_size:
            return self._reply(op, error=_ERR_INVALID)
        if s.inflater is not None:
            try:
                out = s.inflater.decompress(data)
            except zlib.error:
                self._abort_session()
                return self._reply(op, error=_ERR_DEFLATE)
            ok, s.produced = s.program(s.produced, out), s.produced + len(out)
        else:
            ok = s.program(seq * s.block_size, data)
        if not ok:
            self._abort_session()
            return self._reply(op, error=_ERR_DEFLATE if s.inflater else _ERR_INVALID)
        s.next_seq += 1
        if s.next_seq < s.blocks:
            return self._reply(op)
        if s.inflater is not None and not s.inflater.eof:
            self._abort_session()
            return self._reply(op, error=_ERR_DEFLATE)
        try:
            self.flash.commit([(s.base, bytes(s.shadow))])
        except VirtualEsp32Error:
            self._abort_session()
            return self._reply(op, error=_ERR_FLASH_WRITE)
        s.done = True
        self.stats.sessions_committed += 1
        return self._reply(op)

    def _md5(self, op: int, payload: bytes) -> bytes:
        addr, size, _, _ = struct.unpack("<IIII", payload)
        if addr + size > FLASH_SIZE:
            return self._reply(op, error=_ERR_FLASH_READ)
        digest = self.flash.md5(addr, size)
        if self._take("md5_mismatch", None):
            self.stats.md5_mismatches += 1
            digest = hashlib.md5(digest.encode()).hexdigest()
        return self._reply(op, digest.encode("ascii"))  # the ROM answers in hex text

    def _abort_session(self) -> None:
        if self._session is not None and not self._session.done:
            self.stats.sessions_aborted += 1
        self._session = None
