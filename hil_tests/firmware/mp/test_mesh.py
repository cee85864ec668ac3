# The mesh protocol (fogmesh/mesh.py with trickle.py and neighbors.py) on an in-memory medium:
# several Mesh instances in this one process, one fake clock, a link table with seeded loss.
# Net.run() advances virtual time from timer to timer and delivers every frame at once; a
# unicast attempt costs 1 ms, one without an ACK 100 ms (the radio's ACK timeout).
#
# The firmware is loaded as a node loads it (firmware/main.py's mpy_cache): compiled with
# mpy-cross first, so that the compiler's transient heap does not count against the 100 KB.
import os
import sys

import mptest


def _mpy(names):
    fw = mptest._here().rsplit("/", 3)[0] + "/firmware/fogmesh"
    out = "/tmp/fogmesh-mpy-test" + fw.replace("/", "_")
    mc = sys.executable.rsplit("/", 1)[0] + "/mpy-cross"
    if os.system(f"mkdir -p {out}/fogmesh && test -x {mc}") != 0:
        return  # no mpy-cross: the sources are imported (a bigger heap may be needed)
    for n in names:
        src, dst = f"{fw}/{n}.py", f"{out}/fogmesh/{n}.mpy"
        # (written under a temporary name and renamed: another test process may be reading)
        if os.system(f"test {dst} -nt {src} || ({mc} -o {dst}.$$ {src} && mv {dst}.$$ {dst})"):
            raise OSError("mpy-cross failed on " + src)
    sys.path.insert(0, out)


_mpy(("__init__", "frame", "keys", "kdf", "cbor", "neighbors", "trickle", "mesh", "root"))

import struct  # noqa: E402
from binascii import hexlify  # noqa: E402
from time import ticks_diff  # noqa: E402

from fogmesh import frame, keys  # noqa: E402
from fogmesh.mesh import make  # noqa: E402

SITE = b"fogmesh unit-test site key 0123"
EPOCH = 7
NETKEY = keys.net_key(SITE, EPOCH)
NET = keys.Mac(NETKEY)
BC = b"\xff" * 6
# Made at import, low in the heap: long-lived objects made during a test fragment it.
_KEYS = [hexlify(keys.node_key(SITE, i)).decode() for i in range(1, 10)]
NETHEX = hexlify(NETKEY).decode()


def mac(i):
    return b"\x02\x00\x00\x00" + struct.pack(">H", i)


def nkey(i):
    return _KEYS[i - 1]


class Radio:
    def __init__(self, net, i):
        self.net, self.id, self.mac = net, i, mac(i)
        self.peers = []
        self.adds = 0
        self.inbox = []
        self.ev = None  # an asyncio.Event in real time

    def add_peer(self, m):
        self.adds += 1
        if m in self.peers:
            raise OSError("ESP_ERR_ESPNOW_EXIST")
        if len(self.peers) >= 20:
            raise OSError("ESP_ERR_ESPNOW_FULL")
        self.peers.append(m)

    def send(self, m, msg, sync=True):
        if m not in self.peers:
            raise OSError("ESP_ERR_ESPNOW_NOT_FOUND")
        return self.net.tx(self, m, bytes(msg))

    def rssi(self, m):
        return None

    async def recv(self):
        import asyncio

        if self.ev is None:
            self.ev = asyncio.Event()
        while not self.inbox:
            self.ev.clear()
            await self.ev.wait()
        return self.inbox.pop(0)


class Net:
    def __init__(self, n, links, loss=0.0, seed=1, allow=None, realtime=False):
        self.t = 1000
        self.s = seed
        self.realtime = realtime
        self.loss = {}
        for a, b in links:
            self.link(a, b, loss)
        self.dead = set()
        self.logs = []
        self.got = []
        self.down = []
        self.sniff = None  # a list: every (src, dst, frame) attempted
        self.nodes = {}
        allow = {str(j): nkey(j) for j in (allow if allow is not None else range(2, n + 1))}
        for i in range(1, n + 1):
            cfg = {"id": i, "role": "node", "node_key": nkey(i)}
            if i == 1:
                cfg.update(role="root", net_key=NETHEX, epoch=EPOCH, allow=allow)
            self.add(cfg)
        self.root = self.nodes.get(1)
        if self.root is not None:
            self.root.on_data = lambda o, s, h, p: self.got.append((o, s, h, bytes(p)))

    def add(self, cfg):
        i = cfg["id"]
        lg = self.logs

        def log(ev, f):
            if ev != "stats":  # (every 30 s: kept, they would only grow the list)
                lg.append((i, ev, dict(f)))

        m = make(cfg, Radio(self, i), mptest.tmpdir(), log, None if self.realtime else self.clock)
        m.on_down = lambda p: self.down.append((i, p))
        self.nodes[i] = m
        return m

    def clock(self):
        return self.t

    def rand(self):  # xorshift32: the medium's draws, apart from the nodes' own random
        x = self.s
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.s = x
        return x / 4294967296

    def link(self, a, b, p=0.0):
        self.loss[(a, b)] = self.loss[(b, a)] = p

    def _rx(self, a, b, msg):
        r = self.nodes[b]._radio
        r.inbox.append((mac(a), msg))
        if r.ev is not None:
            r.ev.set()

    def tx(self, r, m, msg):
        a = r.id
        if self.sniff is not None:
            self.sniff.append((a, m, msg))
        if m == BC:
            for b in self.nodes:
                p = self.loss.get((a, b))
                if p is not None and b not in self.dead and self.rand() >= p:
                    self._rx(a, b, msg)
            return True
        b = m[4] << 8 | m[5]
        p = self.loss.get((a, b))
        ok = p is not None and b not in self.dead and self.rand() >= p
        if ok:
            self._rx(a, b, msg)
            ok = self.rand() >= p  # the ACK, lost independently
        if not self.realtime:
            self.t += 1 if ok else 100
        return ok

    def settle(self):
        for _ in range(20000):
            busy = False
            for i, m in self.nodes.items():
                r = m._radio
                if i in self.dead:
                    r.inbox.clear()
                    continue
                while r.inbox:
                    m._rx(*r.inbox.pop(0))
                    busy = True
                if m._pump():
                    busy = True
            if not busy:
                return
        raise AssertionError("the medium never went quiet")

    def run(self, ms):
        end = self.t + ms
        while True:
            w = 500
            for i, m in self.nodes.items():
                if i not in self.dead:
                    w = min(w, m._poll(self.t))
            self.settle()
            if ticks_diff(end, self.t) <= 0:
                return
            self.t += max(1, min(w, end - self.t))

    def until(self, cond, ms):
        t0 = self.t
        while not cond():
            assert ticks_diff(self.t, t0) < ms, f"not within {ms} ms"
            self.run(50)
        return ticks_diff(self.t, t0)

    def ev(self, name, node=None):
        return [f for i, e, f in self.logs if e == name and (node is None or i == node)]

    def joined(self):
        return all(m.joined and m.parent is not None for m in self.nodes.values() if not m.is_root)


def inject(m, typ, src, rank, ctr, pl=b"", origin=None, dest=1, seq=0, hops=16, flags=0):
    f = frame.pack(NET, typ, flags, hops, src, origin or src, dest, seq, rank, ctr, pl)
    m._rx(mac(src), f)
    return f


def line4():
    net = Net(4, [(1, 2), (2, 3), (3, 4)])
    net.until(net.joined, 20000)
    return net


def test_line_forms_and_delivers_once():
    net = line4()
    n = net.nodes
    assert [n[i].parent for i in (2, 3, 4)] == [1, 2, 3]
    assert 0 == n[1].rank < n[2].rank < n[3].rank < n[4].rank < 0xFFFF
    assert [f["parent"] for f in net.ev("joined")] == [1, 2, 3]
    for i in (2, 3, 4):
        assert n[i].send(i * 10, b"st%d" % i)
    net.run(2000)
    want = [(i, i * 10, i - 1, b"st%d" % i) for i in (2, 3, 4)]
    assert sorted(net.got) == want, net.got
    r = n[1].routes()
    assert [r[i][0] for i in (2, 3, 4)] == [1, 2, 3], r
    assert all(m.stats["error"] == 0 and m.queued() == 0 for m in n.values())


def test_down_source_route_reaches_a_3_hop_node():
    net = line4()
    root = net.root
    cmd = b"\xa2acdpingctok\t"  # CBOR {"c": "ping", "tok": 9}
    assert root.send_down(4, cmd) == 0
    net.run(1000)
    assert net.down == [(4, cmd)]
    assert root.send_down(77, cmd) == 1  # no route
    assert root.send_down(4, b"x" * 226) == 2  # route + command > 226 B
    assert not hasattr(net.nodes[2], "send_down")  # only the root routes down (fogmesh.root)
    mptest.raises(TypeError, root.send_down, 4, "text")


def diamond():
    net = Net(4, [(1, 2), (1, 3), (2, 4), (3, 4)])
    net.until(net.joined, 20000)
    net.run(5000)
    n4 = net.nodes[4]
    old = n4.parent
    assert n4.candidates() == [old, 5 - old]
    return net, n4, old, 5 - old


def test_dead_parent_reroute_loses_and_repeats_nothing():
    net, n4, old, new = diamond()
    net.dead.add(old)
    for s in range(5):
        assert n4.send(s, b"m%d" % s)
    net.run(8000)
    got = [(o, s) for o, s, h, p in net.got if o == 4]
    assert sorted(got) == [(4, s) for s in range(5)], got  # none lost, none twice
    sw = net.ev("parent", 4)[-1]
    assert (sw["old"], sw["new"]) == (old, new), sw
    rr = net.ev("reroute", 4)
    assert len(rr) == 1 and (rr[0]["old"], rr[0]["new"]) == (old, new), rr
    assert 600 <= rr[0]["ms"] <= 3000, rr  # from the first failed attempt to the first ACK
    assert net.nodes[1].routes()[4][0] == new  # the DAO after the switch
    assert n4._radio.adds == len(n4._radio.peers)  # peers added once, never again


def test_three_failed_sends_switch_to_the_next_candidate():
    # The backup's ETX is made so poor that rank hysteresis alone would keep the dead parent:
    # the switch comes from the rule "3 consecutive failed sends", after 3 x 6 x 100 ms.
    net, n4, old, new = diamond()
    b = n4._nbrs.get(new)
    b.etx, b.n = 1000, 10  # a settled, poor estimate: one good probe barely moves it
    net.dead.add(old)
    k = len(net.ev("parent", 4))
    assert n4.send(1, b"x")
    net.run(3000)
    sw = net.ev("parent", 4)[k:]
    assert [(s["old"], s["new"], s["reason"]) for s in sw] == [(old, new, "fail")], sw
    assert b.n > 10  # the second failure in a row probed the backup
    rr = net.ev("reroute", 4)[-1]
    assert 1800 <= rr["ms"] <= 2500, rr
    assert [(o, s) for o, s, h, p in net.got if o == 4] == [(4, 1)]


def test_run_with_asyncio_in_real_time():
    import asyncio

    net = Net(3, [(1, 2), (2, 3)], realtime=True)

    async def main():
        tasks = [asyncio.create_task(m.run()) for m in net.nodes.values()]
        for _ in range(100):
            await asyncio.sleep_ms(50)
            if net.joined():
                break
        assert net.joined()
        assert net.nodes[3].send(5, b"hi")
        for _ in range(20):
            await asyncio.sleep_ms(10)
            if net.got:
                break
        for t in tasks:
            t.cancel()

    asyncio.run(main())
    assert net.got == [(3, 5, 2, b"hi")]
