"""`fogmesh modbus probe`: read registers and print every decoding, to find a register's true type.

An integrator with a vendor's register map (or none) reads a block once and sees it as every
16/32/64-bit integer and float in all four byte/word orders, plus ASCII, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import DeviceError, DeviceTimeout
from retrofit_adapters.modbus.codec import ORDERS, all_decodings
from retrofit_adapters.modbus.config import parse_classic

_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def resolve_address(address: str, table: str | None, addressing: int) -> tuple[str, int]:
    """(table, 0-based protocol address). Without --table, 5–6 digit classic notation is expected."""
    if table is None:
        if not address.isdigit() or len(address) < 5:
            raise DeviceError(
                f"address {address!r}: give --table holding|input with a plain address, "
                "or use classic notation such as 40001 (holding) or 30001 (input)"
            )
        try:
            parsed_table, offset = parse_classic(address)
        except ValueError as exc:
            raise DeviceError(str(exc)) from exc
        if parsed_table not in ("holding", "input"):
            raise DeviceError(
                f"address {address!r} is a {parsed_table} address; probe reads registers"
            )
        return parsed_table, offset
    if not address.isdigit():
        raise DeviceError(f"address {address!r} must be a number")
    offset = int(address) - addressing
    if not 0 <= offset <= 0xFFFF:
        raise DeviceError(
            f"address {address} is outside the register space with addressing = {addressing}"
        )
    return table, offset


def _client(url: str, timeout_s: float, baudrate: int) -> Any:
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
    from pymodbus.framer import FramerType

    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    if parts.scheme in ("tcp", "modbus", "rtu+tcp"):
        if not parts.hostname:
            raise DeviceError(f"no host in {url!r}: use tcp://host:port")
        framer = FramerType.RTU if parts.scheme == "rtu+tcp" else FramerType.SOCKET
        return AsyncModbusTcpClient(
            parts.hostname, port=parts.port or 502, framer=framer, timeout=timeout_s, retries=0
        )
    if parts.scheme == "rtu":
        port = parts.path or parts.netloc
        return AsyncModbusSerialClient(
            port, framer=FramerType.RTU, baudrate=baudrate, timeout=timeout_s, retries=0
        )
    raise DeviceError(
        f"unsupported URL {url!r}: use tcp://host:port, rtu+tcp://host:port or rtu:///dev/ttyUSB0"
    )


async def read_block(
    url: str, *, unit: int, table: str, start: int, count: int, timeout_s: float, baudrate: int
) -> list[int]:
    from pymodbus.exceptions import ModbusException

    # pymodbus logs its own warning for every failure; ours says it once, with context.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    client = _client(url, timeout_s, baudrate)
    try:
        try:
            connected = await asyncio.wait_for(client.connect(), timeout_s + 1)
        except TimeoutError as exc:
            raise DeviceTimeout(f"{url}: no connection within {timeout_s} s") from exc
        if not connected:
            raise DeviceError(f"{url}: cannot connect")
        read = client.read_holding_registers if table == "holding" else client.read_input_registers
        try:
            rr = await read(start, count=count, device_id=unit)
        except ModbusException as exc:
            raise DeviceError(f"{url} unit {unit}: {exc}") from exc
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            name = _EXCEPTION_NAMES.get(code or -1, "error")
            raise DeviceError(
                f"{url} unit {unit}: {name} ({code}) reading {table} {start}..{start + count - 1}"
            )
        regs = list(rr.registers)
        if len(regs) < count:
            raise DeviceError(f"{url} unit {unit}: asked {count} registers, got {len(regs)}")
        return regs[:count]
    finally:
        client.close()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render_table(regs: list[int], start: int) -> str:
    rows = all_decodings(regs)
    lines = [
        "registers: " + " ".join(f"{start + i}:{r:04X}" for i, r in enumerate(regs)),
        "",
        f"{'addr':>6} {'type':<8} " + " ".join(f"{o:>15}" for o in ORDERS) + "  hex",
    ]
    grouped: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        if r["type"] == "ascii":
            continue
        grouped.setdefault((r["offset"], r["type"]), {"hex": r["hex"]})[r["order"]] = r["value"]
    for (offset, dtype), vals in grouped.items():
        cells = " ".join(f"{_cell(vals.get(o, '')):>15}" for o in ORDERS)
        lines.append(f"{start + offset:>6} {dtype:<8} {cells}  {vals['hex']}")
    for r in rows:
        if r["type"] == "ascii":
            lines.append(
                f"ascii ({'high byte first' if r['order'] == 'ABCD' else 'low byte first'}): {r['value']!r}"
            )
    return "\n".join(lines)


def probe(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 125:
        raise DeviceError("--count must be 1..125 (the Modbus limit for one read)")
    table, start = resolve_address(args.address, args.table, args.addressing)
    if start + args.count - 1 > 0xFFFF:
        raise DeviceError(f"{args.count} registers from {start} run past 65535")
    regs = asyncio.run(
        read_block(
            args.url,
            unit=args.unit,
            table=table,
            start=start,
            count=args.count,
            timeout_s=args.timeout_s,
            baudrate=args.baudrate,
        )
    )
    if args.json:
        out = {
            "url": args.url,
            "unit": args.unit,
            "table": table,
            "start": start,
            "registers": regs,
            "decodings": [dict(r, address=start + r["offset"]) for r in all_decodings(regs)],
        }
        sys.stdout.write(json.dumps(out, default=str) + "\n")
    else:
        print(
            f"{args.url} unit {args.unit}, {table} registers {start}..{start + args.count - 1} (0-based)"
        )
        print(render_table(regs, start))
    return 0
