# The root's part of the mesh (docs/mesh-routing.md): admission (the allow list, the JOIN
# counters, the network key wrapped in the node key), the view of the tree learnt from DAOs and
# DATA, delivery of upward frames to the application, and the source-routed downlink. Only the
# root loads this module: a sensor node's heap holds none of it.
#
#   m = mesh.make(cfg, radio, "/flash", log)   # a Root when cfg["role"] == "root"
#   m.on_data = f              # f(origin, seq, hops crossed, payload) once per (origin, seq)
#   m.send_down(dest, cbor)    # 0 queued, 1 no route (or queue full), 2 too long
#   m.routes()                 # {id: (parent, rank, seconds since last heard)}

import struct
from time import ticks_diff

from micropython import const

from fogmesh import frame, keys
from fogmesh.frame import HOPS_MAX, MAX_PAYLOAD, T_DAO, T_DOWN, T_JOIN, T_JOINACK
from fogmesh.mesh import Mesh, _check, _key
from fogmesh.neighbors import cbor_pack, cbor_unpack
from fogmesh.trickle import Bag

_INF = const(0xFFFF)
_ROUTES = const(64)  # nodes the root keeps a route to (the one heard longest ago is replaced)


class Root(Mesh):
    def __init__(self, cfg, radio, flash, log, clock=None):
        Mesh.__init__(self, cfg, radio, flash, log, clock)
        # (its state in a Bag of its own: an object with more than 29 attributes needs a ~1 KB
        # block for them, which a fragmented heap may lack)
        r = self._routes = Bag()
        r.netkey = _key("net_key", cfg.get("net_key"))
        self._net = keys.Mac(r.netkey)
        r.epoch = e = cfg.get("epoch")
        allow = cfg.get("allow", {})
        if not isinstance(e, int) or not 0 <= e <= 255 or not isinstance(allow, dict):
            raise ValueError("config epoch must be 0..255 and allow a map id -> node key")
        r.allow = {}
        for k, v in allow.items():
            if not (isinstance(k, str) and k.isdigit() and 1 <= int(k) <= 0xFFFE):
                raise ValueError("config allow: %r is not a node id" % (k,))
            r.allow[int(k)] = _key("allow[%s]" % k, v)
        r.jctr = {}  # id -> last JOIN counter accepted
        r.d = {}  # the tree: id -> [parent, rank, last heard ticks]
        r.buf = bytearray(MAX_PAYLOAD)  # a source route being built
        r.seq = 0  # seq of the root's DOWN frames

    # ---- API
    def send(self, seq, payload):
        # The root's own messages go straight to on_data (0 hops crossed).
        _check(seq, payload)
        if self.on_data is not None:
            self.on_data(self.id, seq, 0, bytes(payload))
        return True

    def send_down(self, dest, payload):
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")
        if not isinstance(dest, int) or dest == self.id:
            return 1
        return self._route_send(T_DOWN, dest, payload)

    def routes(self):
        now = self._clock()
        return {k: (v[0], v[1], ticks_diff(now, v[2]) // 1000) for k, v in self._routes.d.items()}

    # ---- the tree
    def _route(self, nid, parent, rank, now):
        # In place when known: no allocation per frame (new long-lived blocks scattered through
        # the heap are what fragments it).
        d = self._routes.d
        e = d.get(nid)
        if e is not None:
            e[0], e[1], e[2] = parent, rank, now
            return
        if len(d) >= _ROUTES:
            old = None
            for k in d:
                if old is None or ticks_diff(d[old][2], d[k][2]) > 0:
                    old = k
            del d[old]
        d[nid] = [parent, rank, now]

    def _source_route(self, dest, body):
        # Into buf: the hop count (1 B), the hops from the first one to dest (2 B each), body.
        # Returns its length; -1: no route (a link unknown, a loop, > 16 hops); -2: too long.
        p = []
        x = dest
        while x != self.id:
            e = self._routes.d.get(x)
            if e is None or len(p) >= 16 or x in p:
                return -1
            p.append(x)
            x = e[0]
        k = len(p)
        n = 1 + 2 * k + len(body)
        buf = self._routes.buf
        if n > len(buf):
            return -2
        buf[0] = k
        for j in range(k):
            struct.pack_into(">H", buf, 2 * k - 1 - 2 * j, p[j])
        buf[1 + 2 * k : n] = body
        return n

    def _route_send(self, typ, dest, body):
        ln = self._source_route(dest, body)
        if ln == -2:
            return 2
        first = self._routes.buf[1] << 8 | self._routes.buf[2]
        if ln < 0 or (self._nbrs.get(first) is None and self._nbrs.joiner(first) is None):
            self.stats["no_route"] += 1
            return 1
        self._routes.seq = (self._routes.seq + 1) & 0xFFFF
        if self._put(False, typ, 0, HOPS_MAX, self.id, dest, self._routes.seq, first,
                     bytes(self._routes.buf[:ln])) < 0:
            self.stats["queue_full"] += 1
            return 1
        return 0

    # ---- receiving
    def _rx_up(self, n, typ, flags, hops, origin, dest, seq, rank, msg, now):
        n.child = now
        pl = frame.payload(msg)
        if typ == T_DAO:
            if len(pl) < 4:
                return self._drop("bad_frame")
            self._route(origin, pl[0] << 8 | pl[1], pl[2] << 8 | pl[3], now)
        elif typ == T_JOIN:
            self._root_join(pl, origin, None, now)
        else:
            e = self._routes.d.get(origin)
            if n.id == origin:
                self._route(origin, self.id, rank, now)
            elif e is not None:
                e[2] = now
            if self._dedup.dup(origin, seq):
                self.stats["dup"] += 1
                return None
            self.stats["delivered"] += 1
            if self.on_data is not None:
                self.on_data(origin, seq, HOPS_MAX - hops + 1, bytes(pl))
        return None

    def _rx_join(self, mac, msg, src, now):
        return self._root_join(msg, self.id, mac, now)

    def _root_join(self, inner, parent, mac, now):
        # Admits a node: its JOIN (inner, whole) verified with its node key from the allow list,
        # its join counter fresh; the answer wraps the network key in the node key.
        try:
            typ, _, _, src, jid, _, _, _, _ = frame.header(inner)
            key = self._routes.allow.get(jid)
            if typ != T_JOIN or src != jid or key is None:
                raise ValueError("unknown node")
            m = keys.Mac(key)
            if not frame.check(m, inner):
                raise ValueError("bad mic")
            i, jctr, nonce = cbor_unpack(frame.payload(inner), 3)
            if i != jid or not isinstance(jctr, int) or len(nonce) != 8:
                raise ValueError("bad payload")
        except (ValueError, TypeError):
            return self._drop("join_denied")
        last = self._routes.jctr.get(jid, -1)
        if jctr == last:  # the JOIN answered already, passed on again by a relay
            self.stats["dup"] += 1
            return None
        if jctr < last:  # replayed
            return self._drop("join_denied")
        if parent != self.id and parent not in self._routes.d:
            return self._drop("no_route")
        self._routes.jctr[jid] = jctr
        wrapped = keys.ctr_crypt(key, nonce, self._routes.netkey)
        mic = m.tag(b"joinack", struct.pack(">HB", jid, self._routes.epoch), nonce, wrapped)
        self._route(jid, parent, _INF, now)
        if mac is not None:
            self._nbrs.joiner_add(jid, mac)
        self.stats["joins"] += 1
        self._log("join", {"id": jid, "parent": parent})
        self._route_send(T_JOINACK, jid, cbor_pack((jid, self._routes.epoch, nonce, wrapped, mic)))
        return None
