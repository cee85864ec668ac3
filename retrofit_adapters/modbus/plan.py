"""The read planner: merges a device's tags into as few Modbus read requests as its limits
allow, so that a hundred tags on neighbouring registers cost one request (docs/modbus.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.model import Value
from retrofit_adapters.modbus.codec import CodecError, decode_tag
from retrofit_adapters.modbus.config import (
    ADDRESS_SPACE,
    BIT_TABLES,
    ModbusLimits,
    ModbusTag,
    Table,
)

__all__ = ["TABLES", "ReadRequest", "plan_reads"]

TABLES: tuple[Table, ...] = ("holding", "input", "coil", "discrete")  # the order of the plan


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read: `count` registers (or bits) of `table` from protocol address `start` (0-based)."""

    table: Table
    start: int
    count: int
    tags: tuple[tuple[ModbusTag, int], ...]  # (tag, index of its first register/bit in here)

    @property
    def end(self) -> int:
        """One past the last address read."""
        return self.start + self.count

    def decode(self, data: Sequence[int] | Sequence[bool]) -> list[tuple[ModbusTag, Value]]:
        """Every tag's value from this request's response, in the order of `tags`.

        Coil and discrete responses may be longer than `count` (pymodbus pads them to whole
        bytes); register responses must be exactly `count` long.
        """
        bits = self.table in BIT_TABLES
        if len(data) < self.count or (not bits and len(data) != self.count):
            unit = "bits" if bits else "registers"
            raise CodecError(
                f"{self.table} {self.start}+{self.count}: expected {self.count} {unit}, "
                f"got {len(data)}"
            )
        return [(tag, decode_tag(tag, data[i : i + tag.register_count()])) for tag, i in self.tags]


def plan_reads(
    tags: Sequence[ModbusTag], addressing: int, limits: ModbusLimits
) -> list[ReadRequest]:
    """The read requests that cover `tags`: tables in TABLES order, then by address.

    Deterministic: the same tags in the same order give the same plan. Tags sharing registers
    (a bit tag and the word it is in) share the read. ValueError if a tag lies outside the
    address space or is larger than one request may be (config validation refuses both).
    """
    spans: dict[Table, list[tuple[int, int, int, ModbusTag]]] = {t: [] for t in TABLES}
    for i, tag in enumerate(tags):
        start, count = tag.offset_address(addressing), tag.register_count()
        limit = limits.max_bits if tag.table in BIT_TABLES else limits.max_registers
        if start < 0 or start + count > ADDRESS_SPACE:
            raise ValueError(f"tag {tag.name!r}: address {tag.address} is outside the table")
        if count > limit:
            raise ValueError(f"tag {tag.name!r}: {count} addresses exceed the limit of {limit}")
        spans[tag.table].append((start, count, i, tag))

    plan: list[ReadRequest] = []
    for table in TABLES:
        limit = limits.max_bits if table in BIT_TABLES else limits.max_registers
        # Longest first at one address, so that a word and a bit inside it start one request
        # together rather than leaving a short request that the long tag then overlaps.
        items = sorted(spans[table], key=lambda s: (s[0], -s[1], s[2]))
        group: list[tuple[ModbusTag, int]] = []
        first = end = 0
        for start, count, _, tag in items:
            new_end = max(end, start + count)
            if group and start - end <= limits.max_gap and new_end - first <= limit:
                group.append((tag, start))
                end = new_end
                continue
            if group:
                plan.append(_request(table, first, end, group))
            group, first, end = [(tag, start)], start, start + count
        if group:
            plan.append(_request(table, first, end, group))
    return plan


def _request(table: Table, first: int, end: int, group: list[tuple[ModbusTag, int]]) -> ReadRequest:
    return ReadRequest(table, first, end - first, tuple((tag, s - first) for tag, s in group))
