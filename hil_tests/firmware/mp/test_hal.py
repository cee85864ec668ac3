# firmware/fogmesh/hal on MicroPython: the unix layer (MAC, flash, UART over real file
# descriptors, the watchdog in a child process, config errors), the shared helpers (log, heap),
# the .mpy cache, boot.py, and the ESP32 layer against fakes of network / aioespnow / machine
# that follow the MicroPython docs (it cannot run here), plus an mpy-cross compile of it.

import main  # firmware/main.py: importing it starts nothing

FW = main.__file__[: main.__file__.rfind("/")]
CACHE = main.use_mpy(FW)
assert CACHE, "mpy-cross is needed"
del main

import asyncio  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import mptest  # noqa: E402
from fogmesh import hal  # noqa: E402
from fogmesh.hal import HalError, linux  # noqa: E402

KEY = "00" * 16


def cfg(**kw):
    c = {"id": 5, "role": "node", "sim": {"medium": ["127.0.0.1", 40000]}}
    c.update(kw)
    return c


def test_load_picks_linux_layer():
    hw = hal.load(cfg(), None)
    assert hw.name == "linux" and sys.platform == "linux"
    assert hw.flash == os.getcwd() == hal.flash_dir()
    assert hw.mac == b"\x02\x00\x00\x00\x00\x05" and linux.sim_mac(0x1234)[4:] == b"\x12\x34"
    r = hw.radio
    assert r.mac == hw.mac and hw.radio is r  # made once
    r.close()


def test_config_errors():
    hw = linux.Hal(cfg(sim=None))
    assert "sim.medium" in str(mptest.raises(HalError, getattr, hw, "radio"))
    assert "adc" in str(mptest.raises(HalError, hw.sensor, {"kind": "adc", "pins": [1]}))
    assert hw.sensor({"kind": "gen", "channels": ["a"]}).read()
    assert "uart.fd" in str(mptest.raises(HalError, hw.uart, {"id": 1}))
    assert "cannot be opened" in str(mptest.raises(HalError, hw.uart, {"fd": "x"}))
    assert mptest.raises(SystemExit, hw.reset).args == (1,)  # no reset here: exit, status 1


def test_uart_over_a_fifo():
    d = mptest.tmpdir()
    os.system(f"mkfifo {d}/f")
    f = open(d + "/f", "r+b")  # noqa: SIM115 (both ends on one fd: what is written comes back)
    u = linux.Uart(f.fileno())

    async def go():
        assert u.write(b"hello")
        got = [await u.read()]
        u.write(bytes(range(256)) * 2)
        while sum(len(x) for x in got) < 5 + 512:
            got.append(await u.read())
        return got

    asyncio.new_event_loop()
    got = asyncio.run(go())
    assert got[0] == b"hello" and b"".join(got[1:]) == bytes(range(256)) * 2
    assert max(len(x) for x in got) <= 256
    n = 0
    chunk = b"x" * 1024
    while u.write(chunk):  # nobody reads: the pipe fills, then writes are dropped
        n += 1
    assert n > 0 and u.dropped == 1


def test_uart_peer_gone_is_oserror():
    import socket
    import struct

    path = mptest.tmpdir() + "/s"
    addr = struct.pack("H", socket.AF_UNIX) + path.encode() + b"\x00"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(addr)
    srv.listen(1)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(addr)
    gw = srv.accept()[0]
    u = linux.Uart(cli.fileno())
    gw.write(b"ab")
    gw.close()

    async def go():
        data = await u.read()
        try:
            await u.read()
        except OSError as e:
            return data, e
        return data, None

    asyncio.new_event_loop()
    data, err = asyncio.run(go())
    assert data == b"ab" and err is not None


_DOG = """import sys, time
sys.path.insert(0, %r)
from fogmesh.hal.linux import Watchdog
from fogmesh.hal import log
w = Watchdog(200, log)
for _ in range(6):
    time.sleep_ms(100)
    w.feed()
print("fed")
time.sleep_ms(2000)
print("still alive")
"""


def test_watchdog_ends_the_process_when_not_fed():
    d = mptest.tmpdir()
    with open(d + "/dog.py", "w") as f:
        f.write(_DOG % CACHE)
    t0 = time.ticks_ms()
    st = os.system(f"{sys.executable} -X heapsize=100k {d}/dog.py > {d}/out 2>&1")
    ms = time.ticks_diff(time.ticks_ms(), t0)
    with open(d + "/out") as f:
        out = f.read()
    assert st != 0 and "fed" in out and "still alive" not in out, (st, out)
    assert '"ev": "watchdog"' in out and ms < 1800, (ms, out)


def test_watchdog_fed_and_stopped():
    w = linux.Watchdog(50)
    for _ in range(5):
        time.sleep_ms(20)
        w.feed()
    w.stop()
    time.sleep_ms(150)  # stopped: it must not fire (it would end this very process)
    mptest.raises(ValueError, linux.Watchdog, 5)


_LOG = """import sys
sys.path.insert(0, %r)
from fogmesh import hal
hal.log("s", {"n": 3, "q": 'a "q"', "z": None, "l": [1.5, {"k": 0}]})
"""


def test_log_without_tees_streams_one_json_line():
    # No tee (every node but the root): written field by field, never as one big string.
    import json

    d = mptest.tmpdir()
    with open(d + "/log.py", "w") as f:
        f.write(_LOG % CACHE)
    assert os.system(f"{sys.executable} -X heapsize=100k {d}/log.py > {d}/out 2>&1") == 0
    with open(d + "/out") as f:
        lines = f.read().splitlines()
    a = json.loads(lines[0])
    assert len(lines) == 1 and isinstance(a.pop("t"), int), lines
    assert a == {"ev": "s", "n": 3, "q": 'a "q"', "z": None, "l": [1.5, {"k": 0}]}, a


def test_log_tee_path_exists_unload():
    lines = []
    hal.tee(lines.append)
    try:
        hal.log("x", {"a": 1})  # (also printed)
    finally:
        hal._tees.remove(lines.append)
    assert lines[0].startswith("{") and '"ev": "x"' in lines[0] and '"t": ' in lines[0]
    assert hal.path("/", "seq") == "/seq" and hal.path("/a", "seq") == "/a/seq"
    assert hal.exists(FW + "/main.py") and not hal.exists(FW + "/nope")
    import fogmesh.sensors  # noqa: F401

    hal.unload("fogmesh.sensors")
    assert "fogmesh.sensors" not in sys.modules


def test_heap_peak_and_heap_log():
    logs = []

    async def go():
        t = asyncio.create_task(hal.heap_log(lambda ev, f: logs.append((ev, f)), 20))
        await asyncio.sleep_ms(70)
        t.cancel()

    asyncio.new_event_loop()
    hal.heap_mark()
    blob = bytearray(3000)  # after the mark: counted in peak, not in code
    asyncio.run(go())
    assert len(logs) >= 3 and logs[0][0] == "heap"
    f = logs[-1][1]
    assert f["peak"] >= logs[0][1]["peak"] > 10000 and f["free"] > 0
    assert hal.heap() == hal._peak[0]
    assert 10000 < f["code"] <= f["peak"] - 3000, f
    del blob


def test_mpy_cache_and_boot_py():
    names = os.listdir(CACHE + "/fogmesh")
    assert "app.mpy" in names and "int8.mpy" in names and "hal" in names
    assert sys.path[0] == CACHE
    with open(FW + "/boot.py") as f:
        exec(f.read(), {})  # a no-op here
    assert "esp" not in sys.modules


# ---- the ESP32 layer, against fakes
class _Fake:
    calls = []

    def __init__(self, *a, **kw):
        _Fake.calls.append((type(self).__name__, a, kw))

    def __getattr__(self, name):
        def f(*a, **kw):
            _Fake.calls.append((name, a, kw))
            mac = len(a) == 1 and type(a[0]) is str and a[0] == "mac"
            return b"\x24\x0a\xc4\x00\x00\x01" if mac else None

        return f


class WLAN(_Fake):
    pass


class AIOESPNow(_Fake):
    peers_table = {b"\x01" * 6: [-60, 1000]}
    fail = None
    rx = []

    def add_peer(self, mac):
        if mac == b"\xee" * 6:
            raise OSError(-12395, "ESP_ERR_ESPNOW_EXIST")
        _Fake.calls.append(("add_peer", (mac,), {}))

    def send(self, mac, msg, sync):
        if self.fail:
            raise OSError(-12391, self.fail)
        return mac != b"\x02" * 6

    async def arecv(self):
        return AIOESPNow.rx.pop(0)


class UART(_Fake):
    pass


class _Mod:
    pass


def _esp32():
    net = _Mod()
    net.WLAN, net.STA_IF, net.AP_IF = WLAN, 0, 1
    aio = _Mod()
    aio.AIOESPNow = AIOESPNow
    mach = _Mod()
    mach.UART, mach.WDT, mach.ADC, mach.Pin = UART, _Fake, _Fake, _Fake
    mach.reset = lambda: _Fake.calls.append(("reset", (), {}))
    saved = sys.modules.get("machine")
    sys.modules.update({"network": net, "aioespnow": aio, "machine": mach})
    try:
        from fogmesh.hal import esp32
    finally:
        del sys.modules["network"], sys.modules["aioespnow"]
        if saved is None:
            del sys.modules["machine"]
        else:
            sys.modules["machine"] = saved
    return esp32


def test_esp32_radio_setup_and_interface():
    esp32 = _esp32()
    _Fake.calls.clear()
    hw = esp32.Hal({"id": 5, "channel": 6})
    r = hw.radio
    assert hw.name == "esp32" and hw.flash == "/" and r.mac == b"\x24\x0a\xc4\x00\x00\x01"
    c = [(n, a, kw) for n, a, kw in _Fake.calls]
    i_rx = c.index(("config", (), {"rxbuf": 4096}))
    assert c[i_rx + 1] == ("active", (True,), {})  # rxbuf first: active() allocates it
    assert ("config", (), {"channel": 6, "hidden": True}) in c  # the AP, on the channel
    assert ("config", (), {"reconnects": 0}) in c and ("config", (), {"channel": 6}) in c
    r.add_peer(b"\x01" * 6)
    r.add_peer(b"\x01" * 6)  # idempotent
    r.add_peer(b"\xee" * 6)  # registered before a soft reset: kept
    assert [a for n, a, _ in _Fake.calls if n == "add_peer"] == [(b"\x01" * 6,)]
    for i in range(18):  # 20 with the two above
        r.add_peer(bytes([0x10 + i]) * 6)
    assert "FULL" in str(mptest.raises(OSError, r.add_peer, b"\x77" * 6))  # 20 peers max
    assert r.send(b"\x01" * 6, b"x") is True and r.send(b"\x02" * 6, b"x") is False
    mptest.raises(ValueError, r.send, b"\x01" * 6, b"")
    mptest.raises(ValueError, r.send, b"\x01" * 6, bytes(251))
    r._e.fail = "ESP_ERR_ESPNOW_NO_MEM"
    assert r.send(b"\x01" * 6, b"x") is False and r.stats["tx_err"] == 1
    assert r.stats["tx_fail"] == 2
    assert r.rssi(b"\x01" * 6) == -60 and r.rssi(b"\x03" * 6) is None
    AIOESPNow.rx = [(None, None), (b"\x05" * 6, b"frame")]
    asyncio.new_event_loop()
    assert asyncio.run(r.recv()) == (b"\x05" * 6, b"frame")


def test_esp32_uart_wdt_adc_reset():
    esp32 = _esp32()
    hw = esp32.Hal({"id": 1})
    assert "uart.id" in str(mptest.raises(HalError, hw.uart, {"fd": 3}))
    _Fake.calls.clear()
    u = hw.uart({"id": 2, "baud": 230400, "tx": 17, "rx": 16})
    assert _Fake.calls[0] == (
        "UART",
        (2,),
        {"baudrate": 230400, "rxbuf": 1024, "txbuf": 1024, "timeout": 0, "tx": 17, "rx": 16},
    )
    assert u.write(b"x") is True
    hw.watchdog(5000)
    assert ("_Fake", (), {"timeout": 5000}) in _Fake.calls
    hw.reset()
    assert _Fake.calls[-1][0] == "reset"


def test_esp32_compiles_with_mpy_cross():
    mc = sys.executable[: sys.executable.rfind("/") + 1] + "mpy-cross"
    out = mptest.tmpdir() + "/esp32.mpy"
    assert os.system(f"{mc} -o {out} {FW}/fogmesh/hal/esp32.py") == 0
    assert os.stat(out)[6] > 1000
