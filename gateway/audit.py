"""The durable, append-only audit log of write attempts: one SQLite file (WAL, synchronous FULL)
in the data directory, committed before the HTTP answer leaves, never updated or deleted.

A write that reaches a device is logged twice: a `pending` entry before the device is touched
(no entry, no write) and its outcome after, pointing back with `ref`. An entry still pending
when the log is opened again belonged to a gateway that stopped mid-write; `open()` completes it
with the outcome `unknown`, so nothing is left dangling.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import StoreError
from gateway.model import Value

__all__ = [
    "KIND_AUDIT",
    "RESULTS",
    "AuditEntry",
    "AuditLog",
]

KIND_AUDIT = "audit"  # the uplink message kind (last level of the MQTT topic)

# Every `result` an entry can have; the HTTP status each answer carries is in docs/http-api.md.
RESULTS: tuple[str, ...] = (
    "ok",
    "pending",  # accepted, the device not answered yet
    "unknown",  # was pending when the gateway stopped
    "refused",  # no or a wrong bearer token (401)
    "disabled",  # no token configured at all (403)
    "not_found",  # no such device or tag (404)
    "forbidden",  # the tag or the device does not take writes (403)
    "invalid",  # the body or the value's type is wrong (400, 415)
    "out_of_range",  # outside the tag's min..max (422)
    "unavailable",  # the device is down, stopped or not connected (503)
    "failed",  # the device or its adapter failed the write (502)
)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: an id is never reused
    ts REAL NOT NULL,                      -- seconds since the epoch
    who TEXT NOT NULL,
    remote_addr TEXT,
    device TEXT NOT NULL,
    tag TEXT NOT NULL,
    old_value TEXT,                        -- JSON, so a value keeps its type
    new_value TEXT,
    result TEXT NOT NULL,
    error TEXT,
    ref INTEGER                            -- the pending entry this outcome completes
);
CREATE INDEX IF NOT EXISTS audit_ref ON audit (ref);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
_COLUMNS = "id, ts, who, remote_addr, device, tag, old_value, new_value, result, error, ref"
_MAX_TEXT = 256  # device, tag, who and address come from the request: keep rows bounded
_MAX_ERROR = 2048


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: float
    who: str
    remote_addr: str | None
    device: str
    tag: str
    old_value: Value | None
    new_value: Value | None
    result: str
    error: str | None
    ref: int | None = None  # for an outcome: the id of its pending entry

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "who": self.who,
            "remote_addr": self.remote_addr,
            "device": self.device,
            "tag": self.tag,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "result": self.result,
            "error": self.error,
            "ref": self.ref,
        }


def _clip(text: str | None, limit: int = _MAX_TEXT) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def _dump(value: Value | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; such a value is never written anyway
    return json.dumps(value)


def _load(text: str | None) -> Value | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, bool | int | float | str) else None


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    return AuditEntry(
        id=row[0],
        ts=row[1],
        who=row[2],
        remote_addr=row[3],
        device=row[4],
        tag=row[5],
        old_value=_load(row[6]),
        new_value=_load(row[7]),
        result=row[8],
        error=row[9],
        ref=row[10],
    )


class AuditLog:
    """The audit log's SQLite file. Blocking: the runtime calls it through `asyncio.to_thread`.

    One connection guarded by a lock, so calls from any thread are serialized. Every `record`
    is its own committed transaction with synchronous = FULL: once it returns, the entry
    survives a crash of the process and a power cut.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> list[AuditEntry]:
        """Open (creating if needed); returns the `unknown` outcomes it added for pending entries."""
        with self._lock:
            if self._db is not None:
                return []
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"audit log {self.path}: cannot open: {exc}") from exc
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise StoreError(
                        f"audit log {self.path}: schema version {version} is newer than this "
                        f"gateway's ({_SCHEMA_VERSION})"
                    )
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            except sqlite3.Error as exc:
                db.close()
                raise StoreError(f"audit log {self.path}: {exc}") from exc
            except StoreError:
                db.close()
                raise
            self._db = db
            return self._complete_pending(db)

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()

    def __enter__(self) -> AuditLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(
        self,
        *,
        who: str,
        remote_addr: str | None,
        device: str,
        tag: str,
        result: str,
        old_value: Value | None = None,
        new_value: Value | None = None,
        error: str | None = None,
        ref: int | None = None,
    ) -> AuditEntry:
        """Append one entry and commit it; StoreError if it could not be made durable."""
        if result not in RESULTS:
            raise ValueError(f"unknown audit result {result!r}")
        values = (
            self._clock(),
            _clip(who) or "",
            _clip(remote_addr),
            _clip(device) or "",
            _clip(tag) or "",
            _dump(old_value),
            _dump(new_value),
            result,
            _clip(error, _MAX_ERROR),
            ref,
        )
        with self._lock:
            db = self._conn()
            try:
                cur = db.execute(
                    "INSERT INTO audit (ts, who, remote_addr, device, tag, old_value, new_value,"
                    " result, error, ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            except sqlite3.Error as exc:
                raise StoreError(f"audit log {self.path}: cannot append: {exc}") from exc
            row_id = cur.lastrowid
        assert row_id is not None
        return _entry((row_id, *values))

    def recent(self, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` entries, newest first."""
        with self._lock:
            db = self._conn()
            try:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM audit ORDER BY id DESC LIMIT ?", (max(0, limit),)
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"audit log {self.path}: cannot read: {exc}") from exc
        return [_entry(r) for r in rows]

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"audit log {self.path} is not open")
        return self._db

    def _complete_pending(self, db: sqlite3.Connection) -> list[AuditEntry]:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM audit p WHERE result = 'pending' AND NOT EXISTS "
            "(SELECT 1 FROM audit o WHERE o.ref = p.id) ORDER BY id"
        ).fetchall()
        added: list[AuditEntry] = []
        for row in rows:
            p = _entry(row)
            values = (
                self._clock(),
                p.who,
                p.remote_addr,
                p.device,
                p.tag,
                row[6],
                row[7],
                "unknown",
                "the gateway stopped before the device answered; the write may or may not "
                "have happened",
                p.id,
            )
            try:
                cur = db.execute(
                    "INSERT INTO audit (ts, who, remote_addr, device, tag, old_value, new_value,"
                    " result, error, ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            except sqlite3.Error as exc:
                raise StoreError(f"audit log {self.path}: cannot append: {exc}") from exc
            assert cur.lastrowid is not None
            added.append(_entry((cur.lastrowid, *values)))
        return added
