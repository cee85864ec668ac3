# The mesh's tables and parent choice (fogmesh/neighbors.py), and what a node checks in every
# frame it receives: ETX and rank arithmetic, the candidate set with its rank rule and
# hysteresis, duplicate windows, source routes, the queue, the peer table, the JOIN payloads;
# and on the in-memory medium of test_mesh.py, what a node checks in every frame it receives:
# length and version, the MIC, replays, the loop rule, the hop limit, duplicates.
import os
import sys

import mptest

# The in-memory medium lives in test_mesh.py, which loads the firmware compiled (mpy-cross), as
# a node does. It is compiled the same way first: from source it would not fit next to this.
_d = mptest._here()
_out = "/tmp/fogmesh-mpy-test" + _d.replace("/", "_")
_mc = sys.executable.rsplit("/", 1)[0] + "/mpy-cross"
_src, _dst = _d + "/test_mesh.py", _out + "/test_mesh.mpy"
os.system(
    f"mkdir -p {_out}; test {_dst} -nt {_src} || ({_mc} -o {_dst}.$$ {_src} && mv {_dst}.$$ {_dst})"
)
sys.path.insert(0, _out)
from test_mesh import NET, Net, inject, mac, nkey  # noqa: E402  (first: see above)

# isort: split
import struct  # noqa: E402

from fogmesh import frame  # noqa: E402
from fogmesh.neighbors import (  # noqa: E402
    Dedup,
    Nbr,
    Queue,
    Table,
    cbor_pack,
    cbor_unpack,
    route_hops,
    route_next,
)

INF = 0xFFFF


def test_etx_ewma_and_rank_arithmetic():
    n = Nbr(5, mac(5), 0)
    assert (n.etx, n.path()) == (256, INF)  # ETX 2 until measured; no rank yet: unreachable
    n.rank = 300
    assert n.path() == 300 + 256
    assert [n.sample(1) or n.etx for _ in range(4)] == [224, 200, 182, 169]  # alpha 0.25
    assert [n.sample(2) or n.etx for _ in range(2)] == [178, 186]  # then alpha 0.1
    n.etx = 128  # ETX 1.0; three frames never ACKed (each counts 16) take it to 5.07
    assert [n.sample(0) or n.etx for _ in range(3)] == [320, 493, 649]
    assert n.path() == 300 + 649
    n.etx = 100  # a link cost is at least 128 (one hop)
    assert n.path() == 300 + 128
    n.rank = 0xFFF0
    assert n.path() == INF


def joined_node(nid=5):
    # A node just after its JOINACK (the network key given directly): its parent comes from
    # the beacons injected below. Nothing is pumped, so nothing is sent.
    net = Net(0, [])  # no root: nothing is pumped, nothing needs to arrive
    m = net.add({"id": nid, "role": "node", "node_key": nkey(nid)})
    m._net, m.joined = NET, True
    return net, m


def beacon(m, src, rank, ctr, up=1, flags=0):
    inject(m, frame.T_BEACON, src, rank, ctr, struct.pack(">HH", up, 1), dest=INF, flags=flags)


def test_candidate_set_rank_rule_and_hysteresis():
    net, m = joined_node()
    net.t += 10  # (a detached node only counts what it hears after it detached)
    beacon(m, 7, 256, 1)
    beacon(m, 8, 300, 1)
    beacon(m, 9, 900, 1)  # not below our rank: never a candidate (the rank rule)
    beacon(m, 10, 0, 1, flags=frame.F_FULL)  # no room for children
    beacon(m, 11, 100, 1, up=5)  # our own child
    assert (m.parent, m.rank) == (7, 256 + 256)
    assert m.candidates() == [7, 8]
    assert [f["reason"] for f in net.ev("parent")] == ["attach"]
    beacon(m, 8, 200, 2)  # 456 against 512: better, but by less than 192
    assert m.parent == 7 and m.candidates() == [7, 8]
    beacon(m, 8, 60, 3)  # 316 against 512: a gain of 196
    assert (m.parent, m.rank) == (8, 60 + 256)
    assert net.ev("parent")[-1] == {"old": 7, "new": 8, "reason": "better"}
    beacon(m, 8, INF, 4)  # the parent is detached: the next candidate takes over
    assert m.parent == 7 and net.ev("parent")[-1]["reason"] == "lost"
    beacon(m, 7, INF, 2)  # the set is empty: detach, advertise infinity, solicit
    assert (m.parent, m.rank) == (None, INF)
    assert m.stats["beacons"] == 1 and m.stats["dis"] == 0
    m._poll(net.t)
    assert m.stats["dis"] == 1
    net.t += 10
    beacon(m, 9, 900, 2)  # any neighbour heard after the poison will do
    assert (m.parent, m.rank) == (9, 900 + 256)


def test_table_evicts_unverified_then_stalest_and_spares_kept():
    t = Table(3)
    a, _, c = (t.add(i, mac(i), 100 * i, lambda n: False) for i in (1, 2, 3))
    a.verified = c.verified = True
    d = t.add(4, mac(4), 500, lambda n: False)
    assert [n.id for n in t.nbrs] == [1, 3, 4]  # 2 was unverified
    d.verified = True
    t.add(5, mac(5), 600, lambda n: n.id == 1)  # 1 is kept (e.g. our parent): 3 goes
    assert [n.id for n in t.nbrs] == [1, 4, 5]
    assert t.add(6, mac(6), 700, lambda n: True) is None  # nothing may go
    t.nbrs[2].child = 650
    assert t.children(700) == 1 and t.children(700 + 192000) == 0


def test_dedup_window():
    d = Dedup(2)
    assert not d.dup(7, 10) and d.dup(7, 10)
    assert not d.dup(7, 12) and not d.dup(7, 11) and d.dup(7, 11) and d.dup(7, 12)
    assert not d.dup(7, 12 - 30) and not d.dup(7, 12 - 30)  # beyond the window: let through
    assert not d.dup(8, 0xFFFE) and not d.dup(8, 1)  # 16-bit wrap: 1 is newer than 0xFFFE
    assert not d.dup(8, 0xFFFF) and d.dup(8, 0xFFFE) and d.dup(8, 1)
    assert not d.dup(9, 3)  # a third origin replaces the oldest entry (7)
    assert not d.dup(7, 10) and d.dup(9, 3)


def test_routes_and_source_routes():
    root = Net(1, []).root  # a fogmesh.root.Root
    for nid, parent in ((2, 1), (3, 2), (4, 3)):
        root._route(nid, parent, 256, 1000 + nid)
    n = root._source_route(4, b"cmd")
    buf = root._routes.buf
    assert bytes(buf[:n]) == b"\x03\x00\x02\x00\x03\x00\x04cmd"
    assert route_hops(buf[:n]) == 3
    assert [route_next(buf[:n], 3, me) for me in (2, 3, 4, 9)] == [3, 4, None, None]
    assert root._source_route(4, b"x" * (len(buf) - 6)) == -2  # longer than the buffer
    assert root._source_route(9, b"") == -1  # unknown
    root._route(2, 4, 256, 1010)  # 2 -> 4 -> 3 -> 2: a loop
    assert root._source_route(4, b"") == -1
    for nid in range(5, 5 + 62):  # 64 routes at most: the one heard longest ago (3) goes
        root._route(nid, 1, 128, 1011 + nid)
    assert len(root._routes.d) == 64 and 3 not in root._routes.d and 2 in root._routes.d
    assert route_hops(b"\x02\x00\x01") == 0 and route_hops(b"") == 0  # truncated, empty


def test_queue_own_limit_and_order():
    q = Queue(4, 2)
    assert q.put(True, 1, 0, 16, 5, 1, 1, INF, b"a") == 0
    assert q.put(True, 1, 0, 16, 5, 1, 2, INF, b"b") == 1
    assert q.put(True, 1, 0, 16, 5, 1, 3, INF, b"c") == -1  # own frames: at most 2
    assert q.put(False, 2, 0, 15, 1, 9, 4, 9, b"down") == 2  # downward, next hop 9
    assert q.put(False, 1, 1, 15, 6, 1, 5, INF, b"e") == 3
    assert q.put(False, 1, 0, 15, 6, 1, 6, INF, b"f") == -1  # full
    assert (q.count(), q.oldest(True), q.oldest(False)) == (4, 0, 2)  # no parent: only down
    assert q.pl[2] == b"down" and list(q.f[14:21]) == [2, 0, 15, 1, 9, 4, 9]
    q.free(0)
    assert q.pl[0] is None and q.oldest(True) == 1
    assert q.put(True, 1, 0, 16, 5, 1, 7, INF, b"g") == 0 and q.oldest(True) == 1


def test_first_etx_from_rssi():
    _, m = joined_node()
    dbm = {7: -50, 8: -75, 9: -90, 10: -120, 11: -200}
    m._radio.rssi = lambda mac: dbm.get(mac[5])
    for i in (7, 8, 9, 10, 11, 12):  # 12: no RSSI (None)
        beacon(m, i, 300, 1)
    etx = [m._nbrs.get(i).etx for i in (7, 8, 9, 10, 11, 12)]
    assert etx == [128, 256, 384, 640, 1024, 256], etx  # clamped to ETX 1..8


def test_full_after_12_children():
    net, m = joined_node()
    for i in range(20, 32):
        beacon(m, i, 900, 1, up=5)  # twelve neighbours name us as their parent
        assert m._full(net.t) == (i == 31)


def test_peer_table_is_bounded_and_never_churns():
    net, m = joined_node()
    r = m._radio
    assert all(m._peer(mac(i)) for i in range(10, 29))
    assert not m._peer(mac(29)) and m._peer(mac(12))  # the 20th is refused; a known one is fine
    assert len(r.peers) == 20 and r.adds == 20  # broadcast + 19, each added once
    assert m._full(net.t)  # and the beacons say so (F_FULL)


def test_checks_on_received_frames():
    net = Net(2, [(1, 2)])
    net.until(net.joined, 10000)
    n2 = net.nodes[2]
    st = n2.stats
    n2._rx(mac(9), b"\x40" * 10)  # too short
    f = bytearray(frame.pack(NET, frame.T_PROBE, 0, 16, 9, 9, 2, 0, 300, 5, b""))
    f[0] = 0x80 | (f[0] & 0x3F)  # version 2
    n2._rx(mac(9), bytes(f))
    assert st["bad_frame"] == 2
    f = bytearray(frame.pack(NET, frame.T_PROBE, 0, 16, 9, 9, 2, 0, 300, 5, b""))
    f[9] ^= 1  # a flipped bit
    n2._rx(mac(9), bytes(f))
    assert st["bad_mic"] == 1 and n2._nbrs.get(9) is None
    inject(n2, frame.T_PROBE, 9, 300, 10, dest=2)
    inject(n2, frame.T_PROBE, 9, 300, 11, dest=2)
    old = inject(n2, frame.T_PROBE, 9, 300, 12, dest=2)
    inject(n2, frame.T_PROBE, 9, 300, 11, dest=2)  # already seen: a replay
    n2._rx(mac(9), old)  # a second copy of the last one: a lost MAC ACK
    assert (st["replay"], st["retx"]) == (1, 1)
    inject(n2, frame.T_PROBE, 9, 300, 1000, dest=2)
    inject(n2, frame.T_PROBE, 9, 300, 900, dest=2)  # more than 64 behind
    assert st["replay"] == 2 and st["error"] == 0


def test_loop_rule_hop_limit_and_duplicates():
    net = Net(2, [(1, 2)])
    net.until(net.joined, 10000)
    net.run(70000)
    n2 = net.nodes[2]
    st = n2.stats
    assert n2._trickle.i > 1000
    net.sniff = []
    r = n2.rank
    inject(n2, frame.T_DATA, 9, r, 1, b"a", origin=9, seq=1)  # sender not below us: rank error
    assert st["rank_err"] == 1 and n2._trickle.i == 1000  # Trickle reset
    net.run(100)
    fw = [frame.header(f) for a, b, f in net.sniff if a == 2 and b == mac(1)]
    fw = [(h[1], h[4]) for h in fw if h[0] == frame.T_DATA]
    assert fw == [(1, 9)], fw  # forwarded once, with the rank-error flag
    r = n2.rank  # (the ACK of the forwarded frame may have improved it)
    inject(n2, frame.T_DATA, 9, r - 1, 2, b"b", origin=9, seq=2, flags=1)  # flagged twice: loop
    inject(n2, frame.T_DATA, 9, r + 200, 3, b"c", origin=9, seq=3, hops=1)
    inject(n2, frame.T_DATA, 9, r + 200, 4, b"d", origin=9, seq=4)
    inject(n2, frame.T_DATA, 9, r + 200, 5, b"d", origin=9, seq=4)  # same origin and seq
    net.run(500)
    assert (st["loop"], st["ttl"], st["dup"]) == (1, 1, 1), st
    assert sorted((o, s, h) for o, s, h, p in net.got) == [(9, 1, 2), (9, 4, 2)]


def test_join_payloads_are_canonical_cbor():
    # Last: it loads the general codec (fogmesh.cbor) to compare with.
    from fogmesh import cbor

    for items in ([5, 0, b"n" * 8], [0xFFFE, 2**32 - 1, b""], [23, 24, 255, 256, 65536, b"k" * 16]):
        assert cbor_pack(items) == cbor.dumps(items), items
        assert cbor_unpack(cbor.dumps(items), len(items)) == items
    for bad in (
        b"",
        b"\x82\x01",
        b"\x83\x01\x02",
        b"\x83\x01\x02\x41",
        b"\x83\x01\x02\x61a",
        b"\x83\x01\x02\x03\x04",
        b"\x83\x01\x02\x1f",
    ):
        mptest.raises(ValueError, cbor_unpack, bad, 3)
