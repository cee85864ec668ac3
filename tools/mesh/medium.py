"""The radio medium of the mesh simulation: one loopback UDP socket that relays the nodes'
frames along a topology with per-link loss and latency, injects faults, captures frames and
accounts for every one of them (docs/mesh.md "Radio medium protocol", docs/mesh-sim.md).

    async with Medium(topology, seed=1) as medium:      # medium.port: the nodes' config
        medium.cut(2, 3); medium.set_loss(4, None, 0.5); medium.partition({5, 6}, {1, 2, 3, 4})
        medium.inject(2, 3, frame)                      # as if node 2 had sent it
        medium.stats()

Accounting: a transmission (an `S` datagram or an injection) hands one copy to each intended
receiver (one for a unicast, every neighbour for a broadcast); every copy is either delivered
or lost, with the reason, so `sent == delivered + lost` always holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from gateway.errors import FogmeshError
from tools.mesh.topology import Topology

__all__ = [
    "BROADCAST",
    "BROADCAST_MAC",
    "REASONS",
    "TYPE_NAMES",
    "Captured",
    "Medium",
    "MediumError",
    "id_of",
    "mac_of",
    "serve",
]

log = logging.getLogger("fogmesh.mesh.medium")

BROADCAST: Final = 0xFFFF
BROADCAST_MAC: Final = b"\xff" * 6
_SIM_OUI: Final = b"\x02\x00\x00\x00"
_S_HDR: Final = 15  # b"S" + txid(2) + src(6) + dst(6)
_MAX_FRAME: Final = 250
REASONS: Final = ("link_loss", "no_link", "dead", "unregistered")
TYPE_NAMES: Final = {
    0: "BEACON",
    1: "DATA",
    2: "DOWN",
    3: "JOIN",
    4: "JOINACK",
    5: "DAO",
    6: "DIS",
    7: "PROBE",
}
_T_DATA: Final = 1
_HOP_KEYS_MAX: Final = 8192  # (relay, origin, seq) arrivals waiting for the onward send
_LATENCY_SAMPLES_MAX: Final = 100_000
_NO_LINK_ANSWER_MS: Final = 2.0  # a unicast nobody hears fails after the MAC's retries


class MediumError(FogmeshError, ValueError):
    """A fault or injection the medium cannot apply (unknown node, no such link, bad value)."""


def mac_of(node_id: int) -> bytes:
    """A simulated node's MAC: 02 00 00 00 + id (2 B BE)."""
    if node_id == BROADCAST:
        return BROADCAST_MAC
    return _SIM_OUI + node_id.to_bytes(2, "big")


def id_of(mac: bytes) -> int | None:
    """The node id of a simulated MAC (0xFFFF for broadcast), None for any other MAC."""
    if mac == BROADCAST_MAC:
        return BROADCAST
    if len(mac) == 6 and mac[:4] == _SIM_OUI:
        n = int.from_bytes(mac[4:], "big")
        return n if 1 <= n <= 0xFFFE else None
    return None


def _origin_seq(frame: bytes) -> tuple[int, int]:
    """origin (offset 4) and seq (offset 8) of a v1 header."""
    return (frame[4] << 8) | frame[5], (frame[8] << 8) | frame[9]


def frame_type(frame: bytes) -> str:
    t = (frame[0] >> 2) & 15 if frame else -1
    return TYPE_NAMES.get(t, f"T{t}")


@dataclass(frozen=True, slots=True)
class Captured:
    """One copy of a relayed frame: who sent it to whom, what it was, and what became of it."""

    t_ms: float  # since the medium started
    src: int
    dst: int  # the receiver of this copy (a broadcast is captured once per neighbour)
    broadcast: bool
    typ: int
    origin: int | None  # None when the frame is too short to have the field
    seq: int | None
    length: int
    delivered: bool
    reason: str | None  # why it was lost; None when delivered
    injected: bool
    frame: bytes

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "frame"}
        d["type"] = TYPE_NAMES.get(self.typ, f"T{self.typ}")
        d["frame"] = self.frame.hex()
        return d


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, medium: Medium) -> None:
        self.medium = medium

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.medium._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a node that died: its next hello re-registers it.
        log.debug("medium socket: %s", exc)


def _new_node_counts() -> dict[str, int]:
    return {"tx": 0, "tx_bytes": 0, "rx": 0, "lost": 0, "ack_lost": 0}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return round(s[i], 3)


class Medium:
    """The medium: `await start()` (or `async with`), then the fault API; `close()`."""

    def __init__(
        self,
        topology: Topology,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        capture: int = 2000,
    ) -> None:
        self.topology = topology
        self.host = host
        self.port = port
        self._rng = random.Random(seed)
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = time.monotonic()
        self._addr: dict[int, tuple[str, int]] = {}  # registered nodes' rx sockets
        self._dead: set[int] = set()
        self._cuts: set[frozenset[int]] = set()
        self._split: set[frozenset[int]] = set()  # cuts made by partition(), undone by heal()
        self._isolated: set[int] = set()
        self._loss: dict[tuple[int, int], float] = {}  # (src, dst) overrides
        self._timers: set[asyncio.TimerHandle] = set()
        self._arrived: OrderedDict[tuple[int, int, int], float] = OrderedDict()
        self._hop_ms: list[float] = []
        self.capture: deque[Captured] = deque(maxlen=capture)
        self.on_register: Callable[[int], None] | None = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._c: dict[str, int] = dict.fromkeys(
            (
                "transmissions",
                "unicast",
                "broadcast",
                "injected",
                "sent",
                "delivered",
                "lost",
                "ack_ok",
                "ack_fail",
                "ack_lost",
                "hellos",
                "bad_datagrams",
            ),
            0,
        )
        self._reasons: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._frames: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._nodes: dict[int, dict[str, int]] = {}

    # --- lifetime ------------------------------------------------------------------------

    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self._loop = loop
        self.port = int(transport.get_extra_info("sockname")[1])
        self._t0 = time.monotonic()
        return self

    def close(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # --- registration --------------------------------------------------------------------

    def registered(self) -> set[int]:
        return set(self._addr)

    def kill(self, node: int) -> None:
        """Forget a node whose process was killed: frames to it are lost as `dead` until it
        says hello again."""
        self._addr.pop(node, None)
        self._dead.add(node)

    # --- faults --------------------------------------------------------------------------

    def _known(self, *nodes: int) -> None:
        for n in nodes:
            if n not in self.topology.nodes:
                raise MediumError(f"no node {n} in the topology")

    def _linked(self, a: int, b: int) -> frozenset[int]:
        self._known(a, b)
        pair = frozenset((a, b))
        if pair not in self.topology.links:
            raise MediumError(f"no link between {a} and {b} in the topology")
        return pair

    def cut(self, a: int, b: int) -> None:
        self._cuts.add(self._linked(a, b))

    def restore(self, a: int, b: int) -> None:
        self._cuts.discard(self._linked(a, b))

    def set_loss(self, a: int, b: int | None, p: float, *, one_way: bool = False) -> None:
        """Loss of the link a–b (every link of a when b is None), both ways unless one_way
        (then a→b only)."""
        if not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
            raise MediumError(f"loss must be in 0..1, got {p!r}")
        self._known(a)
        others = self.topology.neighbours(a) if b is None else [b]
        for n in others:
            self._linked(a, n)
            self._loss[(a, n)] = float(p)
            if not one_way:
                self._loss[(n, a)] = float(p)

    def isolate(self, node: int) -> None:
        """Cut every link of `node` until heal()."""
        self._known(node)
        self._isolated.add(node)

    def partition(self, side_a: Iterable[int], side_b: Iterable[int]) -> None:
        """Cut every link between the two sides until heal()."""
        a, b = set(side_a), set(side_b)
        self._known(*a, *b)
        if a & b:
            raise MediumError(f"partition: nodes {sorted(a & b)} are on both sides")
        for pair in self.topology.links:
            x, y = tuple(pair)
            if (x in a and y in b) or (x in b and y in a):
                self._split.add(pair)

    def heal(self) -> None:
        """Undo every partition() and isolate(); cut() stays until restore()."""
        self._split.clear()
        self._isolated.clear()

    def link_up(self, a: int, b: int) -> bool:
        pair = frozenset((a, b))
        return (
            pair in self.topology.links
            and pair not in self._cuts
            and pair not in self._split
            and a not in self._isolated
            and b not in self._isolated
        )

    def loss(self, src: int, dst: int) -> float | None:
        """The loss src→dst now; None when the link is absent or cut."""
        if not self.link_up(src, dst):
            return None
        over = self._loss.get((src, dst))
        return over if over is not None else self.topology.loss(src, dst)

    # --- relaying ------------------------------------------------------------------------

    def now_ms(self) -> float:
        """Milliseconds since the medium started: the clock of `Captured.t_ms`."""
        return (time.monotonic() - self._t0) * 1000.0

    def _later(self, delay_ms: float, data: bytes, addr: tuple[str, int]) -> None:
        if self._loop is None:
            return
        if delay_ms <= 0:
            self._sendto(data, addr)
            return
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._sendto(data, addr)

        handle = self._loop.call_later(delay_ms / 1000.0, fire)
        self._timers.add(handle)

    def _sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def _node(self, n: int) -> dict[str, int]:
        c = self._nodes.get(n)
        if c is None:
            c = self._nodes[n] = _new_node_counts()
        return c

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        kind = data[:1]
        if kind == b"H" and len(data) == 7:
            node = id_of(data[1:7])
            if node is None or node == BROADCAST:
                self._c["bad_datagrams"] += 1
                return
            self._c["hellos"] += 1
            fresh = self._addr.get(node) != addr
            self._addr[node] = addr
            self._dead.discard(node)
            self._sendto(b"h", addr)
            if fresh and self.on_register is not None:
                self.on_register(node)
        elif kind == b"S" and len(data) > _S_HDR:
            txid = data[1:3]
            src, dst = id_of(data[3:9]), id_of(data[9:15])
            frame = data[_S_HDR:]
            if src is None or src == BROADCAST or dst is None or len(frame) > _MAX_FRAME:
                self._c["bad_datagrams"] += 1
                self._sendto(b"A" + txid + b"\x00", addr)
                return
            ok, delay = self._transmit(src, dst, frame, injected=False)
            self._c["ack_ok" if ok else "ack_fail"] += 1
            self._later(delay, b"A" + txid + (b"\x01" if ok else b"\x00"), addr)
        else:
            self._c["bad_datagrams"] += 1

    def _transmit(self, src: int, dst: int, frame: bytes, *, injected: bool) -> tuple[bool, float]:
        """Account one transmission and hand out its copies; -> (ACKed, answer delay ms)."""
        c = self._c
        c["transmissions"] += 1
        c["injected" if injected else ("broadcast" if dst == BROADCAST else "unicast")] += 1
        name = frame_type(frame)
        self._frames[name] = self._frames.get(name, 0) + 1
        self._bytes[name] = self._bytes.get(name, 0) + len(frame)
        nc = self._node(src)
        nc["tx"] += 1
        nc["tx_bytes"] += len(frame)
        typ = (frame[0] >> 2) & 15
        key = None
        if typ == _T_DATA and len(frame) >= 10:
            origin, seq = _origin_seq(frame)
            t = self._arrived.pop((src, origin, seq), None)
            key = (origin, seq)
            if t is not None:
                lat = self.topology.link(src, dst)
                extra = lat.latency_ms if lat is not None else 0.0
                if len(self._hop_ms) < _LATENCY_SAMPLES_MAX:
                    self._hop_ms.append(self.now_ms() - t + extra)
        if injected:
            ok = self._copy(src, dst, frame, 0.0, lossless=True, key=key, injected=True)
            return ok, 0.0
        if dst == BROADCAST:
            for n in self.topology.neighbours(src):
                p = self.loss(src, n)
                if p is not None:
                    link = self.topology.link(src, n)
                    assert link is not None
                    self._copy(src, n, frame, link.latency_ms, p=p, key=key, broadcast=True)
            return True, 0.0
        link = self.topology.link(src, dst)
        p = self.loss(src, dst)
        if link is None or p is None:
            self._lose(src, dst, frame, "no_link", injected=False)
            return False, _NO_LINK_ANSWER_MS
        if not self._copy(src, dst, frame, link.latency_ms, p=p, key=key):
            return False, link.latency_ms
        back = self.loss(dst, src)
        if back is not None and self._rng.random() < back:
            c["ack_lost"] += 1
            nc["ack_lost"] += 1
            return False, link.latency_ms
        return True, link.latency_ms

    def _copy(
        self,
        src: int,
        dst: int,
        frame: bytes,
        latency_ms: float,
        *,
        p: float = 0.0,
        key: tuple[int, int] | None,
        lossless: bool = False,
        broadcast: bool = False,
        injected: bool = False,
    ) -> bool:
        """One copy src→dst: delivered after the latency, or lost and counted."""
        addr = self._addr.get(dst)
        if addr is None:
            reason = "dead" if dst in self._dead else "unregistered"
            self._lose(src, dst, frame, reason, injected=injected, broadcast=broadcast)
            return False
        if not lossless and self._rng.random() < p:
            self._lose(src, dst, frame, "link_loss", injected=injected, broadcast=broadcast)
            return False
        self._c["sent"] += 1
        self._c["delivered"] += 1
        self._node(dst)["rx"] += 1
        if key is not None:
            arrived = self._arrived
            arrived[(dst, key[0], key[1])] = self.now_ms() + latency_ms
            arrived.move_to_end((dst, key[0], key[1]))
            while len(arrived) > _HOP_KEYS_MAX:
                arrived.popitem(last=False)
        self._record(src, dst, frame, None, injected=injected, broadcast=broadcast)
        self._later(latency_ms, b"R" + mac_of(src) + frame, addr)
        return True

    def _lose(
        self,
        src: int,
        dst: int,
        frame: bytes,
        reason: str,
        *,
        injected: bool,
        broadcast: bool = False,
    ) -> None:
        self._c["sent"] += 1
        self._c["lost"] += 1
        self._reasons[reason] += 1
        if dst != BROADCAST:
            self._node(dst)["lost"] += 1
        self._record(src, dst, frame, reason, injected=injected, broadcast=broadcast)

    def _record(
        self,
        src: int,
        dst: int,
        frame: bytes,
        reason: str | None,
        *,
        injected: bool,
        broadcast: bool,
    ) -> None:
        if self.capture.maxlen == 0:
            return
        origin = seq = None
        if len(frame) >= 10:
            origin, seq = _origin_seq(frame)
        self.capture.append(
            Captured(
                t_ms=round(self.now_ms(), 3),
                src=src,
                dst=dst,
                broadcast=broadcast,
                typ=(frame[0] >> 2) & 15 if frame else -1,
                origin=origin,
                seq=seq,
                length=len(frame),
                delivered=reason is None,
                reason=reason,
                injected=injected,
                frame=bytes(frame),
            )
        )

    def inject(self, src: int, dst: int, frame: bytes) -> bool:
        """Deliver `frame` to `dst` at once, as if `src` had sent it (no loss, no link needed:
        a forger next to the receiver). -> delivered (False when dst is not registered)."""
        self._known(src, dst)
        if not 1 <= len(frame) <= _MAX_FRAME:
            raise MediumError(f"inject: a frame is 1..{_MAX_FRAME} bytes, got {len(frame)}")
        ok, _ = self._transmit(src, dst, bytes(frame), injected=True)
        return ok

    # --- figures -------------------------------------------------------------------------

    def hop_latency_samples(self) -> list[float]:
        return list(self._hop_ms)

    def stats(self) -> dict[str, Any]:
        """Every counter since start (a copy: subtract two snapshots for a window)."""
        hop = self._hop_ms
        return {
            **self._c,
            "lost_by_reason": dict(self._reasons),
            "frames_by_type": dict(sorted(self._frames.items())),
            "bytes_by_type": dict(sorted(self._bytes.items())),
            "nodes": {n: dict(c) for n, c in sorted(self._nodes.items())},
            "hop_latency_ms": {
                "n": len(hop),
                "p50": _percentile(hop, 0.5),
                "p95": _percentile(hop, 0.95),
            },
            "registered": sorted(self._addr),
        }

    # --- JSON control (the standalone command) -------------------------------------------

    def control(self, cmd: Any) -> dict[str, Any]:
        """Run one JSON command: {"op": "cut", "a": 1, "b": 2}, ... -> {"ok": true, ...} or
        {"ok": false, "error": "..."}. Ops: cut restore set_loss isolate partition heal
        inject kill stats capture."""
        try:
            return {"ok": True, **self._control(cmd)}
        except (MediumError, KeyError, TypeError, ValueError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            return {"ok": False, "error": what}

    def _control(self, cmd: Any) -> dict[str, Any]:
        if not isinstance(cmd, dict) or not isinstance(cmd.get("op"), str):
            raise MediumError('a command is a JSON object with "op"')
        op = cmd["op"]
        if op == "cut":
            self.cut(int(cmd["a"]), int(cmd["b"]))
        elif op == "restore":
            self.restore(int(cmd["a"]), int(cmd["b"]))
        elif op == "set_loss":
            b = cmd.get("b")
            self.set_loss(
                int(cmd["a"]),
                None if b is None else int(b),
                float(cmd["p"]),
                one_way=bool(cmd.get("one_way", False)),
            )
        elif op == "isolate":
            self.isolate(int(cmd["node"]))
        elif op == "partition":
            self.partition([int(n) for n in cmd["a"]], [int(n) for n in cmd["b"]])
        elif op == "heal":
            self.heal()
        elif op == "kill":
            self.kill(int(cmd["node"]))
        elif op == "inject":
            return {
                "delivered": self.inject(
                    int(cmd["src"]), int(cmd["dst"]), bytes.fromhex(cmd["frame"])
                )
            }
        elif op == "stats":
            return {"stats": self.stats()}
        elif op == "capture":
            n = int(cmd.get("n", 20))
            return {"capture": [c.to_json() for c in list(self.capture)[-n:]] if n > 0 else []}
        else:
            raise MediumError(f"unknown op {op!r}")
        return {}


async def serve(
    topology: Topology,
    *,
    port: int = 0,
    seed: int = 0,
    seconds: float | None = None,
    out: Any = None,
) -> dict[str, Any]:
    """`fogmesh mesh medium`: run a medium, print its address as one JSON line, then answer
    one JSON command per stdin line with one JSON line. Ends on {"op": "quit"}, after
    `seconds`, or on cancellation; stdin's end only stops the control (the medium runs on).
    -> the final stats."""
    out = out or sys.stdout

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    async with Medium(topology, seed=seed, port=port) as medium:
        say({"medium": [medium.host, medium.port], "nodes": sorted(topology.nodes)})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        deadline = None if seconds is None else loop.time() + seconds
        stdin_open = True
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            if not stdin_open:
                await asyncio.sleep(left if left is not None else 3600)
                continue
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            if not line:
                stdin_open = False
                continue
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                cmd = json.loads(text)
            except json.JSONDecodeError as exc:
                say({"ok": False, "error": f"not JSON: {exc}"})
                continue
            if isinstance(cmd, dict) and cmd.get("op") == "quit":
                say({"ok": True})
                break
            say(medium.control(cmd))
        return medium.stats()
