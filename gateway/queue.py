"""The durable store-and-forward queue: SQLite in WAL mode between the edge stage and the fog sink.

Seqs are assigned inside the insert transaction and never reused; rows leave only when the sink
acknowledges them, or on purpose (full policy, age), and then a `gap` message declares them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import cbor2

from gateway import wire
from gateway.config.models import QueueConfig
from gateway.errors import StoreError
from gateway.model import GATEWAY_DEVICE, KIND_GAP, Outgoing

__all__ = [
    "DECLARED_REASONS",
    "DISK_FULL",
    "DROP_OLDEST",
    "EXPIRED",
    "OVERSIZE",
    "REJECTED_REASONS",
    "REJECT_NEW",
    "DurableQueue",
    "Queued",
]

log = logging.getLogger("fogmesh.queue")

# Reasons a message leaves the queue without an acknowledgement; the keys of `drops`.
DROP_OLDEST = "drop_oldest"  # full_policy made room: the seqs are declared in a gap message
EXPIRED = "expired"  # older than max_age_s: declared in a gap message
REJECT_NEW = "reject_new"  # full_policy = reject_new: refused before getting a seq
DISK_FULL = "disk_full"  # SQLITE_FULL: refused before getting a seq, like reject_new
OVERSIZE = "oversize"  # one message larger than max_bytes: refused before getting a seq
DECLARED_REASONS = (DROP_OLDEST, EXPIRED)
REJECTED_REASONS = (REJECT_NEW, DISK_FULL, OVERSIZE)

_SCHEMA_VERSION = 1
_MAX_PENDING_RANGES = 256  # a gap message stays small even if drops are fragmented
_SCAN_CHUNK = 1000
_IN_CHUNK = 500  # bound parameters per `IN (...)`

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY,   -- assigned in the insert transaction; meta.last_seq keeps it growing
    enq_ms INTEGER NOT NULL,   -- gateway clock at enqueue, for max_age_s
    size INTEGER NOT NULL,     -- len(payload), for max_bytes
    gap INTEGER NOT NULL,      -- 1 for the gateway's own gap messages (re-declared if dropped)
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL      -- the CBOR envelope with historical = false
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Queued:
    """A stored message, ready to publish (the payload is the encoded envelope)."""

    seq: int
    device: str
    kind: str
    payload: bytes


@dataclass(slots=True)
class _Pending:
    """Drops not yet announced to the fog: seq ranges dropped on purpose and counts of refusals."""

    ranges: list[tuple[int, int, str]] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)

    def empty(self) -> bool:
        return not self.ranges and not any(self.rejected.values())

    def copy(self) -> _Pending:
        return _Pending(list(self.ranges), dict(self.rejected))

    def as_data(self) -> dict[str, Any]:
        return {
            "ranges": [[a, b, r] for a, b, r in self.ranges],
            "rejected": {k: v for k, v in sorted(self.rejected.items()) if v},
        }


@dataclass(slots=True)
class _Drop:
    seqs: list[int]
    freed: int
    backlog: int  # how many of seqs were at or below the backlog boundary
    redeclare: list[dict[str, Any]]  # data of dropped gap messages, merged back into pending


def _runs(seqs: list[int], reason: str) -> list[tuple[int, int, str]]:
    """Sorted seqs as contiguous (first, last, reason) runs."""
    out: list[tuple[int, int, str]] = []
    for s in sorted(seqs):
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s, reason)
        else:
            out.append((s, s, reason))
    return out


def _merge(ranges: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Sort and join touching ranges of one reason; past the cap the oldest ones are coalesced."""
    out: list[tuple[int, int, str]] = []
    for a, b, r in sorted(ranges):
        if out and out[-1][2] == r and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]), r)
        else:
            out.append((a, b, r))
    while len(out) > _MAX_PENDING_RANGES:
        # Over-declaring a little (seqs in between were delivered) beats an unbounded message.
        (a, _b, r), (_c, d, _r2) = out[0], out[1]
        out[:2] = [(a, d, r)]
    return out


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class DurableQueue:
    """One gateway's outbound queue file. Single writer: an exclusive lock guards the file.

    Every method runs a short transaction on the caller's thread; `open` may take longer (it sums
    the stored sizes), so async callers run it in a thread.
    """

    def __init__(
        self,
        path: Path,
        cfg: QueueConfig,
        *,
        site: str,
        gateway_id: str,
        clock: Callable[[], float] = time.time,
        # A hard cap on the file (PRAGMA max_page_count): how tests make a small, full disk.
        max_db_pages: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.site = site
        self.gateway_id = gateway_id
        self._clock = clock
        self._max_db_pages = max_db_pages
        self._db: sqlite3.Connection | None = None
        self._lock_file: IO[str] | None = None
        self._last_seq = 0
        self._depth = 0
        self._bytes = 0
        self._boundary: int | None = None
        self._backlog = 0
        self._drops: dict[str, int] = {}
        self._pending = _Pending()
        self._dirty = False  # counters changed but not yet written (the disk was full)
        self._topics_ok: set[tuple[str, str]] = set()

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> DurableQueue:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the queue directory {self.path.parent}: {exc}"
            ) from exc
        self._lock()
        try:
            self._open_db()
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            f = open(lock_path, "a+")  # noqa: SIM115 - held open for the queue's lifetime
        except OSError as exc:
            raise StoreError(f"cannot open the queue lock {lock_path}: {exc}") from exc
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise StoreError(
                f"queue {self.path} is in use by pid {holder}; one gateway per queue file"
            ) from exc
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def _unlock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _open_db(self) -> None:
        try:
            # check_same_thread=False: opened in a worker thread, then used from the event loop;
            # never from two threads at once.
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=2.0
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the queue {self.path}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"queue {self.path}: cannot switch to WAL mode (got {mode})")
            db.execute(f"PRAGMA synchronous={self.cfg.synchronous.upper()}")
            db.execute("PRAGMA temp_store=MEMORY")
            if self._max_db_pages is not None:
                db.execute(f"PRAGMA max_page_count={int(self._max_db_pages)}")
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema", _SCHEMA_VERSION),
                        ("site", self.site),
                        ("gateway", self.gateway_id),
                        ("last_seq", 0),
                    ],
                )
                db.execute("COMMIT")
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != _SCHEMA_VERSION:
                raise StoreError(f"queue {self.path}: unknown schema version {meta.get('schema')}")
            if (meta.get("site"), meta.get("gateway")) != (self.site, self.gateway_id):
                # Its envelopes carry the old identity and its seqs belong to that stream.
                raise StoreError(
                    f"queue {self.path} belongs to gateway {meta.get('site')}/{meta.get('gateway')}, "
                    f"not {self.site}/{self.gateway_id}; move it aside or restore the gateway id"
                )
            max_seq, depth, nbytes = db.execute(
                "SELECT MAX(seq), COUNT(*), COALESCE(SUM(size), 0) FROM queue"
            ).fetchone()
            self._last_seq = max(int(meta.get("last_seq", 0)), int(max_seq or 0))
            self._depth, self._bytes = int(depth), int(nbytes)
            self._drops = {
                k.removeprefix("drops."): int(v) for k, v in meta.items() if k.startswith("drops.")
            }
            pending = meta.get("pending")
            if isinstance(pending, bytes):
                data = cbor2.loads(pending)
                self._pending = _Pending(
                    [(int(a), int(b), str(r)) for a, b, r in data.get("ranges", [])],
                    {str(k): int(v) for k, v in data.get("rejected", {}).items()},
                )
        except StoreError:
            db.close()
            raise
        except (sqlite3.Error, ValueError, cbor2.CBORError) as exc:
            db.close()
            raise StoreError(f"queue {self.path} is unusable ({exc}); move it aside") from exc
        self._db = db
        self._boundary = None
        log.info(
            "queue %s: %d messages, %d bytes, last seq %d",
            self.path,
            self._depth,
            self._bytes,
            self._last_seq,
        )

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                if self._dirty:
                    self._write_counters(db, self._drops, self._pending)
            with contextlib.suppress(sqlite3.Error):
                # Fold the WAL back so the directory holds one compact file at rest.
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
        self._unlock()

    def __enter__(self) -> DurableQueue:
        return self if self.is_open else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- state -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def nbytes(self) -> int:
        """Sum of stored payload sizes, the quantity bounded by max_bytes."""
        return self._bytes

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def backlog(self) -> int:
        """Messages at or below the boundary (everything while no boundary is set)."""
        return self._depth if self._boundary is None else self._backlog

    @property
    def drops(self) -> dict[str, int]:
        return dict(self._drops)

    @property
    def has_pending_gaps(self) -> bool:
        return not self._pending.empty()

    def pending_gaps(self) -> dict[str, Any]:
        """What the next gap message would declare."""
        return self._pending.as_data()

    def set_boundary(self, seq: int | None) -> None:
        """Seqs up to `seq` count as backlog; None: every queued message does (disconnected)."""
        self._boundary = seq
        if seq is None or seq >= self._last_seq:
            self._backlog = self._depth
        else:
            row = self._conn().execute("SELECT COUNT(*) FROM queue WHERE seq <= ?", (seq,))
            self._backlog = int(row.fetchone()[0])

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"queue {self.path} is not open")
        return self._db

    # ---- writes ----------------------------------------------------------------------------

    def _check_topic(self, device: str, kind: str) -> None:
        if (device, kind) not in self._topics_ok:
            # A name that cannot be a topic level would block the queue at send time; refuse it now.
            wire.topic_for(self.site, self.gateway_id, device, kind)
            self._topics_ok.add((device, kind))

    def _encode(self, seq: int, m: Outgoing) -> bytes:
        self._check_topic(m.device, m.kind)
        env = wire.Envelope(
            self.site, self.gateway_id, m.device, m.kind, seq, m.ts_ms, False, m.data
        )
        return wire.encode(env)

    def put(self, msgs: Sequence[Outgoing]) -> list[Queued]:
        """Store messages durably (committed on return) and give them seqs.

        Messages the full policy refuses get no seq and are only counted; a message `data` that
        CBOR cannot carry raises WireError before anything is stored.
        """
        db = self._conn()
        cfg = self.cfg
        rejected: dict[str, int] = {}
        accepted: list[Queued] = []
        room = cfg.max_bytes - self._bytes
        seq = self._last_seq
        for m in msgs:
            payload = self._encode(seq + 1, m)
            size = len(payload)
            if size > cfg.max_bytes:
                rejected[OVERSIZE] = rejected.get(OVERSIZE, 0) + 1
                continue
            if cfg.full_policy == REJECT_NEW:
                if size > room:
                    rejected[REJECT_NEW] = rejected.get(REJECT_NEW, 0) + 1
                    continue
                room -= size
            seq += 1
            accepted.append(Queued(seq, m.device, m.kind, payload))
        new_bytes = sum(len(q.payload) for q in accepted)
        if cfg.full_policy == DROP_OLDEST and new_bytes > cfg.max_bytes:
            # The batch alone overflows: its own oldest messages go, before they get a seq.
            keep: list[Outgoing] = []
            total = 0
            for m in reversed(msgs):
                size = len(self._encode(self._last_seq + 1, m))
                if size > cfg.max_bytes:
                    continue
                if total + size > cfg.max_bytes:
                    rejected[DROP_OLDEST] = rejected.get(DROP_OLDEST, 0) + 1
                    continue
                total += size
                keep.append(m)
            keep.reverse()
            accepted = [
                Queued(self._last_seq + i, m.device, m.kind, self._encode(self._last_seq + i, m))
                for i, m in enumerate(keep, 1)
            ]
            new_bytes = sum(len(q.payload) for q in accepted)

        drops = dict(self._drops)
        pending = self._pending.copy()
        for reason, n in rejected.items():
            drops[reason] = drops.get(reason, 0) + n
            pending.rejected[reason] = pending.rejected.get(reason, 0) + n
        if not accepted:
            self._apply_counters(db, drops, pending, changed=bool(rejected))
            return []

        now_ms = int(self._clock() * 1000)
        drop: _Drop | None = None
        try:
            db.execute("BEGIN IMMEDIATE")
            need = self._bytes + new_bytes - cfg.max_bytes
            if cfg.full_policy == DROP_OLDEST and need > 0:
                drop = self._drop_prefix(db, need_bytes=need)
                self._declare(pending, drops, drop, DROP_OLDEST)
            db.executemany(
                "INSERT INTO queue (seq, enq_ms, size, gap, device, kind, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        q.seq,
                        now_ms,
                        len(q.payload),
                        int(q.kind == KIND_GAP and q.device == GATEWAY_DEVICE),
                        q.device,
                        q.kind,
                        q.payload,
                    )
                    for q in accepted
                ],
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (accepted[-1].seq,))
            if drop is not None or rejected or self._dirty:
                self._write_counters(db, drops, pending)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            if not _is_full(exc):
                raise StoreError(f"queue {self.path}: cannot store messages: {exc}") from exc
            # A full disk must not stop the gateway: refuse like reject_new, keep the stream whole.
            drops = dict(self._drops)
            pending = self._pending.copy()
            for reason, n in rejected.items():
                drops[reason] = drops.get(reason, 0) + n
                pending.rejected[reason] = pending.rejected.get(reason, 0) + n
            drops[DISK_FULL] = drops.get(DISK_FULL, 0) + len(accepted)
            pending.rejected[DISK_FULL] = pending.rejected.get(DISK_FULL, 0) + len(accepted)
            self._drops, self._pending, self._dirty = drops, pending, True
            log.warning("queue %s: disk full, %d messages refused", self.path, len(accepted))
            return []
        self._last_seq = accepted[-1].seq
        self._depth += len(accepted)
        self._bytes += new_bytes
        if drop is not None:
            self._forget(drop)
        self._drops, self._pending, self._dirty = drops, pending, False
        return accepted

    def ack(self, seqs: Sequence[int]) -> int:
        """Delete acknowledged seqs in one transaction; unknown seqs (already dropped) are ignored."""
        if not seqs:
            return 0
        db = self._conn()
        gone: list[tuple[int, int]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for i in range(0, len(seqs), _IN_CHUNK):
                chunk = seqs[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                gone += db.execute(
                    f"DELETE FROM queue WHERE seq IN ({marks}) RETURNING seq, size", chunk
                ).fetchall()
            if self._dirty:
                self._write_counters(db, self._drops, self._pending)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StoreError(
                f"queue {self.path}: cannot delete acknowledged messages: {exc}"
            ) from exc
        self._dirty = False
        self._depth -= len(gone)
        self._bytes -= sum(size for _, size in gone)
        if self._boundary is not None:
            self._backlog -= sum(1 for s, _ in gone if s <= self._boundary)
        return len(gone)

    def expire(self, max_rows: int = 5000) -> int:
        """Drop messages older than max_age_s (at most max_rows now); returns how many went."""
        db = self._conn()
        cutoff = int((self._clock() - self.cfg.max_age_s) * 1000)
        head = db.execute("SELECT enq_ms FROM queue ORDER BY seq LIMIT 1").fetchone()
        if head is None or head[0] >= cutoff:
            return 0
        drops = dict(self._drops)
        pending = self._pending.copy()
        try:
            db.execute("BEGIN IMMEDIATE")
            drop = self._drop_prefix(db, older_than_ms=cutoff, max_rows=max_rows)
            self._declare(pending, drops, drop, EXPIRED)
            self._write_counters(db, drops, pending)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StoreError(f"queue {self.path}: cannot expire old messages: {exc}") from exc
        self._forget(drop)
        self._drops, self._pending, self._dirty = drops, pending, False
        return len(drop.seqs)

    def flush_gaps(self, ts_ms: int | None = None) -> Queued | None:
        """Turn pending drop declarations into one `gap` message; None if there are none or no room.

        Under drop_oldest it makes room like any message (newly dropped seqs join this
        declaration); under reject_new it waits until it fits. Either way the bound holds.
        """
        if self._pending.empty():
            return None
        db = self._conn()
        cfg = self.cfg
        seq = self._last_seq + 1
        if ts_ms is None:
            ts_ms = int(self._clock() * 1000)
        payload = self._gap_payload(seq, ts_ms, self._pending)
        if cfg.full_policy == REJECT_NEW and self._bytes + len(payload) > cfg.max_bytes:
            return None
        drops = dict(self._drops)
        pending = self._pending.copy()
        freed = 0
        drop = _Drop([], 0, 0, [])
        try:
            db.execute("BEGIN IMMEDIATE")
            # Dropping to make room extends the declaration, which may grow the message: repeat.
            for _ in range(8):
                need = self._bytes - freed + len(payload) - cfg.max_bytes
                if need <= 0:
                    break
                more = self._drop_prefix(db, need_bytes=need)
                if not more.seqs:
                    break
                self._declare(pending, drops, more, DROP_OLDEST)
                freed += more.freed
                drop = _Drop(
                    drop.seqs + more.seqs,
                    drop.freed + more.freed,
                    drop.backlog + more.backlog,
                    drop.redeclare + more.redeclare,
                )
                payload = self._gap_payload(seq, ts_ms, pending)
            db.execute(
                "INSERT INTO queue (seq, enq_ms, size, gap, device, kind, payload)"
                " VALUES (?, ?, ?, 1, ?, ?, ?)",
                (seq, int(self._clock() * 1000), len(payload), GATEWAY_DEVICE, KIND_GAP, payload),
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            self._write_counters(db, drops, _Pending())
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            if _is_full(exc):
                return None  # declarations stay pending until there is room
            raise StoreError(f"queue {self.path}: cannot store a gap message: {exc}") from exc
        self._forget(drop)
        self._last_seq = seq
        self._depth += 1
        self._bytes += len(payload)
        self._drops, self._pending, self._dirty = drops, _Pending(), False
        return Queued(seq, GATEWAY_DEVICE, KIND_GAP, payload)

    def _gap_payload(self, seq: int, ts_ms: int, pending: _Pending) -> bytes:
        return self._encode(seq, Outgoing(GATEWAY_DEVICE, KIND_GAP, ts_ms, pending.as_data()))

    # ---- reads -----------------------------------------------------------------------------

    def fetch(self, after_seq: int, upto_seq: int | None, limit: int) -> list[Queued]:
        """Up to `limit` stored messages with after_seq < seq <= upto_seq, oldest first."""
        if limit <= 0:
            return []
        db = self._conn()
        try:
            rows = db.execute(
                "SELECT seq, device, kind, payload FROM queue WHERE seq > ? AND seq <= ?"
                " ORDER BY seq LIMIT ?",
                (after_seq, upto_seq if upto_seq is not None else self._last_seq, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"queue {self.path}: cannot read messages: {exc}") from exc
        return [Queued(s, d, k, p) for s, d, k, p in rows]

    def seqs(self) -> list[int]:
        """Every queued seq (tests and diagnostics; reads the whole index)."""
        return [r[0] for r in self._conn().execute("SELECT seq FROM queue ORDER BY seq")]

    # ---- internals -------------------------------------------------------------------------

    def _rollback(self, db: sqlite3.Connection) -> None:
        # SQLite already rolls back by itself after some errors (SQLITE_FULL among them).
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def _drop_prefix(
        self,
        db: sqlite3.Connection,
        *,
        need_bytes: int | None = None,
        older_than_ms: int | None = None,
        max_rows: int | None = None,
    ) -> _Drop:
        """Delete the oldest rows (a prefix by seq) until enough bytes are free or rows are young."""
        seqs: list[int] = []
        gap_seqs: list[int] = []
        freed = 0
        after = 0
        done = False
        while not done:
            rows = db.execute(
                "SELECT seq, size, enq_ms, gap FROM queue WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, _SCAN_CHUNK),
            ).fetchall()
            if not rows:
                break
            for seq, size, enq_ms, gap in rows:
                if older_than_ms is not None and enq_ms >= older_than_ms:
                    done = True
                    break
                seqs.append(seq)
                freed += size
                if gap:
                    gap_seqs.append(seq)
                if (need_bytes is not None and freed >= need_bytes) or (
                    max_rows is not None and len(seqs) >= max_rows
                ):
                    done = True
                    break
            after = rows[-1][0]
        redeclare: list[dict[str, Any]] = []
        for i in range(0, len(gap_seqs), _IN_CHUNK):
            chunk = gap_seqs[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for (payload,) in db.execute(
                f"SELECT payload FROM queue WHERE seq IN ({marks})", chunk
            ):
                try:
                    redeclare.append(wire.decode(payload).data)
                except wire.WireError:
                    log.error("queue %s: unreadable gap message dropped", self.path)
        if seqs:
            db.execute("DELETE FROM queue WHERE seq <= ?", (seqs[-1],))
        backlog = 0
        if self._boundary is not None:
            backlog = sum(1 for s in seqs if s <= self._boundary)
        return _Drop(seqs, freed, backlog, redeclare)

    def _declare(self, pending: _Pending, drops: dict[str, int], drop: _Drop, reason: str) -> None:
        if not drop.seqs:
            return
        drops[reason] = drops.get(reason, 0) + len(drop.seqs)
        ranges = list(pending.ranges) + _runs(drop.seqs, reason)
        for data in drop.redeclare:
            # A dropped gap message must not take its declarations with it.
            for item in data.get("ranges", []):
                with contextlib.suppress(TypeError, ValueError):
                    a, b, r = item
                    ranges.append((int(a), int(b), str(r)))
            for r, n in data.get("rejected", {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    pending.rejected[str(r)] = pending.rejected.get(str(r), 0) + int(n)
        pending.ranges = _merge(ranges)

    def _forget(self, drop: _Drop) -> None:
        self._depth -= len(drop.seqs)
        self._bytes -= drop.freed
        self._backlog -= drop.backlog
        if drop.seqs:
            log.warning(
                "queue %s: dropped seqs %d..%d (%d messages)",
                self.path,
                drop.seqs[0],
                drop.seqs[-1],
                len(drop.seqs),
            )

    def _write_counters(
        self, db: sqlite3.Connection, drops: dict[str, int], pending: _Pending
    ) -> None:
        rows: list[tuple[str, Any]] = [(f"drops.{k}", v) for k, v in drops.items()]
        rows.append(("pending", cbor2.dumps(pending.as_data())))
        db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

    def _apply_counters(
        self, db: sqlite3.Connection, drops: dict[str, int], pending: _Pending, *, changed: bool
    ) -> None:
        """Persist refusal counters in their own small transaction (nothing else was stored)."""
        self._drops, self._pending = drops, pending
        if not changed and not self._dirty:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            self._write_counters(db, drops, pending)
            db.execute("COMMIT")
            self._dirty = False
        except sqlite3.Error as exc:
            self._rollback(db)
            if not _is_full(exc):
                raise StoreError(f"queue {self.path}: cannot update counters: {exc}") from exc
            self._dirty = True
