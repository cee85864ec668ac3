# A stand-in node firmware for the simulator's own tests (not the real mesh): started by
# tools.mesh.sim.Sim exactly like firmware/main.py (cwd = flash dir with config.json,
# MICROPYPATH with <repo>/firmware). It uses the real SimRadio and the real UART codec.
#
# Protocol (deliberately trivial): the root broadcasts a beacon (hop count 0) every 0.5 s;
# a node takes the beacon sender with the lowest hop count as parent (never a node whose
# beacon names it as parent) and beacons hop + 1.
# Every summary_s a node creates a message (seq from the file "seq") unless the file "quiet"
# exists, and sends it up as DATA; a relay forwards DATA to its parent; the root writes
# UART UP frames. 3 failed sends in a row drop the parent. Header layout of docs/mesh.md, with
# an all-zero MIC, so the medium parses type, origin and seq.

import asyncio
import json
import os
import struct
import sys
import time

from fogmesh import uart
from fogmesh.hal.simradio import SimRadio

BCAST = b"\xff" * 6
T_BEACON = 0
T_DATA = 1


def log(ev, **kw):
    kw["ev"] = ev
    kw["t"] = time.ticks_ms()
    print(json.dumps(kw))


def mac(n):
    return b"\x02\x00\x00\x00" + struct.pack(">H", n)


def frame(typ, hops, src, origin, seq, payload=b"", dest=0):
    head = struct.pack(">BBHHHHHI", 0x40 | typ << 2, hops, src, origin, dest, seq, 0, 0)
    return head + payload + bytes(8)


class Stub:
    def __init__(self, cfg):
        self.cfg = cfg
        self.id = cfg["id"]
        self.root = cfg.get("role") == "root"
        m = cfg["sim"]["medium"]
        self.radio = SimRadio(mac(self.id), (m[0], m[1]))
        self.radio.add_peer(BCAST)
        self.hop = 0 if self.root else 255
        self.parent = None
        self.fails = 0
        self.t_fail = None  # first failed send of a run of failures (for "reroute")
        self.old = None
        self.queue = []
        self.seen = set()
        self.uart = open(cfg["uart"]["fd"], "wb") if self.root else None
        self.peak = 0
        try:
            with open("seq") as f:
                self.seq = int(f.read())
        except OSError:
            self.seq = 0
        if self.root:
            self.uart.write(uart.encode(uart.T_HELLO, b"\xa2avx01bid\x01"))
        log("boot", id=self.id, role=cfg.get("role"))

    async def beacons(self):
        while True:
            if self.hop < 255:
                # dest = our parent: a child never takes a beacon of its own child
                self.radio.send(BCAST, frame(T_BEACON, self.hop, self.id, self.id, 0, b"", self.parent or 0))
            await asyncio.sleep_ms(500)

    async def receive(self):
        while True:
            src_mac, f = await self.radio.recv()
            typ = (f[0] >> 2) & 15
            src, origin, seq = struct.unpack_from(">H", f, 2)[0], struct.unpack_from(">H", f, 4)[0], struct.unpack_from(">H", f, 8)[0]
            their_parent = struct.unpack_from(">H", f, 6)[0]
            if typ == T_BEACON and not self.root and f[1] + 1 < self.hop and their_parent != self.id:
                old = self.parent
                self.parent, self.hop, self.fails = src, f[1] + 1, 0
                self.radio.add_peer(src_mac)
                if old is None:
                    log("joined", parent=src, rank=self.hop * 256)
                else:
                    log("parent", old=old, new=src, reason="better")
            elif typ == T_DATA:
                if (origin, seq) in self.seen:
                    continue
                self.seen.add((origin, seq))
                if self.root:
                    # UP hops = 16 - hops crossed, as firmware/fogmesh/border.py writes it
                    body = struct.pack(">HHB", origin, seq, f[1] - 1) + f[16:-8]
                    self.uart.write(uart.encode(uart.T_UP, body))
                else:
                    self.queue.append((origin, seq, f[1] - 1, bytes(f[16:-8])))

    async def forward(self):
        while True:
            await asyncio.sleep_ms(20)
            while self.queue and self.parent is not None:
                origin, seq, hops, pl = self.queue[0]
                ok = False
                for _ in range(6):
                    if self.radio.send(mac(self.parent), frame(T_DATA, hops, self.id, origin, seq, pl)):
                        ok = True
                        break
                    await asyncio.sleep_ms(0)
                if ok:
                    self.queue.pop(0)
                    self.fails = 0
                    if self.t_fail is not None and self.parent != self.old:
                        ms = time.ticks_diff(time.ticks_ms(), self.t_fail)
                        log("reroute", ms=ms, old=self.old, new=self.parent)
                    self.t_fail = None
                else:
                    self.fails += 1
                    if self.t_fail is None:
                        self.t_fail, self.old = time.ticks_ms(), self.parent
                    if self.fails >= 3:
                        log("parent", old=self.parent, new=None, reason="fails")
                        self.parent, self.hop = None, 255
                    break

    async def generate(self):
        while True:
            await asyncio.sleep_ms(int(self.cfg.get("summary_s", 2) * 1000))
            self.peak = max(self.peak, __import__("gc").mem_alloc())
            log("heap", peak=self.peak)
            if self.root or "quiet" in os.listdir():
                continue
            self.seq += 1
            with open("seq", "w") as f:
                f.write(str(self.seq))
            log("gen", seq=self.seq)
            self.queue.append((self.id, self.seq, 16, b"\xa1aks"))

    async def main(self):
        asyncio.create_task(self.beacons())
        asyncio.create_task(self.forward())
        asyncio.create_task(self.generate())
        await self.receive()


with open("config.json") as f:
    _cfg = json.load(f)
if _cfg.get("stub_crash"):
    print("stub: crashing as asked")
    sys.exit(3)
asyncio.run(Stub(_cfg).main())
