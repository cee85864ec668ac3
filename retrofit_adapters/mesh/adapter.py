"""The `mesh` adapter: the ESP-NOW mesh seen through its root node's UART.

A background task takes frames from the link as they arrive: node messages (UP) become readings
stamped with the time they reached the gateway, the root's STATUS and HELLO become mesh-wide
readings, DOWNACKs answer the commands waiting for them. `read()` hands over what arrived since
the last poll. Writes set a node's `cfg` keys through a DOWN frame and wait for its DOWNACK.
Behaviour and tag names: docs/mesh-adapter.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import cbor2

from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError, DeviceTimeout
from gateway.model import Value
from gateway.wire import WireError, loads_one
from retrofit_adapters.base import CAP_READ, CAP_WRITE, Adapter, Reading
from retrofit_adapters.mesh import uart
from retrofit_adapters.mesh.config import MeshCommand, MeshDevice, node_tag, parse_node_tag
from retrofit_adapters.mesh.link import MeshLink

__all__ = ["ACK_MEANINGS", "HOPS_MAX", "MeshAdapter"]

log = logging.getLogger("fogmesh.mesh")

HOPS_MAX: Final = 16  # the hop limit a frame starts with (docs/mesh.md)
ACK_MEANINGS: Final[dict[int, str]] = {
    uart.ACK_SENT: "sent",
    uart.ACK_NO_ROUTE: "no route",
    uart.ACK_TOO_LONG: "too long",
    uart.ACK_BAD: "bad command",
}
PROTOCOL_VERSION: Final = 1  # HELLO "v"

# The share of timeout_ms a command waits for its DOWNACK; the rest leaves room for the
# adapter's own message to reach last_error before the supervisor's generic timeout.
_ACK_SHARE: Final = 0.9
_SEQ_WINDOW: Final = 256  # (seq, payload CRC) remembered per origin
_MAX_ORIGINS: Final = 4096  # origins remembered; the least recently heard is forgotten
_MAX_PENDING: Final = 20_000  # readings kept between polls; the oldest go first
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")  # a channel or stat name
_COUNTER_TAGS: Final = ("duplicates", "malformed", "bad_frames")  # mesh.gw.<name>


class _Malformed(Exception):
    """A payload that is not what docs/mesh.md says; the message says what is wrong."""


class _Seen:
    """The last _SEQ_WINDOW (seq -> payload CRC) of one origin."""

    __slots__ = ("crcs", "order")

    def __init__(self) -> None:
        self.crcs: dict[int, int] = {}
        self.order: deque[int] = deque()

    def check(self, seq: int, crc: int) -> str:
        """`dup` (same seq, same payload), "reset" (same seq, another payload) or "new"."""
        old = self.crcs.get(seq)
        if old == crc:
            return "dup"
        self.crcs[seq] = crc
        if old is not None:
            return "reset"
        self.order.append(seq)
        if len(self.order) > _SEQ_WINDOW:
            del self.crcs[self.order.popleft()]
        return "new"


class MeshAdapter(Adapter):
    """The mesh behind its root node. Capabilities: read, write (the commands of the config)."""

    type_name = "mesh"
    config_model = MeshDevice
    capabilities = frozenset({CAP_READ, CAP_WRITE})

    def __init__(
        self,
        cfg: DeviceBase,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(cfg, clock=clock)
        if not isinstance(cfg, MeshDevice):
            raise TypeError(f"MeshAdapter needs a MeshDevice config, got {type(cfg).__name__}")
        # No I/O here; everything below survives close() and open().
        self._dev = cfg
        self._wall = wall
        self._ack_s = cfg.timeout_ms / 1000.0 * _ACK_SHARE
        self._link = MeshLink(cfg.port, cfg.baudrate)  # reopened across reconnects
        self._open = False
        self._reader: asyncio.Task[None] | None = None
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._token = random.randrange(0x10000)  # a restarted gateway does not reuse tokens
        self._pending: deque[Reading] = deque()
        self._seen: OrderedDict[int, _Seen] = OrderedDict()
        self._warned: set[tuple[str, int]] = set()
        self._opened_at = 0.0
        self._last_rx: float | None = None
        self._counted: dict[str, int] | None = None  # counter tags last reported
        self._parts: tuple[int, int] | None = None  # STATUS parts so far: (last index, nodes)
        self.root_id: int | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "up",  # node messages turned into readings
                "duplicates",  # same origin, seq and payload again: dropped
                "seq_resets",  # same origin and seq, another payload: a node restarted its seqs
                "malformed",  # frames or payloads that are not what docs/mesh.md says
                "bad_values",  # non-finite numbers skipped inside otherwise good messages
                "ignored",  # messages of nodes not in `nodes`
                "unknown_types",  # frames of a type the gateway does not expect
                "stray_acks",  # DOWNACKs nobody waits for (late, or from before a restart)
                "logs",  # LOG frames
                "hellos",  # HELLO frames (root starts)
                "statuses",  # STATUS frames
                "dropped",  # readings dropped because nobody polled for too long
            ),
            0,
        )

    # --- the contract --------------------------------------------------------------------

    def tag_names(self) -> list[str] | None:
        # Nodes come and go and report the channels they have: no fixed list. Tags the adapter
        # makes always have the shape n<id>.<field> or mesh.<field>.
        return None

    async def open(self) -> None:
        if self._open:
            await self.close()
        await self._link.open()
        self._open = True
        self._opened_at = self.clock()
        self._last_rx = None
        self._reader = asyncio.create_task(self._read_loop(self._link), name=f"mesh-{self._dev.id}")

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        self._open = False
        try:
            if reader is not None:
                reader.cancel()
                # wait() neither raises the reader's exception nor hides our own cancellation
                await asyncio.wait([reader])
                if not reader.cancelled() and reader.exception() is not None:
                    log.error("mesh %s: reader failed", self._dev.id, exc_info=reader.exception())
        finally:
            self._fail_acks(f"mesh device {self._dev.id!r} closed before the root answered")
            await self._link.close()

    async def read(self) -> list[Reading]:
        link = self._require()
        out = list(self._pending)
        self._pending.clear()
        if not out:
            # What arrived before a failure is handed over first; the failure comes next time.
            if link.error is not None:
                raise DeviceError(str(link.error)) from link.error
            last = self._last_rx if self._last_rx is not None else self._opened_at
            silent = self.clock() - last
            if silent > self._dev.silence_timeout_s:
                heard = "no frame since open" if self._last_rx is None else "no frame"
                raise DeviceTimeout(
                    f"{heard} from the root on {self._dev.port} for {silent:.0f} s "
                    f"(silence_timeout_s = {self._dev.silence_timeout_s:g})"
                )
        out.extend(self._counter_readings())
        return out

    async def write(self, tag: str, value: Value) -> None:
        node, cmd = self._write_target(tag)
        v = _command_value(tag, cmd, value)
        status = await self.command(node, {"c": "cfg", "set": {cmd.key: v}})
        if status != uart.ACK_SENT:
            meaning = ACK_MEANINGS.get(status, "unknown status")
            raise DeviceError(
                f"write {tag} = {v!r}: the root answered {meaning!r} (DOWNACK status {status})"
                + (f": node {node} is not reachable" if status == uart.ACK_NO_ROUTE else "")
            )

    # --- commands ----------------------------------------------------------------------

    async def command(self, node: int, cmd: Mapping[str, Any]) -> int:
        """Send a downlink command (CBOR map, e.g. {"c": "ping", "tok": 1}) to `node` through
        the root and return the root's DOWNACK status (0 sent, 1 no route, 2 too long, 3 bad).
        "sent" means the root handed it to the mesh, not that the node has it. DeviceTimeout
        when no DOWNACK comes within 90 % of timeout_ms; DeviceError when not open."""
        link = self._require()
        if not 1 <= node <= 0xFFFE:
            raise DeviceError(f"node id {node} is not 1..65534")
        try:
            payload = bytes(cbor2.dumps(dict(cmd), canonical=True))
        except Exception as exc:
            raise DeviceError(f"command for node {node} cannot be encoded as CBOR: {exc}") from exc
        token = self._next_token()
        body = uart.down_body(node, token, payload)
        if len(body) > uart.MAX_BODY:
            raise DeviceError(
                f"command for node {node} is {len(payload)} B of CBOR; a DOWN frame carries at "
                f"most {uart.MAX_BODY - 4} B"
            )
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[token] = fut
        try:
            await link.send(uart.T_DOWN, body)
            async with asyncio.timeout(self._ack_s):
                return await fut
        except TimeoutError:
            raise DeviceTimeout(
                f"no DOWNACK from the root for the command to node {node} (token {token}) "
                f"within {self._ack_s * 1000:.0f} ms"
            ) from None
        finally:
            self._acks.pop(token, None)

    def _next_token(self) -> int:
        for _ in range(0x10000):
            self._token = (self._token + 1) & 0xFFFF
            if self._token not in self._acks:
                return self._token
        raise DeviceError("65536 commands wait for their DOWNACK")  # cannot happen in practice

    def _write_target(self, tag: str) -> tuple[int, MeshCommand]:
        parsed = parse_node_tag(tag)
        node = parsed[0] if parsed is not None else None
        if parsed is None or node is None:
            raise DeviceError(f"tag {tag!r} is not writable: write tags are n<node id>.<cfg key>")
        key = parsed[1]
        cmd = self._dev.command(key)
        if cmd is None:
            keys = ", ".join(c.key for c in self._dev.commands) or "none are configured"
            raise DeviceError(f"tag {tag!r} is not writable: {key!r} is not a command ({keys})")
        if not self._dev.accepts(node):
            raise DeviceError(f"tag {tag!r} is not writable: node {node} is not in `nodes`")
        return node, cmd

    def _fail_acks(self, message: str) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(DeviceError(message))

    def _require(self) -> MeshLink:
        if not self._open:
            raise DeviceError(f"mesh device {self._dev.id!r} is not open")
        return self._link

    # --- state for tools and tests -------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """The adapter's counters and its link's (frames, bytes, bad_crc, bad_cobs, ...)."""
        out = dict(self.counters)
        s = self._link.stats
        out.update(
            frames=s.frames_in,
            bad_crc=s.bad_crc,
            bad_cobs=s.bad_cobs,
            oversize=s.oversize,
            bad_frames=s.bad_frames,
            overflow=s.overflow,
            link_failures=s.failures,
        )
        return out

    # --- the reader --------------------------------------------------------------------

    async def _read_loop(self, link: MeshLink) -> None:
        while True:
            try:
                typ, body = await link.recv()
            except DeviceError as exc:
                # The port failed or closed: read() reports it; pending commands fail now.
                self._fail_acks(f"the link to the root failed: {exc}")
                return
            self._last_rx = self.clock()
            try:
                self._handle(typ, body, self._wall())
            except Exception:
                # A bug here must not stop the reader: the frame is lost, the next one counts.
                self.counters["malformed"] += 1
                log.exception("mesh %s: frame type %d could not be handled", self._dev.id, typ)

    def _handle(self, typ: int, body: bytes, ts: float) -> None:
        if typ == uart.T_UP:
            self._on_up(body, ts)
        elif typ == uart.T_DOWNACK:
            self._on_downack(body)
        elif typ == uart.T_STATUS:
            self._on_status(body, ts)
        elif typ == uart.T_HELLO:
            self._on_hello(body, ts)
        elif typ == uart.T_LOG:
            self.counters["logs"] += 1
            log.info("mesh %s root: %s", self._dev.id, body.decode("utf-8", "replace").rstrip())
        else:
            self.counters["unknown_types"] += 1
            self._warn(
                ("type", typ), f"frame type {typ} from the root is not one the gateway knows"
            )

    def _on_up(self, body: bytes, ts: float) -> None:
        try:
            origin, seq, hops, payload = uart.parse_up(body)
        except uart.UartError as exc:
            self._malformed(0, f"UP frame: {exc}")
            return
        if not 1 <= origin <= 0xFFFE:
            self._malformed(0, f"UP frame from origin {origin}, which is no node id")
            return
        if not self._dev.accepts(origin):
            self.counters["ignored"] += 1
            return
        seen = self._seen.get(origin)
        if seen is None:
            seen = self._seen[origin] = _Seen()
            if len(self._seen) > _MAX_ORIGINS:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(origin)
        verdict = seen.check(seq, zlib.crc32(payload))
        if verdict == "dup":
            self.counters["duplicates"] += 1
            return
        if verdict == "reset":
            self.counters["seq_resets"] += 1
        try:
            msg = _loads(payload)
            readings = self._up_readings(origin, hops, msg, ts)
        except _Malformed as exc:
            self._malformed(origin, f"node {origin} seq {seq}: {exc}")
            return
        self.counters["up"] += 1
        self._add(readings)

    def _up_readings(self, node: int, hops: int, msg: object, ts: float) -> list[Reading]:
        if not isinstance(msg, dict):
            raise _Malformed(f"payload is a CBOR {_kind(msg)}, not a map")
        kind = msg.get("k")
        out: list[Reading] = []

        def put(field: str, value: Value | None) -> None:
            if value is not None:
                out.append(Reading(node_tag(node, field), value, ts=ts))

        if kind == "sum":
            put("samples", _opt_int(msg, "n"))
            for name, v in _channels(msg, list_of=3).items():
                assert isinstance(v, list)  # _channels checked it
                for stat, x in zip(("min", "max", "mean"), v, strict=True):
                    put(f"{name}.{stat}", self._finite(_number(x, f"ch.{name}"), f"ch.{name}"))
            put("score", self._finite(_opt_number(msg, "score"), "score"))
            put("alarm", _opt_bool(msg, "alarm"))
        elif kind == "evt":
            score = _opt_number(msg, "score")
            thr = _opt_number(msg, "thr")
            alarm = _opt_bool(msg, "alarm")
            if alarm is None:
                # docs/mesh.md gives an event no alarm flag: it is raised, unless the node says
                # otherwise or its score is below its threshold (an event that clears).
                alarm = not (score is not None and thr is not None and score < thr)
            for name, v in _channels(msg, list_of=0).items():
                put(name, self._finite(_number(v, f"ch.{name}"), f"ch.{name}"))
            put("score", self._finite(score, "score"))
            put("alarm", alarm)
        elif kind == "st":
            for field in ("parent", "rank", "heap", "buf"):
                put(field, _opt_int(msg, field))
        elif kind == "pong":
            put("pong", _opt_int(msg, "tok"))
        elif isinstance(kind, str):
            raise _Malformed(f"unknown message kind {kind!r}")
        else:
            raise _Malformed('no "k" naming the message kind')
        put("uptime_s", self._finite(_opt_number(msg, "u"), "u"))
        # The UP `hops` is 16 - the radio hops the message crossed (docs/mesh.md): 1 for a child
        # of the root.
        put("hops", HOPS_MAX - hops if 0 <= hops <= HOPS_MAX else None)
        return out

    def _on_downack(self, body: bytes) -> None:
        try:
            token, status = uart.parse_downack(body)
        except uart.UartError as exc:
            self._malformed(0, f"DOWNACK frame: {exc}")
            return
        fut = self._acks.get(token)
        if fut is None or fut.done():
            self.counters["stray_acks"] += 1
            log.debug("mesh %s: DOWNACK for token %d that nobody waits for", self._dev.id, token)
            return
        fut.set_result(status)

    def _on_status(self, body: bytes, ts: float) -> None:
        self.counters["statuses"] += 1
        try:
            msg = _loads(body)
            if not isinstance(msg, dict):
                raise _Malformed(f"STATUS is a CBOR {_kind(msg)}, not a map")
            out: list[Reading] = []
            root = msg.get("id")
            if root is not None:
                self.root_id = _int(root, "id")
                out.append(Reading("mesh.root_id", self.root_id, ts=ts))
            nodes = msg.get("nodes", {})
            if not isinstance(nodes, dict):
                raise _Malformed(f'"nodes" is a CBOR {_kind(nodes)}, not a map')
            count = self._count_nodes(msg.get("part"), len(nodes))
            if count is not None:
                out.append(Reading("mesh.nodes", count, ts=ts))
            for key, row in nodes.items():
                node = _node_key(key)
                if not (isinstance(row, list) and len(row) == 3):
                    raise _Malformed(f"nodes[{key!r}] is not [parent, rank, last_seen_s]")
                if not self._dev.accepts(node):
                    continue
                parent = _int(row[0], f"nodes[{key!r}] parent")
                rank = _int(row[1], f"nodes[{key!r}] rank")
                seen = self._finite(_number(row[2], f"nodes[{key!r}] last_seen_s"), "last_seen_s")
                out.append(Reading(node_tag(node, "parent"), parent, ts=ts))
                out.append(Reading(node_tag(node, "rank"), rank, ts=ts))
                if seen is not None:
                    out.append(Reading(node_tag(node, "last_seen_s"), seen, ts=ts))
            stats = msg.get("stats", {})
            if not isinstance(stats, dict):
                raise _Malformed(f'"stats" is a CBOR {_kind(stats)}, not a map')
            for name, v in stats.items():
                if (
                    isinstance(name, str)
                    and _NAME_RE.match(name)
                    and isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                ):
                    out.append(Reading(f"mesh.root.{name}", v, ts=ts))
        except _Malformed as exc:
            self._malformed(0, f"STATUS: {exc}")
            return
        self._add(out)

    def _count_nodes(self, part: object, n: int) -> int | None:
        # A root with many nodes splits its table over several STATUS frames, each with
        # "part": [i, count]; the node count is known once all of them came in order.
        if part is None:
            self._parts = None
            return n
        if not (
            isinstance(part, list)
            and len(part) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in part)
            and 0 <= part[0] < part[1]
        ):
            raise _Malformed(f'"part" is {part!r}, not [index, count]')
        i, total = part
        if i == 0:
            self._parts = (0, n)
        elif self._parts is not None and self._parts[0] == i - 1:
            self._parts = (i, self._parts[1] + n)
        else:
            self._parts = None  # a part went missing: no count this period
            return None
        if i == total - 1:
            count = self._parts[1]
            self._parts = None
            return count
        return None

    def _on_hello(self, body: bytes, ts: float) -> None:
        self.counters["hellos"] += 1
        # The root (re)started: whatever it had not acknowledged is gone with it.
        self._fail_acks("the root restarted before it acknowledged the command")
        try:
            msg = _loads(body)
            if not isinstance(msg, dict):
                raise _Malformed(f"HELLO is a CBOR {_kind(msg)}, not a map")
            version = msg.get("v")
            root = _int(msg.get("id"), "id")
        except _Malformed as exc:
            self._malformed(0, f"HELLO: {exc}")
            return
        if version != PROTOCOL_VERSION:
            self._warn(
                ("version", 0),
                f"the root speaks UART protocol version {version!r}; this gateway speaks "
                f"{PROTOCOL_VERSION}",
            )
        self.root_id = root
        log.info("mesh %s: root %d started on %s", self._dev.id, root, self._dev.port)
        self._add([Reading("mesh.root_id", root, ts=ts)])

    # --- helpers -----------------------------------------------------------------------

    def _add(self, readings: list[Reading]) -> None:
        pending = self._pending
        for r in readings:
            if len(pending) >= _MAX_PENDING:
                pending.popleft()
                self.counters["dropped"] += 1
            pending.append(r)

    def _finite(self, v: float | None, what: str) -> float | None:
        if v is None or math.isfinite(v):
            return v
        self.counters["bad_values"] += 1
        log.debug("mesh %s: %s is %r; skipped", self._dev.id, what, v)
        return None

    def _malformed(self, node: int, message: str) -> None:
        self.counters["malformed"] += 1
        self._warn(("malformed", node), message)

    def _warn(self, key: tuple[str, int], message: str) -> None:
        # Once per node (or frame type) at WARNING, then at DEBUG: a broken node must not
        # flood the log.
        if key in self._warned:
            log.debug("mesh %s: %s", self._dev.id, message)
            return
        self._warned.add(key)
        log.warning("mesh %s: %s (further ones are logged at DEBUG)", self._dev.id, message)

    def _counter_readings(self) -> list[Reading]:
        stats = self.stats
        now = {k: stats.get(k, 0) for k in _COUNTER_TAGS}
        if now == self._counted:
            return []
        self._counted = now
        return [Reading(f"mesh.gw.{k}", v) for k, v in now.items()]


# --- payload checks ---------------------------------------------------------------------


def _loads(data: bytes) -> object:
    try:
        return loads_one(data)
    except WireError as exc:
        raise _Malformed(f"bad CBOR: {exc}") from exc


def _kind(v: object) -> str:
    if isinstance(v, dict):
        return "map"
    if isinstance(v, list):
        return "array"
    if isinstance(v, str):
        return "text"
    if isinstance(v, bytes):
        return "byte string"
    if isinstance(v, bool):
        return "bool"
    if v is None:
        return "null"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Malformed(f"{what} is a {_kind(v)}, not a number")
    return v


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Malformed(f"{what} is a {_kind(v)}, not an integer")
    return v


def _opt_number(msg: dict[Any, Any], key: str) -> float | None:
    v = msg.get(key)
    return None if v is None else _number(v, repr(key))


def _opt_int(msg: dict[Any, Any], key: str) -> int | None:
    v = msg.get(key)
    return None if v is None else _int(v, repr(key))


def _opt_bool(msg: dict[Any, Any], key: str) -> bool | None:
    v = msg.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise _Malformed(f"{key!r} is a {_kind(v)}, not a bool")


def _channels(msg: dict[Any, Any], *, list_of: int) -> dict[str, object]:
    """`ch`: {name: [min, max, mean]} (list_of=3) or {name: value} (list_of=0), checked."""
    ch = msg.get("ch", {})
    if not isinstance(ch, dict):
        raise _Malformed(f'"ch" is a CBOR {_kind(ch)}, not a map')
    for name, v in ch.items():
        if not (isinstance(name, str) and _NAME_RE.match(name)):
            raise _Malformed(
                f"channel name {name!r} is not 1-32 letters, digits, '_' or '-' "
                "(it must fit in a tag name)"
            )
        if list_of:
            if not (isinstance(v, list) and len(v) == list_of):
                raise _Malformed(f"ch.{name} is not [min, max, mean]")
            for x in v:
                _number(x, f"ch.{name}")
        else:
            _number(v, f"ch.{name}")
    return ch


def _node_key(key: object) -> int:
    # CBOR maps from the root may key nodes by integer or by decimal text.
    if isinstance(key, str) and key.isdecimal():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or not 1 <= key <= 0xFFFE:
        raise _Malformed(f"node id {key!r} is not 1..65534")
    return key


def _command_value(tag: str, cmd: MeshCommand, value: Value) -> Value:
    """The value the command takes, or DeviceError (gateway.writes checked it already; this is
    the second line of defence, and the only one for direct callers)."""
    if cmd.type == "bool":
        if not isinstance(value, bool):
            raise DeviceError(f"tag {tag!r} takes a boolean, got {value!r}")
        return value
    if cmd.type == "string":
        if not isinstance(value, str):
            raise DeviceError(f"tag {tag!r} takes a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DeviceError(f"tag {tag!r} takes a finite number, got {value!r}")
    if cmd.type == "integer" and isinstance(value, float):
        if not value.is_integer():
            raise DeviceError(f"tag {tag!r} takes an integer, got {value!r}")
        value = int(value)
    lo, hi = cmd.min, cmd.max
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{'' if lo is None else f'{lo:g}'}..{'' if hi is None else f'{hi:g}'}"
        raise DeviceError(f"tag {tag!r}: {value!r} is out of range {span}")
    return value
