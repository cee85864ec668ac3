"""The audit log on its own: append-only SQLite in WAL mode with synchronous FULL, values that keep
their JSON type, newest-first listing, pending entries completed at the next open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.audit import RESULTS, AuditEntry, AuditLog
from gateway.errors import StoreError


def entry(log: AuditLog, result: str = "ok", **kw: object) -> AuditEntry:
    args: dict[str, object] = {
        "who": "alice",
        "remote_addr": "10.0.0.7",
        "device": "plc",
        "tag": "speed",
        "result": result,
        "old_value": 1.5,
        "new_value": 2,
    }
    args.update(kw)
    return log.record(**args)  # type: ignore[arg-type]


def test_entries_are_listed_newest_first_with_their_types(tmp_path: Path) -> None:
    ticks = iter(range(1000, 2000))
    with AuditLog(tmp_path / "a" / "audit.db", clock=lambda: float(next(ticks))) as log:
        first = entry(log)
        entry(log, "invalid", old_value=True, new_value="fast", error="takes a number")
        entry(log, "refused", who="anonymous", old_value=None, new_value=None)
        recent = log.recent(10)
        assert [e.result for e in recent] == ["refused", "invalid", "ok"]
        assert recent[2] == first
        assert (first.id, first.ts, first.old_value, first.new_value) == (1, 1000.0, 1.5, 2)
        assert isinstance(recent[1].old_value, bool) and recent[1].new_value == "fast"
        assert recent[0].old_value is None and recent[0].who == "anonymous"
        assert [e.id for e in log.recent(2)] == [3, 2]
        assert log.recent(0) == []
        assert recent[1].as_dict()["error"] == "takes a number"


def test_the_log_is_append_only_wal_and_fully_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        entry(log)
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            for sql in ("UPDATE audit SET result = 'ok'", "DELETE FROM audit"):
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    db.execute(sql)
        finally:
            db.close()
        assert log._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with AuditLog(path) as again:
        assert len(again.recent()) == 1


def test_ids_are_never_reused_across_reopens(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        ids = [entry(log).id for _ in range(3)]
    with AuditLog(path) as log:
        assert entry(log).id == ids[-1] + 1


def test_pending_entries_left_behind_are_completed_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        done = entry(log, "pending")
        entry(log, "ok", ref=done.id)
        cut = entry(log, "pending", who="bob", new_value=9)
    log = AuditLog(path)
    added = log.open()
    try:
        assert len(added) == 1
        (unknown,) = added
        assert (unknown.result, unknown.ref, unknown.who, unknown.new_value) == (
            "unknown",
            cut.id,
            "bob",
            9,
        )
        assert "may or may not" in (unknown.error or "")
        assert log.open() == []  # already open: nothing more
    finally:
        log.close()
    with AuditLog(path) as log:  # completed once, not at every start
        assert [e.result for e in log.recent()].count("unknown") == 1


def test_long_fields_are_clipped_and_results_checked(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.db") as log:
        e = entry(log, device="d" * 5000, tag="t" * 300, error="e" * 10_000)
        assert len(e.device) == 256 and e.device.endswith("...")
        assert len(e.tag) == 256 and len(e.error or "") == 2048
        with pytest.raises(ValueError, match="unknown audit result"):
            entry(log, "maybe")
        assert {"ok", "pending", "unknown", "refused", "failed"} <= set(RESULTS)


def test_errors_are_store_errors(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    with pytest.raises(StoreError, match="not open"):
        entry(log)
    with pytest.raises(StoreError, match="not open"):
        log.recent()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        AuditLog(blocker / "audit.db").open()
    not_sqlite = tmp_path / "junk.db"
    not_sqlite.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        AuditLog(not_sqlite).open()


def test_a_failed_append_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        entry(log)
        db = sqlite3.connect(path)
        try:  # the next insert fails inside SQLite, as a full disk would make it
            db.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON audit "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
            db.commit()
        finally:
            db.close()
        with pytest.raises(StoreError, match="cannot append: disk on fire"):
            entry(log)
        assert len(log.recent()) == 1
