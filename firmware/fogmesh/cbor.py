# A small CBOR (RFC 8949) codec for the mesh's application payloads.
#
#   data = dumps({"k": "sum", "u": 12, "ch": {"temp": [20.5, 21.0, 20.7]}})
#   obj = loads(data)   # bytes, bytearray or memoryview; CBORError on anything malformed
#
# Encoder: int (-2**64 .. 2**64-1), bytes/bytearray, str, list/tuple, dict, True/False/None,
# float. The output is canonical and equals cbor2.dumps(obj, canonical=True) byte for byte:
# shortest integer heads, map keys sorted by the length of their encoding and then bytewise,
# each float in the shortest of half/single/double that keeps its value exactly, every NaN as
# f97e00. Other types, and nesting deeper than 16 containers, raise CBORError.
#
# Decoder: definite and indefinite lengths, half/single/double floats, false/true/null and
# undefined (read as None). It rejects with CBORError: tags (major type 6: nothing in the mesh
# uses them, and skipping one would silently change a value's meaning, e.g. a bignum), other
# simple values, truncated input, trailing bytes, reserved additional information (28..30),
# nesting deeper than 16, lengths beyond the buffer, non-UTF-8 text (strict: no overlongs, no
# surrogates), a break outside an indefinite item, and map keys that are arrays or maps. Every
# length is checked against the bytes left before anything is sliced or allocated.
# Byte strings decode to bytes, arrays to lists, maps to dicts (a repeated key: the last wins).

import struct
from math import frexp, ldexp

from micropython import const

_MAX_DEPTH = const(16)
_BREAK = const(0xFF)
_HALF_MAX = 65504.0
_NHALF_MAX = -65504.0
_SINGLE_MAX = 3.4028234663852886e38
_NSINGLE_MAX = -3.4028234663852886e38
_INF = float("inf")
_NINF = float("-inf")


class CBORError(ValueError):
    pass


_scratch = bytearray(8)  # float packing; the codec never yields, so one buffer serves all


# Encoder


def _head(buf, major, n):
    # Bytes appended one by one: small ints, nothing allocated.
    major <<= 5
    if n < 24:
        buf.append(major | n)
        return
    if n < 0x100:
        buf.append(major | 24)
        shift = 0
    elif n < 0x10000:
        buf.append(major | 25)
        shift = 8
    elif n < 0x100000000:
        buf.append(major | 26)
        shift = 24
    elif n < 0x10000000000000000:
        buf.append(major | 27)
        shift = 56
    else:
        raise CBORError("int out of range")
    while shift >= 0:
        buf.append((n >> shift) & 0xFF)
        shift -= 8


def _half_bits(x):
    # The IEEE half-precision bits of x if a half holds x exactly, else None. Done by hand (not
    # every port's struct has the "e" format) and without float temporaries where it can.
    if x == 0:  # the sign of -0.0 shows only in its bits
        struct.pack_into(">d", _scratch, 0, x)
        return 0x8000 if _scratch[0] & 0x80 else 0
    if x > _HALF_MAX or x < _NHALF_MAX:
        return None
    m, e = frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    if e >= -13:  # normal half: 11 significant bits
        m = m * 2048
        e += 14
    else:  # subnormal half: a multiple of 2**-24
        m = x * 16777216
        e = 0
    i = int(m)
    if m != i:
        return None
    if i < 0:
        return 0x8000 | (e << 10) | ((-i) & 0x3FF)
    return (e << 10) | (i & 0x3FF)


def _float(buf, x):
    if x != x:
        buf.extend(b"\xf9\x7e\x00")
        return
    if x == _INF:
        buf.extend(b"\xf9\x7c\x00")
        return
    if x == _NINF:
        buf.extend(b"\xf9\xfc\x00")
        return
    h = _half_bits(x)
    if h is not None:
        buf.append(0xF9)
        buf.append(h >> 8)
        buf.append(h & 0xFF)
        return
    sc = _scratch
    if _NSINGLE_MAX <= x <= _SINGLE_MAX:
        struct.pack_into(">f", sc, 0, x)
        if struct.unpack_from(">f", sc, 0)[0] == x:
            buf.append(0xFA)
            for i in range(4):
                buf.append(sc[i])
            return
    struct.pack_into(">d", sc, 0, x)
    buf.append(0xFB)
    buf.extend(sc)


def _key_lt(buf, a0, a1, b0, b1):
    # Canonical key order (as cbor2's canonical=True): shorter encoding first, then bytewise.
    if a1 - a0 != b1 - b0:
        return a1 - a0 < b1 - b0
    while a0 < a1:
        if buf[a0] != buf[b0]:
            return buf[a0] < buf[b0]
        a0 += 1
        b0 += 1
    return False


def _map(buf, obj, depth):
    # Entries are encoded in the dict's order, straight into buf, then the region is permuted
    # into key order: one copy of the map instead of one buffer per key.
    _head(buf, 5, len(obj))
    start = len(buf)
    offs = []  # per entry: key start, value start, end
    for k, v in obj.items():
        k0 = len(buf)
        _enc(buf, k, depth)
        v0 = len(buf)
        _enc(buf, v, depth)
        offs.append((k0, v0, len(buf)))
    n = len(offs)
    ordered = True
    for i in range(1, n):
        if not _key_lt(buf, offs[i - 1][0], offs[i - 1][1], offs[i][0], offs[i][1]):
            ordered = False
            break
    if ordered:
        return
    for i in range(1, n):  # insertion sort: maps are small
        e = offs[i]
        j = i - 1
        while j >= 0 and _key_lt(buf, e[0], e[1], offs[j][0], offs[j][1]):
            offs[j + 1] = offs[j]
            j -= 1
        offs[j + 1] = e
    region = memoryview(bytes(memoryview(buf)[start:]))
    p = start
    for k0, _, end in offs:
        q = p + end - k0
        buf[p:q] = region[k0 - start : end - start]
        p = q


def _enc(buf, obj, depth):
    if obj is None:
        buf.append(0xF6)
    elif obj is True:
        buf.append(0xF5)
    elif obj is False:
        buf.append(0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            _head(buf, 0, obj)
        else:
            _head(buf, 1, -1 - obj)
    elif isinstance(obj, float):
        _float(buf, obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _head(buf, 2, len(obj))
        buf.extend(obj)
    elif isinstance(obj, str):
        b = obj.encode()
        _head(buf, 3, len(b))
        buf.extend(b)
    elif isinstance(obj, (list, tuple, dict)):
        if depth >= _MAX_DEPTH:
            raise CBORError("nesting deeper than 16")
        if isinstance(obj, dict):
            _map(buf, obj, depth + 1)
        else:
            _head(buf, 4, len(obj))
            for v in obj:
                _enc(buf, v, depth + 1)
    else:
        raise CBORError("cannot encode type " + type(obj).__name__)


def dumps(obj):
    buf = bytearray()
    _enc(buf, obj, 0)
    return bytes(buf)


# Decoder


def _utf8_strict(b):
    # MicroPython's str() lets overlong forms, surrogates and code points past U+10FFFF through.
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            k, lo, hi = 1, 0x80, 0xBF
        elif 0xE0 <= c <= 0xEF:
            k = 2
            lo = 0xA0 if c == 0xE0 else 0x80
            hi = 0x9F if c == 0xED else 0xBF
        elif 0xF0 <= c <= 0xF4:
            k = 3
            lo = 0x90 if c == 0xF0 else 0x80
            hi = 0x8F if c == 0xF4 else 0xBF
        else:
            return False
        if i + k >= n:
            return False
        if not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += k + 1
    return True


def _half(bits):
    e = (bits >> 10) & 0x1F
    m = bits & 0x3FF
    if e == 0x1F:
        x = float("nan") if m else float("inf")
    elif e == 0:
        x = m / 16777216
    else:
        x = ldexp(m + 1024, e - 25)
    return -x if bits & 0x8000 else x


class _Decoder:
    def __init__(self, data):
        self.mv = memoryview(data)
        self.pos = 0
        self.end = len(data)

    def take(self, n):
        p = self.pos
        if n > self.end - p:
            raise CBORError("truncated at %d" % p)
        self.pos = p + n
        return self.mv[p : p + n]

    def byte(self):
        if self.pos >= self.end:
            raise CBORError("truncated at %d" % self.pos)
        b = self.mv[self.pos]
        self.pos += 1
        return b

    def arg(self, ai):
        # The head's argument; None for an indefinite length (ai 31).
        if ai < 24:
            return ai
        if ai == 24:
            return self.byte()
        if ai <= 27:  # 2, 4 or 8 bytes, read in place (no slice, no tuple)
            k = 1 << (ai - 24)
            p = self.pos
            if k > self.end - p:
                raise CBORError("truncated at %d" % p)
            mv = self.mv
            n = 0
            for i in range(p, p + k):
                n = (n << 8) | mv[i]
            self.pos = p + k
            return n
        if ai == 31:
            return None
        raise CBORError("reserved info %d at %d" % (ai, self.pos - 1))

    def string(self, major, n):
        if n is None:
            parts = []
            while True:
                ib = self.byte()
                if ib == _BREAK:
                    break
                if ib >> 5 != major or ib & 0x1F == 31:
                    raise CBORError("bad chunk at %d" % (self.pos - 1))
                parts.append(self.string(major, self.arg(ib & 0x1F)))
            return (b"" if major == 2 else "").join(parts)
        b = self.take(n)
        if major == 2:
            return bytes(b)
        try:
            s = str(b, "utf-8")
        except UnicodeError:
            s = None
        if s is None or (len(s) != n and not _utf8_strict(b)):
            raise CBORError("bad UTF-8 at %d" % (self.pos - n))
        return s

    def item(self, depth):
        ib = self.byte()
        major = ib >> 5
        ai = ib & 0x1F
        if major == 7:
            return self.simple(ib, ai)
        n = self.arg(ai)
        if major == 0:
            if n is None:
                raise CBORError("indefinite int")
            return n
        if major == 1:
            if n is None:
                raise CBORError("indefinite int")
            return -1 - n
        if major == 2 or major == 3:
            return self.string(major, n)
        if major == 6:
            raise CBORError("tag at %d" % (self.pos - 1))
        if depth >= _MAX_DEPTH:
            raise CBORError("nesting deeper than 16")
        depth += 1
        if major == 4:
            out = []
            if n is None:
                while not self.at_break():
                    out.append(self.item(depth))
            else:
                # Every item takes at least one byte: a count beyond the buffer is an error
                # before anything is allocated.
                if n > self.end - self.pos:
                    raise CBORError("array length %d beyond end" % n)
                for _ in range(n):
                    out.append(self.item(depth))
            return out
        out = {}
        if n is None:
            while not self.at_break():
                self.pair(out, depth)
        else:
            if n > (self.end - self.pos) // 2:
                raise CBORError("map length %d beyond end" % n)
            for _ in range(n):
                self.pair(out, depth)
        return out

    def at_break(self):
        if self.pos >= self.end:
            raise CBORError("truncated: no break")
        if self.mv[self.pos] == _BREAK:
            self.pos += 1
            return True
        return False

    def pair(self, out, depth):
        at = self.pos
        k = self.item(depth)
        if isinstance(k, (list, dict)):
            raise CBORError("bad map key at %d" % at)
        if self.pos < self.end and self.mv[self.pos] == _BREAK:
            raise CBORError("key without value at %d" % at)
        out[k] = self.item(depth)

    def simple(self, ib, ai):
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22 or ai == 23:
            return None
        if ai == 25:
            return _half(self.arg(25))
        if ai == 26 or ai == 27:
            k = 4 if ai == 26 else 8
            p = self.pos
            if k > self.end - p:
                raise CBORError("truncated at %d" % p)
            self.pos = p + k
            return struct.unpack_from(">f" if k == 4 else ">d", self.mv, p)[0]
        if ai == 31:
            raise CBORError("stray break at %d" % (self.pos - 1))
        if 28 <= ai <= 30:
            raise CBORError("reserved info %d at %d" % (ai, self.pos - 1))
        if ai == 24 and self.byte() < 32:
            raise CBORError("bad simple value at %d" % (self.pos - 2))
        raise CBORError("simple value at %d" % (self.pos - 1))


def loads(data):
    d = _Decoder(data)
    obj = d.item(0)
    if d.pos != d.end:
        raise CBORError("%d trailing bytes" % (d.end - d.pos))
    return obj
