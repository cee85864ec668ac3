"""The Modbus register codec: known vectors in all four orders, exact round trips for every type,
strings, bits, scaling and the write range checks an integrator meets."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import BadData
from retrofit_adapters.modbus.codec import (
    NUMERIC_TYPES,
    ORDERS,
    CodecError,
    all_decodings,
    bit_masks,
    decode_registers,
    decode_tag,
    encode_bit,
    encode_registers,
    encode_tag,
    register_count,
    type_spec,
)
from retrofit_adapters.modbus.config import ModbusTag


def tag(**kw: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": "t", "address": 0, **kw})


def error(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(CodecError) as exc:
        fn(*args, **kw)
    return str(exc.value)


# --- known vectors ---------------------------------------------------------------------------

# float32 123.456 = 0x42F6E979: bytes A=42 B=F6 C=E9 D=79
FLOAT32_123_456 = {
    "ABCD": [0x42F6, 0xE979],
    "CDAB": [0xE979, 0x42F6],
    "BADC": [0xF642, 0x79E9],
    "DCBA": [0x79E9, 0xF642],
}
# int32 -2 = 0xFFFFFFFE
INT32_MINUS_2 = {
    "ABCD": [0xFFFF, 0xFFFE],
    "CDAB": [0xFFFE, 0xFFFF],
    "BADC": [0xFFFF, 0xFEFF],
    "DCBA": [0xFEFF, 0xFFFF],
}
# uint64 0x0102030405060708: CDAB reverses all four words, BADC swaps bytes in each word
UINT64_VECTOR = {
    "ABCD": [0x0102, 0x0304, 0x0506, 0x0708],
    "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
    "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
    "DCBA": [0x0807, 0x0605, 0x0403, 0x0201],
}
FLOAT64_ONE = {
    "ABCD": [0x3FF0, 0, 0, 0],
    "CDAB": [0, 0, 0, 0x3FF0],
    "BADC": [0xF03F, 0, 0, 0],
    "DCBA": [0, 0, 0, 0xF03F],
}


@pytest.mark.parametrize("order", ORDERS)
def test_known_vectors_in_every_order(order: str) -> None:
    assert encode_registers(123.456, "float32", order) == FLOAT32_123_456[order]
    assert decode_registers(FLOAT32_123_456[order], "float32", order) == 123.456
    assert encode_registers(-2, "int32", order) == INT32_MINUS_2[order]
    assert decode_registers(INT32_MINUS_2[order], "int32", order) == -2
    assert decode_registers(INT32_MINUS_2[order], "uint32", order) == 0xFFFFFFFE
    assert encode_registers(0x0102030405060708, "uint64", order) == UINT64_VECTOR[order]
    assert decode_registers(UINT64_VECTOR[order], "uint64", order) == 0x0102030405060708
    assert encode_registers(1.0, "float64", order) == FLOAT64_ONE[order]
    assert decode_registers(FLOAT64_ONE[order], "float64", order) == 1.0


def test_16_bit_types_only_swap_bytes() -> None:
    for order, regs in {
        "ABCD": [0xFFFE],
        "CDAB": [0xFFFE],
        "BADC": [0xFEFF],
        "DCBA": [0xFEFF],
    }.items():
        assert encode_registers(-2, "int16", order) == regs
        assert decode_registers(regs, "int16", order) == -2
    assert decode_registers([0x1234], "uint16", "BADC") == 0x3412


def test_float32_decodes_to_the_shortest_decimal_of_the_same_float32() -> None:
    assert decode_registers([0x3DCC, 0xCCCD], "float32", "ABCD") == 0.1
    raw = struct.unpack(">f", bytes.fromhex("42F6E979"))[0]
    assert raw != 123.456  # what a naive decoder returns ...
    assert struct.pack(">f", 123.456) == struct.pack(">f", raw)  # ... is the same float32


# --- round trips -----------------------------------------------------------------------------

INT_EDGES: dict[str, list[float]] = {
    "int16": [-32768, -1, 0, 1, 32767],
    "uint16": [0, 1, 65535],
    "int32": [-(2**31), -2, 0, 2**31 - 1],
    "uint32": [0, 2**32 - 1],
    "int64": [-(2**63), -1, 0, 2**63 - 1],
    "uint64": [0, 2**53 + 1, 2**64 - 1],  # beyond 2**53: exact, never through a float
}
FLOAT_EDGES: dict[str, list[float]] = {
    # float32 values as decoded: the shortest decimal of each float32
    "float32": [
        0.0,
        1.5,
        -123.25,
        3.4028235e38,
        -1.1754944e-38,
        1e-45,
        123.456,
        math.inf,
        -math.inf,
    ],
    "float64": [0.0, 0.1, -1e300, 5e-324, 1.7976931348623157e308, math.inf, -math.inf],
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    ("dtype", "value"),
    [(t, v) for t, vs in {**INT_EDGES, **FLOAT_EDGES}.items() for v in vs],
)
def test_edge_values_round_trip_in_every_order(dtype: str, value: float, order: str) -> None:
    regs = encode_registers(value, dtype, order)
    assert len(regs) == register_count(dtype)
    back = decode_registers(regs, dtype, order)
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_negative_zero_keeps_its_sign(dtype: str, order: str) -> None:
    back = decode_registers(encode_registers(-0.0, dtype, order), dtype, order)
    assert isinstance(back, float)
    assert back == 0.0 and math.copysign(1.0, back) == -1.0


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    ("dtype", "bits"),
    [
        ("float32", 0x7FC00000),  # quiet NaN
        ("float32", 0xFFC00001),  # negative, with a payload
        ("float32", 0x7F800001),  # signaling: a C conversion would quieten it
        ("float64", 0x7FF8000000000000),
        ("float64", 0x7FF0000000000001),
    ],
)
def test_nan_is_kept_bit_exact(dtype: str, bits: int, order: str) -> None:
    same_width = "uint32" if dtype == "float32" else "uint64"
    wire = encode_registers(bits, same_width, order)  # the pattern as the device sends it
    value = decode_registers(wire, dtype, order)
    assert isinstance(value, float) and math.isnan(value)
    assert encode_registers(value, dtype, order) == wire


@pytest.mark.parametrize(
    "bits",
    [0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001, 0x00800000, 0x007FFFFF, 0x3F800001],
)
def test_float32_extremes_round_trip_bit_exact(bits: int) -> None:
    # the largest finite value: a short decimal of it would round up past the maximum
    wire = encode_registers(bits, "uint32", "ABCD")
    value = decode_registers(wire, "float32", "ABCD")
    assert encode_registers(value, "float32", "ABCD") == wire


@given(st.data())
def test_any_register_pattern_round_trips_bit_exact(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(NUMERIC_TYPES))
    order = data.draw(st.sampled_from(ORDERS))
    regs = data.draw(
        st.lists(
            st.integers(0, 0xFFFF), min_size=register_count(dtype), max_size=register_count(dtype)
        )
    )
    value = decode_registers(regs, dtype, order)
    assert encode_registers(value, dtype, order) == regs


@given(st.data())
def test_any_integer_in_range_round_trips(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from([t for t in NUMERIC_TYPES if "int" in t]))
    order = data.draw(st.sampled_from(ORDERS))
    lo, hi = type_spec(dtype).int_range
    value = data.draw(st.integers(lo, hi))
    assert decode_registers(encode_registers(value, dtype, order), dtype, order) == value


def test_integral_floats_are_accepted_for_integer_types() -> None:
    assert encode_registers(7.0, "uint16", "ABCD") == [7]


@pytest.mark.parametrize(
    ("value", "dtype", "message"),
    [
        (32768, "int16", "32768 is out of range for int16 (-32768..32767)"),
        (-1, "uint16", "-1 is out of range for uint16 (0..65535)"),
        (2**32, "uint32", "4294967296 is out of range for uint32 (0..4294967295)"),
        (2**63, "int64", f"{2**63} is out of range for int64 ({-(2**63)}..{2**63 - 1})"),
        (1.5, "int32", "int32 needs a whole number, got 1.5"),
        (math.nan, "int32", "int32 needs a whole number, got nan"),
        (True, "uint16", "uint16 needs a number, got bool True"),
        ("5", "float32", "float32 needs a number, got str '5'"),
        (1e39, "float32", "1e+39 is out of range for float32 (±3.4028235e+38)"),
        (10**400, "float64", f"{10**400} is out of range for float64"),
        (2, "bool", "bool needs true or false, got int 2"),
    ],
)
def test_values_that_do_not_fit_are_refused(value: Any, dtype: str, message: str) -> None:
    assert error(encode_registers, value, dtype, "ABCD") == message


def test_bad_input_is_refused_with_a_message() -> None:
    assert error(decode_registers, [1], "float32", "ABCD") == "float32 needs 2 registers, got 1"
    assert (
        error(decode_registers, [70000], "uint16", "ABCD") == "register value 70000 is not 0..65535"
    )
    assert (
        error(decode_registers, [True], "uint16", "ABCD") == "register value True is not 0..65535"
    )
    assert error(decode_registers, [1], "uint16", "ABDC") == (
        "unknown order 'ABDC'; must be one of ABCD, CDAB, BADC, DCBA"
    )
    assert error(register_count, "float") == (
        "unknown type 'float'; must be one of bool, int16, uint16, int32, uint32, int64, "
        "uint64, float32, float64, string(N)"
    )
    assert error(register_count, "string(251)") == "string(251): string length must be 1..250 bytes"
    assert issubclass(CodecError, BadData)


def test_register_counts() -> None:
    counts = {"bool": 1, "int16": 1, "uint32": 2, "float32": 2, "int64": 4, "float64": 4}
    for dtype, n in counts.items():
        assert register_count(dtype) == n
    assert register_count("string(10)") == 5
    assert register_count("string(9)") == 5
    assert register_count("string(1)") == 1
    assert register_count("string(250)") == 125


# --- strings ---------------------------------------------------------------------------------


def test_string_byte_order_inside_registers_and_nul_padding() -> None:
    # odd length: the last register is padded with NUL
    assert encode_registers("ABC", "string(3)", "ABCD") == [0x4142, 0x4300]
    assert encode_registers("ABC", "string(3)", "CDAB") == [0x4142, 0x4300]  # no word swap
    assert encode_registers("ABC", "string(3)", "BADC") == [0x4241, 0x0043]
    assert encode_registers("ABC", "string(3)", "DCBA") == [0x4241, 0x0043]
    assert encode_registers("A", "string(6)", "ABCD") == [0x4100, 0, 0]
    for order in ORDERS:
        for text in ("ABC", "", "A", "x y"):
            regs = encode_registers(text, "string(3)", order)
            assert decode_registers(regs, "string(3)", order) == text


def test_string_decoding_cuts_at_nul_and_strips_trailing_spaces() -> None:
    assert decode_registers([0x4142, 0x2020], "string(4)", "ABCD") == "AB"
    assert decode_registers([0x2041, 0x2020], "string(4)", "ABCD") == " A"  # leading kept
    assert decode_registers([0x4100, 0x4243], "string(4)", "ABCD") == "A"  # stale bytes after NUL
    assert decode_registers([0x4142, 0x4344], "string(3)", "ABCD") == "ABC"  # N bytes only
    assert decode_registers([0x41FF], "string(2)", "ABCD") == "A\ufffd"


def test_strings_that_cannot_be_written_are_refused() -> None:
    assert error(encode_registers, "ABCD", "string(3)", "ABCD") == (
        "string(3): 'ABCD' is 4 bytes, more than 3"
    )
    assert (
        error(encode_registers, "Grüße", "string(10)", "ABCD") == "string(10): 'Grüße' is not ASCII"
    )
    assert error(encode_registers, "A\0B", "string(10)", "ABCD") == (
        "string(10): 'A\\x00B' contains NUL, which ends a string on read"
    )
    assert (
        error(encode_registers, 5, "string(10)", "ABCD") == "string(10) needs a string, got int 5"
    )


# --- tags ------------------------------------------------------------------------------------


def test_decode_tag_scales_and_offsets() -> None:
    t = tag(type="int16", scale=0.1, offset=20.0)
    assert decode_tag(t, [0xFFFB]) == pytest.approx(19.5)  # raw -5
    plain = tag(type="int32")
    value = decode_tag(plain, [0xFFFF, 0xFFFE])
    assert value == -2 and isinstance(value, int)  # no scaling: the raw int, not a float
    assert isinstance(decode_tag(tag(scale=2.0), [3]), float)
    assert decode_tag(tag(type="float32", order="CDAB"), FLOAT32_123_456["CDAB"]) == 123.456


def test_decode_tag_bits_bools_and_coils() -> None:
    assert decode_tag(tag(bit=2), [0x0004]) is True
    assert decode_tag(tag(bit=2), [0xFFFB]) is False
    assert decode_tag(tag(bit=15, type="int16"), [0x8000]) is True
    # bit numbers count in the value after the byte swap
    assert decode_tag(tag(bit=2, order="BADC"), [0x0400]) is True
    assert decode_tag(tag(type="bool"), [0]) is False
    assert decode_tag(tag(type="bool"), [0x0100]) is True  # any bit set
    assert decode_tag(tag(table="coil"), [True]) is True
    assert decode_tag(tag(table="discrete"), [False]) is False


def test_decode_tag_errors_name_the_tag() -> None:
    assert error(decode_tag, tag(name="kw", type="float32"), [1]) == (
        "tag 'kw': float32 needs 2 registers, got 1"
    )
    assert error(decode_tag, tag(name="run", table="coil"), [True, False]) == (
        "tag 'run': a coil is one bit, got 2 values"
    )
    assert error(decode_tag, tag(name="run", bit=1), [1, 2]) == (
        "tag 'run': a bit tag spans 1 register, got 2"
    )


def test_encode_tag_unscales_rounding_half_away_from_zero() -> None:
    t = tag(type="int16", scale=0.1, writable=True)
    assert encode_tag(t, 23.45) == [235]  # 23.45 / 0.1 is 234.49999999999997 in binary
    assert encode_tag(t, -23.45) == encode_registers(-235, "int16", "ABCD")
    assert encode_tag(t, 23.44) == [234]
    half = tag(type="int16", scale=0.5, writable=True)
    assert encode_tag(half, 0.25) == [1]
    assert encode_tag(half, -0.25) == [0xFFFF]
    offset = tag(type="uint16", scale=0.1, offset=-40.0, writable=True)
    assert encode_tag(offset, 25.0) == [650]
    assert decode_tag(offset, [650]) == pytest.approx(25.0)
    assert encode_tag(tag(type="float32", scale=10.0, writable=True), 1234.56) == (
        encode_registers(123.456, "float32", "ABCD")
    )


@given(st.data())
def test_scaled_values_round_trip_through_decode_and_encode(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(["int16", "uint16", "int32", "uint32"]))
    scale = data.draw(st.sampled_from([0.1, 0.01, 0.001, 0.5, 2.0, 10.0, -1.0, 0.3]))
    offset = data.draw(st.sampled_from([0.0, -40.0, 273.15, 1000.5]))
    order = data.draw(st.sampled_from(ORDERS))
    t = tag(type=dtype, scale=scale, offset=offset, order=order, writable=True)
    lo, hi = type_spec(dtype).int_range
    regs = encode_registers(data.draw(st.integers(lo, hi)), dtype, order)
    assert encode_tag(t, decode_tag(t, regs)) == regs


def test_int64_without_scaling_is_exact() -> None:
    t = tag(type="int64", writable=True)
    assert decode_tag(t, encode_tag(t, 2**62 + 1)) == 2**62 + 1


@pytest.mark.parametrize(
    ("kw", "value", "message"),
    [
        ({"scale": 0.1}, 7000, "tag 't': 7000 is out of range 0..6553.5 (uint16 with scale 0.1)"),
        ({"scale": 0.1}, -1, "tag 't': -1 is out of range 0..6553.5 (uint16 with scale 0.1)"),
        (
            {"type": "int16", "scale": 0.1, "offset": -40.0},
            4000,
            "tag 't': 4000 is out of range -3316.8..3236.7 (int16 with scale 0.1, offset -40)",
        ),
        ({}, 70000, "tag 't': 70000 is out of range for uint16 (0..65535)"),
        ({"min": 0.0, "max": 100.0}, 100.5, "tag 't': 100.5 is out of range 0..100 (min..max)"),
        ({"min": 0.0, "max": 100.0}, -1, "tag 't': -1 is out of range 0..100 (min..max)"),
        ({"min": 10.0}, 5, "tag 't': 5 is below min 10"),
        ({"max": 10.0}, 11, "tag 't': 11 is above max 10"),
        ({"type": "float32"}, math.inf, "tag 't': inf is not a finite number"),
        ({"type": "float32"}, 1e39, "tag 't': 1e+39 is out of range for float32 (±3.4028235e+38)"),
        ({"type": "float64", "scale": 1e-300}, 1e300, "tag 't': 1e+300 overflows when unscaled"),
        ({}, True, "tag 't': uint16 needs a number, got bool True"),
        ({}, "12", "tag 't': uint16 needs a number, got str '12'"),
        ({"type": "bool"}, 2, "tag 't': bool needs true or false, got int 2"),
        ({"type": "string(4)"}, "ABCDE", "tag 't': string(4): 'ABCDE' is 5 bytes, more than 4"),
    ],
)
def test_out_of_range_writes_are_refused_naming_the_range(
    kw: dict[str, Any], value: Any, message: str
) -> None:
    assert error(encode_tag, tag(writable=True, **kw), value) == message


def test_min_max_at_the_limits_are_accepted() -> None:
    t = tag(min=0.0, max=100.0, writable=True)
    assert encode_tag(t, 0) == [0]
    assert encode_tag(t, 100) == [100]
    assert encode_tag(tag(scale=0.1, writable=True), 6553.5) == [65535]


def test_encode_tag_for_coils_bools_strings_and_read_only_tables() -> None:
    assert encode_tag(tag(table="coil", writable=True), True) == [True]
    assert encode_tag(tag(table="coil", writable=True), 0) == [False]
    assert (
        error(encode_tag, tag(table="coil"), 2) == "tag 't': a coil needs true or false, got int 2"
    )
    assert encode_tag(tag(type="bool", writable=True), True) == [1]
    assert encode_tag(tag(type="bool", writable=True), False) == [0]
    assert encode_tag(tag(type="string(3)", order="BADC", writable=True), "ABC") == [0x4241, 0x0043]
    assert error(encode_tag, tag(table="input"), 1) == "tag 't': input tables are read-only"
    assert (
        error(encode_tag, tag(table="discrete"), True) == "tag 't': discrete tables are read-only"
    )


def test_bit_writes_change_only_their_bit() -> None:
    t = tag(bit=3, writable=True)
    assert encode_bit(t, 0xF000, True) == 0xF008
    assert encode_bit(t, 0xFFFF, False) == 0xFFF7
    assert encode_tag(t, True, current=0x0001) == [0x0009]
    swapped = tag(bit=3, order="BADC", writable=True)
    assert encode_bit(swapped, 0x0000, True) == 0x0800  # bit 3 of the value is in the low byte
    assert decode_tag(swapped, [encode_bit(swapped, 0x1234, True)]) is True
    assert error(encode_tag, t, True) == (
        "tag 't': a bit write needs the register's current value (current=...)"
    )
    assert error(encode_bit, tag(), 0, True) == "tag 't': not a bit tag"
    assert error(encode_bit, t, 0, 5) == "tag 't': a bit needs true or false, got int 5"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("on", [True, False])
def test_bit_masks_do_what_fc22_does_to_the_register(order: str, on: bool) -> None:
    t = tag(bit=5, order=order, writable=True)
    and_mask, or_mask = bit_masks(t, on)
    for current in (0x0000, 0xFFFF, 0x1234):
        # FC22 on the device: (current AND and_mask) OR (or_mask AND NOT and_mask)
        result = (current & and_mask) | (or_mask & ~and_mask & 0xFFFF)
        assert result == encode_bit(t, current, on)
        assert decode_tag(t, [result]) is on


# --- the probe -------------------------------------------------------------------------------


def test_all_decodings_lists_every_type_and_order_that_fits() -> None:
    rows = all_decodings([0x42F6, 0xE979])
    # offset 0: int16, uint16 (1 register) and int32, uint32, float32 (2); offset 1: the 16-bit ones
    assert len(rows) == 4 * (5 + 2) + 2
    by_key = {(r["offset"], r["type"], r["order"]): r for r in rows}
    assert by_key[0, "float32", "ABCD"]["value"] == 123.456
    assert by_key[0, "float32", "ABCD"]["hex"] == "42F6 E979"
    assert by_key[0, "uint16", "BADC"]["value"] == 0xF642
    assert by_key[1, "uint16", "ABCD"]["value"] == 0xE979
    assert by_key[0, "int32", "DCBA"]["value"] == struct.unpack("<i", bytes.fromhex("42F6E979"))[0]
    swapped = all_decodings(FLOAT32_123_456["CDAB"])
    assert {(r["type"], r["order"]) for r in swapped if r["value"] == 123.456} == {
        ("float32", "CDAB")
    }
    assert (0, "float64", "ABCD") not in by_key  # needs 4 registers


def test_all_decodings_shows_ascii_both_ways() -> None:
    rows = all_decodings([0x4142, 0x4300, 0x0A7E])
    ascii_rows = [r for r in rows if r["type"] == "ascii"]
    assert ascii_rows == [
        {"offset": 0, "type": "ascii", "order": "ABCD", "value": "ABC..~", "hex": "4142 4300 0A7E"},
        {"offset": 0, "type": "ascii", "order": "BADC", "value": "BA.C~.", "hex": "4142 4300 0A7E"},
    ]
    assert any(r["type"] == "float64" for r in all_decodings([0] * 4))
    assert all_decodings([]) == []
    assert error(all_decodings, [1, -1]) == "register value -1 is not 0..65535"
