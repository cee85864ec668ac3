"""The Modbus tag map as an integrator writes it: classic notation and addressing bases, types,
orders and bits, and the exact message (at its exact path) for every mistake."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Union

import pytest
from pydantic import Field, ValidationError

from gateway.config import loader as loader_module
from gateway.config.fragments import DeviceBase
from gateway.config.models import GatewayConfig
from gateway.errors import ConfigError
from retrofit_adapters.modbus.config import (
    ModbusLimits,
    ModbusRtuDevice,
    ModbusTag,
    ModbusTcpDevice,
    parse_classic,
    rtu_frame_delay_ms,
)
from retrofit_adapters.simulated.config import SimulatedDevice

ROOT = Path(__file__).resolve().parents[2]
TYPES = "bool, int16, uint16, int32, uint32, int64, uint64, float32, float64, string(N)"


def tag(**kw: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": "t", **kw})


def tcp(*tags: dict[str, Any], **kw: Any) -> ModbusTcpDevice:
    data = {"id": "m1", "type": "modbus_tcp", "host": "10.0.0.5", "tags": list(tags), **kw}
    return ModbusTcpDevice.model_validate(data)


def rtu(*tags: dict[str, Any], **kw: Any) -> ModbusRtuDevice:
    data = {"id": "r1", "type": "modbus_rtu", "port": "/dev/ttyUSB0", "tags": list(tags), **kw}
    return ModbusRtuDevice.model_validate(data)


def problems(build: Any, *args: Any, **kw: Any) -> list[str]:
    """`dotted.path: message` of every error, as the loader would show them below the device."""
    with pytest.raises(ValidationError) as exc:
        build(*args, **kw)
    return [
        ".".join(str(p) for p in e["loc"]) + ": " + e["msg"]
        for e in exc.value.errors(include_url=False)
    ]


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "table", "offset"),
    [
        ("40001", "holding", 0),
        ("40100", "holding", 99),
        ("49999", "holding", 9998),
        ("400001", "holding", 0),
        ("465536", "holding", 65535),
        ("30010", "input", 9),
        ("300010", "input", 9),
        ("00001", "coil", 0),
        ("000017", "coil", 16),
        ("10001", "discrete", 0),
        ("165536", "discrete", 65535),
    ],
)
def test_classic_notation_implies_table_and_ignores_addressing(
    address: str, table: str, offset: int
) -> None:
    t = tag(address=address)
    assert t.table == table
    assert t.offset_address(0) == offset
    assert t.offset_address(1) == offset
    assert parse_classic(address) == (table, offset)
    # coils and discrete inputs are bools without saying so
    assert t.type == ("bool" if table in ("coil", "discrete") else "uint16")


def test_integer_addresses_count_from_the_device_base() -> None:
    t = tag(address=1)
    assert t.offset_address(1) == 0  # addressing = 1: address 1 is the first register
    assert t.offset_address(0) == 1
    assert tcp({"name": "a", "address": 1}, addressing=1).tags[0].offset_address(1) == 0
    assert (
        tcp({"name": "a", "address": 65536, "type": "uint16"}, addressing=1).tags[0].address
        == 65536
    )
    assert tcp({"name": "a", "address": 65535}).tags[0].offset_address(0) == 65535


def test_explicit_table_that_agrees_with_the_notation_is_fine() -> None:
    assert tag(address="30010", table="input").table == "input"
    assert tag(table="coil", address=5).type == "bool"


def test_the_callers_dict_is_not_changed() -> None:
    raw = {"name": "t", "address": "00001"}
    tag(**raw)
    assert raw == {"name": "t", "address": "00001"}


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("40000", "address 40000 is not valid: classic notation starts at 40001"),
        ("400000", "address 400000 is not valid: classic notation starts at 400001"),
        ("00000", "address 00000 is not valid: classic notation starts at 00001"),
        ("465537", "address 465537 is out of range: 6-digit notation ends at 465536"),
        (
            "50001",
            "address 50001 is not classic notation: the first digit must be 0 (coil), "
            "1 (discrete input), 3 (input register) or 4 (holding register)",
        ),
        (
            "4001",
            'address 4001 is not classic notation: write 5 or 6 digits such as "40001" or '
            '"400001", or an integer for a 0- or 1-based offset',
        ),
        (
            "4x0001",
            'address 4x0001 is not classic notation: write 5 or 6 digits such as "40001" or '
            '"400001", or an integer for a 0- or 1-based offset',
        ),
        (-1, "address -1 is out of range: registers are 0..65535 (1..65536 with addressing = 1)"),
        (
            65537,
            "address 65537 is out of range: registers are 0..65535 (1..65536 with addressing = 1)",
        ),
    ],
)
def test_bad_addresses_show_what_was_written(address: int | str, message: str) -> None:
    assert problems(tag, address=address) == [f"address: {message}"]


def test_notation_that_contradicts_the_table_is_refused() -> None:
    assert problems(tag, address="30010", table="holding") == [
        "address: address 30010 is input register notation, but table is 'holding'; remove "
        "`table` (the notation implies it) or give the address as an integer offset"
    ]


def test_device_checks_addresses_against_its_base_and_the_end_of_the_table() -> None:
    assert problems(tcp, {"name": "a", "address": 0}, addressing=1) == [
        "tags.0.address: address 0 is out of range: with addressing = 1 addresses are 1..65536"
    ]
    assert problems(tcp, {"name": "a", "address": 65536}) == [
        "tags.0.address: address 65536 is out of range: with addressing = 0 addresses are 0..65535"
    ]
    assert problems(
        tcp,
        {"name": "ok", "address": 65535, "type": "float32"},  # protocol 65534..65535
        {"name": "a", "address": 65536, "type": "float32"},
        {"name": "b", "address": "465535", "type": "float64"},
        addressing=1,
    ) == [
        "tags.1.address: address 65536 needs 2 registers (float32) and runs past the last "
        "address, 65536",
        "tags.2.address: address 465535 needs 4 registers (float64) and runs past the last "
        "address, 465536",
    ]
    assert problems(tcp, {"name": "a", "address": 65535, "type": "uint32"}) == [
        "tags.0.address: address 65535 needs 2 registers (uint32) and runs past the last "
        "address, 65535"
    ]


# --- types, orders, bits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        ("real", f'must be one of {TYPES}; did you mean "float32"?'),
        ("FLOAT32", f'must be one of {TYPES}; did you mean "float32"?'),
        ("dword", f'must be one of {TYPES}; did you mean "uint32"?'),
        ("int8", f"must be one of {TYPES}"),
        (
            "string",
            f'must be one of {TYPES}; a string needs its length in bytes, e.g. "string(16)"',
        ),
        ("string(0)", "string length must be 1..250 bytes (got 0)"),
        ("string(251)", "string length must be 1..250 bytes (got 251)"),
        ("string(-1)", f"must be one of {TYPES}"),
    ],
)
def test_unknown_types_list_the_known_ones(dtype: str, message: str) -> None:
    assert problems(tag, address=0, type=dtype) == [f"type: {message}"]


def test_every_type_and_order_is_accepted() -> None:
    for dtype in ("bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32"):
        for order in ("ABCD", "CDAB", "BADC", "DCBA"):
            assert tag(address=0, type=dtype, order=order).order == order
    assert tag(address=0, type="string(250)").register_count() == 125
    assert tag(address=0, type="float64").register_count() == 4
    assert problems(tag, address=0, order="ABDC") == [
        "order: Input should be 'ABCD', 'CDAB', 'BADC' or 'DCBA'"
    ]


def test_bits_come_from_16_bit_registers() -> None:
    assert tag(address=0, bit=15).register_count() == 1
    assert tag(address=0, bit=0, type="int16").value_kind() == "bool"
    assert tag(address=0, bit=3, type="bool").bit == 3
    assert problems(tag, address=0, bit=3, type="float32") == [
        "bit: `bit` selects a bit of a 16-bit register: type must be uint16, int16 or bool "
        "(got 'float32')"
    ]
    assert problems(tag, address=0, bit=16) == ["bit: must be 0..15"]


def test_coils_and_discrete_inputs_are_single_bits() -> None:
    assert problems(tag, address="00001", type="uint16", order="CDAB", bit=1) == [
        "type: coils are single bits: type must be \"bool\" (got 'uint16')",
        "bit: coils are single bits already; `bit` is for registers",
        "order: `order` does not apply to coils",
    ]
    assert problems(tag, table="discrete", address=0, type="int16") == [
        "type: discrete inputs are single bits: type must be \"bool\" (got 'int16')"
    ]


def test_scaling_and_limits_only_for_numbers() -> None:
    assert problems(tag, address=0, type="bool", scale=2.0, offset=1.0) == [
        "scale: `scale` applies to numbers; this tag's value is a bool",
        "offset: `offset` applies to numbers; this tag's value is a bool",
    ]
    assert problems(tag, address=0, type="string(8)", min=0.0, max=1.0) == [
        "min: `min` applies to numbers; this tag's value is a string",
        "max: `max` applies to numbers; this tag's value is a string",
    ]
    assert problems(tag, address=0, bit=1, scale=1.0) == [
        "scale: `scale` applies to numbers; this tag's value is a bool"
    ]
    assert problems(tag, address="00001", offset=2.0) == [
        "offset: `offset` applies to numbers; this tag's value is a bool"
    ]
    assert problems(tag, address=0, scale=0.0) == ["scale: must not be 0"]
    assert problems(tag, address=0, min=10.0, max=5.0) == ["min: min 10 is greater than max 5"]
    assert tag(address=0, min=5, max=5).min == 5.0  # an integer is a number


def test_value_kinds() -> None:
    assert tag(address=0).value_kind() == "int"
    assert tag(address=0, scale=0.1).value_kind() == "float"
    assert tag(address=0, type="float32").value_kind() == "float"
    assert tag(address=0, type="string(4)").value_kind() == "string"
    assert tag(address=0, type="bool").value_kind() == "bool"
    assert tag(address="10001").value_kind() == "bool"


def test_read_only_tables_cannot_hold_writable_tags() -> None:
    assert problems(tag, address="30001", writable=True) == [
        "writable: input registers are read-only; only coils and holding registers can be written"
    ]
    assert problems(tag, address="10001", writable=True) == [
        "writable: discrete inputs are read-only; only coils and holding registers can be written"
    ]
    assert tag(address="00001", writable=True).writable
    assert problems(tag, address=0, type="string(248)", writable=True) == [
        "type: a write carries at most 123 registers (FC16); a writable string can be at most "
        "string(246)"
    ]
    assert tag(address=0, type="string(246)", writable=True).register_count() == 123


# --- devices ---------------------------------------------------------------------------------


def test_tcp_device_defaults() -> None:
    dev = tcp({"name": "a", "address": 0})
    assert (dev.port, dev.unit, dev.addressing) == (502, 1, 0)
    assert dev.limits == ModbusLimits()
    assert (dev.limits.max_registers, dev.limits.max_bits, dev.limits.max_gap) == (125, 2000, 16)
    assert (dev.limits.inter_frame_delay_ms, dev.limits.retries) == (None, 1)
    assert dev.frame_delay_ms() == 0.0
    assert (
        tcp({"name": "a", "address": 0}, limits={"inter_frame_delay_ms": 5}).frame_delay_ms() == 5
    )


def test_rtu_device_defaults_and_frame_delay() -> None:
    dev = rtu({"name": "a", "address": 0})
    assert (dev.baudrate, dev.bytesize, dev.parity, dev.stopbits, dev.unit) == (9600, 8, "N", 1, 1)
    assert dev.frame_delay_ms() == pytest.approx(3.5 * 10 / 9600 * 1000)  # 8N1: 10 bits a char
    assert rtu_frame_delay_ms(19200, 8, "E", 1) == pytest.approx(3.5 * 11 / 19200 * 1000)
    assert rtu_frame_delay_ms(38400, 8, "N", 1) == 1.75  # fixed above 19200 baud
    assert (
        rtu({"name": "a", "address": 0}, limits={"inter_frame_delay_ms": 0}).frame_delay_ms() == 0
    )


def test_device_needs_tags_within_its_limits_and_period() -> None:
    assert problems(tcp) == ["tags: a Modbus device needs at least one tag"]
    assert problems(
        tcp,
        {"name": "s", "address": 0, "type": "string(250)"},
        {"name": "f", "address": 200, "type": "float64"},
        {"name": "slow", "address": 300, "period_ms": 1500},
        limits={"max_registers": 3},
    ) == [
        "tags.0.type: string(250) needs 125 registers, more than one request may read "
        "(limits.max_registers = 3)",
        "tags.1.type: float64 needs 4 registers, more than one request may read "
        "(limits.max_registers = 3)",
        "tags.2.period_ms: must be a multiple of the device's period_ms (1000): the device is "
        "polled every 1000 ms",
    ]
    assert tcp({"name": "slow", "address": 0, "period_ms": 60000}).tags[0].period_ms == 60000


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"unit": 256}, "unit: must be 0..255"),
        ({"port": 0}, "port: must be 1..65535"),
        (
            {"host": "10.0.0.5:502"},
            "host: must be a host name or an IP address; the port goes in `port`",
        ),
        (
            {"host": "tcp://10.0.0.5"},
            "host: must be a host name or an IP address, not a URL; the port goes in `port`",
        ),
        ({"host": ""}, "host: must be a host name or an IP address"),
        ({"addressing": 2}, "addressing: Input should be 0 or 1"),
        ({"limits": {"max_registers": 126}}, "limits.max_registers: must be 1..125"),
        ({"limits": {"max_bits": 2001}}, "limits.max_bits: must be 1..2000"),
        ({"limits": {"max_gap": -1}}, "limits.max_gap: must be 0..125"),
        ({"limits": {"retries": 6}}, "limits.retries: must be 0..5"),
        (
            {"limits": {"inter_frame_delay_ms": -1.0}},
            "limits.inter_frame_delay_ms: must be 0 or more",
        ),
    ],
)
def test_tcp_device_problems(kw: dict[str, Any], message: str) -> None:
    assert problems(tcp, {"name": "a", "address": 0}, **kw) == [message]


def test_tcp_hosts() -> None:
    for host in ("plc-7.plant.local", "10.0.0.5", "fe80::1", "[fe80::1]"):
        assert tcp({"name": "a", "address": 0}, host=host).host == host


@pytest.mark.parametrize(
    "port",
    [
        "/dev/ttyUSB0",
        "/dev/serial/by-id/usb-FTDI-if00",
        "COM3",
        "socket://10.0.0.9:4001",
        "rfc2217://moxa:4001",
        "loop://",
    ],
)
def test_rtu_ports(port: str) -> None:
    assert rtu({"name": "a", "address": 0}, port=port).port == port


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"unit": 0}, "unit: must be 1..247"),
        ({"unit": 248}, "unit: must be 1..247"),
        (
            {"port": "socket://10.0.0.9"},
            "port: socket:// needs a host and a port: socket://host:port",
        ),
        (
            {"port": "tcp://10.0.0.9:4001"},
            "port: must be a serial device (/dev/ttyUSB0, /dev/serial/by-id/..., COM3) or a "
            "pyserial URL (socket://host:port or rfc2217://host:port for RTU over TCP)",
        ),
        ({"parity": "X"}, "parity: Input should be 'N', 'E' or 'O'"),
        ({"baudrate": 0}, "baudrate: must be greater than 0"),
    ],
)
def test_rtu_device_problems(kw: dict[str, Any], message: str) -> None:
    assert problems(rtu, {"name": "a", "address": 0}, **kw) == [message]


# --- through the loader ----------------------------------------------------------------------


class ModbusConfig(GatewayConfig):
    # What gateway.config.models will hold once the Modbus types are wired in.
    devices: list[
        Annotated[
            Union[SimulatedDevice, ModbusTcpDevice, ModbusRtuDevice],  # noqa: UP007
            Field(discriminator="type"),
        ]
    ] = []  # type: ignore[assignment]


def load(text: str) -> Any:
    return loader_module._parse(
        text, source="<test>", base_dir=Path.cwd(), path=None, env={}, model=ModbusConfig
    )


HEAD = '[gateway]\nid = "gw1"\nsite = "plant-a"\n'
METER = """
[[devices]]
id = "meter1"
type = "modbus_tcp"
host = "10.0.0.20"
unit = 3
[[devices.tags]]
name = "power_kw"
address = "43001"
type = "float32"
order = "CDAB"
[[devices.tags]]
name = "energy_kwh"
address = 3010
type = "uint32"
order = "CDAB"
scale = 0.1
[[devices.tags]]
name = "breaker_closed"
address = "00017"
"""


def test_a_toml_meter_loads() -> None:
    cfg = load(HEAD + METER).config
    (meter,) = cfg.devices
    assert isinstance(meter, ModbusTcpDevice)
    power, energy, breaker = meter.tags
    assert (power.table, power.offset_address(meter.addressing)) == ("holding", 3000)
    assert (energy.table, energy.offset_address(meter.addressing), energy.scale) == (
        "holding",
        3010,
        0.1,
    )
    assert (breaker.table, breaker.type, breaker.offset_address(0)) == ("coil", "bool", 16)


def test_the_loader_reports_modbus_problems_at_their_dotted_paths() -> None:
    text = HEAD + METER.replace('"43001"', '"40000"').replace(
        'name = "breaker_closed"', 'name = "b"\ntype = "uint16"'
    )
    text += """
[[devices]]
id = "drive"
type = "modbus_rtu"
port = "/dev/ttyUSB0"
addressing = 1
[[devices.tags]]
name = "speed"
address = 0
"""
    with pytest.raises(ConfigError) as exc:
        load(text)
    assert [str(p) for p in exc.value.problems] == [
        "devices[0].tags[0].address: address 40000 is not valid: classic notation starts at 40001",
        "devices[0].tags[2].type: coils are single bits: type must be \"bool\" (got 'uint16')",
        "devices[1].tags[0].address: address 0 is out of range: with addressing = 1 addresses "
        "are 1..65536",
    ]


def test_json_schema_of_the_devices_is_generated() -> None:
    schema = ModbusTcpDevice.model_json_schema()
    tag_schema = schema["$defs"]["ModbusTag"]["properties"]
    assert tag_schema["bit"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 15}
    assert "address" in schema["$defs"]["ModbusTag"]["required"]
    unit = ModbusRtuDevice.model_json_schema()["properties"]["unit"]
    assert (unit["minimum"], unit["maximum"], unit["default"]) == (1, 247, 1)


def test_an_address_of_the_wrong_type_gets_one_message() -> None:
    text = HEAD + METER.replace("address = 3010", "address = 3010.0").replace(
        'address = "00017"', "address = true"
    )
    with pytest.raises(ConfigError) as exc:
        load(text)
    assert [str(p) for p in exc.value.problems] == [
        "devices[0].tags[1].address: must be an integer offset or a string in classic notation "
        'such as "40001" (got float 3010.0)',
        "devices[0].tags[2].address: must be an integer offset or a string in classic notation "
        'such as "40001" (got boolean true)',
    ]


# --- the guide ---------------------------------------------------------------------------------


def _documented_keys() -> dict[str, set[str]]:
    """Keys in the first column of each table, by the backticked part of the heading above."""
    sections: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in (ROOT / "docs" / "modbus.md").read_text().splitlines():
        if line.startswith("#"):
            heading = re.match(r"^#+ .*?`([^`]+)`", line)
            current = sections.setdefault(heading[1], set()) if heading else None
        elif current is not None and line.startswith("| `"):
            current.update(re.findall(r"`(\w+)`", line.split("|")[1]))
    return sections


def test_the_guide_describes_every_key() -> None:
    device_keys = set(DeviceBase.model_fields) | {"type"}
    assert _documented_keys() == {
        'type = "modbus_tcp"': set(ModbusTcpDevice.model_fields) - device_keys,
        'type = "modbus_rtu"': set(ModbusRtuDevice.model_fields) - device_keys,
        "[[devices.tags]]": set(ModbusTag.model_fields),
        "[devices.limits]": set(ModbusLimits.model_fields),
    }


def test_config_codec_and_plan_do_not_load_pymodbus() -> None:
    # gateway.config imports the config module; a config check must not pull in the vendor library
    code = (
        "import sys\n"
        "import retrofit_adapters.modbus.config, retrofit_adapters.modbus.codec\n"
        "import retrofit_adapters.modbus.plan\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pymodbus', 'serial')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("address", [40001, 30010, 49999, 10001])
def test_an_integer_that_reads_like_classic_notation_must_be_confirmed(address: int) -> None:
    message = (
        f"address {address} is an integer, so it would be holding offset {address}; for classic "
        f'notation write it as a string, address = "{address}", or give `table` to confirm the offset'
    )
    assert problems(tag, address=address) == [f": {message}"]  # reported at the tag itself
    # With the table given, the offset is meant as written.
    assert tag(address=address, table="holding").offset_address(0) == address
    assert tag(address=9999).offset_address(0) == 9999  # not classic-looking: a plain offset
