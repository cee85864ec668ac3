"""The fog side: a SQLite fog store that deduplicates by (site, gateway, seq), gap reports that
separate lost seqs from declared drops, and `tail` over a fog store or an MQTT broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cbor2

from gateway import wire
from gateway.config.models import MqttOptions
from gateway.errors import StoreError, UplinkError
from gateway.model import GATEWAY_DEVICE, KIND_GAP
from gateway.sinks.base import redact_url, sqlite_path

__all__ = [
    "FogStore",
    "InsertResult",
    "Range",
    "gap_report",
    "gap_report_url",
    "merge_ranges",
    "subtract_ranges",
    "tail",
]

log = logging.getLogger("fogmesh.fog")

Range = tuple[int, int]  # inclusive seq range

NEW = "new"
DUPLICATE = "duplicate"  # same (site, gateway, seq) and same content: an at-least-once re-send
CONFLICT = "conflict"  # same key, different content: the gateway reused seqs (its queue was reset?)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,            -- arrival order, for tail --follow
    site TEXT NOT NULL, gateway TEXT NOT NULL, seq INTEGER NOT NULL,
    device TEXT NOT NULL, kind TEXT NOT NULL,
    ts_ms INTEGER NOT NULL, historical INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    data BLOB NOT NULL,                -- canonical CBOR of the envelope's data
    UNIQUE (site, gateway, seq)
);
CREATE TABLE IF NOT EXISTS streams (
    site TEXT NOT NULL, gateway TEXT NOT NULL,
    duplicates INTEGER NOT NULL DEFAULT 0, conflicts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site, gateway)
);
CREATE TABLE IF NOT EXISTS declared (   -- seq ranges a gateway dropped on purpose (gap messages)
    site TEXT NOT NULL, gateway TEXT NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, reason TEXT NOT NULL, gap_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (   -- messages refused before they got a seq, by reason
    site TEXT NOT NULL, gateway TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (site, gateway, reason)
);
CREATE TABLE IF NOT EXISTS conflicts (  -- kept, not lost: the second message for a reused seq
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL, gateway TEXT NOT NULL, seq INTEGER NOT NULL,
    device TEXT NOT NULL, kind TEXT NOT NULL, ts_ms INTEGER NOT NULL, historical INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, data BLOB NOT NULL
);
"""


# ---- seq range arithmetic -------------------------------------------------------------------


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with overlapping or touching ranges joined."""
    out: list[Range] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract_ranges(ranges: Iterable[Range], minus: Iterable[Range]) -> list[Range]:
    """`ranges` without any seq in `minus`."""
    cut = merge_ranges(minus)
    out: list[Range] = []
    for a, b in merge_ranges(ranges):
        start = a
        for c, d in cut:
            if d < start or c > b:
                continue
            if c > start:
                out.append((start, c - 1))
            start = max(start, d + 1)
            if start > b:
                break
        if start <= b:
            out.append((start, b))
    return out


def _count(ranges: Iterable[Range]) -> int:
    return sum(b - a + 1 for a, b in ranges)


# ---- the store --------------------------------------------------------------------------------


@dataclass(slots=True)
class InsertResult:
    new: int = 0
    duplicates: int = 0
    conflicts: int = 0
    outcomes: list[str] = field(default_factory=list)  # NEW / DUPLICATE / CONFLICT per envelope


class FogStore:
    """The embedded fog for a single machine (`sqlite:///path`). A commit is the acknowledgement."""

    def __init__(self, path: Path | str, *, synchronous: str = "normal") -> None:
        self.path = path if path == ":memory:" else Path(path)
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None

    def open(self, *, create: bool = True) -> FogStore:
        if isinstance(self.path, Path):
            if not create and not self.path.exists():
                raise StoreError(f"no fog store at {self.path}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {self.path.parent}: {exc}") from exc
        try:
            # check_same_thread=False: the sink opens it in a worker, then uses it on the loop.
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the fog store {self.path}: {exc}") from exc
        self._db = db
        return self

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> FogStore:
        return self.open() if self._db is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"fog store {self.path} is not open")
        return self._db

    # ---- writes ----------------------------------------------------------------------------

    def insert(
        self, envelopes: Sequence[wire.Envelope], *, received_ms: int | None = None
    ) -> InsertResult:
        """Store envelopes in one transaction; a repeated (site, gateway, seq) is counted, not stored."""
        db = self._conn()
        now = int(time.time() * 1000) if received_ms is None else received_ms
        res = InsertResult()
        try:
            db.execute("BEGIN IMMEDIATE")
            for env in envelopes:
                blob = cbor2.dumps(env.data, canonical=True)
                row = (
                    env.site,
                    env.gateway,
                    env.seq,
                    env.device,
                    env.kind,
                    env.ts_ms,
                    int(env.historical),
                    now,
                    blob,
                )
                cur = db.execute(
                    "INSERT OR IGNORE INTO messages (site, gateway, seq, device, kind, ts_ms,"
                    " historical, received_ms, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                if cur.rowcount == 1:
                    res.new += 1
                    res.outcomes.append(NEW)
                    if env.kind == KIND_GAP and env.device == GATEWAY_DEVICE:
                        self._record_gap(db, env)
                    continue
                old = db.execute(
                    "SELECT device, kind, ts_ms, data FROM messages"
                    " WHERE site = ? AND gateway = ? AND seq = ?",
                    (env.site, env.gateway, env.seq),
                ).fetchone()
                same = old is not None and tuple(old) == (env.device, env.kind, env.ts_ms, blob)
                column = "duplicates" if same else "conflicts"
                db.execute(
                    f"INSERT INTO streams (site, gateway, {column}) VALUES (?, ?, 1)"
                    f" ON CONFLICT (site, gateway) DO UPDATE SET {column} = {column} + 1",
                    (env.site, env.gateway),
                )
                if same:
                    res.duplicates += 1
                    res.outcomes.append(DUPLICATE)
                else:
                    db.execute(
                        "INSERT INTO conflicts (site, gateway, seq, device, kind, ts_ms,"
                        " historical, received_ms, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    res.conflicts += 1
                    res.outcomes.append(CONFLICT)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise StoreError(f"fog store {self.path}: cannot store messages: {exc}") from exc
        return res

    def _record_gap(self, db: sqlite3.Connection, env: wire.Envelope) -> None:
        # Data from the wire: skip malformed items rather than refuse the message.
        for item in env.data.get("ranges", []) or []:
            try:
                a, b, reason = item
                a, b = int(a), int(b)
            except (TypeError, ValueError):
                log.warning(
                    "gap message %s/%s seq %d: bad range %r", env.site, env.gateway, env.seq, item
                )
                continue
            if 1 <= a <= b:
                db.execute(
                    "INSERT INTO declared (site, gateway, first, last, reason, gap_seq)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (env.site, env.gateway, a, b, str(reason), env.seq),
                )
        rejected = env.data.get("rejected", {})
        if isinstance(rejected, dict):
            for reason, n in rejected.items():
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    db.execute(
                        "INSERT INTO rejected (site, gateway, reason, count) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (site, gateway, reason) DO UPDATE SET count = count + ?",
                        (env.site, env.gateway, str(reason), n, n),
                    )

    # ---- reads -----------------------------------------------------------------------------

    def rows(self, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored messages in arrival order, decoded, after a given row id."""
        cur = self._conn().execute(
            "SELECT id, site, gateway, seq, device, kind, ts_ms, historical, received_ms, data"
            " FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        out = []
        for rid, site, gw, seq, dev, kind, ts_ms, hist, rx_ms, blob in cur:
            out.append(
                {
                    "id": rid,
                    "site": site,
                    "gateway": gw,
                    "device": dev,
                    "kind": kind,
                    "seq": seq,
                    "ts_ms": ts_ms,
                    "historical": bool(hist),
                    "received_ms": rx_ms,
                    "data": cbor2.loads(blob),
                }
            )
        return out

    def streams(self) -> list[tuple[str, str]]:
        """(site, gateway) of every gateway that sent something."""
        return [
            (s, g)
            for s, g in self._conn().execute(
                "SELECT DISTINCT site, gateway FROM messages ORDER BY site, gateway"
            )
        ]

    def seqs(self, site: str, gateway: str) -> list[int]:
        return [
            r[0]
            for r in self._conn().execute(
                "SELECT seq FROM messages WHERE site = ? AND gateway = ? ORDER BY seq",
                (site, gateway),
            )
        ]

    def count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def gap_report(
        self, *, site: str | None = None, gateway: str | None = None, from_seq: int | None = 1
    ) -> dict[str, Any]:
        """Per gateway: received, duplicates, missing ranges, declared drops, and what is lost.

        `from_seq=1` proves completeness from the stream's start; None starts at the first seq
        received (for a fog that joined late). Seqs after the last one received can't be judged.
        """
        streams = [
            (s, g)
            for s, g in self.streams()
            if (site is None or s == site) and (gateway is None or g == gateway)
        ]
        reports = [self._stream_report(s, g, from_seq) for s, g in streams]
        return {
            "gateways": reports,
            "complete": all(r["complete"] for r in reports),
            "lost": sum(r["lost_count"] for r in reports),
        }

    def _stream_report(self, site: str, gateway: str, from_seq: int | None) -> dict[str, Any]:
        db = self._conn()
        key = (site, gateway)
        first, last, received = db.execute(
            "SELECT MIN(seq), MAX(seq), COUNT(*) FROM messages WHERE site = ? AND gateway = ?", key
        ).fetchone()
        start = first if from_seq is None else from_seq
        holes: list[Range] = []
        if first > start:
            holes.append((start, first - 1))
        holes += db.execute(
            "SELECT seq + 1, nxt - 1 FROM (SELECT seq, LEAD(seq) OVER (ORDER BY seq) AS nxt"
            " FROM messages WHERE site = ? AND gateway = ?) WHERE nxt > seq + 1",
            key,
        ).fetchall()
        missing = [
            (max(a, start), b)
            for a, b in merge_ranges((int(a), int(b)) for a, b in holes)
            if b >= start
        ]
        declared_rows = db.execute(
            "SELECT first, last, reason FROM declared WHERE site = ? AND gateway = ?"
            " ORDER BY first",
            key,
        ).fetchall()
        declared = [(int(a), int(b)) for a, b, _ in declared_rows]
        lost = subtract_ranges(missing, declared)
        dropped = subtract_ranges(missing, lost)  # missing on purpose
        dup_row = db.execute(
            "SELECT duplicates, conflicts FROM streams WHERE site = ? AND gateway = ?", key
        ).fetchone()
        duplicates, conflicts = (int(dup_row[0]), int(dup_row[1])) if dup_row else (0, 0)
        rejected = dict(
            db.execute(
                "SELECT reason, count FROM rejected WHERE site = ? AND gateway = ? ORDER BY reason",
                key,
            ).fetchall()
        )
        return {
            "site": site,
            "gateway": gateway,
            "received": int(received),
            "duplicates": duplicates,
            "conflicts": conflicts,
            "first_seq": int(first),
            "last_seq": int(last),
            "missing": [list(r) for r in missing],
            "missing_count": _count(missing),
            "declared": [[int(a), int(b), str(r)] for a, b, r in declared_rows],
            "declared_missing_count": _count(dropped),
            "lost": [list(r) for r in lost],
            "lost_count": _count(lost),
            "rejected": {str(k): int(v) for k, v in rejected.items()},
            "complete": not lost and not conflicts,
        }


def gap_report(
    store: FogStore,
    *,
    site: str | None = None,
    gateway: str | None = None,
    from_seq: int | None = 1,
) -> dict[str, Any]:
    """`store.gap_report(...)`: {"gateways": [per-gateway report], "complete": bool, "lost": int}."""
    return store.gap_report(site=site, gateway=gateway, from_seq=from_seq)


# ---- tail -------------------------------------------------------------------------------------


def _envelope_dict(env: wire.Envelope, topic: str | None, received_ms: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "site": env.site,
        "gateway": env.gateway,
        "device": env.device,
        "kind": env.kind,
        "seq": env.seq,
        "ts_ms": env.ts_ms,
        "historical": env.historical,
        "received_ms": received_ms,
        "data": env.data,
    }
    if topic is not None:
        out["topic"] = topic
    return out


async def tail(
    url: str,
    *,
    on_message: Callable[[dict[str, Any]], None],
    follow: bool = False,
    stop: asyncio.Event | None = None,
    store: FogStore | None = None,
    from_id: int = 0,
    poll_interval_s: float = 0.2,
    idle_s: float = 1.0,
    options: MqttOptions | None = None,
    password: str | None = None,
    client_id: str | None = None,
    topic: str = f"{wire.TOPIC_PREFIX}/#",
    persistent: bool = True,
    retry_max_s: float = 5.0,
) -> int:
    """Hand every message that arrives at the fog to `on_message`, decoded; returns how many.

    `sqlite:///path`: rows after `from_id` in arrival order; with `follow`, keep polling.
    `mqtt(s)://host:port`: subscribe to `topic` at QoS 1 with a persistent session (messages
    published while the tail is away are delivered on its return); without `follow`, return once
    nothing arrived for `idle_s`. With a `store`, messages are stored and only then acknowledged
    to the broker. `stop` ends a follow; while following, lost connections are retried with
    backoff up to `retry_max_s`. Undecodable messages arrive as {"topic", "error"}.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return await _tail_sqlite(url, on_message, follow, stop, from_id, poll_interval_s)
    if scheme in ("mqtt", "mqtts"):
        tailer = _MqttTail(
            url,
            on_message=on_message,
            store=store,
            options=options or MqttOptions(),
            password=password,
            client_id=client_id or f"fogmesh-tail-{socket.gethostname()}",
            topic=topic,
            persistent=persistent,
            retry_max_s=retry_max_s,
        )
        return await tailer.run(follow=follow, stop=stop, idle_s=idle_s)
    raise UplinkError(f"fog URL must be sqlite:///path or mqtt://host:port, got {redact_url(url)}")


async def _wait(stop: asyncio.Event | None, timeout_s: float) -> None:
    if stop is None:
        await asyncio.sleep(timeout_s)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await stop.wait()


async def _tail_sqlite(
    url: str,
    on_message: Callable[[dict[str, Any]], None],
    follow: bool,
    stop: asyncio.Event | None,
    from_id: int,
    poll_interval_s: float,
) -> int:
    fog = FogStore(sqlite_path(url)).open(create=False)
    delivered = 0
    last = from_id
    try:
        while True:
            rows = fog.rows(after_id=last, limit=1000)
            for row in rows:
                on_message(row)
                last = row["id"]
            delivered += len(rows)
            if len(rows) == 1000:
                await asyncio.sleep(0)
                continue
            if not follow or (stop is not None and stop.is_set()):
                return delivered
            await _wait(stop, poll_interval_s)
            if stop is not None and stop.is_set():
                return delivered
    finally:
        fog.close()


class _MqttTail:
    """A persistent-session QoS 1 subscriber on the asyncio loop, reconnecting while it follows."""

    def __init__(
        self,
        url: str,
        *,
        on_message: Callable[[dict[str, Any]], None],
        store: FogStore | None,
        options: MqttOptions,
        password: str | None,
        client_id: str,
        topic: str,
        persistent: bool,
        retry_max_s: float = 5.0,
    ) -> None:
        from gateway.sinks.mqtt import mqtt_address  # paho only for MQTT URLs

        self.retry_max_s = retry_max_s
        self.url = url
        self.host, self.port, self.tls = mqtt_address(url)
        self.tls = self.tls or options.tls is not None
        self.on_message = on_message
        self.store = store
        self.options = options
        self.password = password
        self.username = options.username or urlsplit(url).username
        self.client_id = client_id
        self.topic = topic
        self.persistent = persistent
        self.delivered = 0
        self.last_activity = time.monotonic()
        self._batch: list[Any] = []
        self._failure: BaseException | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._client: Any = None  # the paho client of the current connection

    async def run(self, *, follow: bool, stop: asyncio.Event | None, idle_s: float) -> int:
        delay = min(0.2, self.retry_max_s)
        while True:
            if stop is not None and stop.is_set():
                return self.delivered
            try:
                paho = await self._connect()
            except UplinkError as exc:
                if not follow:
                    raise
                log.warning("tail %s: %s; retrying in %.1f s", redact_url(self.url), exc, delay)
                await _wait(stop, delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.retry_max_s)
                continue
            delay = min(0.2, self.retry_max_s)
            try:
                done = await self._serve(paho, follow=follow, stop=stop, idle_s=idle_s)
            finally:
                if paho.connected:
                    await paho.disconnect()
                else:
                    paho.abort()
            if self._failure is not None:
                raise self._failure
            if done:
                return self.delivered

    async def _connect(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from gateway.sinks.mqtt import AsyncPaho, new_client

        v5 = self.options.version == "5"
        client = new_client(
            self.options,
            client_id=self.client_id,
            username=self.username,
            password=self.password,
            tls=self.tls,
            clean=not self.persistent,
            manual_ack=self.store is not None,
        )
        client.on_message = lambda _c, _u, msg: self._batch.append(msg)
        subscribed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_subscribe(_c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
            if not subscribed.done():
                subscribed.set_result(codes)

        client.on_subscribe = on_subscribe
        self._lost = asyncio.Event()
        self._client = client
        paho = AsyncPaho(client, on_lost=lambda _r: self._lost.set(), after_read=self._drain)
        kwargs: dict[str, Any] = {}
        if v5:
            kwargs["clean_start"] = not self.persistent
            if self.persistent:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 7 * 24 * 3600
                kwargs["properties"] = props
        await paho.connect(self.host, self.port, self.options.keepalive_s, timeout_s=10.0, **kwargs)
        client.subscribe(self.topic, qos=1)
        try:
            async with asyncio.timeout(10.0):
                codes = await subscribed
        except TimeoutError:
            paho.abort()
            raise UplinkError(f"no SUBACK from {redact_url(self.url)}") from None
        if any(getattr(c, "is_failure", False) for c in codes):
            paho.abort()
            raise UplinkError(f"subscription to {self.topic} refused: {codes}")
        self.last_activity = time.monotonic()
        return paho

    async def _serve(
        self, paho: Any, *, follow: bool, stop: asyncio.Event | None, idle_s: float
    ) -> bool:
        """True when the tail is done, False to reconnect."""
        while True:
            if self._failure is not None:
                return True
            if stop is not None and stop.is_set():
                return True
            if self._lost.is_set():
                if not follow:
                    raise UplinkError(f"lost the connection to {redact_url(self.url)}")
                return False
            if not follow and time.monotonic() - self.last_activity >= idle_s:
                return True
            await _wait(stop, 0.05 if not follow else 0.2)

    def _drain(self) -> None:
        """One burst of received messages: decode, store (then ack), hand over."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        self.last_activity = time.monotonic()
        now = int(time.time() * 1000)
        items: list[dict[str, Any]] = []
        envelopes: list[wire.Envelope] = []
        for msg in batch:
            topic = msg.topic
            try:
                _site, _gw, device, kind = wire.parse_topic(topic)
                if device == GATEWAY_DEVICE and kind == "state":
                    items.append(
                        {
                            "topic": topic,
                            "site": _site,
                            "gateway": _gw,
                            "device": device,
                            "kind": kind,
                            "state": bytes(msg.payload).decode("utf-8", "replace"),
                            "received_ms": now,
                        }
                    )
                    continue
                env = wire.decode(msg.payload)
            except wire.WireError as exc:
                items.append({"topic": topic, "error": str(exc), "received_ms": now})
                continue
            envelopes.append(env)
            items.append(_envelope_dict(env, topic, now))
        if self.store is not None:
            try:
                result = self.store.insert(envelopes, received_ms=now)
            except StoreError as exc:
                # Not acknowledged: the broker keeps the messages for the next session.
                self._failure = exc
                self._lost.set()
                return
            outcomes = iter(result.outcomes)
            for item in items:
                if "seq" in item:
                    item["duplicate"] = next(outcomes) != NEW
            client = self._client
            for msg in batch:
                if msg.qos > 0 and client is not None:
                    client.ack(msg.mid, msg.qos)
        for item in items:
            self.delivered += 1
            try:
                self.on_message(item)
            except Exception as exc:  # the caller's bug: surface it from tail(), not the loop
                self._failure = exc
                self._lost.set()
                return


async def gap_report_url(
    url: str,
    *,
    site: str | None = None,
    gateway: str | None = None,
    from_seq: int | None = 1,
    idle_s: float = 1.0,
    options: MqttOptions | None = None,
    password: str | None = None,
    client_id: str | None = None,
) -> dict[str, Any]:
    """Gap report of a fog store, or of what an MQTT broker delivers to this tail's session now."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        with FogStore(sqlite_path(url)).open(create=False) as fog:
            return fog.gap_report(site=site, gateway=gateway, from_seq=from_seq)
    with FogStore(":memory:") as fog:
        await tail(
            url,
            on_message=lambda _m: None,
            store=fog,
            idle_s=idle_s,
            options=options,
            password=password,
            client_id=client_id,
        )
        return fog.gap_report(site=site, gateway=gateway, from_seq=from_seq)
