# The firmware's UART codec (fogmesh/uart.py) against the shared vectors
# (hil_tests/vectors/uart.json), plus what the vectors cannot say: chunking at every offset,
# the decoder's bounded buffer, and allocation per byte.
import gc
import json

import mptest
from fogmesh import uart


def _here():
    f = __file__
    i = f.rfind("/")
    return f[:i] if i >= 0 else "."


_cache = []


def _vectors(section):
    # The file is loaded once and each section read from it; under a 100 KB heap the parsed
    # vectors fit, two copies might not.
    if not _cache:
        with open(_here() + "/../../vectors/uart.json") as f:
            _cache.append(json.load(f))
    return _cache[0][section]


def _hex(s):
    return bytes.fromhex(s)


def _counters(d):
    return {"frames": d.frames, "bad_crc": d.bad_crc, "bad_cobs": d.bad_cobs, "oversize": d.oversize}


def test_constants():
    assert (uart.T_UP, uart.T_DOWN, uart.T_DOWNACK) == (1, 2, 3)
    assert (uart.T_STATUS, uart.T_LOG, uart.T_HELLO) == (4, 5, 6)
    assert uart.MAX_FRAME == 512 == _vectors("max_frame")
    assert uart.MAX_BODY == 507


def test_encode_every_vector():
    for v in _vectors("frames"):
        got = uart.encode(v["type"], _hex(v["body"]))
        assert got == _hex(v["encoded"]), v["name"]


def test_decode_every_vector():
    for v in _vectors("frames"):
        d = uart.Decoder()
        got = d.feed(_hex(v["encoded"]))
        assert got == [(v["type"], _hex(v["body"]))], v["name"]
        assert d.frames == 1 and d.bad_crc == 0 and d.bad_cobs == 0 and d.oversize == 0


def test_encode_errors():
    for v in _vectors("encode_errors"):
        mptest.raises(ValueError, uart.encode, v["type"], bytes(v["body_len"]))
    mptest.raises(uart.UartError, uart.encode, 1, bytes(uart.MAX_BODY + 1))


def test_every_stream():
    for v in _vectors("streams"):
        d = uart.Decoder()
        got = []
        for c in v["chunks"]:
            for typ, body in d.feed(_hex(c)):
                got.append([typ, body.hex()])
        assert got == v["frames"], v["name"]
        assert _counters(d) == v["counters"], (v["name"], _counters(d))


def test_streams_fed_byte_by_byte_give_the_same():
    for v in _vectors("streams"):
        d = uart.Decoder()
        got = []
        for c in v["chunks"]:
            data = _hex(c)
            for i in range(len(data)):
                for typ, body in d.feed(data[i : i + 1]):
                    got.append([typ, body.hex()])
        assert got == v["frames"], v["name"]
        assert _counters(d) == v["counters"], v["name"]


def test_split_at_every_offset():
    v = _vectors("frames")[0]
    enc = _hex(v["encoded"])
    want = (v["type"], _hex(v["body"]))
    for cut in range(len(enc) + 1):
        d = uart.Decoder()
        got = d.feed(enc[:cut]) + d.feed(enc[cut:])
        assert got == [want], cut


def test_bodies():
    for v in _vectors("bodies"):
        f = v["fields"]
        p = _hex(v["payload"])
        body = _hex(v["body"])
        if v["kind"] == "up":
            assert uart.up_body(f[0], f[1], f[2], p) == body
            assert uart.parse_up(body) == (f[0], f[1], f[2], p)
        elif v["kind"] == "down":
            assert uart.down_body(f[0], f[1], p) == body
            assert uart.parse_down(body) == (f[0], f[1], p)
        else:
            assert uart.downack_body(f[0], f[1]) == body
            assert uart.parse_downack(body) == (f[0], f[1])


def test_body_errors():
    parsers = {"up": uart.parse_up, "down": uart.parse_down, "downack": uart.parse_downack}
    for v in _vectors("body_errors"):
        e = mptest.raises(uart.UartError, parsers[v["kind"]], _hex(v["body"]))
        assert "B" in str(e)
    mptest.raises(uart.UartError, uart.up_body, 0x10000, 0, 0, b"")
    mptest.raises(uart.UartError, uart.down_body, 1, -1, b"")
    mptest.raises(uart.UartError, uart.downack_body, 1, 256)


def test_buffer_never_grows():
    d = uart.Decoder()
    enc = d._enc
    d.feed(b"\x41" * 5000)
    d.feed(b"\x42" * 5000 + b"\x00")
    assert d._enc is enc and len(enc) == 515
    assert d.oversize == 1
    frame = uart.encode(uart.T_LOG, b"x" * 507)
    assert d.feed(frame) == [(uart.T_LOG, b"x" * 507)]


def _alloc(d, stream):
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        got = d.feed(stream)
        used = gc.mem_alloc() - before
    finally:
        gc.enable()
    return got, used


def test_decode_does_not_allocate_per_byte():
    # The same frames behind 50 or 450 bytes of garbage each: the heap grows by the frames
    # returned and a few small objects per frame, the same amount whatever the byte count.
    d = uart.Decoder()
    frame = uart.encode(uart.T_UP, uart.up_body(5, 1, 14, b"\x11" * 100))
    short = (b"\x55" * 50 + b"\x00" + frame) * 4
    long = (b"\x55" * 450 + b"\x00" + frame) * 4
    _alloc(d, short)  # warm up
    got_short, used_short = _alloc(d, short)
    got_long, used_long = _alloc(d, long)
    assert len(got_short) == len(got_long) == 4
    assert d.bad_cobs == 12
    assert abs(used_long - used_short) <= 64, (used_short, used_long)
    assert used_long < 1600, used_long  # 4 bodies of 105 B and small change
    # a maximal frame decodes in place too
    big = uart.encode(uart.T_UP, b"\x22" * uart.MAX_BODY)
    got, used = _alloc(d, big)
    assert got == [(uart.T_UP, b"\x22" * uart.MAX_BODY)]
    assert used < uart.MAX_BODY + 400, used


def test_memoryview_input():
    frame = uart.encode(uart.T_HELLO, b"\xa2")
    d = uart.Decoder()
    assert d.feed(memoryview(frame)) == [(uart.T_HELLO, b"\xa2")]


def test_reset_forgets_a_partial_frame():
    d = uart.Decoder()
    frame = uart.encode(uart.T_LOG, b"hello")
    d.feed(frame[:4])
    d.reset()
    assert d.feed(frame[4:]) == []  # the tail alone is not a frame
    assert d.bad_cobs + d.bad_crc == 1
    assert d.feed(frame) == [(uart.T_LOG, b"hello")]
