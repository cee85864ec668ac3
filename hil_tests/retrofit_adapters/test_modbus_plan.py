"""The read planner: neighbouring tags share requests within the device's limits, every tag is
read exactly once, and the plan is the same every time."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrofit_adapters.modbus.codec import CodecError, decode_tag, encode_registers
from retrofit_adapters.modbus.config import ModbusLimits, ModbusTag
from retrofit_adapters.modbus.plan import ReadRequest, plan_reads

DEFAULT = ModbusLimits()


def tag(name: str, address: int | str, **kw: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": name, "address": address, **kw})


def spans(plan: list[ReadRequest]) -> list[tuple[str, int, int]]:
    return [(r.table, r.start, r.count) for r in plan]


def members(request: ReadRequest) -> list[tuple[str, int]]:
    return [(t.name, i) for t, i in request.tags]


def test_neighbours_share_one_request() -> None:
    tags = [
        tag("a", 0),
        tag("b", 1, type="float32"),
        tag("c", 3, type="float64"),
        tag("d", 7, type="string(3)"),
    ]
    (request,) = plan_reads(tags, 0, DEFAULT)
    assert (request.table, request.start, request.count, request.end) == ("holding", 0, 9, 9)
    assert members(request) == [("a", 0), ("b", 1), ("c", 3), ("d", 7)]


def test_gaps_up_to_max_gap_are_read_through() -> None:
    limits = ModbusLimits(max_gap=4)
    assert spans(plan_reads([tag("a", 0), tag("b", 5)], 0, limits)) == [("holding", 0, 6)]
    assert spans(plan_reads([tag("a", 0), tag("b", 6)], 0, limits)) == [
        ("holding", 0, 1),
        ("holding", 6, 1),
    ]
    # max_gap = 0 still merges registers that touch
    none = ModbusLimits(max_gap=0)
    assert spans(plan_reads([tag("a", 0), tag("b", 1), tag("c", 3)], 0, none)) == [
        ("holding", 0, 2),
        ("holding", 3, 1),
    ]


def test_requests_stop_at_max_registers() -> None:
    tags = [tag(f"t{i}", i) for i in range(300)]
    assert spans(plan_reads(tags, 0, DEFAULT)) == [
        ("holding", 0, 125),
        ("holding", 125, 125),
        ("holding", 250, 50),
    ]
    small = ModbusLimits(max_registers=4)
    two_floats = [tag("a", 0, type="float32"), tag("b", 2, type="float32")]
    assert spans(plan_reads(two_floats, 0, small)) == [("holding", 0, 4)]
    # a float32 that would straddle the limit starts the next request whole
    assert spans(plan_reads([tag("a", 0), tag("b", 1), tag("c", 3, type="float32")], 0, small)) == [
        ("holding", 0, 2),
        ("holding", 3, 2),
    ]


def test_bits_use_max_bits() -> None:
    coils = [tag(f"c{i}", i, table="coil") for i in range(2500)]
    assert spans(plan_reads(coils, 0, DEFAULT)) == [("coil", 0, 2000), ("coil", 2000, 500)]
    limits = ModbusLimits(max_bits=8, max_gap=0)
    assert spans(plan_reads(coils[:20], 0, limits)) == [
        ("coil", 0, 8),
        ("coil", 8, 8),
        ("coil", 16, 4),
    ]


def test_tables_are_planned_apart_in_a_fixed_order() -> None:
    tags = [
        tag("d", "10001"),
        tag("c", "00001"),
        tag("i", "30001"),
        tag("h", "40001"),
        tag("h2", 1),
    ]
    plan = plan_reads(tags, 0, DEFAULT)
    assert spans(plan) == [
        ("holding", 0, 2),
        ("input", 0, 1),
        ("coil", 0, 1),
        ("discrete", 0, 1),
    ]
    assert members(plan[0]) == [("h", 0), ("h2", 1)]


def test_addressing_base_applies_to_integer_addresses_only() -> None:
    tags = [tag("a", 1), tag("b", "40002")]  # both are protocol address... 0 and 1
    (request,) = plan_reads(tags, 1, DEFAULT)
    assert (request.start, members(request)) == (0, [("a", 0), ("b", 1)])
    (request,) = plan_reads([tag("a", 1)], 0, DEFAULT)
    assert request.start == 1


def test_overlapping_tags_share_the_read() -> None:
    word = tag("status", 10)
    running = tag("running", 10, bit=0)
    fault = tag("fault", 10, bit=7)
    total = tag("total", 9, type="uint32")  # registers 9..10, overlapping the status word
    (request,) = plan_reads([running, word, fault, total], 0, DEFAULT)
    assert (request.start, request.count) == (9, 2)
    assert members(request) == [("total", 0), ("running", 1), ("status", 1), ("fault", 1)]


def test_longest_tag_first_at_one_address() -> None:
    # The float at 120 does not fit after 0..119; it starts the next request and the bit tag at
    # the same address goes with it, rather than ending the first request.
    tags = [tag("a", 0, type="string(240)"), tag("bit", 120, bit=1), tag("f", 120, type="float32")]
    plan = plan_reads(tags, 0, ModbusLimits(max_registers=121))
    assert spans(plan) == [("holding", 0, 120), ("holding", 120, 2)]
    assert members(plan[1]) == [("f", 0), ("bit", 0)]


def test_the_plan_is_deterministic() -> None:
    tags = [tag(f"t{i}", (i * 37) % 400, type="float32") for i in range(60)]
    first = plan_reads(tags, 0, DEFAULT)
    assert plan_reads(tags, 0, DEFAULT) == first
    assert spans(plan_reads(list(reversed(tags)), 0, DEFAULT)) == spans(first)


def test_tags_that_cannot_be_read_are_refused() -> None:
    with pytest.raises(ValueError, match="'s': 125 addresses exceed the limit of 100"):
        plan_reads([tag("s", 0, type="string(250)")], 0, ModbusLimits(max_registers=100))
    with pytest.raises(ValueError, match="'z': address 0 is outside the table"):
        plan_reads([tag("z", 0)], 1, DEFAULT)
    with pytest.raises(ValueError, match="'e': address 65535 is outside the table"):
        plan_reads([tag("e", 65535, type="float32")], 0, DEFAULT)
    assert plan_reads([], 0, DEFAULT) == []


def test_decode_gives_every_tag_its_value() -> None:
    tags = [
        tag("a", 0, type="int16"),
        tag("b", 1, type="float32", order="CDAB"),
        tag("run", 3, bit=2),
        tag("word", 3),
    ]
    (request,) = plan_reads(tags, 0, DEFAULT)
    data = [
        *encode_registers(-5, "int16", "ABCD"),
        *encode_registers(123.456, "float32", "CDAB"),
        0x0004,
    ]
    assert [(t.name, v) for t, v in request.decode(data)] == [
        ("a", -5),
        ("b", 123.456),
        ("run", True),
        ("word", 4),
    ]
    with pytest.raises(CodecError, match=r"holding 0\+4: expected 4 registers, got 3"):
        request.decode(data[:3])
    with pytest.raises(CodecError, match="expected 4 registers, got 5"):
        request.decode([*data, 0])


def test_decode_accepts_coil_responses_padded_to_whole_bytes() -> None:
    (request,) = plan_reads([tag("a", "00001"), tag("b", "00003")], 0, DEFAULT)
    padded = [True, False, False] + [False] * 5
    assert [(t.name, v) for t, v in request.decode(padded)] == [("a", True), ("b", False)]
    with pytest.raises(CodecError, match="coil 0\\+3: expected 3 bits, got 2"):
        request.decode([True, False])


# --- properties ------------------------------------------------------------------------------

SIZES = {"uint16": 1, "float32": 2, "float64": 4, "string(20)": 10, "string(250)": 125}


@st.composite
def tag_sets(draw: st.DrawFn) -> tuple[list[ModbusTag], int, ModbusLimits]:
    addressing = draw(st.sampled_from([0, 1]))
    n = draw(st.integers(0, 30))
    tags: list[ModbusTag] = []
    for i in range(n):
        table = draw(st.sampled_from(["holding", "input", "coil", "discrete"]))
        bits = table in ("coil", "discrete")
        dtype = "bool" if bits else draw(st.sampled_from(list(SIZES)))
        count = 1 if bits else SIZES[dtype]
        bit = None if bits or dtype != "uint16" else draw(st.none() | st.integers(0, 15))
        # clustered near 0 and near the top of the address space, where the limits bite
        start = draw(st.integers(0, 400) | st.integers(65536 - 200, 65536 - count))
        kw: dict[str, Any] = {"table": table, "type": dtype}
        if bit is not None:
            kw["bit"] = bit
        tags.append(tag(f"t{i}", start + addressing, **kw))
    largest = max([t.register_count() for t in tags if t.table in ("holding", "input")] + [1])
    limits = ModbusLimits(
        max_registers=draw(st.integers(largest, 125)),
        max_bits=draw(st.integers(1, 2000)),
        max_gap=draw(st.integers(0, 125)),
    )
    return tags, addressing, limits


@settings(max_examples=300, deadline=None)
@given(tag_sets())
def test_plan_properties(case: tuple[list[ModbusTag], int, ModbusLimits]) -> None:
    tags, addressing, limits = case
    plan = plan_reads(tags, addressing, limits)
    assert plan == plan_reads(tags, addressing, limits)

    # every tag is in exactly one request, which holds all its registers
    seen: dict[int, int] = {}
    for request in plan:
        for t, index in request.tags:
            seen[id(t)] = seen.get(id(t), 0) + 1
            assert t.table == request.table
            assert index == t.offset_address(addressing) - request.start
            assert index >= 0
            assert index + t.register_count() <= request.count
    assert sorted(seen.values()) == [1] * len(tags)
    assert len(seen) == len(tags)

    for request in plan:
        limit = limits.max_bits if request.table in ("coil", "discrete") else limits.max_registers
        assert 1 <= request.count <= limit
        assert request.start >= 0
        assert request.end <= 65536
        # no wasted edges, and no hole inside wider than max_gap
        covered = [False] * request.count
        for t, index in request.tags:
            covered[index : index + t.register_count()] = [True] * t.register_count()
        assert covered[0] and covered[-1]
        hole = longest = 0
        for c in covered:
            hole = 0 if c else hole + 1
            longest = max(longest, hole)
        assert longest <= limits.max_gap

    # greedy and sorted: no request could be merged into the one before it
    for before, after in itertools.pairwise(plan):
        if before.table != after.table:
            continue
        assert after.start >= before.start
        limit = limits.max_bits if before.table in ("coil", "discrete") else limits.max_registers
        merged = max(before.end, after.end) - before.start
        assert merged > limit or after.start - before.end > limits.max_gap


@settings(max_examples=100, deadline=None)
@given(tag_sets(), st.randoms(use_true_random=False))
def test_plan_decodes_what_reading_each_tag_alone_would(
    case: tuple[list[ModbusTag], int, ModbusLimits], rnd: Any
) -> None:
    tags, addressing, limits = case
    registers: dict[str, dict[int, int | bool]] = {
        table: {} for table in ("holding", "input", "coil", "discrete")
    }

    def memory(table: str, address: int) -> int | bool:
        cells = registers[table]
        if address not in cells:
            bits = table in ("coil", "discrete")
            cells[address] = rnd.random() < 0.5 if bits else rnd.randrange(65536)
        return cells[address]

    def read(table: str, start: int, count: int) -> list[Any]:
        return [memory(table, a) for a in range(start, start + count)]

    for request in plan_reads(tags, addressing, limits):
        data = read(request.table, request.start, request.count)
        for t, value in request.decode(data):
            alone = decode_tag(t, read(t.table, t.offset_address(addressing), t.register_count()))
            assert value == alone or (value != value and alone != alone)  # NaN equals NaN here
