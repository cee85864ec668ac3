# fogmesh.cbor on MicroPython: the shared vectors (hil_tests/vectors/cbor.json), round trips,
# the firmware's own limits (tags, depth, simple values, key types) and memory under the heap cap.

import gc
import struct
from binascii import unhexlify

import mptest
from fogmesh.cbor import CBORError, dumps, loads


def _value(v):
    # The JSON encoding of values described in hil_tests/vectors/make_vectors.py.
    if isinstance(v, list):
        return [_value(x) for x in v]
    if isinstance(v, dict):
        if "$bytes" in v:
            return unhexlify(v["$bytes"])
        if "$float" in v:
            return struct.unpack(">d", unhexlify(v["$float"]))[0]
        if "$map" in v:
            return {_value(k): _value(x) for k, x in v["$map"]}
        raise ValueError("unknown encoded value")
    return v


def _same(a, b):
    # Equality that tells -0.0 from 0.0, NaN equal to NaN, True from 1, bytes from str.
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if a != a:
            return b != b
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        for k in a:
            if k not in b or not _same(a[k], b[k]):
                return False
        return True
    return a == b


def test_valid_vectors_encode_canonically():
    cases = mptest.vectors("cbor")["valid"]
    assert len(cases) >= 60
    for c in cases:
        got = dumps(_value(c["value"]))
        assert got == unhexlify(c["hex"]), c["name"] + ": " + got.hex()


def test_valid_vectors_decode():
    for c in mptest.vectors("cbor")["valid"]:
        got = loads(unhexlify(c["hex"]))
        assert _same(got, _value(c["value"])), c["name"]


def test_decode_only_vectors():
    cases = mptest.vectors("cbor")["decode_only"]
    assert cases
    for c in cases:
        got = loads(unhexlify(c["hex"]))
        assert _same(got, _value(c["value"])), c["name"]


def test_malformed_vectors_raise():
    cases = mptest.vectors("cbor")["malformed"]
    assert len(cases) >= 15
    for c in cases:
        data = unhexlify(c["hex"])
        try:
            loads(data)
        except CBORError:
            continue
        raise AssertionError("no CBORError: " + c["name"])


def test_accepts_bytearray_and_memoryview():
    data = dumps({"a": [1, b"xy"]})
    assert loads(bytearray(data)) == {"a": [1, b"xy"]}
    assert loads(memoryview(b"\x00" + data)[1:]) == {"a": [1, b"xy"]}


def test_round_trips():
    for v in [
        0,
        -1,
        2**64 - 1,
        -(2**64),
        "",
        "\u00fc\u6c34",
        b"\x00\xff",
        [],
        {},
        [[], {}],
        {"k": "sum", "u": 12, "ch": {"t": [1.5, -2.25, 0.1]}, "alarm": True, "x": None},
        {1: 2, "1": 3, b"1": 4},
    ]:
        assert _same(loads(dumps(v)), v), repr(v)


def test_tuple_and_bytearray_encode_as_array_and_bytes():
    assert dumps((1, 2)) == dumps([1, 2]) == b"\x82\x01\x02"
    assert dumps(bytearray(b"ab")) == b"\x42ab"
    assert dumps(memoryview(b"ab")) == b"\x42ab"


def test_encode_rejects_unsupported_types():
    e = mptest.raises(CBORError, dumps, {1, 2})
    assert "set" in str(e)
    mptest.raises(CBORError, dumps, [object()])
    mptest.raises(CBORError, dumps, 2**64)
    mptest.raises(CBORError, dumps, -(2**64) - 1)


def _nest(n):
    v = 0
    for _ in range(n):
        v = [v]
    return v


def test_depth_limit():
    assert loads(dumps(_nest(16))) == _nest(16)
    e = mptest.raises(CBORError, dumps, _nest(17))
    assert "16" in str(e)
    e = mptest.raises(CBORError, loads, b"\x81" * 17 + b"\x00")
    assert "nesting" in str(e)
    mptest.raises(CBORError, loads, b"\xa1\x00" * 17 + b"\x00")
    mptest.raises(CBORError, loads, b"\x9f" * 17 + b"\xff" * 17)


def test_tags_rejected():
    e = mptest.raises(CBORError, loads, unhexlify("c11a514b67b0"))  # epoch datetime
    assert "tag" in str(e)
    mptest.raises(CBORError, loads, unhexlify("c249010000000000000000"))  # bignum 2**64
    mptest.raises(CBORError, loads, unhexlify("81d818420102"))


def test_simple_values():
    assert loads(b"\xf7") is None  # undefined
    e = mptest.raises(CBORError, loads, b"\xf0")
    assert "simple" in str(e)
    mptest.raises(CBORError, loads, b"\xf8\xff")
    mptest.raises(CBORError, loads, b"\xf8\x10")
    mptest.raises(CBORError, loads, b"\xf8")


def test_map_keys_must_be_hashable_kinds():
    e = mptest.raises(CBORError, loads, unhexlify("a18000"))  # {[]: 0}
    assert "key" in str(e)
    mptest.raises(CBORError, loads, unhexlify("a1a000"))  # {{}: 0}


def test_errors_say_where():
    e = mptest.raises(CBORError, loads, b"\x00\x00")
    assert "trailing" in str(e)
    e = mptest.raises(CBORError, loads, b"\x45\x01")
    assert "truncated" in str(e)
    e = mptest.raises(CBORError, loads, b"\x62\xc3\x28")
    assert "UTF-8" in str(e)
    e = mptest.raises(CBORError, loads, b"\x1c")
    assert "reserved" in str(e)
    # Counts are checked against the bytes left before any item is read.
    e = mptest.raises(CBORError, loads, unhexlify("9a7fffffff00"))
    assert "array length" in str(e) and "beyond" in str(e)
    e = mptest.raises(CBORError, loads, unhexlify("a3000000"))
    assert "map length" in str(e) and "beyond" in str(e)


def test_huge_lengths_allocate_nothing():
    gc.collect()
    before = gc.mem_free()
    for h in (
        "5bffffffffffffffff",
        "9bffffffffffffffff00",
        "bbffffffffffffffff00",
        "5a7fffffff",
        "9a7fffffff00",
    ):
        mptest.raises(CBORError, loads, unhexlify(h))
    gc.collect()
    assert gc.mem_free() > before - 2048


def test_error_is_a_value_error():
    assert issubclass(CBORError, ValueError)
    mptest.raises(ValueError, loads, b"")


def _payload200():
    m = {
        "k": "sum",
        "u": 123456,
        "n": 1000,
        "alarm": False,
        "score": 0.25,
        "ch": {"temp": [20.5, 24.25, 22.125], "vib": [0.01, 0.5, 0.1], "amp": [1, 2, 3]},
        "pad": b"\x00" * 106,
    }
    assert 190 <= len(dumps(m)) <= 226, len(dumps(m))
    return m


def test_memory_200_byte_map():
    m = _payload200()
    data = dumps(m)
    gc.collect()
    start = gc.mem_alloc()
    gc.collect()
    for _ in range(50):
        data = dumps(m)
        back = loads(data)
    assert _same(back, m)
    # One round allocates a small multiple of the payload, not more.
    gc.collect()
    gc.disable()
    try:
        a0 = gc.mem_alloc()
        loads(dumps(m))
        used = gc.mem_alloc() - a0
    finally:
        gc.enable()
    assert used < 8192, used
    # 50 rounds of a 200-byte payload run in a 100 KB heap, and each leaves nothing behind.
    gc.collect()
    assert gc.mem_alloc() < start + 1024, (start, gc.mem_alloc())
