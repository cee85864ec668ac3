# A node's anomaly detector: the pipeline section of a model blob around the int8 engine.
#
# Per sample it computes what models/pipeline.py's StreamingScorer computes (layout and
# arithmetic: docs/model-format.md):
#   1. per channel, over its last `window` values (fewer at the start): mean, population std,
#      dev = value − mean; the channel's feature kinds, in their stored order;
#   2. z = clip((feature − mean) · inv_std, ±clip)   (the standardizer, folded into the blob);
#   3. q = saturate(round_half_away(z / input_scale) + input_zp), the int8 network, then
#      reconstruction = (yq − output_zp) · output_scale;
#   4. raw score = mean |z − reconstruction|; score = mean of the last `smooth` raw scores;
#      alarm = score > threshold.
#
#   d = Detector(open("model.bin", "rb").read())   # ModelError without a pipeline section
#   score = d.push(row)   # row: one value per channel, in d.channels order
#   if d.alarm: ...
#
# Every buffer is allocated once in __init__; push() allocates only the float objects its
# arithmetic makes. Histories are summed oldest first, as the reference does.

import math
import struct
from array import array

from micropython import const

from fogmesh.int8 import Model, ModelError

_HEAD = "<HHHHff"  # window, smooth, channel count, feature count, clip, threshold
_HEAD_SIZE = const(16)
_VALUE = const(0)
_MEAN = const(1)
_STD = const(2)
_DEV = const(3)
# Double arrays where floats are doubles (unix port), single where they are single (ESP32):
# the arrays then hold exactly the floats the arithmetic makes, at the smallest size.
_FT = "d" if 1.0 + 1e-10 != 1.0 else "f"
_FSIZE = 8 if _FT == "d" else 4


def _zeros(n):
    return array(_FT, bytes(_FSIZE * n))


class Detector:
    def __init__(self, blob):
        m = Model(blob)
        p = m.pipeline
        if p is None:
            raise ModelError("blob has no pipeline section")
        n = len(p)
        if n < _HEAD_SIZE:
            raise ModelError("pipeline section truncated")
        window, smooth, n_ch, n_feat, clip, threshold = struct.unpack_from(_HEAD, p, 0)
        if n_feat != m.n_in:
            raise ModelError("pipeline has %d features, network takes %d" % (n_feat, m.n_in))
        # x - x != 0 holds for inf and nan only.
        if window < 1 or smooth < 1 or n_ch < 1 or not clip > 0 or clip - clip != 0:
            raise ModelError("bad pipeline header")
        if threshold - threshold != 0:
            raise ModelError("bad pipeline header")
        at = _HEAD_SIZE + 8 * n_feat
        if at > n:
            raise ModelError("pipeline section truncated")
        self._mean = array(_FT, struct.unpack_from("<%df" % n_feat, p, _HEAD_SIZE))
        self._inv = array(_FT, struct.unpack_from("<%df" % n_feat, p, _HEAD_SIZE + 4 * n_feat))
        codes = bytearray(n_feat)
        nk = bytearray(n_ch)
        need = bytearray(n_ch)  # bit 0: the channel needs its mean, bit 1: its std
        names = []
        f = 0
        for c in range(n_ch):
            if at >= n or at + 1 + p[at] >= n:
                raise ModelError("pipeline channel %d truncated" % c)
            k = p[at]
            if f + k > n_feat:
                raise ModelError("pipeline kinds exceed its feature count")
            for j in range(k):
                code = p[at + 1 + j]
                if code > _DEV:
                    raise ModelError("pipeline feature code %d unknown" % code)
                codes[f] = code
                f += 1
                if code != _VALUE:
                    need[c] |= 1
                if code == _STD:
                    need[c] |= 2
            nk[c] = k
            at += 1 + k
            name_len = p[at]
            if at + 1 + name_len > n:
                raise ModelError("pipeline channel %d truncated" % c)
            try:
                names.append(str(bytes(p[at + 1 : at + 1 + name_len]), "utf-8"))
            except UnicodeError:
                raise ModelError("pipeline channel %d name is not UTF-8" % c)
            at += 1 + name_len
        if f != n_feat or n - at > 3:
            raise ModelError("pipeline channels do not match the section")
        for i in range(n_feat):
            v = self._inv[i]
            if not v > 0 or v - v != 0:
                raise ModelError("pipeline inv_std must be finite and > 0")
            v = self._mean[i]
            if v - v != 0:
                raise ModelError("pipeline mean must be finite")
        self.model = m
        self.channels = tuple(names)
        self.window = window
        self.smooth = smooth
        self.clip = clip
        self.threshold = threshold
        self._codes = bytes(codes)
        self._nk = bytes(nk)
        self._need = bytes(need)
        self._ring = _zeros(n_ch * window)  # channel c's history: [c·window, (c+1)·window)
        self._scores = _zeros(smooth)
        self._z = _zeros(n_feat)
        self.xq = array("b", bytes(n_feat))  # the int8 input of the last push
        self.reset()

    def reset(self):
        self._head = 0  # ring slot of the next value
        self._n = 0  # values in each channel's history
        self._shead = 0
        self._sn = 0
        self.score = 0.0
        self.alarm = False

    def push(self, row):
        # One sample (one value per channel) → the smoothed score; also sets self.alarm.
        nch = len(self._nk)
        if len(row) != nch:
            raise ModelError("row has %d values, pipeline %d channels" % (len(row), nch))
        w = self.window
        ring = self._ring
        head = self._head
        n = self._n
        if n < w:
            n += 1
            self._n = n
        first = head - n + 1  # the oldest value's slot
        if first < 0:
            first += w
        codes = self._codes
        nk = self._nk
        need = self._need
        means = self._mean
        inv = self._inv
        z = self._z
        xq = self.xq
        clip = self.clip
        m = self.model
        s_in = m.input_scale
        zp = m.input_zp
        f = 0
        for c in range(nch):
            v = float(row[c])
            base = c * w
            ring[base + head] = v
            mean = 0.0
            std = 0.0
            if need[c]:
                s = 0.0
                i = first
                for _ in range(n):
                    s += ring[base + i]
                    i += 1
                    if i == w:
                        i = 0
                mean = s / n
                if need[c] & 2:
                    s = 0.0
                    i = first
                    for _ in range(n):
                        d = ring[base + i] - mean
                        s += d * d
                        i += 1
                        if i == w:
                            i = 0
                    std = math.sqrt(s / n)
            for _ in range(nk[c]):
                code = codes[f]
                if code == _VALUE:
                    x = v
                elif code == _MEAN:
                    x = mean
                elif code == _STD:
                    x = std
                else:
                    x = v - mean
                x = (x - means[f]) * inv[f]
                if x > clip:
                    x = clip
                elif x < -clip:
                    x = -clip
                z[f] = x
                # Round half away from zero, saturate; bounding t first keeps q a small int.
                t = x / s_in
                if t > 300.0:
                    t = 300.0
                elif t < -300.0:
                    t = -300.0
                q = (int(t + 0.5) if t >= 0 else -int(0.5 - t)) + zp
                xq[f] = 127 if q > 127 else (-128 if q < -128 else q)
                f += 1
        head += 1
        self._head = 0 if head == w else head
        y = m.run(xq)
        zp = m.output_zp
        s_out = m.output_scale
        raw = 0.0
        for j in range(f):
            raw += abs(z[j] - (y[j] - zp) * s_out)
        raw /= f
        sc = self._scores
        k = self.smooth
        sh = self._shead
        sc[sh] = raw
        sh += 1
        self._shead = 0 if sh == k else sh
        sn = self._sn
        if sn < k:
            sn += 1
            self._sn = sn
        i = self._shead - sn
        if i < 0:
            i += k
        s = 0.0
        for _ in range(sn):
            s += sc[i]
            i += 1
            if i == k:
                i = 0
        score = s / sn
        self.score = score
        self.alarm = score > self.threshold
        return score
