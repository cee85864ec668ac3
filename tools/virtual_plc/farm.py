"""The gateway benchmark's server farm: N Modbus TCP devices on N ports, each with T tags in
contiguous registers whose values change every `update_ms`, all in one process.

Run it in its own process so the benchmark can report the farm's CPU apart from the gateway's:

    python -m tools.virtual_plc.farm --devices 200 --tags 30 --ready-file /tmp/farm.json

prints (and writes to the ready file) `{"host": ..., "ports": [...], ...}` once every port
listens, runs until SIGINT/SIGTERM (or --duration-s), then prints its own CPU time and
requests served as one JSON line.

Layout of every device (any unit id; FC 3 and FC 4 read the same registers), device index d
(0-based, in the order of `ports`), tag j (0-based), step k = whole `update_ms` periods since
start:

- kind uint16: tag j at register j, value (1000·d + 10·j + k) mod 65536;
- kind float32: tag j at registers 2j, 2j+1, IEEE 754 big-endian (ABCD), value 1000·d + j + k/4.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import struct
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from tools.virtual_plc.registers import VirtualPlcError

__all__ = ["ServerFarm", "farm_value", "main"]

Kind = Literal["uint16", "float32"]


def farm_value(kind: Kind, device: int, tag: int, step: int) -> float | int:
    """The value tag `tag` of device `device` holds during step `step` (see the module doc)."""
    if kind == "uint16":
        return (1000 * device + 10 * tag + step) % 65536
    return 1000.0 * device + tag + step / 4.0


def _registers(kind: Kind, device: int, tags: int, step: int) -> list[int]:
    if kind == "uint16":
        return [(1000 * device + 10 * j + step) & 0xFFFF for j in range(tags)]
    data = struct.pack(f">{tags}f", *(1000.0 * device + j + step / 4.0 for j in range(tags)))
    return list(struct.unpack(f">{2 * tags}H", data))


class ServerFarm:
    """`devices` pymodbus TCP servers in this process, on free ports (or base_port + i)."""

    def __init__(
        self,
        devices: int,
        tags: int,
        *,
        kind: Kind = "uint16",
        host: str = "127.0.0.1",
        base_port: int = 0,
        update_ms: int = 1000,
    ) -> None:
        if devices < 1 or not 1 <= tags <= 60:
            raise ValueError("devices must be >= 1 and tags 1..60")
        if kind not in ("uint16", "float32"):
            raise ValueError(f"kind must be uint16 or float32, got {kind!r}")
        self.devices = devices
        self.tags = tags
        self.kind: Kind = kind
        self.host = host
        self.base_port = base_port
        self.update_s = update_ms / 1000.0
        self.registers_per_device = tags if kind == "uint16" else 2 * tags
        self.ports: list[int] = []
        self.requests = 0
        self._servers: list[ModbusTcpServer] = []
        self._steps: list[int] = []
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> ServerFarm:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._steps = [-1] * self.devices
        try:
            for d in range(self.devices):
                block = SimData(0, count=self.registers_per_device, datatype=DataType.REGISTERS)
                device = SimDevice(0, simdata=[block], action=functools.partial(self._action, d))
                port = self.base_port + d if self.base_port else 0
                server = ModbusTcpServer([device], address=(self.host, port))
                try:
                    await server.serve_forever(background=True)
                except RuntimeError as exc:
                    raise VirtualPlcError(f"farm: cannot listen on {self.host}:{port}") from exc
                self._servers.append(server)
                listener: Any = server.transport
                self.ports.append(int(listener.sockets[0].getsockname()[1]))
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        servers, self._servers = self._servers, []
        for s in servers:
            with contextlib.suppress(Exception):
                await s.shutdown()  # type: ignore[no-untyped-call]

    def step(self) -> int:
        assert self._loop is not None
        return int((self._loop.time() - self._t0) / self.update_s)

    async def _action(
        self,
        device: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # Values are refreshed lazily, once per device and step, when a request needs them:
        # an idle device costs nothing, and a polled one costs one list rebuild per period.
        self.requests += 1
        k = self.step()
        if k != self._steps[device]:
            self._steps[device] = k
            registers[: self.registers_per_device] = _registers(self.kind, device, self.tags, k)
        return None


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ServerFarm(
        args.devices,
        args.tags,
        kind=args.kind,
        host=args.host,
        base_port=args.base_port,
        update_ms=args.update_ms,
    ) as farm:
        ready = {
            "host": farm.host,
            "ports": farm.ports,
            "devices": farm.devices,
            "tags": farm.tags,
            "kind": farm.kind,
            "registers_per_device": farm.registers_per_device,
            "update_ms": args.update_ms,
            "pid": os.getpid(),
        }
        text = json.dumps(ready)
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(text + "\n", encoding="utf-8")
            tmp.replace(args.ready_file)
        print(text, flush=True)
        cpu0, wall0 = _cpu_s(), time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration_s):
                await stop.wait()
        cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
        n = farm.requests
    return {
        "requests": n,
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 3),
        "cpu_percent": round(100.0 * cpu / wall, 2) if wall > 0 else 0.0,
        "cpu_per_request_us": round(1e6 * cpu / n, 1) if n else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.virtual_plc.farm", description="Many Modbus TCP devices."
    )
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--tags", type=int, default=30)
    p.add_argument("--kind", choices=("uint16", "float32"), default="uint16")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=0, help="ports base..base+N-1 (0: free ports)")
    p.add_argument("--update-ms", type=int, default=1000)
    p.add_argument("--duration-s", type=float, default=None, help="stop by itself after this")
    p.add_argument("--ready-file", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        report = asyncio.run(_serve(args))
    except (VirtualPlcError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
