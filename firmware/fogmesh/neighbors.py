# The mesh's state one hop away and its bounded tables (docs/mesh-routing.md): neighbours with
# their link ETX, rank and replay window; Parents, the part of Mesh that picks the parent among
# them; per-origin duplicate windows; the queue of frames awaiting their hop; reading a source
# route (the root builds them: fogmesh.root); the fixed CBOR arrays of JOIN and JOINACK.
#
#   t = Table(19); n = t.add(id, mac, now, keep)   # evicts the stalest one keep(n) spares
#   n.sample(tries)            # tries = MAC attempts until the ACK, 0 = never ACKed
#   n.path()                   # rank through n: n.rank + max(128, ETX*128)
#   d = Dedup(16); d.dup(origin, seq)    # True for a seq already seen from that origin
#   k = route_hops(pl); route_next(pl, k, me)   # a DOWN's source route: its length, our next hop
#   cbor_pack([5, 7, b"nonce..."]); cbor_unpack(data, 3)   # JOIN / JOINACK payloads
#   q = Queue(10, 8); i = q.put(own, fields, payload); q.oldest(up); q.free(i)
#
# ETX is kept in fixed point, x128 as in RPL's MRHOF, so that every value stays a small int.

import struct
from array import array
from time import ticks_diff

from micropython import const

from fogmesh.keys import ReplayWindow

_ETX1 = const(128)  # ETX 1.0
_ETX_NOACK = const(2048)  # a frame never ACKed counts as 16 transmissions (Contiki link-stats)
_ETX_INIT = const(256)  # no sample yet: ETX 2
_ETX_MAX = const(4096)
_INF = const(0xFFFF)
_TTL = const(192000)  # 3 Imax: a neighbour not heard for longer is no candidate and no child
_NCAND = const(3)  # candidate parents: the parent and 2 backups
_GAIN = const(192)  # switch parents only for a rank gain >= 192 (ETX 1.5)
_RESET = const(256)  # a rank change beyond this resets Trickle
_IMIN = const(1000)
_W = const(24)  # dedup window: the highest seq and the 23 below it


class Nbr(ReplayWindow):
    # Its replay window is itself (accept(ctr)): no second object per neighbour.
    def __init__(self, nid, mac, now):
        ReplayWindow.__init__(self)
        self.id = nid
        self.mac = mac
        self.rank = _INF  # from the header of its last accepted frame
        self.etx = _ETX_INIT  # ETX x128
        self.n = 0  # ETX samples taken
        self.full = False  # F_FULL in its last beacon
        self.up = _INF  # its parent and root id, from its beacons
        self.root = 0
        self.heard = now  # ticks of its last accepted frame
        self.verified = False  # heard under the network key, not only in unverified beacons
        self.child = None  # ticks of its last sign of using us as its parent
        self.fail = None  # ticks when it failed as our parent: no candidate until heard again
        self.last = -1  # last accepted counter: a second copy is a MAC retransmission

    def sample(self, tries):
        # EWMA, alpha 0.25 for the first 4 samples, then 0.1.
        s = tries * _ETX1 if tries else _ETX_NOACK
        e = (self.etx * 3 + s + 2) >> 2 if self.n < 4 else (self.etx * 9 + s + 5) // 10
        self.etx = min(e, _ETX_MAX)
        self.n += 1

    def path(self):
        r = self.rank + max(_ETX1, self.etx)
        return r if r < _INF else _INF

    def usable(self, now, me):
        # Fit to be our parent: verified, not failed, finite, fresh, and not our child.
        return (self.verified and self.fail is None and self.path() < _INF and self.up != me
                and ticks_diff(now, self.heard) < _TTL)


class Table:
    def __init__(self, cap):
        self.cap = cap
        self.nbrs = []
        self.joiners = []  # [id, mac]: nodes without the key whose JOIN we passed on (<= 4)

    def get(self, nid):
        for n in self.nbrs:
            if n.id == nid:
                return n
        return None

    def add(self, nid, mac, now, keep):
        if len(self.nbrs) >= self.cap:
            # Unverified entries go first, then the one heard longest ago.
            w = None
            for n in self.nbrs:
                if keep(n):
                    continue
                if (w is None or (w.verified and not n.verified)
                        or (w.verified == n.verified and ticks_diff(w.heard, n.heard) > 0)):
                    w = n
            if w is None:
                return None
            self.nbrs.remove(w)
        n = Nbr(nid, bytes(mac), now)
        self.nbrs.append(n)
        return n

    def children(self, now):
        c = 0
        for n in self.nbrs:
            if n.child is not None:
                if ticks_diff(now, n.child) < _TTL:
                    c += 1
                else:
                    n.child = None
        return c

    def select(self, now, me, parent, lim, detach_t, peers):
        # The best eligible neighbours other than the parent, best first, at most 3. The rank
        # rule: a new parent's rank must be below lim (the lower of our rank and our last
        # advertised one: our descendants computed theirs from it). Detached (lim infinite),
        # only ranks heard after we advertised infinity count. Full ones and children never do.
        out = []
        for n in self.nbrs:
            if (n is parent or n.full or n.rank >= lim or not n.usable(now, me)
                    or (n.child is not None and ticks_diff(now, n.child) < _TTL)
                    or (parent is None and ticks_diff(n.heard, detach_t) <= 0)
                    or (n.mac not in peers and len(peers) >= self.cap)):
                continue
            i = len(out)
            while i > 0 and out[i - 1].path() > n.path():
                i -= 1
            out.insert(i, n)
        return out[:_NCAND]

    def joiner(self, nid):
        for j in self.joiners:
            if j[0] == nid:
                return j[1]
        return None

    def joiner_add(self, nid, mac):
        js = self.joiners
        for j in js:
            if j[0] == nid:
                js.remove(j)
                break
        if len(js) >= 4:
            js.pop(0)
        js.append((nid, bytes(mac)))


class Dedup:
    # Per origin (cap origins, the oldest entry replaced): the highest seq seen and a bitmap of
    # the window below it, bit i = seq hi - i. A seq older than the window is let through: it
    # cannot be told apart from a late first copy, and losing data is worse than a rare duplicate.
    def __init__(self, cap):
        self.ids = array("i", [-1] * cap)
        self.hi = array("H", bytes(2 * cap))
        self.bits = array("I", bytes(4 * cap))
        self.next = 0

    def dup(self, origin, seq):
        ids = self.ids
        for i in range(len(ids)):
            if ids[i] == origin:
                break
        else:
            i = self.next
            self.next = (i + 1) % len(ids)
            ids[i], self.hi[i], self.bits[i] = origin, seq, 1
            return False
        d = (seq - self.hi[i]) & 0xFFFF
        if d == 0:
            return True
        if d < 0x8000:
            self.bits[i] = ((self.bits[i] << d) | 1) & 0xFFFFFF if d < _W else 1
            self.hi[i] = seq
            return False
        m = 1 << (0x10000 - d) if 0x10000 - d < _W else 0
        if self.bits[i] & m:
            return True
        self.bits[i] |= m
        return False


def cbor_pack(items):
    # A CBOR array of unsigned ints and byte strings, canonical (shortest heads): the fixed
    # shapes of JOIN [id, ctr, nonce8] and JOINACK [id, epoch, nonce8, key16, mic8]. Equal to
    # fogmesh.cbor.dumps(items) (tested), without loading the general codec for two arrays.
    b = bytearray((0x80 | len(items),))
    for v in items:
        major = 0 if isinstance(v, int) else 0x40
        n = v if major == 0 else len(v)
        if n < 24:
            b.append(major | n)
        else:
            w = 1 if n < 0x100 else (2 if n < 0x10000 else 4)
            b.append(major | {1: 24, 2: 25, 4: 26}[w])
            b.extend(n.to_bytes(w, "big"))
        if major:
            b.extend(v)
    return bytes(b)


def cbor_unpack(data, n):
    # The inverse for an array of exactly n items; ValueError on anything else.
    mv = memoryview(data)
    if len(mv) < 1 or mv[0] != 0x80 | n:
        raise ValueError("not a CBOR array of %d" % n)
    out = []
    i = 1
    for _ in range(n):
        if i >= len(mv):
            raise ValueError("truncated")
        h = mv[i]
        a = h & 31
        i += 1
        if a >= 24:
            w = 1 << (a - 24)
            if a > 26 or i + w > len(mv):
                raise ValueError("bad head")
            a = int.from_bytes(mv[i : i + w], "big")
            i += w
        if h >> 5 == 0:
            out.append(a)
        elif h >> 5 == 2 and i + a <= len(mv):
            out.append(bytes(mv[i : i + a]))
            i += a
        else:
            raise ValueError("not a uint or byte string")
    if i != len(mv):
        raise ValueError("trailing bytes")
    return out


def route_hops(pl):
    # The hop count of a source-routed payload, 0 when malformed.
    k = pl[0] if len(pl) else 0
    return k if 0 < k <= 16 and len(pl) >= 1 + 2 * k else 0


def route_next(pl, k, me):
    # The hop after `me` in a source route of k hops, or None if `me` is not on it (or last).
    for i in range(k - 1):
        if pl[1 + 2 * i] << 8 | pl[2 + 2 * i] == me:
            return pl[3 + 2 * i] << 8 | pl[4 + 2 * i]
    return None


class Queue:
    # Frames waiting for their next hop, own and relayed, sent oldest first. send() may hold at
    # most `own` of the n slots so that relayed frames always find room. A slot keeps a
    # reference to its payload (a view into the frame as received, or the app's bytes):
    # nothing is copied or allocated on the relay path. Slot i's fields f[7i..7i+6]: type,
    # flags, hops, origin, dest, seq, next hop (_INF: whoever is our parent when it is sent).
    def __init__(self, n, own):
        self.own = own
        self.pl = [None] * n
        self.f = array("H", bytes(14 * n))
        self.mine = bytearray(n)
        self.order = [0] * n  # enqueue order, 0: free
        self.n = 0

    def count(self):
        return len(self.order) - self.order.count(0)

    def put(self, own, typ, flags, hops, origin, dest, seq, nxt, pl):
        free = -1
        mine = 0
        for i in range(len(self.order)):
            if self.order[i]:
                mine += self.mine[i]
            elif free < 0:
                free = i
        if free < 0 or (own and mine >= self.own):
            return -1
        self.pl[free] = pl
        f, o = self.f, 7 * free
        f[o], f[o + 1], f[o + 2], f[o + 3], f[o + 4], f[o + 5] = typ, flags, hops, origin, dest, seq
        f[o + 6] = nxt
        self.mine[free] = 1 if own else 0
        self.n += 1
        self.order[free] = self.n
        return free

    def oldest(self, up):
        # The oldest frame that can go now: any when up (we have a parent), else downward only.
        best = -1
        o = self.order
        for i in range(len(o)):
            if o[i] and (up or self.f[7 * i + 6] != _INF) and (best < 0 or o[i] < o[best]):
                best = i
        return best

    def free(self, i):
        self.order[i] = 0
        self.pl[i] = None


class Parents:
    # Parent selection, a part of Mesh (see fogmesh.mesh for the attributes it shares). Called
    # whenever a neighbour's rank or ETX changes. better=False (after an ETX sample of our own
    # sends) keeps the parent unless it is gone: one lost frame lifts ETX by ~1.4 at once, and
    # switching to an equal parent for that costs a DAO per hop each time; the next beacon or
    # the 30 s tick decides, by which time the estimate has settled.

    def _evaluate(self, now, why="lost", better=True):
        if self.is_root or not self.joined:
            return
        p = self._p
        lim = _INF if p is None else min(self.rank, self._adv)
        others = self._nbrs.select(now, self.id, p, lim, self._detach_t, self._x.peers)
        best = others[0] if others else None
        if p is None:
            if best is not None:
                self._switch(best, "attach", now)
        elif not p.usable(now, self.id):
            if best is not None:
                self._switch(best, why, now)
            else:
                self._detach(why, now)
        elif better and best is not None and best.path() + _GAIN <= p.path():
            self._switch(best, "better", now)
        p = self._p
        self._cset = ([p] if p else []) + [n for n in others if n is not p][: _NCAND - 1]
        r = _INF if p is None else p.path()
        if r != self.rank:
            d = r - self.rank
            self.rank = r
            if d > _RESET or d < -_RESET:
                self._trickle.reset(now)

    def _switch(self, n, why, now):
        old = self._p
        if old is not None and self._x.tfail is not None and self._x.rr is None:
            self._x.rr = (old.id, self._x.tfail)  # log reroute at the first ACK through n
        self._p = n
        self.parent = n.id
        self._log("parent", {"old": old.id if old else None, "new": n.id, "reason": why})
        self.stats["parent_changes"] += 1
        self._x.streak = 0
        self._x.dao = True
        if n.root:
            self._root_id = n.root
        self._x.acked = now
        if old is None:
            self._trickle.reset(now)  # a new parent after none; a mere swap resets only if
        self._kick()  # the rank moves by more than 256 (in _evaluate)

    def _detach(self, why, now):
        # The parent set is empty: advertise infinite rank (poison), solicit beacons, keep the
        # queue; re-attach to the best neighbour heard after this point.
        old = self._p
        if self._x.tfail is not None and self._x.rr is None:
            self._x.rr = (old.id, self._x.tfail)
        self._p = self.parent = None
        self._log("parent", {"old": old.id, "new": None, "reason": why})
        self._x.streak = 0
        self._x.ka = False
        self._x.probes = []
        self._detach_t = self._jn.dis_at = now
        self._jn.dis_gap = _IMIN
        self.rank = _INF
        self._trickle.reset(now)
        self._beacon(now)
