"""`fogmesh virtual plc`: run the virtual PLC from the command line.

Light to import (the CLI builds its parser from `add_arguments` on every run); the servers and
their vendor libraries load only when `serve` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import FogmeshError
from tools.virtual_plc.registers import VirtualPlcError

if TYPE_CHECKING:
    from tools.virtual_plc.plc import PlcFault, VirtualPlc


def parse_fault(text: str) -> PlcFault:
    """`kind=slow,unit=1,at_s=5,duration_s=10,delay_ms=500` → PlcFault (numbers converted)."""
    from tools.virtual_plc.plc import PlcFault

    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--fault {text!r}: expected key=value pairs separated by commas")
        val: Any = raw.strip()
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                pass
        fields[key.strip()] = val
    kind = fields.pop("kind", None)
    if not isinstance(kind, str):
        raise ValueError(f"--fault {text!r}: needs kind=...")
    at_s = float(fields.pop("at_s", 0.0))
    duration = fields.pop("duration_s", None)
    unit = fields.pop("unit", None)
    return PlcFault(
        kind,
        at_s,
        None if duration is None else float(duration),
        None if unit is None else int(unit),
        fields,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pumps", type=int, default=2, help="pumps on units 1..N (default 2)")
    p.add_argument("--seed", type=int, default=1, help="process seed (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--modbus-port", type=int, default=5020, help="Modbus TCP port (0: any free)")
    p.add_argument("--no-modbus", action="store_true", help="no Modbus TCP server")
    p.add_argument(
        "--rtu", action="store_true", help="also serve Modbus RTU on a pty and RTU over TCP"
    )
    p.add_argument("--rtu-tcp-port", type=int, default=0, help="RTU-over-TCP port (0: any free)")
    p.add_argument("--opcua-port", type=int, default=4840, help="OPC-UA port (0: any free)")
    p.add_argument("--no-opcua", action="store_true", help="no OPC-UA server")
    p.add_argument(
        "--opcua-cert", type=Path, help="server certificate (DER or PEM): Basic256Sha256"
    )
    p.add_argument("--opcua-key", type=Path, help="server private key (PEM)")
    p.add_argument("--no-meter", action="store_true", help="no energy meter on unit 10")
    p.add_argument("--update-ms", type=int, default=100, help="process update period (default 100)")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="scheduled fault, e.g. kind=spike,unit=1,at_s=30,duration_s=10,tag=flow_m3h,magnitude=9 "
        "(kinds in docs/virtual-plc.md); repeatable",
    )
    p.add_argument("--ready-file", type=Path, help="write the endpoints as JSON here once serving")


def _endpoints(plc: VirtualPlc) -> dict[str, Any]:
    return {
        "modbus_tcp": plc.modbus_url if plc.modbus_tcp else None,
        "modbus_rtu_tcp": plc.rtu_tcp_url,
        "modbus_rtu_port": plc.rtu_port,
        "opcua": plc.opcua_endpoint,
        "units": {str(u): name for u, name in plc.units.items()},
        "pid": os.getpid(),
    }


async def serve(args: argparse.Namespace) -> None:
    """Run a VirtualPlc from parsed arguments until SIGINT or SIGTERM."""
    from tools.virtual_plc.plc import VirtualPlc

    try:
        faults = [parse_fault(s) for s in args.fault]
        plc = VirtualPlc(
            pumps=args.pumps,
            seed=args.seed,
            faults=faults,
            modbus_tcp=not args.no_modbus,
            modbus_rtu=args.rtu,
            opcua=not args.no_opcua,
            host=args.host,
            modbus_port=args.modbus_port,
            opcua_port=args.opcua_port,
            update_ms=args.update_ms,
            meter=not args.no_meter,
            rtu_tcp_port=args.rtu_tcp_port,
            opcua_cert=args.opcua_cert,
            opcua_key=args.opcua_key,
        )
    except ValueError as exc:
        raise VirtualPlcError(f"virtual PLC: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with plc:
        info = json.dumps(_endpoints(plc))
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(info + "\n", encoding="utf-8")
            tmp.replace(args.ready_file)
        print(info, flush=True)
        await stop.wait()


def command_virtual_plc(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -c 'import sys, tools.virtual_plc as v; sys.exit(v.main())' ...`."""
    p = argparse.ArgumentParser(prog="fogmesh virtual plc", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return command_virtual_plc(args)
    except FogmeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
