"""Modbus register codec: every supported type in the four byte/word orders (ABCD, CDAB, BADC,
DCBA; A = most significant byte), with one code path for reads and writes. On top of it, the tag
layer applies bits, scale/offset and the range checks of writes (docs/modbus.md §3, §5).
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from gateway.errors import BadData
from gateway.model import Value

if TYPE_CHECKING:
    # Only for annotations: config imports this module to validate `type`.
    from retrofit_adapters.modbus.config import ModbusTag

__all__ = [
    "MAX_STRING_BYTES",
    "MAX_WRITE_REGISTERS",
    "NUMERIC_TYPES",
    "ORDERS",
    "TYPE_NAMES",
    "CodecError",
    "TypeSpec",
    "all_decodings",
    "bit_masks",
    "decode_registers",
    "decode_tag",
    "encode_bit",
    "encode_registers",
    "encode_tag",
    "register_count",
    "type_spec",
]

Kind = Literal["bool", "int", "uint", "float", "string"]

ORDERS: tuple[str, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
_WORD_SWAP = frozenset({"CDAB", "DCBA"})
_BYTE_SWAP = frozenset({"BADC", "DCBA"})

# (kind, bytes, struct code); ordered by width, as the probe lists them
_FIXED: dict[str, tuple[Kind, int, str]] = {
    "bool": ("bool", 2, ""),
    "int16": ("int", 2, "h"),
    "uint16": ("uint", 2, "H"),
    "int32": ("int", 4, "i"),
    "uint32": ("uint", 4, "I"),
    "float32": ("float", 4, "f"),
    "int64": ("int", 8, "q"),
    "uint64": ("uint", 8, "Q"),
    "float64": ("float", 8, "d"),
}
NUMERIC_TYPES: tuple[str, ...] = tuple(t for t in _FIXED if t != "bool")
TYPE_NAMES: tuple[str, ...] = (
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string(N)",
)
STRING_RE = re.compile(r"string\(([0-9]{1,4})\)")  # use with fullmatch
MAX_STRING_BYTES = 250  # 125 registers, the most one read request (FC3/FC4) returns
MAX_WRITE_REGISTERS = 123  # the most one FC16 request may carry
_FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


class CodecError(BadData):
    """A value can't be encoded or decoded: out of its type's range, a bad string, wrong length."""


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """A parsed `type`: "float32" -> kind float, 4 bytes, struct code "f"."""

    name: str
    kind: Kind
    nbytes: int  # N for string(N); 2 for bool (it takes a whole register)
    code: str  # struct format code; "" for bool and string

    @property
    def registers(self) -> int:
        return (self.nbytes + 1) // 2

    @property
    def int_range(self) -> tuple[int, int]:
        bits = self.nbytes * 8
        if self.kind == "int":
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1


@lru_cache(maxsize=256)
def type_spec(dtype: str) -> TypeSpec:
    """Parse a type name; CodecError if it is not one of TYPE_NAMES."""
    fixed = _FIXED.get(dtype)
    if fixed is not None:
        return TypeSpec(dtype, *fixed)
    m = STRING_RE.fullmatch(dtype)
    if m is None:
        raise CodecError(f"unknown type {dtype!r}; must be one of {', '.join(TYPE_NAMES)}")
    n = int(m[1])
    if not 1 <= n <= MAX_STRING_BYTES:
        raise CodecError(f"{dtype}: string length must be 1..{MAX_STRING_BYTES} bytes")
    return TypeSpec(dtype, "string", n, "")


def register_count(dtype: str) -> int:
    """Registers a value of `dtype` spans: "float32" -> 2, "string(9)" -> 5, "bool" -> 1."""
    return type_spec(dtype).registers


# --- raw values <-> registers ------------------------------------------------------------------


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise CodecError(f"unknown order {order!r}; must be one of {', '.join(ORDERS)}")


def _check_registers(regs: Sequence[int], spec: TypeSpec) -> None:
    if len(regs) != spec.registers:
        raise CodecError(f"{spec.name} needs {spec.registers} registers, got {len(regs)}")
    for r in regs:
        # bool is an int to Python but never a register value
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 0xFFFF:
            raise CodecError(f"register value {r!r} is not 0..65535")


def _unpack(regs: Sequence[int], order: str) -> bytes:
    """Registers as read -> the value's bytes, most significant (A) first."""
    words = [r.to_bytes(2, "big") for r in regs]
    if order in _WORD_SWAP:
        words.reverse()
    if order in _BYTE_SWAP:
        words = [w[::-1] for w in words]
    return b"".join(words)


def _pack(data: bytes, order: str) -> list[int]:
    """The value's bytes, A first -> registers to send; the exact inverse of _unpack."""
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if order in _BYTE_SWAP:
        words = [w[::-1] for w in words]
    if order in _WORD_SWAP:
        words.reverse()
    return [int.from_bytes(w, "big") for w in words]


def _string_bytes(regs: Sequence[int], order: str) -> bytes:
    # Strings keep their registers in address order; only the bytes inside a register swap.
    swap = order in _BYTE_SWAP
    return b"".join(r.to_bytes(2, "little" if swap else "big") for r in regs)


def _float32_from_bits(data: bytes) -> float:
    bits = int.from_bytes(data, "big")
    if bits & 0x7F800000 == 0x7F800000 and bits & 0x007FFFFF:
        # A NaN: widen it by hand, since the C conversion would quieten a signaling NaN.
        sign, payload = bits >> 31, bits & 0x007FFFFF
        wide = (sign << 63) | (0x7FF << 52) | (payload << 29)
        f: float = struct.unpack(">d", wide.to_bytes(8, "big"))[0]
        return f
    value: float = struct.unpack(">f", data)[0]
    if math.isinf(value) or value == 0.0:
        return value
    # The shortest decimal that maps back to the same float32: 123.456, not 123.45600128173828.
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        # near float32's maximum a short decimal may round up past it
        with contextlib.suppress(OverflowError):
            if struct.pack(">f", short) == data:
                return short
    return value


def _float32_to_bits(value: float) -> bytes:
    if math.isnan(value):
        wide = int.from_bytes(struct.pack(">d", value), "big")
        sign, payload = wide >> 63, (wide >> 29) & 0x007FFFFF
        # A double NaN whose payload sits only in the low bits would narrow to inf; keep it a NaN.
        return ((sign << 31) | 0x7F800000 | (payload or 0x00400000)).to_bytes(4, "big")
    try:
        return struct.pack(">f", value)
    except OverflowError:
        raise CodecError(
            f"{_num(value)} is out of range for float32 (±{_FLOAT32_MAX:.8g})"
        ) from None


def decode_registers(regs: Sequence[int], dtype: str, order: str) -> int | float | str:
    """The raw (unscaled) value of registers as read from the device.

    bool: True when the register is not 0. float32: the shortest decimal that is the same float32;
    NaN payloads and infinities are kept bit-exact. string(N): ASCII, cut at the first NUL,
    trailing spaces stripped; bytes outside ASCII become U+FFFD.
    """
    spec = type_spec(dtype)
    _check_order(order)
    _check_registers(regs, spec)
    if spec.kind == "bool":
        return regs[0] != 0
    if spec.kind == "string":
        raw = _string_bytes(regs, order)[: spec.nbytes]
        raw = raw.split(b"\0", 1)[0].rstrip(b" ")
        return raw.decode("ascii", errors="replace")
    data = _unpack(regs, order)
    if dtype == "float32":
        return _float32_from_bits(data)
    value: int | float = struct.unpack(">" + spec.code, data)[0]
    return value


def encode_registers(value: int | float | str, dtype: str, order: str) -> list[int]:
    """Registers to write for a raw value; the exact inverse of decode_registers.

    Integers must be whole numbers within the type's range, floats within float32's range
    (NaN and ±inf are encoded as such), strings ASCII without NUL and at most N bytes (padded
    with NUL). Anything else raises CodecError.
    """
    spec = type_spec(dtype)
    _check_order(order)
    if spec.kind == "bool":
        return [1 if _as_bool(value, dtype) else 0]
    if spec.kind == "string":
        return _encode_string(value, spec, order)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{dtype} needs a number, got {_describe(value)}")
    if spec.kind == "float":
        try:
            f = float(value)
        except OverflowError:  # an int beyond any double
            raise CodecError(f"{value} is out of range for {dtype}") from None
        if dtype == "float32":
            return _pack(_float32_to_bits(f), order)
        return _pack(struct.pack(">d", f), order)
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and inf
            raise CodecError(f"{dtype} needs a whole number, got {_num(value)}")
        value = int(value)
    lo, hi = spec.int_range
    if not lo <= value <= hi:
        raise CodecError(f"{value} is out of range for {dtype} ({lo}..{hi})")
    return _pack(struct.pack(">" + spec.code, value), order)


def _encode_string(value: object, spec: TypeSpec, order: str) -> list[int]:
    if not isinstance(value, str):
        raise CodecError(f"{spec.name} needs a string, got {_describe(value)}")
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise CodecError(f"{spec.name}: {value!r} is not ASCII") from None
    if b"\0" in raw:
        raise CodecError(f"{spec.name}: {value!r} contains NUL, which ends a string on read")
    if len(raw) > spec.nbytes:
        raise CodecError(f"{spec.name}: {value!r} is {len(raw)} bytes, more than {spec.nbytes}")
    raw = raw.ljust(spec.registers * 2, b"\0")
    swap = order in _BYTE_SWAP
    return [
        int.from_bytes(raw[i : i + 2], "little" if swap else "big") for i in range(0, len(raw), 2)
    ]


def _as_bool(value: object, what: str) -> bool:
    # 0 and 1 are accepted since many writers (and JSON clients) send them for flags
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CodecError(f"{what} needs true or false, got {_describe(value)}")


# --- tags ----------------------------------------------------------------------------------


def _is_bit_table(tag: ModbusTag) -> bool:
    return tag.table in ("coil", "discrete")


def _has_scaling(tag: ModbusTag) -> bool:
    return tag.scale != 1.0 or tag.offset != 0.0


def decode_tag(tag: ModbusTag, words: Sequence[int] | Sequence[bool]) -> Value:
    """A tag's value from the registers (or, for coils and discrete inputs, the one bit) it spans.

    Bit tags give a bool (bit 0 is the least significant bit of the register after `order` is
    applied). Numbers are `raw * scale + offset` as a float when scale/offset are set, otherwise
    the raw int or float unchanged.
    """
    try:
        if _is_bit_table(tag):
            if len(words) != 1:
                raise CodecError(f"a {tag.table} is one bit, got {len(words)} values")
            return _as_bool(words[0], tag.table)
        regs: Sequence[int] = words
        if tag.bit is not None:
            if len(regs) != 1:
                raise CodecError(f"a bit tag spans 1 register, got {len(regs)}")
            word = decode_registers(regs, "uint16", tag.order)
            assert isinstance(word, int)
            return bool(word >> tag.bit & 1)
        raw = decode_registers(regs, tag.type, tag.order)
    except CodecError as exc:
        raise CodecError(f"tag {tag.name!r}: {exc}") from None
    if isinstance(raw, bool | str) or not _has_scaling(tag):
        return raw
    return raw * tag.scale + tag.offset


def encode_tag(
    tag: ModbusTag, value: Value, *, current: int | None = None
) -> list[int] | list[bool]:
    """What to write for an engineering value; the inverse of decode_tag.

    Numbers are checked against `min`/`max`, unscaled (`(value - offset) / scale`, rounded half
    away from zero for integer types) and checked against the raw type's range; the message
    names the range in engineering units. A bit tag needs the register's `current` raw value
    (a read-modify-write; see encode_bit and bit_masks). Coils give `[bool]`.
    """
    try:
        return _encode_tag(tag, value, current)
    except CodecError as exc:
        raise CodecError(f"tag {tag.name!r}: {exc}") from None


def _encode_tag(tag: ModbusTag, value: Value, current: int | None) -> list[int] | list[bool]:
    if tag.table in ("input", "discrete"):
        raise CodecError(f"{tag.table} tables are read-only")
    if tag.table == "coil":
        return [_as_bool(value, "a coil")]
    if tag.bit is not None:
        if current is None:
            raise CodecError("a bit write needs the register's current value (current=...)")
        return [_encode_bit(tag, current, value)]
    spec = type_spec(tag.type)
    if spec.kind in ("bool", "string"):
        return encode_registers(value, tag.type, tag.order)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{tag.type} needs a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise CodecError(f"{_num(value)} is not a finite number")
    lo, hi = tag.min, tag.max
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            raise CodecError(f"{_num(value)} is out of range {_num(lo)}..{_num(hi)} (min..max)")
        side = f"below min {_num(lo)}" if lo is not None else f"above max {_num(hi or 0)}"
        raise CodecError(f"{_num(value)} is {side}")
    raw = _unscale(tag, spec, value)
    try:
        return encode_registers(raw, tag.type, tag.order)
    except CodecError:
        if not _has_scaling(tag):
            raise
        lo_e, hi_e = _engineering_range(tag, spec)
        how = f"{tag.type} with scale {_num(tag.scale)}"
        if tag.offset:
            how += f", offset {_num(tag.offset)}"
        raise CodecError(f"{_num(value)} is out of range {lo_e}..{hi_e} ({how})") from None


def _unscale(tag: ModbusTag, spec: TypeSpec, value: int | float) -> int | float:
    if not _has_scaling(tag):
        return value  # an int stays exact, even beyond 2**53
    raw = (value - tag.offset) / tag.scale
    if not math.isfinite(raw):  # a tiny scale can overflow a finite value
        raise CodecError(f"{_num(value)} overflows when unscaled")
    if spec.kind == "float":
        return raw
    # 12 significant digits first: 23.45 / 0.1 is 234.49999999999997 and must give 235.
    raw = float(f"{raw:.12g}")
    return int(math.copysign(math.floor(abs(raw) + 0.5), raw))


def _engineering_range(tag: ModbusTag, spec: TypeSpec) -> tuple[str, str]:
    if spec.kind == "float":
        raw_lo, raw_hi = (
            (-_FLOAT32_MAX, _FLOAT32_MAX) if spec.nbytes == 4 else (-math.inf, math.inf)
        )
    else:
        raw_lo, raw_hi = spec.int_range
    ends = sorted((raw_lo * tag.scale + tag.offset, raw_hi * tag.scale + tag.offset))
    return _num(ends[0]), _num(ends[1])


def encode_bit(tag: ModbusTag, current_register: int, value: Value) -> int:
    """The register to write so that `tag.bit` becomes `value` and every other bit stays as in
    `current_register` (the raw register as read). Not atomic: the device may change other bits
    between the read and the write; use bit_masks with FC22 (mask write) where supported.
    """
    try:
        return _encode_bit(tag, current_register, value)
    except CodecError as exc:
        raise CodecError(f"tag {tag.name!r}: {exc}") from None


def _encode_bit(tag: ModbusTag, current_register: int, value: Value) -> int:
    if tag.bit is None:
        raise CodecError("not a bit tag")
    on = _as_bool(value, "a bit")
    word = decode_registers([current_register], "uint16", tag.order)
    assert isinstance(word, int)
    word = word | (1 << tag.bit) if on else word & ~(1 << tag.bit)
    return encode_registers(word, "uint16", tag.order)[0]


def bit_masks(tag: ModbusTag, value: Value) -> tuple[int, int]:
    """(and_mask, or_mask) of a Modbus FC22 mask write that sets `tag.bit` to `value` atomically.

    The device computes (current AND and_mask) OR (or_mask AND NOT and_mask) on the register as
    it stores it, so for byte-swapped orders the bit moves to the other byte.
    """
    if tag.bit is None:
        raise CodecError(f"tag {tag.name!r}: not a bit tag")
    on = _as_bool(value, f"tag {tag.name!r}")
    wire_bit = tag.bit ^ 8 if tag.order in _BYTE_SWAP else tag.bit
    mask = 1 << wire_bit
    return 0xFFFF & ~mask, mask if on else 0


# --- probe ---------------------------------------------------------------------------------


def all_decodings(regs: Sequence[int]) -> list[dict[str, Any]]:
    """Every reading of a block of registers, for `fogmesh modbus probe`.

    One row per offset, numeric type (int16 ... float64, by width) and order (all four, even for
    16-bit types where CDAB equals ABCD and DCBA equals BADC), where the type fits from that
    offset: {"offset", "type", "order", "value", "hex"} with "hex" the registers used. Then two
    rows of type "ascii" for the whole block, high byte first (order ABCD) and low byte first
    (order BADC), with non-printable bytes shown as ".".
    """
    for r in regs:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 0xFFFF:
            raise CodecError(f"register value {r!r} is not 0..65535")
    rows: list[dict[str, Any]] = []
    for offset in range(len(regs)):
        for dtype in NUMERIC_TYPES:
            n = register_count(dtype)
            if offset + n > len(regs):
                continue
            chunk = list(regs[offset : offset + n])
            hex_ = " ".join(f"{r:04X}" for r in chunk)
            for order in ORDERS:
                value = decode_registers(chunk, dtype, order)
                rows.append(
                    {"offset": offset, "type": dtype, "order": order, "value": value, "hex": hex_}
                )
    if regs:
        hex_ = " ".join(f"{r:04X}" for r in regs)
        for order in ("ABCD", "BADC"):
            text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in _string_bytes(regs, order))
            rows.append({"offset": 0, "type": "ascii", "order": order, "value": text, "hex": hex_})
    return rows


# --- messages ------------------------------------------------------------------------------


def _num(v: float) -> str:
    """A number as a person writes it: 100 not 100.0, 6553.5 not 6553.500000000001."""
    if isinstance(v, int):
        return str(v)
    if math.isfinite(v) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.10g}"


def _describe(v: object) -> str:
    return f"{type(v).__name__} {v!r}"
