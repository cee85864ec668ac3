# The mesh's sending side (docs/mesh-routing.md): the Trickle timer (RFC 6206) that paces the
# beacons, and Sender, the part of Mesh that sends on its own: the timers (beacons, DIS,
# keepalive probes, DAO refresh, stats), the hop-by-hop engine that sends queued frames with
# up to 6 MAC attempts, samples ETX and leaves a parent after 3 failed frames, and joining
# (JOIN and its retries, a parent passing JOINs on, the JOINACK; the root's side: root.py). As in
# Contiki-NG's rpl-timers.c, the timed control traffic lives in one place.
#
#   t = Trickle(1000, 64000, 3)
#   t.reset(now)            # an inconsistency: back to Imin (no-op if already there)
#   t.c += 1                # a consistent beacon was heard in this interval
#   if t.poll(now, force):  # True once per interval at its random point, unless suppressed
#       send_beacon()       # (force: never suppress, e.g. a node with children)
#   t.wait(now)             # ms until poll() has work

# (Import order: the biggest module compiles first, while the heap is emptiest.)
from fogmesh.neighbors import Parents, cbor_pack, cbor_unpack, route_hops

import os
import random
import struct
from time import ticks_add, ticks_diff

from micropython import const

from fogmesh import frame, keys
from fogmesh.frame import BROADCAST, F_FULL, HOPS_MAX, MAX_PAYLOAD, T_BEACON, T_DAO, T_DIS
from fogmesh.frame import T_JOIN, T_JOINACK, T_PROBE

_INF = const(0xFFFF)
_IMAX = const(64000)
_FAILS = const(3)  # consecutive failed frames before leaving the parent
_TRIES = const(6)  # MAC attempts per frame and hop
_MAXCHILD = const(12)
_PEERS = const(19)  # unicast ESP-NOW peers (+ the broadcast peer = 20)
_UDIS_MAX = const(8000)  # DIS backoff cap without the network key
_DIS_MAX = const(256000)  # DIS backoff cap when detached
_JOINS_S = const(4)  # JOINs a parent forwards per second
_DAO_MS = const(512000)  # DAO refresh (8 Imax): a root that lost its routes relearns them
_STATS_MS = const(30000)  # stats log line, and a re-evaluation of the parent set (staleness)
_POLL_MS = const(500)
_SLOT = const(1)  # kinds of transmission
_PROBE = const(2)
_DAO = const(3)
_JOIN = const(4)
_BCAST = b"\xff\xff\xff\xff\xff\xff"


def _keep(b):
    # A payload to hold in the queue: bytes are immutable and kept as they are (a memoryview
    # of received bytes too); anything the radio or the app might reuse is copied once.
    return b if isinstance(b, bytes) else bytes(b)


class Bag:
    # Plain attributes (see Mesh.__init__).
    pass


class Trickle:
    # Times are ticks_ms-like ints (the caller's clock), compared with ticks_diff.
    def __init__(self, imin, imax, k):
        self.imin, self.imax, self.k = imin, imax, k
        self.i = imin
        self.start = self.t = self.c = 0  # interval start, its transmission point, beacons heard
        self.fired = True
        self.running = False

    def _begin(self, now):
        # t uniform in [I/2, I): the first half of every interval only listens (RFC 6206 §4.2).
        self.start = now
        h = self.i >> 1
        self.t = h + random.getrandbits(20) % h
        self.c = 0
        self.fired = False

    def reset(self, now):
        # An inconsistency (rule 6): I = Imin and a new interval, unless I is Imin already.
        if self.running and self.i == self.imin:
            return False
        self.running = True
        self.i = self.imin
        self._begin(now)
        return True

    def poll(self, now, force):
        # True once per interval, at t, unless c >= k consistent beacons were heard (and not
        # force). At the interval's end I doubles up to Imax (rule 5).
        if not self.running:
            return False
        e = ticks_diff(now, self.start)
        send = False
        if not self.fired and e >= self.t:
            self.fired = True
            send = force or self.c < self.k
        if e >= self.i:
            end = ticks_add(self.start, self.i)
            self.i = min(self.i << 1, self.imax)
            self._begin(end if ticks_diff(now, end) < self.i >> 1 else now)
        return send

    def wait(self, now):
        if not self.running:
            return self.imax
        d = (self.i if self.fired else self.t) - ticks_diff(now, self.start)
        return d if d > 0 else 0


class Sender(Parents):
    # A part of Mesh: see fogmesh.mesh for the attributes it shares.

    def _poll(self, now):
        # The timers; returns the ms until the next one is due (at most _POLL_MS).
        if self.joined:
            if self._trickle.poll(now, self.is_root or self._nbrs.children(now) > 0):
                self._beacon(now)
            if not self.is_root:
                if self._p is None:
                    if ticks_diff(now, self._jn.dis_at) >= 0:
                        self._dis(self._net, now, _DIS_MAX)
                elif not self._x.ka and ticks_diff(now, self._x.acked) >= _IMAX:
                    self._x.ka = True  # idle: nothing ACKed by the parent during Imax
                    self._kick()
                elif ticks_diff(now, self._x.dao_t) >= _DAO_MS:
                    self._x.dao = True
                    self._kick()
        elif not self.is_root and self._x.kind != _JOIN and ticks_diff(now, self._jn.wait) >= 0:
            # JOIN states: _jn.to set, _jn.nonce None: to send; both set: sent, awaiting the
            # JOINACK until _jn.wait; neither: choose a candidate (or DIS when there is none).
            if self._jn.nonce is not None:  # no JOINACK in time: maybe another candidate
                self._jn.to.sample(0)
                self._jn.nonce = self._jn.to = None
                self._jn.gap = min(self._jn.gap << 1, _IMAX)
            if self._jn.to is None:
                for n in self._nbrs.nbrs:
                    if n.rank < _INF and not n.full and (
                            self._jn.to is None or n.path() < self._jn.to.path()):
                        self._jn.to = n
                if self._jn.to is not None:
                    self._kick()
                elif ticks_diff(now, self._jn.dis_at) >= 0:
                    self._dis(keys.Mac(self._nodekey), now, _UDIS_MAX)
        if ticks_diff(now, self._stats_at) >= _STATS_MS:
            self._stats_at = now
            self._log("stats", self.stats)  # (log must not keep or change fields)
            self._evaluate(now)  # neighbours gone stale
        return min(_POLL_MS, self._trickle.wait(now))

    def _beacon(self, now):
        # Payload: our parent, the root's id.
        p = self._p
        n = frame.pack_into(self._x.bx, self._net, T_BEACON, F_FULL if self._full(now) else 0,
                            HOPS_MAX, self.id, self.id, BROADCAST, 0, self.rank,
                            self._ctr.next(), struct.pack(">HH", p.id if p else _INF,
                                                          self._root_id))
        self._xmit(_BCAST, n)
        self._adv = self.rank
        self.stats["beacons"] += 1
        self.stats["ctl_bytes"] += n

    def _dis(self, mac, now, cap):
        n = frame.pack_into(self._x.bx, mac, T_DIS, 0, HOPS_MAX, self.id, self.id, BROADCAST, 0,
                            self.rank, self._ctr.next(), b"")
        self._xmit(_BCAST, n)
        self.stats["dis"] += 1
        self.stats["ctl_bytes"] += n
        self._jn.dis_at = ticks_add(now, self._jn.dis_gap)
        self._jn.dis_gap = min(self._jn.dis_gap << 1, cap)

    def _full(self, now):
        return self._nbrs.children(now) >= _MAXCHILD or len(self._x.peers) >= _PEERS

    def _peer(self, mac):
        # ESP-NOW peers are added once and never deleted (deleting churns and crashes).
        if mac not in self._x.peers:
            if len(self._x.peers) >= _PEERS:
                return False
            try:
                self._radio.add_peer(mac)
            except (OSError, ValueError):
                pass  # already a peer
            self._x.peers.append(mac)
        return True

    def _xmit(self, mac, n):
        # One attempt; a broadcast goes from _bx, a unicast from _tx.
        self.stats["tx"] += 1
        try:
            ok = self._radio.send(mac, memoryview(self._x.bx if mac is _BCAST else self._x.tx)[:n],
                                  True)
        except OSError:
            ok = False
        if not ok:
            self.stats["tx_fail"] += 1
        return ok

    def _put(self, own, typ, flags, hops, origin, dest, seq, nxt, pl):
        i = self._q.put(own, typ, flags, hops, origin, dest, seq, nxt, pl)
        if i >= 0:
            self._kick()
        return i

    def _kick(self):
        if self._wake is not None:  # run() is waiting for work
            self._wake.set()

    def _pump(self):
        # One MAC attempt of the current transmission (starting the next one if none).
        now = self._clock()
        if self._x.kind and self._x.up and self._x.to is not self._p:
            self._x.kind = 0  # the parent changed under this frame: re-pack it for the new one
        if not self._x.kind and not self._start(now):
            return False
        ok = self._xmit(self._x.mac, self._x.n)
        self._x.tries += 1
        if not ok and self._x.up and self._x.tfail is None:
            self._x.tfail = now  # the first failed attempt towards the parent: reroute time 0
        if self._x.kind != _SLOT:
            self.stats["ctl_bytes"] += self._x.n
        if ok or self._x.tries >= _TRIES:
            self._done(ok, now)
        return True

    def _start(self, now):
        # Next: keepalive, candidate probes, JOIN, DAO, then the oldest frame that can go.
        p = self._p
        if self._x.ka and p is not None:
            return self._begin(_PROBE, p, p.mac, True, now, 1)
        while self._x.probes:
            n = self._x.probes[0]
            if n is not p and n in self._nbrs.nbrs:
                return self._begin(_PROBE, n, n.mac, False, now, 0)
            self._x.probes.pop(0)
        if not self.joined and self._jn.to is not None and self._jn.nonce is None:
            return self._begin(_JOIN, self._jn.to, self._jn.to.mac, False, now, 0)
        if self._x.dao and p is not None:
            return self._begin(_DAO, p, p.mac, True, now, 0)
        q = self._q
        while True:
            i = q.oldest(p is not None)
            if i < 0:
                return False
            nxt = q.f[7 * i + 6]
            if nxt == _INF:
                return self._begin(_SLOT, p, p.mac, True, now, i)
            n = self._nbrs.get(nxt)
            mac = n.mac if n is not None else self._nbrs.joiner(nxt)
            if mac is not None and self._peer(mac):
                return self._begin(_SLOT, n, mac, False, now, i)
            q.free(i)
            self._drop("no_route")

    def _begin(self, kind, n, mac, up, now, arg):
        self._x.kind, self._x.to, self._x.mac, self._x.up = kind, n, mac, up
        self._x.tries = 0
        if not self._peer(mac):  # no peer slot left for it: unreachable, a failed send
            self._done(False, now)
            return False
        ctr, tx, net, me, r = self._ctr.next(), self._x.tx, self._net, self.id, self.rank
        if kind == _SLOT:
            f, o = self._q.f, 7 * arg
            self._x.slot = arg
            self._x.n = frame.pack_into(tx, net, f[o], f[o + 1], f[o + 2], me, f[o + 3], f[o + 4],
                                         f[o + 5], r, ctr, self._q.pl[arg])
        elif kind == _PROBE:  # seq 1: a keepalive to our parent
            self._x.n = frame.pack_into(tx, net, T_PROBE, 0, HOPS_MAX, me, me, n.id, arg, r, ctr,
                                         b"")
            self.stats["probes"] += 1
        elif kind == _DAO:  # payload: our parent, our rank
            self._x.n = frame.pack_into(tx, net, T_DAO, 0, HOPS_MAX, me, me, self._root_id, 0, r,
                                         ctr, struct.pack(">HH", n.id, r))
            self.stats["daos"] += 1
        else:
            self._jn.nonce = os.urandom(8)
            self._x.n = frame.pack_into(tx, keys.Mac(self._nodekey), T_JOIN, 0, HOPS_MAX, me, me,
                                         self._root_id, 0, _INF, ctr,
                                         cbor_pack((me, ctr, self._jn.nonce)))
        return True

    def _done(self, ok, now):
        # The current transmission ended: ACKed (ok), or not after all its attempts.
        kind, n, up = self._x.kind, self._x.to, self._x.up
        self._x.kind = 0
        if n is not None:
            n.sample(self._x.tries if ok else 0)
        if up and ok:
            self._x.acked = now
            self._x.streak = 0
            self._x.tfail = None
            if self._x.rr is not None:
                self._log("reroute", {"ms": ticks_diff(now, self._x.rr[1]), "old": self._x.rr[0],
                                      "new": n.id})
                self._x.rr = None
        elif up:
            # It stays pending (frame, DAO or keepalive) and is retried; after 3 failed sends
            # through the next candidate. The second failure in a row probes the backups (a
            # single one is mostly loss: 1.7 % of frames at 30 % loss per direction).
            self._x.streak += 1
            if self._x.streak == 2:
                self._x.probes = self._cset[1:]
            if self._x.streak >= _FAILS:
                n.fail = now
                return self._evaluate(now, "fail")
            return self._evaluate(now, better=False)
        if kind == _SLOT:
            self._q.free(self._x.slot)
            if not ok:
                self._drop("down_lost")  # a downward frame: no other way to its next hop
        elif kind == _PROBE:
            if up:
                self._x.ka = False
            elif self._x.probes:
                self._x.probes.pop(0)
        elif kind == _DAO:
            self._x.dao = False
            self._x.dao_t = now
        elif kind == _JOIN:
            if not ok:
                self._jn.nonce = self._jn.to = None
            self._jn.wait = ticks_add(now, self._jn.gap if ok else 200)  # ok: wait for JOINACK
        return self._evaluate(now, better=False)

    # ---- join (docs/mesh.md "Join"): the joining node, its parent, the root
    def _rx_nokey(self, mac, msg, typ, flags, src, dest, rank, now):
        # Without the network key only beacons (unverified: they only point at a candidate
        # parent) and our own JOINACK (checked with the node key) mean anything.
        if typ == T_BEACON and rank < _INF:
            n = self._nbrs.get(src) or self._nbrs.add(src, mac, now, self._keep)
            if n is None:
                return self._drop("nbr_full")
            n.rank, n.full, n.heard, n.fail = rank, bool(flags & F_FULL), now, None
            n.mac = bytes(mac)
            pl = frame.payload(msg)
            if len(pl) >= 4:
                self._root_id = pl[2] << 8 | pl[3]
            return None
        if typ == T_JOINACK and dest == self.id and self._jn.nonce is not None:
            pl = frame.payload(msg)
            k = route_hops(pl)
            try:
                jid, epoch, nonce, wrapped, mic = cbor_unpack(pl[1 + 2 * k :] if k else b"", 5)
                ok = (jid == self.id and nonce == self._jn.nonce and len(wrapped) == 16
                      and keys.Mac(self._nodekey).verify(
                          b"joinack" + struct.pack(">HB", jid, epoch) + nonce + wrapped, mic))
            except (ValueError, TypeError):
                return self._drop("bad_frame")
            if not ok:
                return self._drop("bad_mic")
            n = self._nbrs.get(src) or self._nbrs.add(src, mac, now, self._keep)
            if n is None:
                return self._drop("nbr_full")
            self._net = keys.Mac(keys.ctr_crypt(self._nodekey, nonce, wrapped))
            self.joined = True
            self._jn.nonce = self._jn.to = None
            n.rank, n.heard, n.verified, n.fail = rank, now, True, None
            n.mac = bytes(mac)
            self._p = n
            self.parent = n.id
            self.rank = n.path()
            self._cset = [n]
            self._x.dao = True
            self._detach_t = self._x.acked = now
            self._trickle.reset(now)
            self._log("joined", {"parent": n.id, "rank": self.rank})
            self._kick()
            return None
        self.stats["no_key"] += 1
        return None

    def _rx_join(self, mac, msg, src, now):
        # A JOIN from a node without the network key: forward it whole to the root inside our
        # own JOIN (at most 4 per second), remembering its MAC for the JOINACK's last hop.
        # (The root's own: fogmesh.root.)
        if self.rank >= _INF or self._full(now):
            return self._drop("no_route")
        jr = self._jn.rate
        if ticks_diff(now, jr[0]) >= 1000:
            jr[0], jr[1] = now, 0
        if jr[1] >= _JOINS_S:
            return self._drop("join_rate")
        if len(msg) > MAX_PAYLOAD:
            return self._drop("bad_frame")
        jr[1] += 1
        self._nbrs.joiner_add(src, mac)
        if self._put(False, T_JOIN, 0, HOPS_MAX, self.id, self._root_id, 0, _INF, _keep(msg)) < 0:
            return self._drop("queue_full")
        return None
