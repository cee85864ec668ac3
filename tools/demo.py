"""`fogmesh demo`: a virtual PLC retrofitted by the real gateway into the embedded fog store.

Starts the virtual PLC (four pumps and an energy meter behind real Modbus TCP and OPC-UA
servers, with faults on a fixed schedule), runs the gateway on the shipped demo config against
it, shows what reaches the fog as it arrives, and ends with the figures that say whether the
edge did its job: how much it reduced, whether every anomaly was reported, how fast, and that
no message was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from gateway.config import LoadedConfig, parse_config
from gateway.fog import FogStore
from gateway.runtime import Gateway
from gateway.sinks.base import sqlite_path
from gateway.stats import percentile
from gateway.wire import Envelope, encode
from retrofit_adapters.simulated.config import FaultConfig
from tools.fog_cli import describe

DEMO_CONFIG = "configs/demo.toml"
_ANOMALY_FAULTS = ("spike", "drift", "stuck")
_MATCH_SLACK_S = 2.0  # an event counts for an anomaly up to this long after the fault ends


@dataclass(frozen=True, slots=True)
class Anomaly:
    device: str
    tag: str
    kind: str
    start_s: float
    end_s: float


def demo_config_text() -> str:
    return files("tools").joinpath(DEMO_CONFIG).read_text(encoding="utf-8")


# What goes wrong in the plant, in seconds after the virtual PLC starts (same story every run).
DEMO_FAULTS: dict[str, list[FaultConfig]] = {
    "pump1": [
        FaultConfig(kind="spike", tag="vibration_mm_s", at_s=4.0, duration_s=1.5, magnitude=5.0)
    ],
    "pump2": [
        FaultConfig(kind="spike", tag="pressure_bar", at_s=7.0, duration_s=2.0, magnitude=-1.5)
    ],
    "pump3": [
        FaultConfig(kind="drift", tag="temperature_c", at_s=10.0, duration_s=5.0, magnitude=4.0),
        # the PLC answers exception 4 (server device failure): the supervisor backs off, recovers
        FaultConfig(kind="raise", at_s=15.0, duration_s=1.5),
    ],
    "pump4": [
        FaultConfig(kind="spike", tag="flow_m3h", at_s=12.5, duration_s=2.0, magnitude=-20.0)
    ],
}


def injected_anomalies(faults: dict[str, list[FaultConfig]], seconds: float) -> list[Anomaly]:
    """Process anomalies that start early enough in a run of `seconds` to be seen."""
    return [
        Anomaly(dev, f.tag, f.kind, f.at_s, f.at_s + f.duration_s)
        for dev, fs in faults.items()
        for f in fs
        if f.kind in _ANOMALY_FAULTS and f.tag is not None and f.at_s + 1.0 < seconds
    ]


def demo_config_for(modbus_port: int, opcua_endpoint: str) -> str:
    """The shipped demo config pointed at a virtual PLC's actual endpoints."""
    return (
        demo_config_text()
        .replace("port = 5020", f"port = {modbus_port}")
        .replace('"opc.tcp://127.0.0.1:4840/fogmesh/"', f'"{opcua_endpoint}"')
    )


def _wire_size(row: dict[str, Any]) -> int:
    """Bytes of the envelope as it travelled (the encoding is deterministic)."""
    fields = ("site", "gateway", "device", "kind", "seq", "ts_ms", "historical", "data")
    return len(encode(Envelope(**{k: row[k] for k in fields})))


# The demo's sensor mesh: a root and three nodes in a line (up to 3 radio hops), each a real
# MicroPython process, 10 % loss on every link; the gateway reads the root through a pty.
MESH_NODES = 4
MESH_LOSS = 0.1
MESH_CHANNELS = ("temp", "vib")


def mesh_device_toml(port: str, nodes: list[int]) -> str:
    """The `mesh` device of the demo gateway, with each node's channel means as fog tags."""
    tags = "".join(
        f'\n[[devices.tags]]\nname = "n{n}.{ch}.mean"\n' for n in nodes for ch in MESH_CHANNELS
    )
    return (
        "\n# --- the ESP-NOW sensor mesh, through its root node's serial port ------------------\n"
        f'[[devices]]\nid = "mesh"\ntype = "mesh"\nport = "{port}"\nperiod_ms = 500\n' + tags
    )


async def _run(base: Path, seconds: float, live: bool) -> dict[str, Any]:
    from tools.mesh import topology
    from tools.mesh.sim import Sim
    from tools.virtual_plc.plc import VirtualPlc

    plc = VirtualPlc(pumps=4, seed=1, faults=DEMO_FAULTS, update_ms=50)
    mesh = Sim(
        topology.line(MESH_NODES, loss=MESH_LOSS),
        workdir=base / "mesh",
        seed=1,
        summary_s=2.0,
        read_uart=False,  # the gateway's mesh device owns the serial port
    )
    async with plc, mesh:
        t0 = time.time()  # the PLC's fault schedule counts from here
        assert plc.opcua_endpoint is not None and mesh.tty_path is not None
        nodes = sorted(n for n in mesh.nodes if n != mesh.root)
        text = demo_config_for(plc.modbus_port, plc.opcua_endpoint) + mesh_device_toml(
            str(mesh.tty_path), nodes
        )
        loaded = parse_config(text, source="demo.toml", base_dir=base)
        if live:
            print(
                f"fogmesh demo: virtual PLC on {plc.modbus_url} (Modbus TCP) and {plc.opcua_endpoint} "
                f"(OPC-UA); a {MESH_NODES}-node ESP-NOW mesh on {mesh.tty_path}; "
                f"{len(loaded.config.devices)} devices for {seconds:g} s; fog store {loaded.sink_url}",
                flush=True,
            )
        result = await _run_gateway(loaded, t0, seconds, live)
        result["mesh"] = _mesh_figures(mesh, result.pop("_mesh_at_fog"))
        if live:
            print(mesh.tree(), flush=True)
        return result


def _mesh_figures(mesh: Any, at_fog: int) -> dict[str, Any]:
    # The root does not join (it is the tree); the figures count the sensor nodes.
    sensors = [n for n in mesh.nodes.values() if not n.root]
    times = [n.joined_at for n in sensors if n.joined_at is not None]
    joined = len(sensors) - len(mesh.unjoined())
    return {
        "nodes": len(sensors),
        "joined": joined,
        "formation_s": round(max(times), 2) if joined == len(sensors) and times else None,
        "node_messages": len(mesh.generated()),
        "peak_heap_bytes": max((n.heap_peak for n in sensors), default=0),
        "fog_messages": at_fog,
    }


async def _run_gateway(
    loaded: LoadedConfig, t0: float, seconds: float, live: bool
) -> dict[str, Any]:
    gw = Gateway(loaded, measure_raw_bytes=True)
    stop = asyncio.Event()
    fog_path = sqlite_path(loaded.sink_url)
    seen = 0

    def show_new(store: FogStore) -> None:
        nonlocal seen
        while rows := store.rows(after_id=seen, limit=1000):
            seen = rows[-1]["id"]
            if live:
                for row in rows:
                    print(describe(row, t0), flush=True)

    serve = asyncio.create_task(gw.serve(stop))
    try:
        await asyncio.sleep(0.3)
        if gw.api is not None and live:
            host, port = gw.api.address
            print(
                f"gateway API: http://{host}:{port}/api/v1/devices  metrics: http://{host}:{port}/metrics",
                flush=True,
            )
        deadline = t0 + seconds
        store: FogStore | None = None
        while time.time() < deadline and not serve.done():
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.time())))
            if store is None and fog_path.exists():
                store = FogStore(fog_path).open(create=False)
            if store is not None:
                show_new(store)
    finally:
        stop.set()
        await serve
        if store is not None:
            store.close()
    with FogStore(fog_path).open(create=False) as final:
        show_new(final)
        return _figures(gw, final, injected_anomalies(DEMO_FAULTS, seconds), t0)


def _figures(gw: Gateway, store: FogStore, anomalies: list[Anomaly], t0: float) -> dict[str, Any]:
    envs: list[dict[str, Any]] = []
    while batch := store.rows(after_id=envs[-1]["id"] if envs else 0, limit=5000):
        envs += batch
    events = [e for e in envs if e["kind"] == "event"]
    latencies = [float(e["received_ms"] - e["ts_ms"]) for e in events]
    reported = 0
    for a in anomalies:
        lo = t0 + a.start_s - 0.5
        hi = t0 + a.end_s + _MATCH_SLACK_S
        if any(
            e["device"] == a.device
            and e["data"].get("tag") == a.tag
            and e["data"].get("state") == "active"
            and lo <= e["ts_ms"] / 1000.0 <= hi
            for e in events
        ):
            reported += 1
    gaps = store.gap_report(site=gw.site, gateway=gw.gateway_id)
    (stream,) = gaps["gateways"]
    up = gw.uplink_stats()
    bytes_forwarded = sum(_wire_size(e) for e in envs)
    return {
        "seconds": round(time.time() - t0, 2),
        "devices": len(gw.services),
        "samples_in": gw.samples_in,
        "messages_forwarded": len(envs),
        "by_kind": {
            k: sum(1 for e in envs if e["kind"] == k) for k in sorted({e["kind"] for e in envs})
        },
        "bytes_in_raw": gw.raw_equivalent_bytes,
        "bytes_forwarded": bytes_forwarded,
        "reduction_ratio": round(gw.raw_equivalent_bytes / bytes_forwarded, 1)
        if bytes_forwarded
        else None,
        "anomalies_injected": len(anomalies),
        "anomalies_reported": reported,
        "events": len(events),
        "event_latency_p50_ms": _round(percentile(latencies, 50)),
        "event_latency_p99_ms": _round(percentile(latencies, 99)),
        "last_seq": up.last_seq,
        "lost": gaps["lost"],
        "duplicates": stream["duplicates"],
        "queue_depth_at_exit": up.queue_depth,
        "drops": up.drops,
        "fog_store": str(store.path),
        "_mesh_at_fog": sum(1 for e in envs if e["device"] == "mesh"),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def run_demo(args: argparse.Namespace) -> int:
    live = not args.json and not args.quiet
    if args.json:
        # Log lines would mix with the JSON object a script reads; keep only warnings, on stderr.
        logging.getLogger().setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        base = (
            Path(args.data_dir)
            if args.data_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fogmesh-demo-")))
        )
        base.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(_run(base, args.seconds, live))
        if not args.data_dir:
            del result["fog_store"]  # a temporary folder, gone when the demo ends
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print("\nwhat the fog received:")
        for k, v in result.items():
            print(f"  {k:<24} {v}")
    mesh = result["mesh"]
    ok = (
        result["lost"] == 0
        and result["anomalies_reported"] == result["anomalies_injected"]
        and mesh["joined"] == mesh["nodes"]
        and mesh["fog_messages"] > 0
    )
    return 0 if ok else 1
