# The hardware layer of the MicroPython unix port: the simulation (tools/mesh/sim.py starts
# each node as `micropython firmware/main.py` with cwd = its flash directory).
#
# radio: SimRadio over the loopback medium (cfg["sim"]["medium"]); MAC 02 00 00 00 + id (2 B BE).
# flash: the working directory.
# uart: an inherited file descriptor (cfg["uart"]["fd"], the master side of a pty in the
#   simulator), opened with open(fd, "r+b"). asyncio's poller waits on it (as StreamReader would);
#   the port's file read() blocks until it has every byte asked for, so bytes are taken one by
#   one while poll() says more are ready. Writes never block the node: when the fd is not
#   writable (nobody reads the other side and its buffer is full) the frame is dropped and
#   counted, as a UART with a full TX FIFO and no flow control would.
# watchdog: a thread that checks how long ago feed() ran. The unix port cannot reset itself and
#   has no os._exit() or signals to offer; when the watchdog fires it logs a line and has the
#   shell SIGKILL this process (`kill -9 $PPID` from os.system's child): as abrupt as a hardware
#   watchdog reset, and the simulator sees the node die.
# mpy_cache(): compiling a module from source takes several times its size in transient heap
#   (its whole parse tree at once) and leaves every identifier it met interned for good: more
#   than a 100 KB heap has room for next to the mesh. An ESP32 is given .mpy files (mpy-cross)
#   for that reason; on the unix port main.py has a child process run mpy_cache(), which
#   compiles the fogmesh package with mpy-cross (found next to the micropython binary, or on
#   PATH) into /tmp/fogmesh-mpy<firmware path> -- once, under a lock, and again only for changed
#   sources -- and main.py puts that directory first on sys.path. Without mpy-cross, or with
#   .mpy files of another bytecode version, the sources are used as they are.

import os
import select
import struct
import sys
import time

from asyncio import core
from micropython import const

from fogmesh.hal import HalError

_RBUF = const(256)


def flash_dir():
    return os.getcwd()


def sim_mac(node_id):
    return b"\x02\x00\x00\x00" + struct.pack(">H", node_id)


def _nolog(ev, fields):
    pass


class Hal:
    name = "linux"

    def __init__(self, cfg, log=None):
        self._cfg = cfg
        self._log = log or _nolog
        self.flash = flash_dir()
        self.mac = sim_mac(cfg["id"])
        self._radio = None

    @property
    def radio(self):
        # Made on first use: the UART and watchdog do not need a medium.
        if self._radio is None:
            sim = self._cfg.get("sim")
            if not sim or "medium" not in sim:
                raise HalError('config sim.medium ["host", port] is required on the unix port')
            from fogmesh.hal.simradio import SimRadio

            self._radio = SimRadio(self.mac, medium=(sim["medium"][0], sim["medium"][1]))
        return self._radio

    def sensor(self, scfg):
        if scfg.get("kind") == "adc":
            raise HalError("sensor kind adc needs an ESP32; use gen or file on the unix port")
        from fogmesh import sensors

        return sensors.make(scfg, self.flash)

    def uart(self, ucfg):
        if "fd" not in ucfg:
            raise HalError('config uart.fd is required on the unix port (uart.id is an ESP32 UART)')
        return Uart(ucfg["fd"])

    def watchdog(self, timeout_ms):
        return Watchdog(timeout_ms, self._log)

    def reset(self):
        sys.exit(1)  # the unix port cannot reset: end non-zero, the simulator decides


class Uart:
    def __init__(self, fd):
        try:
            self._f = open(fd, "r+b")
        except (OSError, TypeError, ValueError) as e:
            raise HalError("uart fd %r cannot be opened: %s" % (fd, e))
        self._rd = select.poll()
        self._rd.register(self._f, select.POLLIN)
        self._wr = select.poll()
        self._wr.register(self._f, select.POLLOUT)
        self._buf = bytearray(_RBUF)
        self._mv = memoryview(self._buf)
        self.dropped = 0  # frames not written: the other side is not reading

    async def read(self):
        # -> the bytes that arrived (at least one). OSError when the other side is gone.
        # Waits in asyncio's poller as StreamReader.readinto() would, without importing
        # asyncio.stream (~2 KB of the root's heap).
        mv = self._mv
        yield core._io_queue.queue_read(self._f)
        if self._f.readinto(mv[:1]) != 1:
            raise OSError("uart: end of file")
        n = 1
        rd = self._rd
        while n < _RBUF:
            ready = rd.poll(0)
            if not ready or not ready[0][1] & select.POLLIN:
                break
            if self._f.readinto(mv[n : n + 1]) != 1:
                break
            n += 1
        return bytes(mv[:n])

    def write(self, data):
        ready = self._wr.poll(0)
        if not ready or not ready[0][1] & select.POLLOUT:
            self.dropped += 1
            return False
        self._f.write(data)
        return True

    def close(self):
        self._f.close()


class Watchdog:
    def __init__(self, timeout_ms, log=None):
        import _thread

        if timeout_ms < 10:
            raise ValueError("watchdog timeout must be >= 10 ms")
        self.timeout_ms = timeout_ms
        self._log = log or _nolog
        # Shared with the thread: a list slot holds a small int (a store is one pointer write;
        # the port runs threads without a GIL).
        self._fed = [time.ticks_ms(), 1]  # last feed, running
        _thread.start_new_thread(self._run, ())

    def feed(self):
        self._fed[0] = time.ticks_ms()

    def stop(self):
        # The unix port only (tests): an ESP32's watchdog cannot be stopped.
        self._fed[1] = 0

    def _run(self):
        step = max(5, min(500, self.timeout_ms // 4))
        fed = self._fed
        while fed[1]:
            time.sleep_ms(step)
            late = time.ticks_diff(time.ticks_ms(), fed[0])
            if fed[1] and late > self.timeout_ms:
                self._log("watchdog", {"late_ms": late, "timeout_ms": self.timeout_ms})
                os.system("kill -9 $PPID")
                return


# ---- the .mpy cache (see the top of this file). Needed only in main.py's child process, which
# compiles this module from source: _build() leaves everything from the next line on out of the
# .mpy files it makes (its bytecode would otherwise sit in every node's heap).
#: source only
if __file__.endswith(".py"):

    def _mtime(p):
        try:
            return os.stat(p)[8]
        except OSError:
            return None

    def _mpy_cross():
        p = sys.executable[: sys.executable.rfind("/") + 1] + "mpy-cross"
        if _mtime(p) is not None:
            return p
        return "mpy-cross" if os.system("command -v mpy-cross >/dev/null 2>&1") == 0 else None

    def _build(fw, cache, mc):
        # Compiles what changed; a module mpy-cross refuses is copied as source.
        march = {1: " -march=x86", 2: " -march=x64"}.get(sys.implementation._mpy >> 10, "")
        for sub in ("fogmesh", "fogmesh/hal"):
            src_dir = fw + "/" + sub
            dst_dir = cache + "/" + sub
            os.system("mkdir -p " + dst_dir)
            names = [n for n in os.listdir(src_dir) if n.endswith(".py")]
            for n in os.listdir(dst_dir):  # a module removed from the sources goes here too
                base = n[:-4] if n.endswith(".mpy") else n[:-3] if n.endswith(".py") else None
                if base is not None and base + ".py" not in names:
                    os.remove(dst_dir + "/" + n)
            for n in names:
                src = src_dir + "/" + n
                mpy = dst_dir + "/" + n[:-3] + ".mpy"
                t = _mtime(src)
                if (_mtime(mpy) or -1) >= t or (_mtime(dst_dir + "/" + n) or -1) >= t:
                    continue
                tmp = mpy + ".tmp"
                cut = src
                with open(src) as f:
                    text = f.read()
                i = text.find("\n#: source only\n")
                if i >= 0:  # compile only what comes before the marker
                    cut = tmp + ".py"
                    with open(cut, "w") as f:
                        f.write(text[: i + 1])
                text = None
                # -s: a short source name for tracebacks (every one is a qstr in each node's heap);
                # -O3: no line numbers in the bytecode (~2 KB less heap; tracebacks say line 1)
                cmd = "%s%s -O3 -s %s/%s -o %s %s && mv %s %s && rm -f %s/%s"
                ok = os.system(cmd % (mc, march, sub, n, tmp, cut, tmp, mpy, dst_dir, n)) == 0
                if cut != src:
                    os.remove(cut)
                if ok:
                    continue  # (a source copy left from an earlier failure would win: gone)
                os.system("rm -f %s %s; cp %s %s.tmp && mv %s.tmp %s/%s"
                          % (tmp, mpy, src, mpy, mpy, dst_dir, n))

    def mpy_cache(fw, root="/tmp"):
        # -> the cache directory (up to date, of this runtime's bytecode version), or None.
        mc = _mpy_cross()
        if mc is None:
            return None
        cache = root + "/fogmesh-mpy" + fw.replace("/", "_")
        lock = cache + ".lock"
        if os.system("mkdir -p %s 2>/dev/null" % root) != 0:
            return None
        for _ in range(300):  # one process builds, the others wait (at most 30 s, then build too)
            if os.system("mkdir %s 2>/dev/null" % lock) == 0:
                break
            time.sleep_ms(100)
        try:
            _build(fw, cache, mc)
        finally:
            os.system("rmdir %s 2>/dev/null" % lock)
        # The .mpy files must match this runtime's bytecode version, or none is used.
        try:
            with open(cache + "/fogmesh/__init__.mpy", "rb") as f:
                head = f.read(2)
        except OSError:
            return None
        return cache if head == b"M" + bytes([sys.implementation._mpy & 0xFF]) else None
