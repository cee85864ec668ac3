# fogmesh.frame on MicroPython: the shared vectors (hil_tests/vectors/frames.json), bad frames,
# field ranges, pack_into with a preallocated buffer.

import gc
from binascii import unhexlify

import mptest
from fogmesh import frame
from fogmesh.frame import FrameError
from fogmesh.keys import Mac

_ORDER = ("typ", "flags", "hops", "src", "origin", "dest", "seq", "rank", "ctr")


def _args(fields):
    return [fields[n] for n in _ORDER]


def test_constants():
    assert frame.VERSION == 1 and frame.HDR == 16 and frame.MIC_LEN == 8
    assert frame.MAX_FRAME == 250 and frame.MAX_PAYLOAD == 226 and frame.HOPS_MAX == 16
    assert frame.BROADCAST == 0xFFFF and frame.RANK_INF == 0xFFFF and frame.F_FULL == 1
    types = (
        frame.T_BEACON,
        frame.T_DATA,
        frame.T_DOWN,
        frame.T_JOIN,
        frame.T_JOINACK,
        frame.T_DAO,
        frame.T_DIS,
        frame.T_PROBE,
    )
    assert types == (0, 1, 2, 3, 4, 5, 6, 7)


def test_vectors_pack():
    cases = mptest.vectors("frames")["frames"]
    assert len(cases) >= 10
    assert sorted(set(c["fields"]["typ"] for c in cases)) == list(range(8))
    for c in cases:
        mac = Mac(unhexlify(c["key"]))
        want = unhexlify(c["hex"])
        got = frame.pack(mac, *(_args(c["fields"]) + [unhexlify(c["payload"])]))
        assert got == want, c["name"]
        buf = bytearray(frame.MAX_FRAME)
        n = frame.pack_into(buf, mac, *(_args(c["fields"]) + [unhexlify(c["payload"])]))
        assert n == len(want) and buf[:n] == want, c["name"]


def test_vectors_parse_and_check():
    for c in mptest.vectors("frames")["frames"]:
        f = unhexlify(c["hex"])
        assert frame.header(f) == tuple(_args(c["fields"])), c["name"]
        assert bytes(frame.payload(f)) == unhexlify(c["payload"]), c["name"]
        assert frame.check(Mac(unhexlify(c["key"])), f), c["name"]
        assert frame.check(Mac(unhexlify(c["key"])), bytearray(f))


def test_vectors_bad_frames():
    cases = mptest.vectors("frames")["bad"]
    assert len(cases) >= 10
    kinds = set()
    for c in cases:
        f = unhexlify(c["hex"])
        mac = Mac(unhexlify(c["key"]))
        kinds.add(c["expect"])
        if c["expect"] == "bad_frame":
            mptest.raises(FrameError, frame.header, f)
            if not 24 <= len(f) <= 250:  # payload() and check() look at the length only
                mptest.raises(FrameError, frame.payload, f)
                assert not frame.check(mac, f), c["name"]
        else:
            frame.header(f)  # length and version are fine
            assert not frame.check(mac, f), c["name"]
    assert kinds == {"bad_frame", "bad_mic"}


def test_vectors_pack_errors():
    cases = mptest.vectors("frames")["pack_errors"]
    assert cases
    mac = Mac(bytes(16))
    for c in cases:
        args = _args(c["fields"]) + [unhexlify(c["payload"])]
        mptest.raises(FrameError, frame.pack, mac, *args)
        mptest.raises(FrameError, frame.pack_into, bytearray(300), mac, *args)


def test_check_rejects_bad_lengths_without_raising():
    mac = Mac(bytes(16))
    assert not frame.check(mac, b"")
    assert not frame.check(mac, bytes(23))
    assert not frame.check(mac, bytes(251))


def test_error_messages():
    mac = Mac(bytes(16))
    e = mptest.raises(FrameError, frame.pack, mac, 1, 0, 16, 70000, 1, 1, 0, 0, 0, b"")
    assert "src" in str(e)
    e = mptest.raises(FrameError, frame.pack, mac, 1, 0, 16, 1, 1, 1, 0, 0, 0, bytes(227))
    assert "227" in str(e)
    e = mptest.raises(FrameError, frame.header, bytes(10))
    assert "10" in str(e)
    f = bytearray(frame.pack(mac, 1, 0, 16, 1, 1, 1, 0, 0, 0, b""))
    f[0] = (2 << 6) | (f[0] & 0x3F)
    e = mptest.raises(FrameError, frame.header, f)
    assert "version" in str(e)
    assert issubclass(FrameError, ValueError)


def test_pack_into_small_buffer():
    mac = Mac(bytes(16))
    e = mptest.raises(
        FrameError, frame.pack_into, bytearray(30), mac, 1, 0, 16, 1, 1, 1, 0, 0, 0, bytes(7)
    )
    assert "buffer" in str(e)
    assert frame.pack_into(bytearray(30), mac, 1, 0, 16, 1, 1, 1, 0, 0, 0, bytes(6)) == 30


def test_round_trip_limits():
    mac = Mac(b"network key 16 b")
    fields = (15, 3, 255, 0xFFFF, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFFFFFF)
    f = frame.pack(mac, *(fields + (bytes(range(226)),)))
    assert len(f) == 250
    assert frame.header(f) == fields
    assert bytes(frame.payload(f)) == bytes(range(226))
    assert frame.check(mac, f)
    f = frame.pack(mac, 0, 0, 0, 0, 0, 0, 0, 0, 0, b"")
    assert len(f) == 24 and frame.header(f) == (0,) * 9 and len(frame.payload(f)) == 0


def test_relay_rewrites_in_place():
    # A relay re-stamps a received frame in its own buffer: payload taken from the same buffer.
    up = Mac(b"k" * 16)
    buf = bytearray(frame.MAX_FRAME)
    n = frame.pack_into(buf, up, frame.T_DATA, 0, 16, 5, 5, 1, 9, 512, 100, b"payload!")
    pl = frame.payload(memoryview(buf)[:n])
    m = frame.pack_into(buf, up, frame.T_DATA, 0, 15, 2, 5, 1, 9, 256, 7, pl)
    assert m == n
    assert frame.header(buf[:m]) == (frame.T_DATA, 0, 15, 2, 5, 1, 9, 256, 7)
    assert bytes(frame.payload(buf[:m])) == b"payload!" and frame.check(up, buf[:m])


def test_pack_into_allocates_little():
    mac = Mac(bytes(16))
    buf = bytearray(frame.MAX_FRAME)
    payload = bytes(200)
    frame.pack_into(buf, mac, 1, 0, 16, 1, 1, 1, 0, 0, 0, payload)
    gc.collect()
    gc.disable()
    try:
        a0 = gc.mem_alloc()
        for i in range(10):
            frame.pack_into(buf, mac, 1, 0, 16, 1, 1, 1, i, 0, i, payload)
        used = gc.mem_alloc() - a0
    finally:
        gc.enable()
    assert used < 10 * 1024, used
    assert frame.check(mac, buf[:224])
