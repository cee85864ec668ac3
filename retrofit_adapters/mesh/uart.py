"""The framing of the UART between the mesh's root node and the gateway (docs/mesh.md "UART
between root and gateway"): COBS frames ended by one 0x00, decoded = type + body + CRC-32 (little
endian) of type + body, at most 512 bytes decoded.

The CPython twin of `firmware/fogmesh/uart.py`, written apart from it: `hil_tests/vectors/uart.json`
proves the two agree. Pure code, no I/O.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from gateway.errors import BadData

__all__ = [
    "ACK_BAD",
    "ACK_NO_ROUTE",
    "ACK_SENT",
    "ACK_TOO_LONG",
    "MAX_BODY",
    "MAX_FRAME",
    "TYPE_NAMES",
    "T_DOWN",
    "T_DOWNACK",
    "T_HELLO",
    "T_LOG",
    "T_STATUS",
    "T_UP",
    "Decoder",
    "UartError",
    "cobs",
    "decode_frame",
    "down_body",
    "downack_body",
    "encode",
    "parse_down",
    "parse_downack",
    "parse_up",
    "uncobs",
    "up_body",
]

T_UP: Final = 1  # root -> gw: origin(2) seq(2) hops(1) payload
T_DOWN: Final = 2  # gw -> root: dest(2) token(2) payload
T_DOWNACK: Final = 3  # root -> gw: token(2) status(1)
T_STATUS: Final = 4  # root -> gw: CBOR
T_LOG: Final = 5  # root -> gw: UTF-8 text
T_HELLO: Final = 6  # root -> gw: CBOR {"v": 1, "id": root}
TYPE_NAMES: Final[dict[int, str]] = {
    T_UP: "UP",
    T_DOWN: "DOWN",
    T_DOWNACK: "DOWNACK",
    T_STATUS: "STATUS",
    T_LOG: "LOG",
    T_HELLO: "HELLO",
}

MAX_FRAME: Final = 512  # decoded: type + body + crc
MAX_BODY: Final = MAX_FRAME - 5

# DOWNACK status
ACK_SENT: Final = 0
ACK_NO_ROUTE: Final = 1
ACK_TOO_LONG: Final = 2
ACK_BAD: Final = 3

_MAX_ENCODED: Final = MAX_FRAME + 3  # COBS adds one code byte per 254 data bytes
_MIN_FRAME: Final = 5  # type + crc
_CRC: Final = struct.Struct("<I")
_UP: Final = struct.Struct(">HHB")
_DOWN: Final = struct.Struct(">HH")
_DOWNACK: Final = struct.Struct(">HB")


class UartError(BadData, ValueError):
    """Bytes that are not a valid frame or body, or a frame that cannot be encoded."""


def cobs(data: bytes) -> bytes:
    """COBS as Cheshire & Baker define it (and Wikipedia's reference code writes it): blocks of
    at most 254 data bytes, no empty block after a full one that ends the data. No delimiter."""
    out = bytearray()
    i = 0
    n = len(data)
    while True:
        j = data.find(0, i)
        end = n if j < 0 else j
        full = False
        while end - i >= 254:
            out.append(0xFF)
            out += data[i : i + 254]
            i += 254
            full = True
        if j < 0 and full and i == n:
            break
        out.append(end - i + 1)
        out += data[i:end]
        if j < 0:
            break
        i = j + 1
    return bytes(out)


def uncobs(data: bytes) -> bytes:
    """Undo `cobs`; UartError when a block runs past the end or the data holds a 0x00."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise UartError(f"COBS data holds a 0x00 at offset {i}")
        end = i + code
        if end > n:
            raise UartError(f"COBS block at offset {i} runs {end - n} B past the end")
        block = data[i + 1 : end]
        if 0 in block:
            raise UartError(f"COBS data holds a 0x00 at offset {i + 1 + block.index(0)}")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode(typ: int, body: bytes) -> bytes:
    """One frame as it goes on the wire, the trailing 0x00 included."""
    if not 0 <= typ <= 255:
        raise UartError(f"frame type {typ} is not 0..255")
    if len(body) > MAX_BODY:
        raise UartError(f"frame body of {len(body)} B exceeds {MAX_BODY} B")
    raw = bytes((typ,)) + bytes(body)
    return cobs(raw + _CRC.pack(zlib.crc32(raw))) + b"\x00"


def decode_frame(encoded: bytes) -> tuple[int, bytes]:
    """One frame without its delimiter -> (type, body); UartError says what is wrong."""
    if len(encoded) > _MAX_ENCODED:
        raise UartError(f"frame of {len(encoded)} encoded B exceeds {MAX_FRAME} B decoded")
    raw = uncobs(encoded)
    if len(raw) < _MIN_FRAME:
        raise UartError(f"frame of {len(raw)} B is shorter than type + CRC ({_MIN_FRAME} B)")
    if len(raw) > MAX_FRAME:
        raise UartError(f"frame of {len(raw)} B exceeds {MAX_FRAME} B")
    (crc,) = _CRC.unpack_from(raw, len(raw) - 4)
    if zlib.crc32(raw[:-4]) != crc:
        raise UartError("frame CRC mismatch")
    return raw[0], raw[1:-4]


class Decoder:
    """Feed it whatever the port read; it returns the good frames as (type, body) and counts the
    rest. Garbage is dropped up to the next 0x00, where decoding starts afresh; the bytes held
    never exceed one maximal encoded frame. Two 0x00 in a row (an empty frame) are ignored."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._over = False  # the frame under way has outgrown MAX_FRAME: drop it
        self.frames = 0
        self.bad_crc = 0
        self.bad_cobs = 0  # bad COBS, or shorter than type + CRC
        self.oversize = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget an unfinished frame (after a reconnect)."""
        self._buf.clear()
        self._over = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        data = bytes(data)
        out: list[tuple[int, bytes]] = []
        buf = self._buf
        i = 0
        n = len(data)
        while i < n:
            j = data.find(0, i)
            end = n if j < 0 else j
            if end > i and not self._over:
                if len(buf) + end - i > _MAX_ENCODED:
                    self._over = True
                    buf.clear()
                else:
                    buf += data[i:end]
            if j < 0:
                break
            if self._over:
                self.oversize += 1
            elif buf:
                frame = self._decode(bytes(buf))
                if frame is not None:
                    out.append(frame)
            buf.clear()
            self._over = False
            i = j + 1
        return out

    def _decode(self, encoded: bytes) -> tuple[int, bytes] | None:
        try:
            raw = uncobs(encoded)
        except UartError:
            self.bad_cobs += 1
            return None
        if len(raw) < _MIN_FRAME:
            self.bad_cobs += 1
            return None
        if len(raw) > MAX_FRAME:
            self.oversize += 1
            return None
        (crc,) = _CRC.unpack_from(raw, len(raw) - 4)
        if zlib.crc32(raw[:-4]) != crc:
            self.bad_crc += 1
            return None
        self.frames += 1
        return raw[0], raw[1:-4]


# --- bodies ---------------------------------------------------------------------------------


def _check(what: str, value: int, hi: int) -> None:
    if not 0 <= value <= hi:
        raise UartError(f"{what} {value} is not 0..{hi}")


def up_body(origin: int, seq: int, hops: int, payload: bytes) -> bytes:
    _check("origin", origin, 0xFFFF)
    _check("seq", seq, 0xFFFF)
    _check("hops", hops, 0xFF)
    return _UP.pack(origin, seq, hops) + payload


def parse_up(body: bytes) -> tuple[int, int, int, bytes]:
    """-> (origin, seq, hops, payload)"""
    if len(body) < _UP.size:
        raise UartError(f"UP body of {len(body)} B is shorter than its {_UP.size} B header")
    origin, seq, hops = _UP.unpack_from(body)
    return origin, seq, hops, bytes(body[_UP.size :])


def down_body(dest: int, token: int, payload: bytes) -> bytes:
    _check("dest", dest, 0xFFFF)
    _check("token", token, 0xFFFF)
    return _DOWN.pack(dest, token) + payload


def parse_down(body: bytes) -> tuple[int, int, bytes]:
    """-> (dest, token, payload)"""
    if len(body) < _DOWN.size:
        raise UartError(f"DOWN body of {len(body)} B is shorter than its {_DOWN.size} B header")
    dest, token = _DOWN.unpack_from(body)
    return dest, token, bytes(body[_DOWN.size :])


def downack_body(token: int, status: int) -> bytes:
    _check("token", token, 0xFFFF)
    _check("status", status, 0xFF)
    return _DOWNACK.pack(token, status)


def parse_downack(body: bytes) -> tuple[int, int]:
    """-> (token, status)"""
    if len(body) != _DOWNACK.size:
        raise UartError(f"DOWNACK body must be {_DOWNACK.size} B, got {len(body)} B")
    token, status = _DOWNACK.unpack(body)
    return int(token), int(status)
