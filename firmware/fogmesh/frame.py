# The mesh radio frame v1 (docs/mesh.md "Radio frame (v1)"): a 16-byte header, 0..226 bytes of
# payload and an 8-byte MIC (truncated HMAC-SHA256 of header + payload), big-endian.
#
#   f = pack(mac, T_DATA, 0, HOPS_MAX, src, origin, dest, seq, rank, ctr, payload)
#   n = pack_into(buf, mac, ...same fields...)  # into a preallocated bytearray(MAX_FRAME)
#   typ, flags, hops, src, origin, dest, seq, rank, ctr = header(f)   # FrameError: length/version
#   if check(mac, f): data = payload(f)        # a memoryview, no copy
#
# `mac` is a fogmesh.keys.Mac. The header fields are range-checked when packed; header() checks
# only length and version (the type is returned as is, for the caller to judge).

import struct

from micropython import const

_VERSION = const(1)
_HDR = const(16)
_MIC_LEN = const(8)
_MAX_FRAME = const(250)
_MAX_PAYLOAD = const(226)
_MIN_FRAME = const(24)
_FMT = ">BBHHHHHI"

VERSION = _VERSION
HDR = _HDR
MIC_LEN = _MIC_LEN
MAX_FRAME = _MAX_FRAME
MAX_PAYLOAD = _MAX_PAYLOAD
HOPS_MAX = const(16)
BROADCAST = const(0xFFFF)
RANK_INF = const(0xFFFF)

T_BEACON = const(0)
T_DATA = const(1)
T_DOWN = const(2)
T_JOIN = const(3)
T_JOINACK = const(4)
T_DAO = const(5)
T_DIS = const(6)
T_PROBE = const(7)

F_FULL = const(1)


class FrameError(ValueError):
    pass


def _field(name, v, hi):
    if not 0 <= v <= hi:
        raise FrameError("%s out of range 0..%d: %r" % (name, hi, v))


def pack_into(buf, mac, typ, flags, hops, src, origin, dest, seq, rank, ctr, payload):
    n = len(payload)
    if n > _MAX_PAYLOAD:
        raise FrameError("payload of %d bytes > %d" % (n, _MAX_PAYLOAD))
    if len(buf) < _MIN_FRAME + n:
        raise FrameError("buffer of %d bytes < %d" % (len(buf), _MIN_FRAME + n))
    _field("typ", typ, 15)
    _field("flags", flags, 3)
    _field("hops", hops, 255)
    _field("src", src, 0xFFFF)
    _field("origin", origin, 0xFFFF)
    _field("dest", dest, 0xFFFF)
    _field("seq", seq, 0xFFFF)
    _field("rank", rank, 0xFFFF)
    _field("ctr", ctr, 0xFFFFFFFF)
    vt = (_VERSION << 6) | (typ << 2) | flags
    struct.pack_into(_FMT, buf, 0, vt, hops, src, origin, dest, seq, rank, ctr)
    end = _HDR + n
    buf[_HDR:end] = payload
    buf[end : end + _MIC_LEN] = mac.tag(memoryview(buf)[:end])
    return end + _MIC_LEN


def pack(mac, typ, flags, hops, src, origin, dest, seq, rank, ctr, payload):
    buf = bytearray(_MIN_FRAME + len(payload))
    pack_into(buf, mac, typ, flags, hops, src, origin, dest, seq, rank, ctr, payload)
    return bytes(buf)


def _length(frame):
    n = len(frame)
    if not _MIN_FRAME <= n <= _MAX_FRAME:
        raise FrameError("frame of %d bytes outside %d..%d" % (n, _MIN_FRAME, _MAX_FRAME))
    return n


def header(frame):
    _length(frame)
    vt, hops, src, origin, dest, seq, rank, ctr = struct.unpack_from(_FMT, frame, 0)
    if vt >> 6 != _VERSION:
        raise FrameError("frame version %d != %d" % (vt >> 6, _VERSION))
    return ((vt >> 2) & 15, vt & 3, hops, src, origin, dest, seq, rank, ctr)


def payload(frame):
    n = _length(frame)
    return memoryview(frame)[_HDR : n - _MIC_LEN]


def check(mac, frame):
    n = len(frame)
    if not _MIN_FRAME <= n <= _MAX_FRAME:
        return False
    mv = memoryview(frame)
    return mac.verify(mv[: n - _MIC_LEN], mv[n - _MIC_LEN : n])
