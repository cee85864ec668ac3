"""The virtual PLC's published Modbus register map and the struct-based codec behind it.

This module is the oracle the Modbus adapter is tested against, so it encodes with `struct`
on its own and imports nothing from the gateway's codec. docs/virtual-plc.md publishes the
same map the way a vendor manual would; a test keeps the two in agreement.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

from gateway.errors import FogmeshError

__all__ = [
    "METER_POINTS",
    "METER_UNIT",
    "PUMP_POINTS",
    "Point",
    "VirtualPlcError",
    "WordOrder",
    "decode",
    "encode",
    "point_by_name",
]


class VirtualPlcError(FogmeshError):
    """The virtual PLC could not start or serve (a port in use, a missing certificate...)."""


Table = Literal["input", "holding", "coil", "discrete"]
DType = Literal["uint16", "int16", "uint32", "int32", "float32", "float64", "string", "bool"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
PlainValue = float | int | bool | str

METER_UNIT = 10  # the energy meter's unit id; pumps are units 1..N

_STRUCT: dict[str, str] = {
    "uint16": "H",
    "int16": "h",
    "uint32": "I",
    "int32": "i",
    "float32": "f",
    "float64": "d",
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}


@dataclass(frozen=True, slots=True)
class Point:
    """One published value: where it lives, how it is encoded, and whether it may be written.

    Integer types carry `scale`: the register holds round(value × scale), saturated to the
    type's range. `low`/`high` bound what a write may set.
    """

    name: str
    table: Table
    address: int
    dtype: DType
    order: WordOrder = "ABCD"
    scale: float = 1.0
    unit: str = ""
    writable: bool = False
    low: float | None = None
    high: float | None = None
    chars: int = 0  # string length in characters (2 per register)
    text: str = ""

    @property
    def count(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the point occupies."""
        if self.dtype == "bool":
            return 1
        if self.dtype == "string":
            return (self.chars + 1) // 2
        return struct.calcsize(_STRUCT[self.dtype]) // 2


def _words(data: bytes, order: WordOrder) -> list[int]:
    """Big-endian bytes of a value (A = most significant) → registers in the given order."""
    regs = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    if order in ("BADC", "DCBA"):
        regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
    if order in ("CDAB", "DCBA"):
        regs.reverse()
    return regs


def _bytes(regs: list[int], order: WordOrder) -> bytes:
    """The inverse of _words: registers in the given order → big-endian bytes of the value."""
    regs = list(regs)
    if order in ("CDAB", "DCBA"):
        regs.reverse()
    if order in ("BADC", "DCBA"):
        regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
    return b"".join(r.to_bytes(2, "big") for r in regs)


def encode(point: Point, value: PlainValue) -> list[int]:
    """The registers that publish `value` at `point` (for a bool point: [0] or [1])."""
    dt = point.dtype
    if dt == "bool":
        return [1 if value else 0]
    if dt == "string":
        raw = str(value).encode("ascii", "replace")[: point.chars].ljust(point.chars, b"\0")
        if len(raw) % 2:
            raw += b"\0"
        return _words(raw, "ABCD")
    fmt = _STRUCT[dt]
    if dt.startswith("float"):
        data = struct.pack(">" + fmt, float(value))
    else:
        lo, hi = _INT_RANGE[dt]
        x = float(value) * point.scale
        n = 0 if math.isnan(x) else lo if x <= lo else hi if x >= hi else round(x)
        data = struct.pack(">" + fmt, n)
    return _words(data, point.order)


def decode(point: Point, regs: list[int]) -> PlainValue:
    """The value that `regs` (as read from the wire) hold for `point`."""
    dt = point.dtype
    if dt == "bool":
        return bool(regs[0])
    if dt == "string":
        return _bytes(regs, "ABCD").rstrip(b"\0").decode("ascii", "replace")
    raw: float | int = struct.unpack(">" + _STRUCT[dt], _bytes(regs, point.order))[0]
    if dt.startswith("float"):
        return float(raw)
    if point.scale != 1.0:
        return raw / point.scale
    return int(raw)


# One pump (units 1..N). Encodings are mixed on purpose, as on real devices.
PUMP_POINTS: tuple[Point, ...] = (
    Point("flow_m3h", "input", 0, "float32", "CDAB", unit="m3/h", text="flow"),
    Point("pressure_bar", "input", 2, "float32", "ABCD", unit="bar", text="discharge pressure"),
    Point("temperature_c", "input", 4, "int16", scale=10, unit="degC", text="bearing temperature"),
    Point("vibration_mm_s", "input", 5, "uint16", scale=100, unit="mm/s", text="vibration velocity (RMS)"),
    Point("run_hours", "input", 6, "uint32", "ABCD", unit="h", text="running-hours counter"),
    Point("status", "input", 8, "uint16", text="status word: bit 0 running, bit 1 fault"),
    Point("reserved_9", "input", 9, "uint16", text="reserved, reads 0"),
    Point("total_volume_m3", "input", 10, "float64", "DCBA", unit="m3", text="pumped volume, totalised"),
    Point(
        "setpoint_m3h", "holding", 0, "float32", "CDAB", unit="m3/h", writable=True,
        low=0.0, high=60.0, text="flow setpoint",
    ),
    Point("device_name", "holding", 100, "string", chars=16, text="device name, ASCII, NUL-padded"),
    Point("run_command", "coil", 0, "bool", writable=True, text="run command: 1 run, 0 stop"),
    Point("running", "discrete", 0, "bool", text="running (= status bit 0)"),
    Point("fault", "discrete", 1, "bool", text="fault (= status bit 1)"),
)  # fmt: skip

# The plant's energy meter (unit 10): every value float32, low word first (CDAB).
METER_POINTS: tuple[Point, ...] = (
    Point("voltage_v", "input", 0, "float32", "CDAB", unit="V", text="phase-to-neutral voltage, average of L1-L3"),
    Point("current_a", "input", 2, "float32", "CDAB", unit="A", text="phase current, average of L1-L3"),
    Point("power_kw", "input", 4, "float32", "CDAB", unit="kW", text="total active power"),
    Point("power_factor", "input", 6, "float32", "CDAB", text="total power factor"),
    Point("frequency_hz", "input", 8, "float32", "CDAB", unit="Hz", text="line frequency"),
    Point("energy_kwh", "input", 10, "float32", "CDAB", unit="kWh", text="active energy import, totalised"),
    Point("device_name", "holding", 100, "string", chars=16, text="device name, ASCII, NUL-padded"),
)  # fmt: skip

STATUS_RUNNING = 0x0001
STATUS_FAULT = 0x0002


def point_by_name(points: tuple[Point, ...], name: str) -> Point:
    for p in points:
        if p.name == name:
            return p
    raise KeyError(name)
