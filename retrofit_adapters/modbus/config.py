"""Config schema of Modbus TCP and RTU devices: the tag map (table, address, type, order, bit,
scaling, write limits) and the request limits, all validated before any I/O (docs/modbus.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.config.fragments import (
    DeviceBase,
    Loc,
    NonNegativeFloat,
    PositiveInt,
    Strict,
    TagBase,
    fail_at,
    int_range,
)
from retrofit_adapters.modbus.codec import (
    MAX_STRING_BYTES,
    MAX_WRITE_REGISTERS,
    STRING_RE,
    TYPE_NAMES,
    CodecError,
    type_spec,
)

__all__ = [
    "ADDRESS_SPACE",
    "BIT_TABLES",
    "READ_ONLY_TABLES",
    "TABLE_WORDS",
    "ModbusDevice",
    "ModbusLimits",
    "ModbusRtuDevice",
    "ModbusTag",
    "ModbusTcpDevice",
    "Order",
    "Table",
    "parse_classic",
    "rtu_frame_delay_ms",
]

Table = Literal["holding", "input", "coil", "discrete"]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]

ADDRESS_SPACE = 65536  # protocol addresses 0..65535 in every table
BIT_TABLES: tuple[Table, ...] = ("coil", "discrete")
READ_ONLY_TABLES: tuple[Table, ...] = ("input", "discrete")
TABLE_WORDS: dict[Table, str] = {
    "holding": "holding register",
    "input": "input register",
    "coil": "coil",
    "discrete": "discrete input",
}
# Classic (Modicon) notation: the first digit names the table, the rest counts from 1.
_CLASSIC_TABLES: dict[str, Table] = {"0": "coil", "1": "discrete", "3": "input", "4": "holding"}
_BIT_TYPES = ("uint16", "int16", "bool")  # types a `bit` may be taken from
# What people coming from PLC tools or other gateways write for our type names.
_TYPE_HINTS = {
    "float": "float32",
    "real": "float32",
    "double": "float64",
    "lreal": "float64",
    "short": "int16",
    "int": "int16",
    "word": "uint16",
    "uint": "uint16",
    "dint": "int32",
    "dword": "uint32",
    "udint": "uint32",
    "long": "int32",
    "lint": "int64",
    "ulint": "uint64",
    "boolean": "bool",
    "bit": "bool",
}

# mypy cannot use int_range() as a type; it sees the plain int.
if TYPE_CHECKING:
    Bit = int
    TcpUnit = int
    RtuUnit = int
    Port = int
    MaxRegisters = int
    MaxBits = int
    MaxGap = int
    Retries = int
else:
    Bit = int_range(0, 15)
    TcpUnit = int_range(0, 255)
    RtuUnit = int_range(1, 247)  # 0 is broadcast (no answer); 248..255 are reserved
    Port = int_range(1, 65535)
    MaxRegisters = int_range(1, 125)
    MaxBits = int_range(1, 2000)
    MaxGap = int_range(0, 125)
    Retries = int_range(0, 5)


def parse_classic(address: str) -> tuple[Table, int]:
    """Classic notation -> (table, 0-based protocol address): "40001" -> ("holding", 0),
    "300010" -> ("input", 9). ValueError with the message for the integrator otherwise.
    """
    if not (address.isascii() and address.isdigit() and len(address) in (5, 6)):
        raise ValueError(
            f"address {address} is not classic notation: write 5 or 6 digits such as "
            '"40001" or "400001", or an integer for a 0- or 1-based offset'
        )
    table = _CLASSIC_TABLES.get(address[0])
    if table is None:
        raise ValueError(
            f"address {address} is not classic notation: the first digit must be 0 (coil), "
            "1 (discrete input), 3 (input register) or 4 (holding register)"
        )
    number = int(address[1:])
    if number == 0:
        first = address[0] + "1".rjust(len(address) - 1, "0")
        raise ValueError(f"address {address} is not valid: classic notation starts at {first}")
    if number > ADDRESS_SPACE:
        raise ValueError(
            f"address {address} is out of range: 6-digit notation ends at {address[0]}65536"
        )
    return table, number - 1


def _type_message(dtype: str) -> str | None:
    """None if `dtype` is a valid type, else what to tell the integrator."""
    m = STRING_RE.fullmatch(dtype)
    if m is not None:
        if 1 <= int(m[1]) <= MAX_STRING_BYTES:
            return None
        return f"string length must be 1..{MAX_STRING_BYTES} bytes (got {m[1]})"
    try:
        type_spec(dtype)
        return None
    except CodecError:
        pass
    msg = "must be one of " + ", ".join(TYPE_NAMES)
    lower = dtype.strip().lower()
    if lower == "string":
        return msg + '; a string needs its length in bytes, e.g. "string(16)"'
    hint = lower if lower in TYPE_NAMES else _TYPE_HINTS.get(lower)
    return msg if hint is None else f'{msg}; did you mean "{hint}"?'


def _describe(v: object) -> str:
    # TOML's names for what was written, as the loader's own messages say it
    if isinstance(v, bool):
        return f"boolean {'true' if v else 'false'}"
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "table"
    return type(v).__name__


def _non_zero(v: float) -> float:
    if v == 0:
        # reads would all be `offset`, and a write could not be unscaled
        raise PydanticCustomError("scale", "must not be 0")
    return v


if TYPE_CHECKING:
    Scale = float
else:
    Scale = Annotated[float, AfterValidator(_non_zero)]


# Integers that read like classic notation (1xxxx, 3xxxx, 4xxxx, and 6-digit forms).
_LOOKS_CLASSIC = re.compile(r"^[134]\d{4,5}$")


class ModbusTag(TagBase):
    """One value on a Modbus device: where it is, how its bytes are laid out, how it is scaled."""

    table: Table = "holding"
    # int: an offset counted from the device's `addressing` base (0 or 1);
    # str: classic notation "40001"/"400001", always 1-based and implying the table
    address: int | str
    type: str = "uint16"  # bool, int16 ... float64, string(N); coils and discrete inputs: bool
    order: Order = "ABCD"
    bit: Bit | None = None  # one bit (0 = least significant) of a 16-bit register, read as bool
    scale: Scale = 1.0  # value = raw * scale + offset
    offset: float = 0.0
    writable: bool = False
    min: float | None = None  # engineering-unit limits of writes
    max: float | None = None
    period_ms: PositiveInt | None = None  # None: every poll of the device

    @model_validator(mode="before")
    @classmethod
    def _implied(cls, data: Any) -> Any:
        # Classic notation implies the table, and coils/discretes imply bool, when not written.
        if not isinstance(data, dict):
            return data
        out = dict(data)  # never change the caller's (the loader's raw TOML) dict
        address = data.get("address")
        if isinstance(address, str) and "table" not in data:
            with contextlib.suppress(ValueError):  # a bad address is reported at `address`
                out["table"] = parse_classic(address)[0]
        if (
            isinstance(address, int)
            and not isinstance(address, bool)
            and "table" not in data
            and _LOOKS_CLASSIC.match(str(address))
        ):
            # `address = 40001` (an integer) is holding offset 40001, which is rarely what the
            # register map meant; make the integrator say which.
            raise PydanticCustomError(
                "address",
                "address {address} is an integer, so it would be holding offset {address}; for "
                'classic notation write it as a string, address = "{address}", or give `table` '
                "to confirm the offset",
                {"address": address},
            )
        if out.get("table") in BIT_TABLES and "type" not in data:
            out["type"] = "bool"
        return out

    @field_validator("address", mode="wrap")
    @classmethod
    def _address(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> int | str:
        try:
            v: int | str = handler(value)
        except ValidationError:
            # One message instead of pydantic's one per member of the union.
            raise PydanticCustomError(
                "address",
                'must be an integer offset or a string in classic notation such as "40001" '
                "(got {got})",
                {"got": _describe(value)},
            ) from None
        if isinstance(v, int):
            # The device's `addressing` narrows this to 0..65535 or 1..65536.
            if not 0 <= v <= ADDRESS_SPACE:
                raise PydanticCustomError(
                    "address",
                    "address {address} is out of range: registers are 0..65535 "
                    "(1..65536 with addressing = 1)",
                    {"address": v},
                )
            return v
        try:
            implied, _ = parse_classic(v)
        except ValueError as exc:
            raise PydanticCustomError("address", "{message}", {"message": str(exc)}) from None
        table = info.data.get("table")
        if table is not None and table != implied:
            raise PydanticCustomError(
                "address",
                "address {address} is {implied} notation, but table is {table}; remove "
                "`table` (the notation implies it) or give the address as an integer offset",
                {"address": v, "implied": TABLE_WORDS[implied], "table": repr(table)},
            )
        return v

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        msg = _type_message(v)
        if msg is not None:
            raise PydanticCustomError("type", "{message}", {"message": msg})
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTag:
        problems: list[tuple[Loc, str, object]] = []
        given = self.model_fields_set
        words = TABLE_WORDS[self.table] + "s"
        bit_table = self.table in BIT_TABLES
        if bit_table:
            if self.type != "bool":
                problems.append(
                    (
                        ("type",),
                        f'{words} are single bits: type must be "bool" (got {self.type!r})',
                        self.type,
                    )
                )
            if self.bit is not None:
                problems.append(
                    (("bit",), f"{words} are single bits already; `bit` is for registers", self.bit)
                )
            if "order" in given:
                problems.append((("order",), f"`order` does not apply to {words}", self.order))
        elif self.bit is not None and self.type not in _BIT_TYPES:
            problems.append(
                (
                    ("bit",),
                    "`bit` selects a bit of a 16-bit register: type must be uint16, int16 or "
                    f"bool (got {self.type!r})",
                    self.bit,
                )
            )
        spec = type_spec(self.type)
        kind = "bool" if bit_table or self.bit is not None else spec.kind
        if kind in ("bool", "string"):
            value_is = "a bool" if kind == "bool" else "a string"
            for key in ("scale", "offset", "min", "max"):
                if key in given:
                    problems.append(
                        (
                            (key,),
                            f"`{key}` applies to numbers; this tag's value is {value_is}",
                            getattr(self, key),
                        )
                    )
        if self.writable and self.table in READ_ONLY_TABLES:
            problems.append(
                (
                    ("writable",),
                    f"{words} are read-only; only coils and holding registers can be written",
                    True,
                )
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            problems.append(
                (("min",), f"min {self.min:g} is greater than max {self.max:g}", self.min)
            )
        if self.writable and spec.kind == "string" and spec.registers > MAX_WRITE_REGISTERS:
            problems.append(
                (
                    ("type",),
                    f"a write carries at most {MAX_WRITE_REGISTERS} registers (FC16); a writable "
                    f"string can be at most string({MAX_WRITE_REGISTERS * 2})",
                    self.type,
                )
            )
        if problems:
            fail_at("ModbusTag", "modbus", problems)
        return self

    def register_count(self) -> int:
        """Registers (holding/input) or bits (coil/discrete) this tag spans."""
        if self.table in BIT_TABLES or self.bit is not None:
            return 1
        return type_spec(self.type).registers

    def offset_address(self, addressing: int) -> int:
        """The 0-based protocol address; classic notation ignores `addressing`."""
        if isinstance(self.address, str):
            return parse_classic(self.address)[1]
        return self.address - addressing

    def value_kind(self) -> Literal["bool", "int", "float", "string"]:
        """What decode_tag returns for this tag."""
        if self.table in BIT_TABLES or self.bit is not None:
            return "bool"
        kind = type_spec(self.type).kind
        if kind in ("bool", "string"):
            return kind
        if kind == "float" or self.scale != 1.0 or self.offset != 0.0:
            return "float"
        return "int"


class ModbusLimits(Strict):
    """What one device accepts per request, and how hard to try."""

    max_registers: MaxRegisters = 125  # per read request (holding/input)
    max_bits: MaxBits = 2000  # per read request (coil/discrete)
    max_gap: MaxGap = 16  # unused registers/bits a request may read to merge two neighbours
    # Silence between requests. RTU: None = 3.5 character times at the line's settings
    # (1.75 ms above 19200 baud); TCP: None = none.
    inter_frame_delay_ms: NonNegativeFloat | None = None
    retries: Retries = 1


def rtu_frame_delay_ms(baudrate: int, bytesize: int, parity: str, stopbits: int) -> float:
    """The RTU inter-frame silence t3.5: 3.5 character times, fixed at 1.75 ms above 19200 baud
    (as the Modbus serial line spec says)."""
    if baudrate > 19200:
        return 1.75
    bits = 1 + bytesize + (0 if parity == "N" else 1) + stopbits  # start, data, parity, stop
    return 3.5 * bits * 1000.0 / baudrate


def _check_tags(
    tags: list[ModbusTag], addressing: int, limits: ModbusLimits, period_ms: int
) -> list[tuple[Loc, str, object]]:
    """Checks that need the device: the addressing base, the request limits, the poll period."""
    problems: list[tuple[Loc, str, object]] = []
    for i, tag in enumerate(tags):
        start = tag.offset_address(addressing)
        count = tag.register_count()
        bit_table = tag.table in BIT_TABLES
        unit = "bits" if bit_table else "registers"
        last: int | str
        if isinstance(tag.address, int):
            first, last = addressing, ADDRESS_SPACE - 1 + addressing
            if not first <= tag.address <= last:
                problems.append(
                    (
                        ("tags", i, "address"),
                        f"address {tag.address} is out of range: with addressing = "
                        f"{addressing} addresses are {first}..{last}",
                        tag.address,
                    )
                )
                continue
        elif len(tag.address) == 6:
            last = tag.address[0] + "65536"  # as written, keeping a leading 0
        else:
            last = ""  # 5-digit notation stops at x9999, far from the end of the space
        if start + count > ADDRESS_SPACE:
            problems.append(
                (
                    ("tags", i, "address"),
                    f"address {tag.address} needs {count} {unit} ({tag.type}) and runs past "
                    f"the last address, {last}",
                    tag.address,
                )
            )
        limit = limits.max_bits if bit_table else limits.max_registers
        if count > limit:
            key = "max_bits" if bit_table else "max_registers"
            problems.append(
                (
                    ("tags", i, "type"),
                    f"{tag.type} needs {count} {unit}, more than one request may read "
                    f"(limits.{key} = {limit})",
                    tag.type,
                )
            )
        if tag.period_ms is not None and tag.period_ms % period_ms:
            problems.append(
                (
                    ("tags", i, "period_ms"),
                    f"must be a multiple of the device's period_ms ({period_ms}): the device "
                    f"is polled every {period_ms} ms",
                    tag.period_ms,
                )
            )
    return problems


def _at_least_one(v: list[ModbusTag]) -> list[ModbusTag]:
    if not v:
        raise PydanticCustomError("tags", "a Modbus device needs at least one tag")
    return v


def _check_host(v: str) -> str:
    if not v or v != v.strip() or " " in v:
        raise PydanticCustomError("host", "must be a host name or an IP address")
    if "://" in v:
        raise PydanticCustomError(
            "host", "must be a host name or an IP address, not a URL; the port goes in `port`"
        )
    if ":" in v:
        try:
            ipaddress.IPv6Address(v.strip("[]"))
        except ValueError:
            raise PydanticCustomError(
                "host", "must be a host name or an IP address; the port goes in `port`"
            ) from None
    return v


_SERIAL_URLS = ("socket", "rfc2217", "loop", "spy", "hwgrep")
_SERIAL_HELP = (
    "must be a serial device (/dev/ttyUSB0, /dev/serial/by-id/..., COM3) or a pyserial URL "
    "(socket://host:port or rfc2217://host:port for RTU over TCP)"
)


def _check_serial_port(v: str) -> str:
    if not v.strip():
        raise PydanticCustomError("port", _SERIAL_HELP)
    if "://" in v:
        parts = urlsplit(v)
        if parts.scheme not in _SERIAL_URLS:
            raise PydanticCustomError("port", _SERIAL_HELP)
        if parts.scheme in ("socket", "rfc2217"):
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or port is None:
                raise PydanticCustomError(
                    "port",
                    "{scheme}:// needs a host and a port: {scheme}://host:port",
                    {"scheme": parts.scheme},
                )
    return v


if TYPE_CHECKING:
    Host = str
    SerialPort = str
    Tags = list[ModbusTag]
else:
    Host = Annotated[str, AfterValidator(_check_host)]
    SerialPort = Annotated[str, AfterValidator(_check_serial_port)]
    Tags = Annotated[list[ModbusTag], AfterValidator(_at_least_one)]


class ModbusTcpDevice(DeviceBase):
    """A Modbus TCP server (or a TCP-to-RTU gateway, with `unit` naming the slave behind it)."""

    type: Literal["modbus_tcp"]
    host: Host
    port: Port = 502
    unit: TcpUnit = 1
    addressing: Literal[0, 1] = 0  # base of integer tag addresses
    tags: Tags
    limits: ModbusLimits = ModbusLimits()

    @model_validator(mode="after")
    def _tags_fit(self) -> ModbusTcpDevice:
        problems = _check_tags(self.tags, self.addressing, self.limits, self.period_ms)
        if problems:
            fail_at("ModbusTcpDevice", "modbus", problems)
        return self

    def frame_delay_ms(self) -> float:
        """Silence to keep between requests; 0 unless limits.inter_frame_delay_ms says so."""
        delay = self.limits.inter_frame_delay_ms
        return 0.0 if delay is None else delay


class ModbusRtuDevice(DeviceBase):
    """A Modbus RTU slave on a serial line, or behind a raw TCP serial server (socket://)."""

    type: Literal["modbus_rtu"]
    port: SerialPort
    baudrate: PositiveInt = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    unit: RtuUnit = 1
    addressing: Literal[0, 1] = 0
    tags: Tags
    limits: ModbusLimits = ModbusLimits()

    @model_validator(mode="after")
    def _tags_fit(self) -> ModbusRtuDevice:
        problems = _check_tags(self.tags, self.addressing, self.limits, self.period_ms)
        if problems:
            fail_at("ModbusRtuDevice", "modbus", problems)
        return self

    def frame_delay_ms(self) -> float:
        """Silence to keep between frames: limits.inter_frame_delay_ms, else t3.5 of the line."""
        delay = self.limits.inter_frame_delay_ms
        if delay is not None:
            return delay
        return rtu_frame_delay_ms(self.baudrate, self.bytesize, self.parity, self.stopbits)


ModbusDevice = ModbusTcpDevice | ModbusRtuDevice
