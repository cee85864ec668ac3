# Starts a fogmesh node. On an ESP32 it runs after boot.py from the flash root; on the
# MicroPython unix port the simulator (tools/mesh/sim.py) starts it as
#   MICROPYPATH=<repo>/firmware micropython -X heapsize=100k <repo>/firmware/main.py
# with the node's flash directory (holding config.json) as the working directory.
#
# Load and check config.json, choose the hardware layer (sys.platform), then run the mesh, the
# application (when a sensor is configured) and, on the root, the border bridge to the UART.
# A fatal error is logged {"ev": "fatal", ...}; then an ESP32 resets after 10 s (time for
# mpremote to break in) and the unix port exits with status 1.
#
# Memory: this file stays small (its code is held for as long as the node runs). On the unix
# port the package is loaded as .mpy files, as an ESP32 is given .mpy files: use_mpy() has a
# child process build them (fogmesh/hal/linux.py mpy_cache()). config.py, needed at boot only,
# is dropped once the config is checked.

import sys


def use_mpy(fw):
    # Unix port: the package's .mpy cache first on sys.path, when it can be built -> its path.
    import os

    if not fw.startswith("/"):
        fw = os.getcwd() + "/" + fw
    cache = "/tmp/fogmesh-mpy" + fw.replace("/", "_")
    code = ("import sys;sys.path[0]='%s';from fogmesh.hal import linux;"
            "sys.exit(0 if linux.mpy_cache('%s') else 1)" % (fw, fw))
    if len(code) < 250 and os.system("%s -X heapsize=100k -c \"%s\"" % (sys.executable, code)) == 0:
        sys.path.insert(0, cache)
        return cache
    return None


def _deployed():
    # A board given .mpy files by `fogmesh deploy` (a virtual ESP32): nothing to build.
    import os

    try:
        os.stat("fogmesh/__init__.mpy")
        return True
    except OSError:
        return False


def _log(ev, fields):
    # Until fogmesh.hal (and its log) is imported.
    import json
    import time

    fields["ev"] = ev
    fields["t"] = time.ticks_ms()
    print(json.dumps(fields))


def _load(log):
    # -> (cfg, hw). In a function of its own so that nothing of config.py stays referenced.
    from fogmesh import config, hal

    cfg = config.load(hal.path(hal.flash_dir(), "config.json"))
    hal.unload("fogmesh.config")
    return cfg, hal.load(cfg, log)


async def _guard(coro, failed, name):
    # A task that ends ends the node: nothing would restart it.
    try:
        await coro
        err = RuntimeError("%s returned" % name)
    except Exception as e:
        err = e
    failed.append((name, err))
    failed[0].set()


async def _node(cfg, hw, log):
    import asyncio
    import gc

    # Every module first, then the objects and their buffers: code loaded into a heap not yet
    # cut up by buffers finds the room it needs.
    from fogmesh.hal import feed, heap_log, heap_mark, tee
    from fogmesh.mesh import make

    root = cfg["role"] == "root"
    if root:
        import fogmesh.root  # noqa: F401 (make() builds a Root)
        from fogmesh.border import Border
    if "sensor" in cfg:
        from fogmesh.app import App

        sensor = hw.sensor(cfg["sensor"])
    radio = hw.radio
    heap_mark()  # (collects: the imports' garbage gone before the buffers are cut out of the heap)
    mesh = make(cfg, radio, hw.flash, log)
    if root:  # the mesh holds the allow list's keys; the hex text is ~6 KB on a 30-node mesh
        cfg.pop("allow", None)  # (config.py reads it from the file again for a `cfg` command)
    wdt = hw.watchdog(int(cfg["watchdog_s"] * 1000)) if cfg["watchdog_s"] else None
    failed = [asyncio.Event()]
    tasks = [("mesh", mesh.run()), ("heap", heap_log(log))]
    if root:
        border = Border(mesh, hw.uart(cfg["uart"]), log, cfg)
        tee(border.log_line)
        tasks.append(("border", border.run()))
    if "sensor" in cfg:
        app = App(cfg, mesh, hw.flash, sensor, log)
        tasks.append(("app", app.run(wdt)))
    elif wdt is not None:
        tasks.append(("watchdog", feed(wdt)))
    for name, coro in tasks:
        asyncio.create_task(_guard(coro, failed, name))
    if "sensor" not in cfg:  # only the application reads the config after boot: ~1 KB back
        cfg.clear()
    gc.collect()
    await failed[0].wait()
    name, err = failed[1]
    log("error", {"what": "task", "task": name, "err": repr(err)})
    raise err


def main():
    log = _log
    try:
        here = globals().get("__file__", "main.py")  # (a board runs main.py without __file__)
        if sys.platform == "linux" and not _deployed():
            use_mpy(here[: here.rfind("/")] if "/" in here else ".")
        import asyncio
        import gc

        from fogmesh.hal import log

        cfg, hw = _load(log)
        gc.collect()
        log("boot", {"id": cfg["id"], "role": cfg["role"], "hal": hw.name})
        asyncio.run(_node(cfg, hw, log))
    except KeyboardInterrupt:
        log("stop", {"why": "KeyboardInterrupt"})
        sys.exit(130)
    except Exception as e:
        log("fatal", {"err": str(e) or repr(e), "type": type(e).__name__})
        sys.print_exception(e, sys.stderr)
        if sys.platform == "esp32":
            import machine
            import time

            time.sleep(10)
            machine.reset()
        sys.exit(1)


if __name__ == "__main__":
    main()
