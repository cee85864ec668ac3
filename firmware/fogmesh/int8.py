# int8 dense inference for blobs made by `fogmesh model export` (layout: docs/model-format.md).
#
# TFLM's FULLY_CONNECTED arithmetic, bit-exact with the TFLM interpreter: an int32 accumulator
# per output channel, then requantization with double rounding (SaturatingRoundingDoublingHighMul,
# then RoundingDivideByPOT), the output zero point and the activation clamp. No float math runs
# in inference: multipliers and shifts were computed on the host in double precision.
#
#   m = Model(open("model.bin", "rb").read())   # checks magic, version, length and CRC32
#   y = m.run(x)   # x: n_in int8 values (bytes, bytearray or array("b")); y: a reused buffer
#
# Blob versions 1 and 2 load. A version 2 blob may carry a pipeline section (features, folded
# scaling, threshold): Model only checks that it fits and exposes its bytes as m.pipeline (None
# without one); fogmesh/detector.py parses it. The CRC covers it, so it is checked once, here.
#
# The multiply-accumulate loop is viper (machine-word ints); requantization uses Python ints,
# which grow past 32 bits as it needs (viper ints would overflow on a 32-bit ESP32).

import struct
from array import array

import micropython
from micropython import const

_MAGIC = b"FMQ8"
_HEADER = "<4sHHIHHfifi"  # version 1; version 2 appends u32 pipeline section length
_HEADER_SIZE = const(32)
_HEADER2_SIZE = const(36)
_LAYER = "<HHBBbbiii"
_LAYER_SIZE = const(20)
_CRC_SIZE = const(4)
_NUDGE = const(0x40000000)
# Not const(): -2^31 is no small int on a 32-bit port.
_I32_MIN = -0x80000000
_I32_MAX = 0x7FFFFFFF


class ModelError(ValueError):
    pass


def _crc32_py(data):
    # Bitwise CRC-32 (IEEE, as zlib): only for ports built without binascii.crc32.
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xEDB88320
            else:
                crc >>= 1
    return crc ^ 0xFFFFFFFF


def _crc32(data):
    try:
        from binascii import crc32
    except ImportError:
        return _crc32_py(data)
    return crc32(data) & 0xFFFFFFFF


def mbqm(x, m, shift):
    # TFLM MultiplyByQuantizedMultiplier(x, m, shift), double rounding, in Python ints.
    if shift > 0:
        x = x << shift
        right = 0
    else:
        right = -shift
    # SaturatingRoundingDoublingHighMul(x, m): C's truncating division by 2^31.
    if x == _I32_MIN and m == _I32_MIN:
        hi = _I32_MAX
    else:
        ab = x * m
        if ab >= 0:
            hi = (ab + _NUDGE) >> 31
        else:
            hi = -((_NUDGE - 1 - ab) >> 31)
    # RoundingDivideByPOT(hi, right): round half away from zero.
    if right:
        mask = (1 << right) - 1
        rem = hi & mask
        thr = mask >> 1
        if hi < 0:
            thr += 1
        hi >>= right
        if rem > thr:
            hi += 1
    return hi


@micropython.viper
def _mac(w: ptr8, x: ptr8, acc: ptr32, p: ptr32):
    # acc[c] = sum_d (w[c, d] - w_zp) * (x[d] - x_zp); p = [n_in, n_out, x_zp, w_zp].
    # ptr8 reads unsigned bytes: (b ^ 0x80) - 0x80 sign-extends an int8. Every step is a ring
    # operation and the true sum fits int32, so the 32-bit store is exact on any word size.
    n_in = p[0]
    n_out = p[1]
    xz = p[2]
    wz = p[3]
    k = 0
    c = 0
    while c < n_out:
        s = 0
        d = 0
        while d < n_in:
            s += (((w[k] ^ 0x80) - 0x80) - wz) * (((x[d] ^ 0x80) - 0x80) - xz)
            d += 1
            k += 1
        acc[c] = s
        c += 1


class Model:
    def __init__(self, blob):
        n = len(blob)
        if n < _HEADER_SIZE + _CRC_SIZE:
            raise ModelError("blob truncated")
        magic, version, n_layers, total, n_in, n_out, s_in, zp_in, s_out, zp_out = (
            struct.unpack_from(_HEADER, blob, 0)
        )
        if magic != _MAGIC:
            raise ModelError("bad magic")
        if version == 1:
            at = _HEADER_SIZE
            plen = 0
        elif version == 2:
            if n < _HEADER2_SIZE + _CRC_SIZE:
                raise ModelError("blob truncated")
            at = _HEADER2_SIZE
            plen = struct.unpack_from("<I", blob, _HEADER_SIZE)[0]
        else:
            raise ModelError("unsupported version %d" % version)
        if n != total:
            raise ModelError("blob length %d, header says %d" % (n, total))
        mv = memoryview(blob)
        if _crc32(mv[: total - _CRC_SIZE]) != struct.unpack_from("<I", blob, total - _CRC_SIZE)[0]:
            raise ModelError("CRC mismatch")
        # The layers end where the pipeline section (if any) begins.
        end = total - _CRC_SIZE - plen
        if plen & 3 or end < at:
            raise ModelError("bad pipeline section length")
        self.version = version
        self.pipeline = mv[end : end + plen] if plen else None
        self.n_in = n_in
        self.n_out = n_out
        # For the application's feature scaling only; inference never touches them.
        self.input_scale = s_in
        self.input_zp = zp_in
        self.output_scale = s_out
        self.output_zp = zp_out
        width = 1
        specs = []
        for _ in range(n_layers):
            if at + _LAYER_SIZE > end:
                raise ModelError("blob truncated")
            li, lo, _flags, _act, amin, amax, xzp, wzp, yzp = struct.unpack_from(_LAYER, blob, at)
            at += _LAYER_SIZE
            wlen = li * lo
            wpad = wlen + (-wlen % 4)
            if at + wpad + 12 * lo > end:
                raise ModelError("blob truncated")
            w = mv[at : at + wlen]
            at += wpad
            bias = struct.unpack_from("<%di" % lo, blob, at)
            mults = struct.unpack_from("<%di" % lo, blob, at + 4 * lo)
            shifts = struct.unpack_from("<%di" % lo, blob, at + 8 * lo)
            at += 12 * lo
            specs.append((li, lo, w, xzp, wzp, bias, mults, shifts, yzp, amin, amax))
            width = max(width, lo)
        if at != end or not specs or specs[0][0] != n_in or specs[-1][1] != n_out:
            raise ModelError("layers do not match the header")
        # Two ping-pong activation buffers and one accumulator buffer, reused by every run.
        bufs = (array("b", bytes(width)), array("b", bytes(width)))
        self._acc = array("i", bytes(4 * width))
        layers = []
        prev = n_in
        for i, (li, lo, w, xzp, wzp, bias, mults, shifts, yzp, amin, amax) in enumerate(specs):
            if li != prev:
                raise ModelError("layer %d input width %d, expected %d" % (i, li, prev))
            prev = lo
            params = array("i", (li, lo, xzp, wzp))
            layers.append((w, params, lo, bias, mults, shifts, yzp, amin, amax, bufs[i & 1]))
        self._layers = layers
        self._out = memoryview(bufs[(len(layers) - 1) & 1])[:n_out]

    def run(self, x):
        # x: n_in int8 values; returns a view of the output buffer, overwritten by the next run.
        if len(x) != self.n_in:
            raise ModelError("input has %d values, model takes %d" % (len(x), self.n_in))
        acc = self._acc
        src = x
        for w, params, lo, bias, mults, shifts, yzp, amin, amax, dst in self._layers:
            _mac(w, src, acc, params)
            for c in range(lo):
                v = mbqm(acc[c] + bias[c], mults[c], shifts[c]) + yzp
                if v < amin:
                    v = amin
                elif v > amax:
                    v = amax
                dst[c] = v
            src = dst
        return self._out
