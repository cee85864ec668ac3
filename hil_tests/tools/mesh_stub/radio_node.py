# A scripted MicroPython node around the real SimRadio, for hil_tests/tools/test_mesh_medium.py:
#
#   micropython -X heapsize=100k radio_node.py STEPS.json
#
# STEPS.json: {"id": 2, "medium": ["127.0.0.1", port], "steps": [...]}; each step prints one
# JSON line {"op": ..., ...result}. Steps:
#   {"op": "registered", "timeout_ms": n}  -> {"ok": bool}   (a recv() until the medium's "h")
#   {"op": "send", "to": id, "msg": hex, "n": k}  -> {"results": [bool...], "ms": [elapsed...]}
#   {"op": "bcast", "msg": hex}  -> {"result": bool}
#   {"op": "recv", "n": k, "timeout_ms": t}  -> {"frames": [[src_id, hex], ...]}
#   {"op": "idle", "ms": t}  -> {}   (awaits recv() with nothing arriving)
#   {"op": "sleep", "ms": t}  -> {}
#   {"op": "stats"}  -> {"stats": {...}}

import asyncio
import json
import struct
import sys
import time

from fogmesh.hal.simradio import SimRadio


def mac(n):
    if n == 0xFFFF:
        return b"\xff" * 6
    return b"\x02\x00\x00\x00" + struct.pack(">H", n)


def out(op, **kw):
    kw["op"] = op
    print(json.dumps(kw))


async def recv_until(r, deadline_ms, n):
    got = []
    t0 = time.ticks_ms()
    while len(got) < n:
        left = deadline_ms - time.ticks_diff(time.ticks_ms(), t0)
        if left <= 0:
            break
        try:
            m, f = await asyncio.wait_for_ms(r.recv(), left)
        except asyncio.TimeoutError:
            break
        got.append([struct.unpack(">H", m[4:6])[0], bytes(f).hex()])
    return got


async def main(spec):
    m = spec["medium"]
    r = SimRadio(mac(spec["id"]), (m[0], m[1]))
    for st in spec["steps"]:
        op = st["op"]
        if op == "registered":
            t0 = time.ticks_ms()
            while not r.registered and time.ticks_diff(time.ticks_ms(), t0) < st["timeout_ms"]:
                try:
                    await asyncio.wait_for_ms(r.recv(), 100)
                except asyncio.TimeoutError:
                    pass
            out(op, ok=r.registered)
        elif op == "send":
            r.add_peer(mac(st["to"]))
            res, ms = [], []
            for _ in range(st.get("n", 1)):
                t0 = time.ticks_ms()
                res.append(r.send(mac(st["to"]), bytes.fromhex(st["msg"])))
                ms.append(time.ticks_diff(time.ticks_ms(), t0))
            out(op, results=res, ms=ms)
        elif op == "bcast":
            r.add_peer(mac(0xFFFF))
            out(op, result=r.send(mac(0xFFFF), bytes.fromhex(st["msg"])))
        elif op == "recv":
            out(op, frames=await recv_until(r, st["timeout_ms"], st["n"]))
        elif op == "idle":
            await recv_until(r, st["ms"], 1)
            out(op)
        elif op == "sleep":
            await asyncio.sleep_ms(st["ms"])
            out(op)
        elif op == "stats":
            out(op, stats=r.stats)
    r.close()


with open(sys.argv[1]) as f:
    asyncio.run(main(json.load(f)))
