# The root's bridge between the mesh and the UART to the gateway (docs/mesh.md "UART between
# root and gateway"; the codec is fogmesh/uart.py).
#
#   b = Border(mesh, uart, log, cfg)   # uart: hal uart (await read() -> bytes, write(b) -> bool)
#   asyncio.create_task(b.run())       # HELLO, then DOWN -> DOWNACK, STATUS every 10 s
#
# mesh.on_data -> UP: origin, seq, hops, payload. UP's `hops` is 16 minus the radio hops the
# message crossed (a child of the root: 15; the root's own messages: 16), so that 16 - hops is
# the hop count, as the gateway's adapter and the benchmark read it. (mesh.on_data gives the hops
# crossed; docs/mesh.md leaves UP's hops undefined.)
# DOWN -> mesh.send_down(dest, payload) -> DOWNACK with its status (0 sent, 1 no route, 2 too
# long), or 3 (bad) when the payload is not a CBOR map with a "c" command; a DOWN too short to
# hold a token is counted and dropped (no token to answer). Other frame types arriving here
# (an echo of our own frames on a pty not in raw mode, line noise) are counted, not acted on.
# STATUS: {"id", "nodes": mesh.routes(), "stats": counters} in one frame of <= 507 B; the
# counters that do not fit (zero ones are left out first) are sent in later periods, in turn.
# Past 30-odd nodes the node table itself is split over several frames, each with "part": [i, n].
# Frames the UART cannot take now wait in a bounded backlog (8 KB), oldest first; past that
# they are dropped and counted (uart_drop) and logged.

import asyncio
from time import ticks_diff, ticks_ms

from micropython import const

from fogmesh import cbor, uart
from fogmesh.uart import ACK_BAD, T_DOWN, T_DOWNACK, T_HELLO, T_LOG, T_STATUS, T_UP

_HOPS_MAX = const(16)  # docs/mesh.md: a DATA frame starts with hops = 16
_STATUS_MS = const(10000)
_BACKLOG = const(8192)
_RETRY_MS = const(10)
_ERR_MS = const(5000)
_NODES = const(459)  # node entries per STATUS frame: uart.MAX_BODY (507) less the other keys
_STATS_KEY = const(9)  # "stats" (6 B) and a map head (<= 3 B)


class Border:
    def __init__(self, mesh, port, log, cfg=None, clock=ticks_ms):
        self.mesh = mesh
        self.port = port
        self._log = log
        self._clock = clock
        self.id = mesh.id
        self.dec = uart.Decoder()
        self.stats = {"uart_up": 0, "uart_down": 0, "uart_down_bad": 0, "uart_unexpected": 0,
                      "uart_drop": 0, "uart_err": 0, "uart_status": 0, "uart_logs": 0}
        self.log_lines = bool(cfg and cfg.get("uart", {}).get("log"))
        self._q = []  # encoded frames waiting for the UART
        self._qb = 0
        self._wake = asyncio.Event()
        self._err_at = None
        self._in_log = False
        self._rot = 0
        mesh.on_data = self.on_data

    # ---- out
    def send(self, typ, body):
        # -> True if written or queued, False if dropped.
        frame = uart.encode(typ, body)
        if not self._q and self._write(frame):
            return True
        if self._qb + len(frame) > _BACKLOG:
            self.stats["uart_drop"] += 1
            self._error("uart_drop", "backlog full, frame type %d dropped" % typ)
            return False
        self._q.append(frame)
        self._qb += len(frame)
        self._wake.set()
        return True

    def _write(self, frame):
        try:
            return self.port.write(frame)
        except OSError as e:
            self.stats["uart_err"] += 1
            self._error("uart_write", repr(e))
            return False

    def _error(self, what, err):
        now = self._clock()
        if self._err_at is None or ticks_diff(now, self._err_at) >= _ERR_MS:
            self._err_at = now
            self._in_log = True  # no T_LOG about the UART failing
            try:
                self._log("error", {"what": what, "err": err})
            finally:
                self._in_log = False

    async def _flush(self):
        while True:
            await self._wake.wait()
            self._wake.clear()
            q = self._q
            while q:
                if self._write(q[0]):
                    self._qb -= len(q.pop(0))
                else:
                    await asyncio.sleep_ms(_RETRY_MS)

    def on_data(self, origin, seq, hops, payload):
        self.stats["uart_up"] += 1
        self.send(T_UP, uart.up_body(origin, seq, max(0, _HOPS_MAX - hops), payload))

    def log_line(self, line):
        # A tee for app.log: log lines as T_LOG (cfg uart.log).
        if self.log_lines and not self._in_log:
            self._in_log = True
            try:
                self.stats["uart_logs"] += 1
                self.send(T_LOG, line.encode()[: uart.MAX_BODY])
            finally:
                self._in_log = False

    def hello(self):
        self.send(T_HELLO, cbor.dumps({"v": 1, "id": self.id}))

    def status_bodies(self):
        # -> the STATUS bodies (CBOR) of one period
        nodes = self.mesh.routes()
        out = []
        chunk = {}
        size = 0
        for k, v in nodes.items():
            n = len(cbor.dumps({k: v})) - 1
            if chunk and size + n > _NODES:
                out.append(chunk)
                chunk = {}
                size = 0
            chunk[k] = v
            size += n
        out.append(chunk)
        bodies = []
        for i in range(len(out)):
            d = {"id": self.id, "nodes": out[i]}
            if len(out) > 1:
                d["part"] = [i, len(out)]
            bodies.append(d)
        last = bodies[-1]
        room = uart.MAX_BODY - len(cbor.dumps(last)) - _STATS_KEY
        st = self._counters()
        # (two sorts of plain keys: a sort key of (zero, name) tuples would cost ~2 KB more)
        names = sorted(k for k in st if st[k])
        r = self._rot % len(names) if names else 0
        order = names[r:] + names[:r] + sorted(k for k in st if not st[k])
        names = None
        stats = {}
        for k in order:
            n = len(cbor.dumps({k: st[k]})) - 1
            if n > room:
                continue
            stats[k] = st[k]
            room -= n
        self._rot += len(stats)
        last["stats"] = stats
        return [cbor.dumps(d) for d in bodies]

    def _counters(self):
        st = {}
        for k, v in self.mesh.stats.items():
            if type(v) is int:
                st[k] = v
        st.update(self.stats)
        d = self.dec
        st["uart_frames"] = d.frames
        st["uart_bad_crc"] = d.bad_crc
        st["uart_bad_cobs"] = d.bad_cobs
        st["uart_oversize"] = d.oversize
        return st

    def status(self):
        for body in self.status_bodies():
            self.send(T_STATUS, body)
        self.stats["uart_status"] += 1

    # ---- in
    def feed(self, data):
        for typ, body in self.dec.feed(data):
            if typ == T_DOWN:
                self._down(body)
            else:
                self.stats["uart_unexpected"] += 1

    def _down(self, body):
        try:
            dest, token, payload = uart.parse_down(body)
        except uart.UartError as e:
            self.stats["uart_down_bad"] += 1
            self._error("down", str(e))
            return
        self.stats["uart_down"] += 1
        try:
            cmd = cbor.loads(payload)
            ok = isinstance(cmd, dict) and isinstance(cmd.get("c"), str)
        except cbor.CBORError:
            ok = False
        if ok:
            status = self.mesh.send_down(dest, payload)
        else:
            self.stats["uart_down_bad"] += 1
            status = ACK_BAD
        self.send(T_DOWNACK, uart.downack_body(token, status))

    async def run(self):
        self.hello()
        asyncio.create_task(self._flush())
        asyncio.create_task(self._status_loop())
        while True:
            try:
                data = await self.port.read()
            except OSError as e:  # the gateway's side is closed: wait for it to come back
                self.stats["uart_err"] += 1
                self._error("uart_read", repr(e))
                await asyncio.sleep_ms(1000)
                continue
            self.feed(data)

    async def _status_loop(self):
        while True:
            await asyncio.sleep_ms(_STATUS_MS)
            try:
                self.status()
            except Exception as e:  # never lose the bridge over a status
                self._error("status", repr(e))
