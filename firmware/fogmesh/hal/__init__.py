# The hardware layer, chosen once at boot by sys.platform: hal/esp32.py on an ESP32 (espnow,
# machine, network), hal/linux.py on the MicroPython unix port (the simulation). The rest of the
# firmware sees only what both offer:
#
#   flash = flash_dir()      # "/" on an ESP32, the working directory on the unix port
#   hw = load(cfg, log)      # cfg: the validated config.json; log(ev, fields)
#   hw.name                  # "esp32" or "linux"
#   hw.flash                 # the directory of config.json, counters, ring buffer, model
#   hw.radio                 # mac, add_peer(mac), send(mac, msg, sync=True) -> bool,
#                            # await recv() -> (mac, msg), rssi(mac), close()
#   hw.sensor(cfg["sensor"]) # channels, read() -> one value per channel
#   hw.uart(cfg["uart"])     # root: await read() -> bytes, write(data) -> bool, close()
#   hw.watchdog(ms)          # feed(); ends the node when not fed for ms
#   hw.reset()
#
# Also the small things every part of a node uses, kept here (loaded on every node) rather than
# in app.py (which a root without a sensor never loads):
#   log(ev, fields)          # one JSON line {"ev", "t": ticks_ms, ...} on stdout (and tees)
#                            # (streamed field by field when there is no tee: no big blocks)
#   tee(fn)                  # fn(line) gets every log line too (the root: T_LOG frames)
#   path(flash, name), exists(path), unload(module name)
#   save_json(path, obj)     # atomically: path.tmp, then rename (over the old file)
#   await feed(wdt)          # feeds a watchdog every second (a node without an application)
#   heap(collect) -> peak; await heap_log(log)   # the `heap` log line every 5 s
#   heap_mark()              # main.py, after every import: that live heap is the line's `code`
#
# The heap peak is the highest gc.mem_alloc() seen right after a collection. Read at any other
# moment, mem_alloc() counts the garbage not yet collected as well and climbs towards the heap
# size between two collections (MicroPython collects when an allocation finds no room), so only
# post-collection readings are live memory. heap_log() collects every 5 s (about 1 ms on a
# 100 KB heap); heap(True) also collects, for the moments worth a reading (a status message).

import sys
from time import ticks_ms

_tees = []
_peak = [0, 0]  # the highest live heap seen; the live heap once boot's imports were done


class HalError(Exception):
    pass


def _module():
    p = sys.platform
    if p == "esp32":
        from fogmesh.hal import esp32 as m
    elif p == "linux":
        from fogmesh.hal import linux as m
    else:
        raise HalError("no hardware layer for platform %r (esp32 or linux)" % p)
    return m


def flash_dir():
    return _module().flash_dir()


def load(cfg, log=None):
    # main.py calls this once; the layer's module is imported here and nowhere else.
    return _module().Hal(cfg, log)


def log(ev, fields=None):
    import json

    if _tees:  # the line as one string, for the tees
        d = {"ev": ev, "t": ticks_ms()}
        if fields:
            d.update(fields)
        line = json.dumps(d)
        try:
            print(line)
        except OSError:
            pass  # stdout gone: nothing to tell it
        for f in _tees:
            f(line)
        return
    # Streamed, one field at a time: a stats line would otherwise need a copy of its 30-entry
    # dict and a ~600 B string, contiguous blocks a fragmented heap may lack (a MemoryError).
    out = sys.stdout
    try:
        out.write('{"ev": ')
        json.dump(ev, out)
        out.write(', "t": %d' % ticks_ms())
        if fields:
            for k in fields:
                out.write(", ")
                json.dump(k, out)
                out.write(": ")
                json.dump(fields[k], out)
        out.write("}\n")
    except OSError:
        pass  # stdout gone


def tee(fn):
    _tees.append(fn)


def path(flash, name):
    return flash + name if flash.endswith("/") else flash + "/" + name


def exists(p):
    import os

    try:
        os.stat(p)
        return True
    except OSError:
        return False


def save_json(p, obj):
    import json
    import os

    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
    try:
        os.rename(tmp, p)
    except OSError:  # a filesystem without atomic replace: a cut here leaves p.tmp, which the
        os.remove(p)  # readers (config.load) take when p is missing
        os.rename(tmp, p)


def unload(name):
    # Drops a module needed rarely (config: at boot and for a `cfg` command): its bytecode goes
    # back to the heap; importing it again loads it again.
    sys.modules.pop(name, None)
    pkg, _, attr = name.rpartition(".")
    if pkg in sys.modules:
        try:
            delattr(sys.modules[pkg], attr)
        except AttributeError:
            pass


async def feed(wdt):
    import asyncio

    while True:
        wdt.feed()
        await asyncio.sleep_ms(1000)


def heap_mark():
    # The live heap after boot's imports: the modules' code and names (an ESP32 running them
    # frozen or from ROMFS would hold most of it in flash) plus the few objects made by then.
    # peak - code is what the node's state, buffers and traffic take.
    _peak[1] = heap(True)


def heap(collect=False):
    import gc

    if collect:
        gc.collect()
        a = gc.mem_alloc()
        if a > _peak[0]:
            _peak[0] = a
    return _peak[0]


async def heap_log(log, every_ms=5000):
    import asyncio
    import gc

    while True:
        p = heap(True)
        log("heap", {"peak": p, "now": gc.mem_alloc(), "free": gc.mem_free(), "code": _peak[1]})
        await asyncio.sleep_ms(every_ms)
