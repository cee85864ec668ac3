# The node application: samples, anomaly score, report by exception, downlink commands.
#
#   app = App(cfg, mesh, flash, sensor)   # mesh: fogmesh.mesh.Mesh (or a fake with send/queued)
#   mesh.on_down = app.on_down
#   await app.run(wdt)                    # or, in tests, app.poll(now) -> ms until due again
#
# Every sample goes to the detector (fogmesh.detector, when cfg["model"] names a blob in flash
# whose channels the sensor has) or else to the threshold rule cfg["rule"] (score = the
# channel's value, alarm = above / below its limits). Messages (docs/mesh.md "Application
# payloads"): a summary every summary_s (min/max/mean per channel, the highest score and
# whether the alarm was up in the interval), an event at once when the alarm rises and one when
# it clears (with "alarm": true/false), a status every status_s (60 s), a pong per ping.
# Each message takes the next end-to-end seq from a counter kept in flash (seq, masked to 16
# bits), is logged {"ev": "gen", "seq": n} and goes to mesh.send(); when that refuses (no route,
# queue full) it goes to the flash ring (store.Ring), and while the ring holds anything new
# messages queue behind it, so the root sees each node's messages in order. The ring drains,
# oldest first, whenever the mesh accepts again. While the file `quiet` exists in flash (the
# simulator's drain phase) no message is made; relaying and draining go on.
# A message larger than a frame's payload (226 B: many or long channel names) is split by
# channels into several, each a complete message of its kind. Floats go out as float32.

import asyncio
import os
import struct
from time import ticks_add, ticks_diff, ticks_ms

from micropython import const

from fogmesh import cbor
from fogmesh.hal import exists as _exists
from fogmesh.hal import heap, log, path, unload
from fogmesh.keys import Counter

_MAX_PAYLOAD = const(226)
_DRAIN_MS = const(200)
_DRAIN_BURST = const(4)
_MAX_WAIT = const(1000)
_ERR_MS = const(5000)


def _move(path):
    try:
        os.rename(path, path + ".bad")
    except OSError:
        pass


_F32 = bytearray(4)


def _f32(x):
    struct.pack_into("<f", _F32, 0, x)
    return struct.unpack_from("<f", _F32, 0)[0]


class App:
    def __init__(self, cfg, mesh, flash, sensor, log=log, clock=ticks_ms):
        self.cfg = cfg
        self.mesh = mesh
        self.flash = flash
        self.sensor = sensor
        self._log = log
        self._clock = clock
        self.channels = sensor.channels
        nch = len(self.channels)
        p = path(flash, "seq")
        try:
            self._seq = Counter(p, 16)
        except ValueError as e:
            # The seq counter is unreadable. Starting at 0 would repeat (origin, seq) pairs the
            # root may still hold as seen; a random start makes a clash unlikely.
            log("error", {"what": "seq", "err": str(e)})
            _move(p)
            with open(p, "w") as f:
                f.write("%d\n" % int.from_bytes(os.urandom(2), "big"))
            self._seq = Counter(p, 16)
        self.ring = None  # store.Ring, opened when first needed (or at boot if it has files)
        for name in ("ring.dat", "ring.head", "ring.head.tmp"):
            if _exists(path(flash, name)):
                self._open_ring()
                break
        self._det = None
        m = cfg.get("model")
        if m and _exists(path(flash, m)):  # rare (a model in flash): the code lives in config.py
            self._rare("model")
        self._min = [0.0] * nch
        self._max = [0.0] * nch
        self._sum = [0.0] * nch
        self._n = 0
        self._peak = 0.0  # highest score in the interval
        self._up = False  # alarm seen in the interval
        self.alarm = False
        self.score = 0.0
        self.skipped = 0  # messages not made while quiet
        self._mdl_st = None  # [total, received] of a model transfer under way
        self._err_at = None
        self._bad = 0
        now = clock()
        self._last = now
        self._up_ms = 0
        self.reschedule(now)
        self._t_st = ticks_add(now, int(cfg["status_s"] * 1000))
        mesh.on_down = self.on_down

    def reschedule(self, now=None):
        # After a change of sample_hz or summary_s: the next sample now, a summary one period on.
        now = self._clock() if now is None else now
        self._p_sample = max(10, int(1000 / self.cfg["sample_hz"]))
        self._p_sum = max(100, int(self.cfg["summary_s"] * 1000))
        self._t_sample = now
        self._t_sum = ticks_add(now, self._p_sum)

    # ---- start-up: the ring
    def _open_ring(self):
        # store.py loads only when the mesh first refuses a message (or the ring has files).
        from fogmesh.store import Ring, StoreError

        try:
            self.ring = Ring(self.flash, self.cfg["ring_bytes"], self._log)
        except (StoreError, ValueError) as e:
            self._log("error", {"what": "ring", "err": str(e)})
            for name in ("ring.dat", "ring.head", "ring.head.tmp"):
                _move(path(self.flash, name))  # kept aside for a post-mortem
            self.ring = Ring(self.flash, self.cfg["ring_bytes"], self._log)
        return self.ring

    def _rare(self, what, arg=None):
        # Rare paths (a `cfg` or `mdl` command, a model at boot): their code lives in config.py,
        # loaded for the occasion and dropped again.
        from fogmesh import config

        try:
            return config.rare(self, what, arg)
        finally:
            unload("fogmesh.config")

    # ---- the loop
    async def run(self, wdt=None):
        while True:
            try:
                wait = self.poll(self._clock())
            except Exception as e:  # a bug must not stop the node: log it (rate limited)
                now = self._clock()
                if self._err_at is None or ticks_diff(now, self._err_at) >= _ERR_MS:
                    self._err_at = now
                    self._log("error", {"what": "poll", "err": repr(e)})
                wait = _MAX_WAIT
            if wdt is not None:
                wdt.feed()
            await asyncio.sleep_ms(wait)

    def poll(self, now):
        # Runs what is due; -> ms until something is due again.
        self._up_ms += ticks_diff(now, self._last)
        self._last = now
        if ticks_diff(now, self._t_sum) >= 0:  # first: a sample due now opens the next interval
            self._summary()
            t = ticks_add(self._t_sum, self._p_sum)
            self._t_sum = t if ticks_diff(t, now) > 0 else ticks_add(now, self._p_sum)
        if ticks_diff(now, self._t_sample) >= 0:
            self._sample()
            t = ticks_add(self._t_sample, self._p_sample)
            # Late by a period or more (a long stall): no burst of catch-up samples.
            self._t_sample = t if ticks_diff(t, now) > 0 else ticks_add(now, self._p_sample)
        if ticks_diff(now, self._t_st) >= 0:
            m = self.mesh
            self._emit({"k": "st", "u": self._up_ms // 1000, "parent": m.parent, "rank": m.rank,
                        "heap": heap(True),
                        "buf": (len(self.ring) if self.ring is not None else 0) + m.queued()})
            self._t_st = ticks_add(now, int(self.cfg["status_s"] * 1000))
        if (len(self.ring) if self.ring is not None else 0):
            self._drain()
        wait = _MAX_WAIT
        for t in (self._t_sample, self._t_sum, self._t_st):
            wait = min(wait, ticks_diff(t, now))
        if (len(self.ring) if self.ring is not None else 0):
            wait = min(wait, _DRAIN_MS)
        return max(0, wait)

    # ---- samples
    def _sample(self):
        row = self.sensor.read()
        if self.sensor.bad != self._bad:  # rows a file sensor skipped: say so, once per change
            self._bad = self.sensor.bad
            self._log("sensor", {"bad_rows": self._bad})
        n = self._n
        mn, mx, sm = self._min, self._max, self._sum
        for i in range(len(row)):
            v = row[i]
            if n == 0 or v < mn[i]:
                mn[i] = v
            if n == 0 or v > mx[i]:
                mx[i] = v
            sm[i] = v + (sm[i] if n else 0.0)
        self._n = n + 1
        alarm, thr = self._score(row)
        if self.score > self._peak or n == 0:
            self._peak = self.score
        if alarm:
            self._up = True
        if alarm != self.alarm:
            self.alarm = alarm
            ch = {}
            for i in range(len(row)):
                ch[self.channels[i]] = _f32(row[i])
            self._emit({"k": "evt", "u": self._up_ms // 1000, "score": _f32(self.score),
                        "thr": _f32(thr), "alarm": alarm, "ch": ch})

    def _score(self, row):
        # -> (alarm, threshold); sets self.score
        det = self._det
        if det is not None:
            m, r = self._dmap
            for i in range(len(m)):
                r[i] = row[m[i]]
            self.score = det.push(r)
            return det.alarm, det.threshold
        rule = self.cfg.get("rule")
        if not rule:
            self.score = 0.0
            return False, 0.0
        v = row[self.channels.index(rule["channel"])]
        self.score = v
        lo = rule.get("below")
        hi = rule.get("above")
        alarm = (hi is not None and v > hi) or (lo is not None and v < lo)
        return alarm, hi if hi is not None else lo

    def _summary(self):
        n = self._n
        ch = {}
        for i in range(len(self.channels) if n else 0):
            ch[self.channels[i]] = [_f32(self._min[i]), _f32(self._max[i]),
                                    _f32(self._sum[i] / n)]
        d = {"k": "sum", "u": self._up_ms // 1000, "n": n, "ch": ch, "alarm": self._up}
        if self._det is not None or self.cfg.get("rule"):
            d["score"] = _f32(self._peak)
        self._emit(d)
        self._n = 0
        self._peak = self.score
        self._up = self.alarm

    # ---- messages
    def _encode(self, d):
        b = cbor.dumps(d)
        if len(b) <= _MAX_PAYLOAD:
            return [b]
        items = list(d.get("ch", {}).items())
        if len(items) < 2:
            raise ValueError("%s message of %d B > %d B" % (d["k"], len(b), _MAX_PAYLOAD))
        out = []
        h = len(items) // 2
        for part in (items[:h], items[h:]):
            d2 = dict(d)
            d2["ch"] = dict(part)
            out.extend(self._encode(d2))
        return out

    def _emit(self, d):
        # -> number of messages made (0 while quiet)
        if _exists(path(self.flash, "quiet")):
            self.skipped += 1
            return 0
        parts = self._encode(d)
        for payload in parts:
            seq = self._seq.next() & 0xFFFF
            self._log("gen", {"seq": seq, "k": d["k"], "len": len(payload)})
            if not (len(self.ring) if self.ring is not None else 0) and self.mesh.send(seq, payload):
                continue
            try:
                if self.ring is None:
                    self._open_ring()
                self.ring.append(seq, payload)
            except (OSError, ValueError) as e:  # flash full or failing: nowhere left to keep it
                self._log("drop", {"reason": "ring_write", "seq": seq, "err": str(e)})
        return len(parts)

    def _drain(self):
        ring = self.ring
        for _ in range(_DRAIN_BURST):
            rec = ring.peek()
            if rec is None or not self.mesh.send(rec[0], rec[1]):
                return
            ring.pop()

    # ---- downlink commands
    def on_down(self, payload):
        try:
            cmd = cbor.loads(payload)
            if not isinstance(cmd, dict):
                raise ValueError("command is not a map")
            c = cmd.get("c")
            if c == "ping":
                tok = cmd.get("tok")
                if type(tok) is not int:
                    raise ValueError("ping needs an integer tok")
                self._emit({"k": "pong", "tok": tok})
                res = None
            elif c == "cfg" or c == "mdl":
                res = self._rare(c, cmd)
            else:
                raise ValueError("unknown command %r" % (c,))
        except Exception as e:  # bad input from the network: log it, change nothing
            self._log("cmd", {"ok": False, "err": str(e) or repr(e)})
            return False
        f = {"c": c, "ok": True}
        if res:
            f.update(res)
        self._log("cmd", f)
        return True
