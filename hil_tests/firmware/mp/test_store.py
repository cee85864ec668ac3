# firmware/fogmesh/store.py on MicroPython: the flash ring buffer. Append/peek/pop, order,
# persistence across reopen, wrap-around, the full ring dropping its oldest, and crashes: a
# record cut mid-write, a head file replaced mid-way, stale records from an earlier lap.

import os

import mptest
from fogmesh.store import Ring, StoreError


def payload(i, n=40):
    return bytes((i + k) & 0xFF for k in range(n))


def drain(r):
    out = []
    while len(r):
        seq, p = r.peek()
        out.append((seq, bytes(p)))
        r.pop()
    return out


def test_append_peek_pop_in_order():
    r = Ring(mptest.tmpdir(), 4096)
    assert len(r) == 0 and r.peek() is None
    for i in range(10):
        r.append(100 + i, payload(i))
    assert len(r) == 10
    assert r.peek() == r.peek()  # peek does not consume
    got = drain(r)
    assert got == [(100 + i, payload(i)) for i in range(10)]
    assert r.peek() is None
    mptest.raises(IndexError, r.pop)


def test_seq_masked_and_empty_payload():
    r = Ring(mptest.tmpdir(), 4096)
    r.append(0x12345, b"")
    assert r.peek() == (0x2345, b"")


def test_survives_reopen():
    d = mptest.tmpdir()
    r = Ring(d, 4096)
    for i in range(6):
        r.append(i, payload(i))
    r.pop()
    r.pop()
    r.close()
    r = Ring(d, 4096)
    assert len(r) == 4
    assert drain(r) == [(i, payload(i)) for i in range(2, 6)]
    r.close()
    r = Ring(d, 4096)
    assert len(r) == 0


def test_wraps_many_laps_without_growing():
    d = mptest.tmpdir()
    r = Ring(d, 1024)
    expect = []
    for i in range(300):  # 300 × 62 B: about 18 laps of the file
        r.append(i, payload(i, 50))
        expect.append(i)
        if len(r) > 5:
            seq, p = r.peek()
            assert seq == expect.pop(0) and p == payload(seq, 50)
            r.pop()
        if i % 37 == 0:  # reopening anywhere in a lap finds the same records
            r.close()
            r = Ring(d, 1024)
            assert len(r) == len(expect)
    assert os.stat(d + "/ring.dat")[6] <= 1024
    assert [s for s, _ in drain(r)] == expect
    assert r.dropped == 0


def test_full_drops_oldest_and_counts():
    d = mptest.tmpdir()
    logs = []
    r = Ring(d, 1024, lambda ev, f: logs.append((ev, f)))
    for i in range(40):  # 40 × 62 B into 1024 B: the oldest go
        r.append(i, payload(i, 50))
    n = len(r)
    assert 10 <= n < 17, n
    assert r.dropped == 40 - n
    assert logs and logs[0][0] == "drop" and logs[0][1]["reason"] == "ring_full"
    assert sum(f["n"] for _, f in logs) == r.dropped
    r.close()
    r = Ring(d, 1024)  # the drops and the survivors persist
    assert r.dropped == 40 - n
    assert [s for s, _ in drain(r)] == list(range(40 - n, 40))


def test_record_too_large():
    r = Ring(mptest.tmpdir(), 1024)
    mptest.raises(ValueError, r.append, 1, bytes(600))
    assert len(r) == 0
    mptest.raises(ValueError, Ring, mptest.tmpdir(), 100)


def test_crash_mid_write_loses_only_the_cut_record():
    d = mptest.tmpdir()
    r = Ring(d, 4096)
    for i in range(5):
        r.append(i, payload(i))
    end = r.t
    r.close()
    # A crash during the 6th append: its header and part of its payload reached the file.
    whole = Ring(d + "", 4096)
    whole.append(5, payload(5))
    whole.close()
    with open(d + "/ring.dat", "r+b") as f:
        f.seek(end + 12 + 10)
        f.write(b"\xee" * 30)  # the rest of the record never made it: garbage there instead
    r = Ring(d, 4096)
    assert len(r) == 5
    r.append(6, payload(6))  # and the ring goes on over the torn record
    r.close()
    r = Ring(d, 4096)
    assert [s for s, _ in drain(r)] == [0, 1, 2, 3, 4, 6]


def test_truncated_tail_record():
    d = mptest.tmpdir()
    r = Ring(d, 4096)
    for i in range(4):
        r.append(i, payload(i))
    r.close()
    size = os.stat(d + "/ring.dat")[6]
    with open(d + "/ring.dat", "rb") as f:
        data = f.read()
    with open(d + "/ring.dat", "wb") as f:
        f.write(data[: size - 7])  # the last record lost its tail
    r = Ring(d, 4096)
    assert [s for s, _ in drain(r)] == [0, 1, 2]


def test_stale_records_of_an_earlier_lap_not_resurrected():
    d = mptest.tmpdir()
    r = Ring(d, 1024)
    for i in range(12):
        r.append(i, payload(i, 50))
    drain(r)
    r.append(99, payload(99, 50))
    r.close()
    r = Ring(d, 1024)  # whole but older records lie after the new one: not taken
    assert drain(r) == [(99, payload(99, 50))]


def test_head_written_atomically_tmp_used_after_cut_rename():
    d = mptest.tmpdir()
    r = Ring(d, 4096)
    for i in range(3):
        r.append(i, payload(i))
    r.pop()
    r.close()
    os.rename(d + "/ring.head", d + "/ring.head.tmp")  # cut between remove and rename
    r = Ring(d, 4096)
    assert [s for s, _ in drain(r)] == [1, 2]


def test_corrupt_head_is_a_clear_error():
    d = mptest.tmpdir()
    r = Ring(d, 4096)
    r.append(1, b"x")
    r.close()
    with open(d + "/ring.head", "w") as f:
        f.write("garbage")
    e = mptest.raises(StoreError, Ring, d, 4096)
    assert "ring.head" in str(e) and "corrupt" in str(e)
    with open(d + "/ring.head", "w") as f:
        f.write("99999 0 0\n")
    assert "outside" in str(mptest.raises(StoreError, Ring, d, 4096))
    os.remove(d + "/ring.head")
    assert "without" in str(mptest.raises(StoreError, Ring, d, 4096))
    assert os.stat(d + "/ring.dat")[6] > 0  # the data is left alone for a post-mortem


def test_flipped_bit_ends_the_scan_there():
    d = mptest.tmpdir()
    r = Ring(d, 4096)
    for i in range(4):
        r.append(i, payload(i))
    r.close()
    with open(d + "/ring.dat", "r+b") as f:
        f.seek(2 * (12 + 40) + 20)
        b = f.read(1)
        f.seek(2 * (12 + 40) + 20)
        f.write(bytes([b[0] ^ 1]))
    r = Ring(d, 4096)
    assert [s for s, _ in drain(r)] == [0, 1]  # never a corrupt record


_CHILD = """import sys
sys.path.insert(0, %r)
from fogmesh.store import Ring
r = Ring(%r, 65536)
seq = r.dropped + len(r)  # the ring may fill: then the oldest go, counted
while True:
    r.append(seq, bytes((seq + k) & 255 for k in range(seq %% 200)))
    print(seq)  # after append() returned: the record must survive any kill from here on
    seq += 1
"""


def _here():
    f = __file__
    if not f.startswith("/"):
        f = os.getcwd() + "/" + f
    return f[: f.rfind("/")]


def test_kill9_at_random_points_loses_nothing_appended():
    import sys
    import time

    d = mptest.tmpdir()
    with open(d + "/child.py", "w") as f:
        f.write(_CHILD % (_here() + "/../../../firmware", d))
    last = -1
    for rnd in range(5):
        os.system(
            f"{sys.executable} -X heapsize=100k {d}/child.py > {d}/out.txt 2>&1 & echo $! > {d}/pid.txt"
        )
        time.sleep_ms(150 + 37 * rnd)
        # Killed, then dead (gone or a zombie nobody reaped yet): its writes are all in.
        os.system(
            f"p=$(cat {d}/pid.txt); kill -9 $p; while [ -e /proc/$p ] &&"
            " [ \"$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)\" != Z ]; do sleep 0.01; done"
        )
        with open(d + "/out.txt", "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 24))
            tail = f.read().split(b"\n")
        done = [int(x) for x in tail if x.isdigit()]  # a last line cut by the kill is no number
        assert done, "the child appended nothing before the kill"
        assert done[-1] > last  # it made progress in this round
        last = done[-1]
        r = Ring(d, 65536)
        n = r.dropped + len(r)
        assert n >= last + 1, (rnd, n, last)  # everything append() returned for
        assert n <= last + 2, (rnd, n, last)  # at most the one being written when killed
        r.close()
    r = Ring(d, 65536)
    assert r.dropped > 0  # the ring filled and wrapped under the kills too
    i = r.dropped
    while len(r):
        seq, p = r.peek()
        assert seq == i and p == bytes((i + k) & 255 for k in range(i % 200)), i
        r.pop()
        i += 1
    assert i >= last + 1
