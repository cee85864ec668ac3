# The framing of the UART between the root node and the gateway (docs/mesh.md "UART between
# root and gateway"): COBS, each frame ended by one 0x00; decoded = type(1) + body + crc32 LE of
# type + body; at most 512 B decoded. Pure codec, no I/O: border.py owns the UART.
# The gateway has its own twin (retrofit_adapters/mesh/uart.py); hil_tests/vectors/uart.json
# proves the two agree.

from micropython import const
import binascii
import struct

T_UP = const(1)  # root -> gw: origin(2) seq(2) hops(1) payload
T_DOWN = const(2)  # gw -> root: dest(2) token(2) payload
T_DOWNACK = const(3)  # root -> gw: token(2) status(1)
T_STATUS = const(4)  # root -> gw: CBOR
T_LOG = const(5)  # root -> gw: UTF-8 text
T_HELLO = const(6)  # root -> gw: CBOR {"v": 1, "id": root}

MAX_FRAME = const(512)  # decoded: type + body + crc
MAX_BODY = const(507)  # MAX_FRAME - 1 - 4

# DOWNACK status
ACK_SENT = const(0)
ACK_NO_ROUTE = const(1)
ACK_TOO_LONG = const(2)
ACK_BAD = const(3)

# Encoded (COBS) length of a MAX_FRAME frame, without the delimiter: one code byte per 254.
_MAX_ENC = const(515)
_MIN_FRAME = const(5)  # type + crc


class UartError(ValueError):
    pass


def encode(typ, body):
    # One frame as it goes on the wire, trailing 0x00 included.
    n = len(body)
    if not 0 <= typ <= 255:
        raise UartError("frame type %d is not 0..255" % typ)
    if n > MAX_BODY:
        raise UartError("frame body of %d B exceeds %d B" % (n, MAX_BODY))
    raw = bytearray(n + 5)
    raw[0] = typ
    raw[1 : n + 1] = body
    struct.pack_into("<I", raw, n + 1, binascii.crc32(memoryview(raw)[: n + 1]) & 0xFFFFFFFF)
    return _cobs(raw, 1)


def cobs(data):
    # COBS-encode `data` (no delimiter).
    return _cobs(data, 0)


def _cobs(data, tail):
    # COBS as in Cheshire & Baker (and Wikipedia's reference code): a block holds at most 254
    # data bytes; a run of exactly 254 at the very end gets no empty block after it. `tail`
    # zero bytes follow (the delimiter). Zero runs are found with find(), not byte by byte.
    n = len(data)
    out = bytearray(n + 1 + n // 254 + tail)
    mv = memoryview(data)
    w = 0  # where the current block's code byte goes
    i = 0
    while True:
        j = data.find(b"\x00", i)
        end = n if j < 0 else j
        full = False
        while end - i >= 254:
            out[w] = 0xFF
            out[w + 1 : w + 255] = mv[i : i + 254]
            w += 255
            i += 254
            full = True
        if j < 0 and full and i == n:
            break
        k = end - i
        out[w] = k + 1
        out[w + 1 : w + 1 + k] = mv[i:end]
        w += k + 1
        if j < 0:
            break
        i = j + 1
    w += tail  # the delimiter is already 0
    return bytes(memoryview(out)[:w])


class Decoder:
    # Feed it whatever the UART read; it returns the good frames as (type, body) and counts the
    # rest. Garbage is dropped up to the next 0x00, where decoding starts afresh. One buffer,
    # allocated once, holds the frame under way and is decoded in place; feed() allocates the
    # frames it returns and a few small objects per call and per frame, never per byte.

    def __init__(self):
        self._enc = bytearray(_MAX_ENC)
        self._enc_mv = memoryview(self._enc)
        self._n = 0  # encoded bytes held
        self._over = False  # the frame under way has outgrown the buffer: drop it
        self.frames = 0
        self.bad_crc = 0
        self.bad_cobs = 0  # bad COBS, or shorter than type + crc
        self.oversize = 0

    def reset(self):
        self._n = 0
        self._over = False

    def feed(self, data):
        # data: bytes or bytearray (anything else is copied once into bytes)
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        out = []
        n = len(data)
        mv = memoryview(data)
        i = 0
        while i < n:
            j = data.find(b"\x00", i)
            end = n if j < 0 else j
            k = end - i
            if k and not self._over:
                m = self._n
                if m + k > _MAX_ENC:
                    self._over = True
                else:
                    self._enc_mv[m : m + k] = mv[i:end]
                    self._n = m + k
            if j < 0:
                break
            if self._over:
                self.oversize += 1
            elif self._n:  # two 0x00 in a row: an empty frame, ignored
                f = self._decode()
                if f is not None:
                    out.append(f)
            self._n = 0
            self._over = False
            i = j + 1
        return out

    def _decode(self):
        # In place: each code byte but the first stands for a 0x00, except one that follows a
        # full block (0xFF), which stands for nothing and is squeezed out.
        b = self._enc
        n = self._n
        r = 0
        prev = 0
        skips = 0
        while r < n:  # the chain of code bytes must end exactly at the end
            code = b[r]
            if r and prev == 0xFF:
                skips += 1
            prev = code
            r += code
        if r != n:
            self.bad_cobs += 1
            return None
        if not skips:  # the usual case: no run of 254 nonzero bytes, nothing moves
            r = b[0]
            while r < n:
                code = b[r]
                b[r] = 0
                r += code
            start = 1
            end = n
        else:
            r = 0
            w = 0
            prev = 0xFF
            while r < n:
                code = b[r]
                if prev != 0xFF:
                    b[w] = 0
                    w += 1
                for x in range(r + 1, r + code):
                    b[w] = b[x]
                    w += 1
                prev = code
                r += code
            start = 0
            end = w
        size = end - start
        if size < _MIN_FRAME:
            self.bad_cobs += 1
            return None
        if size > MAX_FRAME:
            self.oversize += 1
            return None
        mv = self._enc_mv
        if binascii.crc32(mv[start : end - 4]) & 0xFFFFFFFF != struct.unpack_from("<I", b, end - 4)[0]:
            self.bad_crc += 1
            return None
        self.frames += 1
        return (b[start], bytes(mv[start + 1 : end - 4]))


# --- bodies -----------------------------------------------------------------------------


def _check(what, v, hi):
    if not 0 <= v <= hi:
        raise UartError("%s %d is not 0..%d" % (what, v, hi))


def up_body(origin, seq, hops, payload):
    _check("origin", origin, 0xFFFF)
    _check("seq", seq, 0xFFFF)
    _check("hops", hops, 0xFF)
    return struct.pack(">HHB", origin, seq, hops) + payload


def parse_up(body):
    # -> (origin, seq, hops, payload)
    if len(body) < 5:
        raise UartError("UP body of %d B is shorter than its 5 B header" % len(body))
    origin, seq, hops = struct.unpack_from(">HHB", body, 0)
    return origin, seq, hops, bytes(body[5:])


def down_body(dest, token, payload):
    _check("dest", dest, 0xFFFF)
    _check("token", token, 0xFFFF)
    return struct.pack(">HH", dest, token) + payload


def parse_down(body):
    # -> (dest, token, payload)
    if len(body) < 4:
        raise UartError("DOWN body of %d B is shorter than its 4 B header" % len(body))
    dest, token = struct.unpack_from(">HH", body, 0)
    return dest, token, bytes(body[4:])


def downack_body(token, status):
    _check("token", token, 0xFFFF)
    _check("status", status, 0xFF)
    return struct.pack(">HB", token, status)


def parse_downack(body):
    # -> (token, status)
    if len(body) != 3:
        raise UartError("DOWNACK body must be 3 B, got %d B" % len(body))
    return struct.unpack(">HB", body)
