# The mesh routing protocol: an RPL-lite collection tree on ESP-NOW (docs/mesh.md "Routing";
# design, state machine and constants explained in docs/mesh-routing.md).
#
#   m = make(cfg, radio, "/flash", log)   # cfg: the node's config.json; log(ev, fields)
#   asyncio.create_task(m.run())
#   m.send(seq, cbor)          # node: queue one upward DATA; False: not joined or queue full
#   m.on_down = g              # node: g(command) for a DOWN addressed to it
#   (the root's on_data, send_down, routes: fogmesh.root)
#
# One Mesh object is built from three modules, each small enough to compile on the device:
# fogmesh.neighbors.Parents (the parent choice) <- fogmesh.trickle.Sender (timers, beacons, the
# hop-by-hop send engine) <- Mesh here (config, API, the receive path, join). The root is a
# fogmesh.root.Root, a Mesh with the root's part, in a module only the root loads.
# The core is synchronous: _rx(mac, frame) handles one received frame, _poll(now) runs the
# timers and returns the ms until it wants to run again, _pump() makes one radio attempt.
# run() drives them with asyncio; the unit tests drive them with a fake clock and medium.

# (Import order: the biggest modules compile first, while the heap is emptiest.)
from fogmesh.trickle import Bag, Sender, Trickle, _keep
from fogmesh.neighbors import Dedup, Queue, Table, route_hops, route_next

import struct
from binascii import unhexlify
from time import ticks_add, ticks_diff, ticks_ms

from micropython import const

from fogmesh import frame, keys
from fogmesh.frame import F_FULL, HOPS_MAX, MAX_PAYLOAD, FrameError
from fogmesh.frame import T_BEACON, T_DAO, T_DATA, T_DIS, T_DOWN, T_JOIN, T_JOINACK, T_PROBE

_INF = const(0xFFFF)
_PEERS = const(19)  # neighbours kept = unicast ESP-NOW peers (+ the broadcast peer = 20)
_QLEN = const(10)  # frame queue, shared by own and relayed frames...
_QOWN = const(8)  # ...of which send() may fill 8: relayed frames always find room
_JOIN_WAIT = const(4000)  # first wait for a JOINACK, doubled per retry up to Imax
_DIS_WAIT = const(1000)  # no beacon for 1 s: DIS
_UDIS_GAP = const(8000)  # at most one Trickle reset per 8 s for DIS we cannot verify
_DROPLOG = const(5000)  # at most one drop log line per 5 s
_F_RERR = const(1)  # bit 0 of upward frames: RPL's 'R', the frame already crossed a rank error
_STATS = (
    "tx tx_fail rx bad_frame bad_mic replay retx dup ttl loop rank_err no_route queue_full busy "
    "join_denied join_rate joins no_key down_rx down_lost delivered beacons dis probes "
    "daos ctl_bytes parent_changes nbr_full error"
)


def _key(name, v):
    try:
        if isinstance(v, str) and len(v) == 32:
            return unhexlify(v)
    except ValueError:
        pass
    raise ValueError("config %s must be 32 hex digits" % name)


def _check(seq, payload):
    # send()'s arguments, on a node and on the root alike.
    if not isinstance(seq, int) or not 0 <= seq <= 0xFFFF:
        raise ValueError("seq must be 0..65535, got %r" % (seq,))
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError("payload must be bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes > %d" % (len(payload), MAX_PAYLOAD))


def make(cfg, radio, flash, log, clock=None):
    # A Mesh, or on the root (cfg["role"] == "root") a fogmesh.root.Root.
    if cfg.get("role") == "root":
        from fogmesh.root import Root

        return Root(cfg, radio, flash, log, clock)
    return Mesh(cfg, radio, flash, log, clock)


class Mesh(Sender):
    def __init__(self, cfg, radio, flash, log, clock=None):
        nid = cfg.get("id")
        if not isinstance(nid, int) or not 1 <= nid <= 0xFFFE:
            raise ValueError("config id must be 1..65534, got %r" % (nid,))
        role = cfg.get("role", "node")
        if role not in ("node", "root"):
            raise ValueError("config role must be node or root, got %r" % (role,))
        self.id = nid
        self.is_root = root = role == "root"
        self._radio, self._log, self._clock = radio, log, clock or ticks_ms
        self._nodekey = self._net = None
        if not root or "node_key" in cfg:
            self._nodekey = _key("node_key", cfg.get("node_key"))
        self._ctr = keys.Counter(flash + "/ctr")
        now = self._clock()
        self.joined = root
        self.parent = None
        self.rank = 0 if root else _INF
        self.stats = {k: 0 for k in _STATS.split()}
        self.on_data = self.on_down = None
        self._q = Queue(_QLEN, _QOWN)
        self._nbrs = Table(_PEERS)
        self._p = None  # the parent's Nbr
        self._cset = []  # candidate parents: the parent first, then up to 2 backups
        self._adv = _INF  # the rank in our last beacon
        self._root_id = nid if root else 1
        self._trickle = Trickle(1000, 64000, 3)
        self._dedup = Dedup(64 if root else 16)
        self._detach_t = self._stats_at = now
        self._droplog = None
        self._wake = None  # an asyncio.Event, made by run()
        # Two bags of state (an object with more than 29 attributes needs a ~1 KB block for
        # them, which a fragmented heap may lack). _x: the send engine.
        x = self._x = Bag()
        x.peers = []  # MACs added to the radio, never removed
        x.tx = bytearray(frame.MAX_FRAME)
        x.bx = bytearray(32)  # beacons and DIS: never clobber a transmission in progress
        # the transmission in progress: kind, queue slot, length, attempts, target Nbr, MAC,
        # whether it goes to the parent (a failure counts against it)
        x.kind = x.slot = x.n = x.tries = 0
        x.to = x.mac = None
        x.up = False
        x.probes = []  # candidates to probe
        x.ka = x.dao = False  # a keepalive probe, a DAO due
        x.streak = 0  # consecutive failed sends to the parent
        # first failed attempt of a failure streak; (parent left, that time) until the reroute
        x.tfail = x.rr = None
        x.acked = x.dao_t = now  # last ACK from the parent, last DAO ACKed
        # _jn: joining (JOIN to a candidate, nonce, JOINACK deadline, backoff), JOINs passed on
        # (window start, count), DIS (next, backoff), DIS we cannot verify (last reset)
        j = self._jn = Bag()
        j.to = j.nonce = j.udis = None
        j.wait, j.gap = now, _JOIN_WAIT
        j.rate = [now, 0]
        j.dis_at, j.dis_gap = ticks_add(now, _DIS_WAIT), _DIS_WAIT
        try:
            radio.add_peer(b"\xff\xff\xff\xff\xff\xff")
        except (OSError, ValueError):
            pass  # already registered by the radio
        if root:
            self._trickle.reset(now)

    # ---- API
    def send(self, seq, payload):
        _check(seq, payload)
        if not self.joined:
            return False
        if self._put(True, T_DATA, 0, HOPS_MAX, self.id, self._root_id, seq, _INF,
                     _keep(payload)) < 0:
            self.stats["busy"] += 1
            return False
        return True

    def queued(self):
        return self._q.count()

    def candidates(self):
        return [n.id for n in self._cset]

    async def run(self):
        import asyncio  # here: the synchronous core (and its tests) do without it

        self._wake = wake = asyncio.Event()
        asyncio.create_task(self._rx_loop())
        while True:
            try:
                d = self._poll(self._clock())
                busy = self._pump()
            except Exception as e:  # a bug must not stop the node: count it, log it, go on
                self._error("tx", e)
                busy, d = False, 100
            if busy:
                await asyncio.sleep(0)  # let the receive loop in between two attempts
                continue
            wake.clear()
            try:
                await asyncio.wait_for_ms(wake.wait(), d)
            except asyncio.TimeoutError:
                pass

    async def _rx_loop(self):
        while True:
            mac, msg = await self._radio.recv()
            try:
                self._rx(mac, msg)
            except Exception as e:
                self._error("rx", e)

    def _error(self, where, e):
        self.stats["error"] += 1
        self._log("error", {"where": where, "err": repr(e)})

    def _drop(self, reason):
        self.stats[reason] += 1
        now = self._clock()
        if self._droplog is None or ticks_diff(now, self._droplog) >= _DROPLOG:
            self._droplog = now
            self._log("drop", {"reason": reason, "n": self.stats[reason]})

    def _keep(self, n):
        return n is self._p or n in self._cset or n.child is not None

    # ---- receiving
    def _rx(self, mac, msg):
        st = self.stats
        st["rx"] += 1
        try:
            typ, flags, hops, src, origin, dest, seq, rank, ctr = frame.header(msg)
        except FrameError:
            return self._drop("bad_frame")
        if typ > T_PROBE or src == self.id or not 1 <= src <= 0xFFFE:
            return self._drop("bad_frame")
        now = self._clock()
        if not self.joined:
            return self._rx_nokey(mac, msg, typ, flags, src, dest, rank, now)
        if not frame.check(self._net, msg):
            if typ == T_JOIN:  # from a node without the network key: its MIC is for the root
                return self._rx_join(mac, msg, src, now)
            if typ == T_DIS:  # ditto: a node looking for a parent to join through
                if self.rank < _INF and (self._jn.udis is None
                                         or ticks_diff(now, self._jn.udis) >= _UDIS_GAP):
                    self._jn.udis = now
                    self._trickle.reset(now)
                return None
            return self._drop("bad_mic")
        n = self._nbrs.get(src)
        if n is None:
            n = self._nbrs.add(src, mac, now, self._keep)
            if n is None:
                return self._drop("nbr_full")
            r = self._radio.rssi(mac)  # a first ETX: -60 dBm -> 1, -90 dBm -> 3 (None: 2)
            if r is not None:
                n.etx = min(1024, max(128, 128 + (-60 - r) * 256 // 30))
        if not n.accept(ctr):
            if ctr == n.last:
                st["retx"] += 1  # our MAC ACK was lost and the sender repeated the frame
                return None
            return self._drop("replay")
        n.last, n.heard, n.verified, n.fail = ctr, now, True, None
        if n.mac != mac:
            n.mac = bytes(mac)
        prev, n.rank = n.rank, rank
        if typ == T_BEACON:
            pl = frame.payload(msg)
            if len(pl) < 4:
                return self._drop("bad_frame")
            n.up, n.root = struct.unpack_from(">HH", pl, 0)
            n.full = bool(flags & F_FULL)
            n.child = now if n.up == self.id else None
            if rank < _INF:
                self._trickle.c += 1  # a consistent beacon (Trickle's counter c)
            if n is self._p:
                self._root_id = n.root
            return self._evaluate(now)
        if typ == T_DATA or typ == T_DAO or typ == T_JOIN:
            self._rx_up(n, typ, flags, hops, origin, dest, seq, rank, msg, now)
        elif typ == T_DOWN or typ == T_JOINACK:
            self._rx_down(typ, hops, origin, dest, seq, msg)
        elif typ == T_DIS:
            if self.rank < _INF and not self._full(now):
                self._trickle.reset(now)
        elif seq == 1 and dest == self.id:  # PROBE: a child's keepalive
            n.child = now
        if n is self._p and rank != prev:
            self._evaluate(now, better=False)  # our rank follows; the next beacon may switch
        return None

    def _rx_up(self, n, typ, flags, hops, origin, dest, seq, rank, msg, now):
        st = self.stats
        n.child = now
        pl = frame.payload(msg)
        if rank >= _INF or (self.rank < _INF and rank <= self.rank):
            # A rank error (RPL data-path validation): forwarded once flagged, dropped if the
            # flag is set already (the frame is going round a loop).
            self._trickle.reset(now)
            if flags & _F_RERR or rank >= _INF:
                return self._drop("loop")
            flags |= _F_RERR
            st["rank_err"] += 1
        if hops <= 1:
            return self._drop("ttl")
        if typ == T_DATA and self._dedup.dup(origin, seq):
            st["dup"] += 1
            return None
        if self._put(False, typ, flags, hops - 1, origin, dest, seq, _INF,
                     pl if isinstance(msg, bytes) else bytes(pl)) < 0:
            return self._drop("queue_full")
        return None

    def _rx_down(self, typ, hops, origin, dest, seq, msg):
        pl = frame.payload(msg)
        k = route_hops(pl)
        if not k:
            return self._drop("bad_frame")
        if dest == self.id:
            if typ == T_DOWN:
                self.stats["down_rx"] += 1
                if self.on_down is not None:
                    self.on_down(bytes(pl[1 + 2 * k :]))
            return None  # a JOINACK here is a late copy: we have joined already
        nxt = route_next(pl, k, self.id)
        if nxt is None or (self._nbrs.get(nxt) is None and self._nbrs.joiner(nxt) is None):
            return self._drop("no_route")
        if hops <= 1:
            return self._drop("ttl")
        if self._put(False, typ, 0, hops - 1, origin, dest, seq, nxt,
                     pl if isinstance(msg, bytes) else bytes(pl)) < 0:
            return self._drop("queue_full")
        return None
