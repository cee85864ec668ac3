"""The durable queue: seqs, ack-only deletion, byte and age bounds, full disk, gap declarations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway import wire
from gateway.config.models import QueueConfig
from gateway.errors import StoreError
from gateway.model import GATEWAY_DEVICE, KIND_GAP, Outgoing
from gateway.queue import DurableQueue

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def msg(i: int) -> Outgoing:
    # Same size for every i < 24 (one-byte CBOR ints), so byte bounds give exact survivors.
    return Outgoing("pump", "raw", 1_700_000_000_000 + i, {"i": i})


def open_queue(path: Path, clock: Clock | None = None, **cfg: object) -> DurableQueue:
    return DurableQueue(
        path / "q.db",
        QueueConfig(**cfg),  # type: ignore[arg-type]
        site="s1",
        gateway_id="gw1",
        clock=clock or Clock(),
    ).open()


def one_size(tmp_path: Path) -> int:
    q = open_queue(tmp_path / "probe")
    (row,) = q.put([msg(1)])
    q.close()
    return len(row.payload)


def test_seqs_start_at_one_and_are_never_reused_after_deletes_and_restarts(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    assert [r.seq for r in q.put([msg(i) for i in range(5)])] == [1, 2, 3, 4, 5]
    assert q.ack([4, 5]) == 2  # the newest rows are gone: MAX(seq) alone would say 3
    q.close()
    q = open_queue(tmp_path)
    assert q.last_seq == 5
    assert [r.seq for r in q.put([msg(9)])] == [6]
    assert q.ack([1, 2, 3, 6]) == 4
    assert q.depth == 0
    q.close()
    q = open_queue(tmp_path)
    assert [r.seq for r in q.put([msg(1), msg(2)])] == [7, 8]
    q.close()


def test_stored_payload_is_the_envelope_with_its_seq(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    (row,) = q.put([msg(3)])
    env = wire.decode(row.payload)
    assert (env.site, env.gateway, env.device, env.kind) == ("s1", "gw1", "pump", "raw")
    assert (env.seq, env.ts_ms, env.historical, env.data) == (1, 1_700_000_000_003, False, {"i": 3})
    q.close()


def test_only_an_ack_deletes(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    q.put([msg(i) for i in range(4)])
    assert [r.seq for r in q.fetch(0, None, 10)] == [1, 2, 3, 4]
    assert [r.seq for r in q.fetch(0, None, 10)] == [1, 2, 3, 4]  # reading takes nothing away
    assert [r.seq for r in q.fetch(1, 3, 10)] == [2, 3]
    assert q.depth == 4
    assert q.ack([2, 99]) == 1  # an unknown seq (already dropped) is ignored
    assert q.seqs() == [1, 3, 4]
    size = len(q.fetch(0, None, 1)[0].payload)
    assert q.nbytes == 3 * size
    q.close()
    with open_queue(tmp_path) as q:
        assert q.seqs() == [1, 3, 4]


def test_drop_oldest_keeps_the_newest_and_declares_the_dropped(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=5 * size + size // 2, full_policy="drop_oldest")
    for i in range(8):
        q.put([msg(i)])
    assert q.seqs() == [4, 5, 6, 7, 8]
    assert q.nbytes == 5 * size
    assert q.drops == {"drop_oldest": 3}
    assert q.pending_gaps() == {"ranges": [[1, 3, "drop_oldest"]], "rejected": {}}
    q.close()
    q = open_queue(tmp_path, max_bytes=5 * size + size // 2)
    assert q.drops == {"drop_oldest": 3}  # counters survive a restart
    assert q.pending_gaps()["ranges"] == [[1, 3, "drop_oldest"]]
    q.close()


def test_reject_new_keeps_the_oldest_and_assigns_no_seq_to_the_rejected(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=5 * size + size // 2, full_policy="reject_new")
    accepted = [q.put([msg(i)]) for i in range(8)]
    assert [len(a) for a in accepted] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert q.seqs() == [1, 2, 3, 4, 5]
    assert q.drops == {"reject_new": 3}
    assert q.pending_gaps() == {"ranges": [], "rejected": {"reject_new": 3}}
    q.ack([1])
    assert [r.seq for r in q.put([msg(1)])] == [6]  # the stream stays contiguous
    q.close()
    with open_queue(tmp_path, max_bytes=5 * size + size // 2, full_policy="reject_new") as q:
        assert q.drops == {"reject_new": 3}


def test_reject_new_takes_what_fits_from_a_batch(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=3 * size, full_policy="reject_new")
    assert [r.seq for r in q.put([msg(i) for i in range(5)])] == [1, 2, 3]
    assert q.drops == {"reject_new": 2}
    q.close()


def test_drop_oldest_batch_larger_than_the_bound_keeps_its_newest(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=3 * size, full_policy="drop_oldest")
    q.put([msg(20), msg(21)])
    rows = q.put([msg(i) for i in range(5)])
    assert [wire.decode(r.payload).data["i"] for r in rows] == [2, 3, 4]
    assert [r.seq for r in rows] == [3, 4, 5]  # no holes: the batch's oldest never got a seq
    assert q.seqs() == [3, 4, 5]
    assert q.drops == {"drop_oldest": 4}  # 2 stored (declared) + 2 of the batch (counted)
    assert q.pending_gaps() == {
        "ranges": [[1, 2, "drop_oldest"]],
        "rejected": {"drop_oldest": 2},
    }
    q.close()


def test_a_message_larger_than_the_bound_is_refused_under_either_policy(tmp_path: Path) -> None:
    for policy in ("drop_oldest", "reject_new"):
        q = open_queue(tmp_path / policy, max_bytes=200, full_policy=policy)
        q.put([msg(1)])
        big = Outgoing("pump", "raw", 0, {"blob": "x" * 500})
        assert q.put([big]) == []
        assert q.seqs() == [1]
        assert q.drops == {"oversize": 1}
        q.close()


def test_age_bound_expires_the_oldest_and_declares_them(tmp_path: Path) -> None:
    clock = Clock()
    q = open_queue(tmp_path, clock, max_age_s=100.0)
    q.put([msg(i) for i in range(3)])
    clock.t += 50
    q.put([msg(i) for i in range(2)])
    assert q.expire() == 0
    clock.t += 60  # the first three are 110 s old, the last two 60 s
    assert q.expire() == 3
    assert q.seqs() == [4, 5]
    assert q.drops == {"expired": 3}
    assert q.pending_gaps()["ranges"] == [[1, 3, "expired"]]
    clock.t += 100
    assert q.expire(max_rows=1) == 1  # chunked, so a long outage never blocks the loop
    assert q.expire() == 1
    assert q.depth == 0
    assert q.pending_gaps()["ranges"] == [[1, 5, "expired"]]
    q.close()


def test_gap_message_declares_ranges_and_rejections_then_clears(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=4 * size)
    for i in range(6):
        q.put([msg(i)])
    q.put([Outgoing("pump", "raw", 0, {"blob": "x" * 1000})])  # oversize: counted, no seq
    q.ack([3, 4])  # room for the gap message, so it drops nothing more
    gap = q.flush_gaps(ts_ms=123)
    assert gap is not None
    assert (gap.device, gap.kind) == (GATEWAY_DEVICE, KIND_GAP)
    env = wire.decode(gap.payload)
    assert env.seq == gap.seq == 7
    assert env.ts_ms == 123
    assert env.data == {"ranges": [[1, 2, "drop_oldest"]], "rejected": {"oversize": 1}}
    assert not q.has_pending_gaps
    assert q.flush_gaps() is None
    assert q.seqs() == [5, 6, 7]
    q.close()
    with open_queue(tmp_path, max_bytes=4 * size) as q:
        assert not q.has_pending_gaps


def test_a_gap_message_makes_room_under_drop_oldest_and_declares_that_too(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    bound = 4 * size
    q = open_queue(tmp_path, max_bytes=bound)
    for i in range(6):
        q.put([msg(i)])  # full: 3..6 stored, 1..2 dropped
    gap = q.flush_gaps()
    assert gap is not None
    (a, b, reason), *rest = wire.decode(gap.payload).data["ranges"]
    assert not rest and (a, reason) == (1, "drop_oldest")
    assert q.seqs() == [*range(b + 1, 7), gap.seq]  # the declaration meets the queue head
    assert q.nbytes <= bound
    q.close()


def test_reject_new_waits_with_the_gap_message_until_it_fits(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=3 * size, full_policy="reject_new")
    q.put([msg(i) for i in range(5)])
    assert q.flush_gaps() is None  # no room: the declaration stays pending
    assert q.has_pending_gaps
    q.ack([1, 2, 3])
    gap = q.flush_gaps()
    assert gap is not None
    assert wire.decode(gap.payload).data == {"ranges": [], "rejected": {"reject_new": 2}}
    assert q.nbytes <= 3 * size
    q.close()


def test_a_dropped_gap_message_hands_its_declarations_to_the_next(tmp_path: Path) -> None:
    size = one_size(tmp_path)
    q = open_queue(tmp_path, max_bytes=4 * size)
    for i in range(6):
        q.put([msg(i)])  # seqs 1, 2 dropped
    q.ack([3, 4])
    gap = q.flush_gaps()
    assert gap is not None
    assert wire.decode(gap.payload).data["ranges"] == [[1, 2, "drop_oldest"]]
    q.ack([5, 6])  # delivered: a hole the next declaration must not claim
    for i in range(8):
        q.put([msg(i)])  # the gap message (seq 7) goes with the oldest
    assert gap.seq not in q.seqs()
    nxt = q.flush_gaps()
    assert nxt is not None
    ranges = wire.decode(nxt.payload).data["ranges"]
    assert ranges[0] == [1, 2, "drop_oldest"]  # handed on from the dropped gap message
    assert ranges[1][0] == gap.seq  # 5 and 6 were delivered, so they are not declared
    declared = {s for a, b, _ in ranges for s in range(a, b + 1)}
    assert not declared & {3, 4, 5, 6}
    assert all(s in declared for s in range(gap.seq, min(q.seqs())))
    q.close()


def test_disk_full_is_counted_never_raised_and_the_queue_stays_whole(tmp_path: Path) -> None:
    q = DurableQueue(
        tmp_path / "q.db", QueueConfig(), site="s1", gateway_id="gw1", max_db_pages=16
    ).open()
    accepted = 0
    refused = 0
    for i in range(5000):
        rows = q.put([Outgoing("pump", "raw", i, {"pad": "x" * 200})])
        if rows:
            accepted += 1
            assert rows[0].seq == accepted  # seqs stay contiguous through refusals
        else:
            refused += 1
            if refused == 20:
                break
    assert refused == 20, "the page cap never filled the database"
    assert q.drops == {"disk_full": 20}
    assert q.seqs() == list(range(1, accepted + 1))
    assert q.depth == accepted
    assert q.pending_gaps()["rejected"] == {"disk_full": 20}
    # Acknowledgements free pages; then new messages fit again, continuing the stream.
    q.ack(list(range(1, accepted + 1)))
    assert [r.seq for r in q.put([msg(1)])] == [accepted + 1]
    q.close()
    db = sqlite3.connect(tmp_path / "q.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    q = open_queue(tmp_path)
    assert q.seqs() == [accepted + 1]
    assert q.drops == {"disk_full": 20}  # written with the next successful transaction
    q.close()


def test_one_gateway_per_queue_file(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    with pytest.raises(StoreError, match="in use"):
        open_queue(tmp_path)
    q.close()
    open_queue(tmp_path).close()  # the lock is released on close


def test_a_queue_of_another_gateway_is_refused(tmp_path: Path) -> None:
    open_queue(tmp_path).close()
    other = DurableQueue(tmp_path / "q.db", QueueConfig(), site="s1", gateway_id="gw2")
    with pytest.raises(StoreError, match="belongs to gateway s1/gw1"):
        other.open()


def test_a_corrupt_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "q.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="unusable"):
        open_queue(tmp_path)


def test_names_that_cannot_be_topics_are_refused_before_anything_is_stored(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    with pytest.raises(wire.WireError):
        q.put([msg(1), Outgoing("bad/device", "raw", 0, {})])
    assert q.depth == 0 and q.last_seq == 0
    assert [r.seq for r in q.put([msg(1)])] == [1]
    q.close()


def test_backlog_counts_messages_at_or_below_the_boundary(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    q.put([msg(i) for i in range(5)])
    assert q.backlog == 5  # no boundary: everything is backlog
    q.set_boundary(5)
    q.put([msg(i) for i in range(3)])
    assert q.backlog == 5
    q.ack([1, 2, 7])
    assert q.backlog == 3
    q.set_boundary(4)
    assert q.backlog == 2
    q.set_boundary(None)
    assert q.backlog == q.depth == 5
    q.close()


def test_wal_mode_and_synchronous_setting(tmp_path: Path) -> None:
    q = open_queue(tmp_path, synchronous="full")
    q.put([msg(1)])
    db = sqlite3.connect(tmp_path / "q.db")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    q.close()
