"""VirtualPlc: the simulated plant (pumps and an energy meter) behind real Modbus TCP, Modbus RTU
and OPC-UA servers, with faults injectable at runtime or on a schedule.

The process values come from retrofit_adapters.simulated.process (a pure function of seed and
time, with the spike/drift/stuck faults); this module adds what a PLC adds around it: a flow
setpoint, a run command, counters that integrate over time, a status word, and the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from asyncua.ua.status_codes import StatusCodes
from pymodbus.constants import ExcCodes

from retrofit_adapters.simulated.config import FaultConfig
from retrofit_adapters.simulated.process import MODELS, unit_noise, value
from tools.virtual_plc.modbus_server import (
    EXCEPTION_CODES,
    GARBAGE_MODES,
    MODBUS_FAULTS,
    Fault,
    FaultTable,
    ModbusEndpoint,
    PtyLink,
    RegisterImage,
)
from tools.virtual_plc.opcua_server import (
    METER_VARIABLES,
    PUMP_VARIABLES,
    OpcUaObject,
    OpcUaServer,
)
from tools.virtual_plc.registers import (
    METER_POINTS,
    METER_UNIT,
    PUMP_POINTS,
    STATUS_FAULT,
    STATUS_RUNNING,
    PlainValue,
)

__all__ = ["FAULT_KINDS", "PlcFault", "VirtualPlc"]

log = logging.getLogger("fogmesh.virtual_plc")

PROCESS_FAULTS = ("spike", "drift", "stuck")
FAULT_KINDS: tuple[str, ...] = (*MODBUS_FAULTS, *PROCESS_FAULTS, "bad_status", "disconnect")
_PARAMS: dict[str, frozenset[str]] = {
    "stop_answering": frozenset(),
    "exception": frozenset({"code"}),
    "slow": frozenset({"delay_ms"}),
    "garbage": frozenset({"mode"}),
    "spike": frozenset({"tag", "magnitude"}),
    "drift": frozenset({"tag", "magnitude"}),
    "stuck": frozenset({"tag"}),
    "bad_status": frozenset({"status"}),
    "disconnect": frozenset(),
}
_FOREVER_S = 1e12

_SIGNALS = MODELS["pump"]
_MEAN_FLOW = _SIGNALS["flow_m3h"].mean
_BAR_PER_M3H = 0.02  # pump curve: discharge pressure falls as the flow setpoint rises
_EFFICIENCY = 0.62  # wire-to-water
_PUMP_AUX_KW = 0.4  # per running pump: cooling fan, controls
_BASE_KW = 1.5  # the rest of the plant behind the meter


@dataclass(frozen=True, slots=True)
class PlcFault:
    """A scheduled fault: `kind` (see FAULT_KINDS) from `at_s` seconds after the PLC starts,
    for `duration_s` (None: until cleared), on one unit or all (None)."""

    kind: str
    at_s: float = 0.0
    duration_s: float | None = None
    unit: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


FaultSpec = FaultConfig | PlcFault


@dataclass(slots=True)
class _Pump:
    unit: int
    seed: int
    scheduled: list[FaultConfig] = field(default_factory=list)
    injected: list[FaultConfig] = field(default_factory=list)
    setpoint_m3h: float = _MEAN_FLOW
    run: bool = True
    run_s: float = 0.0
    volume_m3: float = 0.0
    t_last: float = 0.0


class VirtualPlc:
    """Pumps on Modbus units 1..N (and OPC-UA Plant/Pump1..N), an energy meter on unit 10
    (Plant/Meter), served until the `async with` block ends. See docs/virtual-plc.md."""

    def __init__(
        self,
        *,
        pumps: int = 2,
        seed: int = 1,
        faults: Sequence[FaultSpec] | Mapping[str, Sequence[FaultSpec]] = (),
        modbus_tcp: bool = True,
        modbus_rtu: bool = False,
        opcua: bool = True,
        host: str = "127.0.0.1",
        modbus_port: int = 0,
        opcua_port: int = 0,
        update_ms: int = 100,
        meter: bool = True,
        rtu_tcp_port: int = 0,
        opcua_cert: str | Path | None = None,
        opcua_key: str | Path | None = None,
    ) -> None:
        max_pumps = METER_UNIT - 1 if meter else 247
        if not 1 <= pumps <= max_pumps:
            raise ValueError(f"pumps must be 1..{max_pumps}, got {pumps}")
        if update_ms <= 0:
            raise ValueError(f"update_ms must be > 0, got {update_ms}")
        self.host = host
        self.modbus_port = modbus_port
        self.rtu_tcp_port: int | None = None
        self.rtu_port: str | None = None
        self.opcua_port = opcua_port
        self.update_ms = update_ms
        self.units: dict[int, str] = {u: f"pump{u}" for u in range(1, pumps + 1)}
        if meter:
            self.units[METER_UNIT] = "meter"
        self._pumps = {u: _Pump(u, seed + u - 1) for u in range(1, pumps + 1)}
        for p in self._pumps.values():
            p.run_s = (65_000 + 1_000 * p.unit) * 3600.0
            p.volume_m3 = 250_000.0 * p.unit + 0.5
        self._seed = seed
        self._energy_kwh = 12_345.0
        self._t_meter = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._faults = FaultTable(self.elapsed_s)
        self._counts: Counter[int] = Counter()
        self._values: dict[int, dict[str, PlainValue]] = {u: {} for u in self.units}
        self._image = RegisterImage(
            {u: PUMP_POINTS if u in self._pumps else METER_POINTS for u in self.units},
            self._faults,
            on_write=self._on_write,
        )
        self.modbus_tcp = modbus_tcp
        self._modbus_rtu = modbus_rtu
        self._rtu_tcp_port_wanted = rtu_tcp_port
        self._endpoints: list[ModbusEndpoint] = []
        self._link: PtyLink | None = None
        self._down_by_fault = False
        self._modbus_lock = asyncio.Lock()
        self._ua_objects = [OpcUaObject(f"Pump{u}", u, PUMP_VARIABLES) for u in self._pumps] + (
            [OpcUaObject("Meter", METER_UNIT, METER_VARIABLES)] if meter else []
        )
        self._opcua: OpcUaServer | None = None
        if opcua:
            self._opcua = OpcUaServer(
                self._ua_objects,
                host=host,
                port=opcua_port,
                cert=Path(opcua_cert) if opcua_cert else None,
                key=Path(opcua_key) if opcua_key else None,
                on_write=self._on_write,
            )
        self._task: asyncio.Task[None] | None = None
        for unit, spec in self._schedule(faults):
            self._add(spec, unit, scheduled=True)

    # --- where to connect ---------------------------------------------------------------------

    @property
    def modbus_url(self) -> str:
        return f"tcp://{self.host}:{self.modbus_port}"

    @property
    def rtu_tcp_url(self) -> str | None:
        return None if self.rtu_tcp_port is None else f"rtu+tcp://{self.host}:{self.rtu_tcp_port}"

    @property
    def opcua_endpoint(self) -> str | None:
        return None if self._opcua is None else self._opcua.endpoint

    @property
    def requests_served(self) -> int:
        """Modbus requests received by every endpoint, answered or not (see docs)."""
        return sum(self._counts.values())

    @property
    def requests_by_unit(self) -> Mapping[int, int]:
        return dict(self._counts)

    def elapsed_s(self) -> float:
        """Process time: seconds since the PLC started (0 before)."""
        return 0.0 if self._loop is None else self._loop.time() - self._t0

    def values(self, unit: int) -> dict[str, PlainValue]:
        """What the servers publish for `unit` right now, before encoding (names as in the
        register map)."""
        return dict(self._values[unit])

    # --- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> VirtualPlc:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._update()
        try:
            if self.modbus_tcp:
                self._endpoints.append(
                    ModbusEndpoint(
                        self._image, self._counts, "tcp", host=self.host, port=self.modbus_port
                    )
                )
            if self._modbus_rtu:
                self._link = PtyLink()
                self._link.start()
                self.rtu_port = self._link.client_path
                self._endpoints.append(
                    ModbusEndpoint(
                        self._image,
                        self._counts,
                        "rtu_tcp",
                        host=self.host,
                        port=self._rtu_tcp_port_wanted,
                    )
                )
                self._endpoints.append(
                    ModbusEndpoint(
                        self._image, self._counts, "rtu_serial", serial_path=self._link.server_path
                    )
                )
            await self._start_modbus()
            if self._opcua is not None:
                await self._publish_opcua()
                await self._opcua.start()
                self.opcua_port = self._opcua.port
        except BaseException:
            await self._close()
            raise
        # Process time starts when everything serves, so scheduled faults are timed from there.
        self._t0 = self._loop.time()
        self._update()
        await self._publish_opcua()
        self._task = asyncio.create_task(self._run(), name="virtual-plc")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for ep in self._endpoints:
            await ep.stop()
        self._endpoints = []
        if self._opcua is not None:
            await self._opcua.stop()
        if self._link is not None:
            self._link.close()
            self._link = None

    async def _start_modbus(self) -> None:
        for ep in self._endpoints:
            await ep.start()
            if ep.transport == "tcp":
                self.modbus_port = ep.port
            elif ep.transport == "rtu_tcp":
                self.rtu_tcp_port = ep.port
        if self._link is not None:
            self._link.passing = True

    async def _stop_modbus(self) -> None:
        if self._link is not None:
            self._link.passing = False
        for ep in self._endpoints:
            await ep.stop()

    async def restart_modbus(self, down_s: float = 0.0) -> None:
        """Stop every Modbus server (connections are closed), wait, start again on the same
        ports. Register values and writes survive; the process keeps running meanwhile."""
        async with self._modbus_lock:
            await self._stop_modbus()
            await asyncio.sleep(down_s)
            await self._start_modbus()
            self._down_by_fault = False  # a disconnect still in force takes it down again

    async def restart_opcua(self, down_s: float = 0.0) -> None:
        """Stop the OPC-UA server, wait, start a fresh one on the same port: sessions and
        subscriptions are gone, as after a real restart; values and setpoints survive."""
        if self._opcua is None:
            raise RuntimeError("this virtual PLC has no OPC-UA server")
        await self._opcua.stop()
        await asyncio.sleep(down_s)
        await self._publish_opcua()
        await self._opcua.start()

    # --- faults -------------------------------------------------------------------------------

    def inject(
        self, kind: str, *, unit: int | None = None, duration_s: float | None = None, **params: Any
    ) -> None:
        """Start a fault now: stop_answering, exception (code=), slow (delay_ms=), garbage
        (mode=), spike/drift (tag=, magnitude=), stuck (tag=), bad_status (status=), disconnect.
        `unit=None` means every unit; `duration_s=None` means until `clear`."""
        self._add(PlcFault(kind, self.elapsed_s(), duration_s, unit, params), unit, scheduled=False)

    def clear(self, kind: str | None = None, *, unit: int | None = None) -> None:
        """End the matching faults, injected and scheduled alike: of `kind` (None: every kind)
        given for `unit` (None: given for any unit or for all)."""
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        self._faults.clear(kind, unit)
        for p in self._pumps.values():
            if unit is None or unit == p.unit:
                p.scheduled = [f for f in p.scheduled if kind is not None and f.kind != kind]
                p.injected = [f for f in p.injected if kind is not None and f.kind != kind]

    def _schedule(
        self, faults: Sequence[FaultSpec] | Mapping[str, Sequence[FaultSpec]]
    ) -> list[tuple[int | None, FaultSpec]]:
        if isinstance(faults, Mapping):
            by_name = {name: u for u, name in self.units.items()}
            out: list[tuple[int | None, FaultSpec]] = []
            for name, specs in faults.items():
                if name not in by_name:
                    raise ValueError(f"faults: no device {name!r}; devices: {', '.join(by_name)}")
                out.extend((by_name[name], s) for s in specs)
            return out
        return [(s.unit if isinstance(s, PlcFault) else None, s) for s in faults]

    def _add(self, spec: FaultSpec, unit: int | None, *, scheduled: bool) -> None:
        if isinstance(spec, FaultConfig):
            params: dict[str, Any] = {}
            kind = {"raise": "exception", "hang": "stop_answering"}.get(spec.kind, spec.kind)
            if spec.kind == "raise":
                params["code"] = ExcCodes.DEVICE_FAILURE
                bad = PlcFault("bad_status", spec.at_s, spec.duration_s, unit)
                self._add(bad, unit, scheduled=scheduled)
            if spec.tag is not None:
                params = {"tag": spec.tag}
                if spec.kind != "stuck":
                    params["magnitude"] = spec.magnitude
            if spec.kind == "disconnect":
                unit = None
            spec = PlcFault(kind, spec.at_s, spec.duration_s, unit, params)
        kind, params = spec.kind, dict(spec.params)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        unknown = set(params) - _PARAMS[kind]
        if unknown:
            raise ValueError(f"fault {kind!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        if unit is not None and unit not in self.units:
            raise ValueError(f"fault {kind!r}: no unit {unit}; units: {sorted(self.units)}")
        if spec.duration_s is not None and not spec.duration_s > 0:
            raise ValueError(f"fault {kind!r}: duration_s must be > 0")
        if kind in PROCESS_FAULTS:
            self._add_process_fault(spec, unit, params, scheduled)
            return
        if kind == "exception":
            code = params.get("code", ExcCodes.DEVICE_BUSY)
            code = EXCEPTION_CODES.get(code, code) if isinstance(code, str) else code
            if not isinstance(code, int) or code not in set(ExcCodes):
                known = ", ".join(f"{n} ({c})" for n, c in EXCEPTION_CODES.items())
                raise ValueError(f"fault 'exception': code must be one of {known}")
            params["code"] = int(code)
        elif kind == "slow":
            params["delay_ms"] = float(params.get("delay_ms", 1000.0))
            if not params["delay_ms"] > 0:
                raise ValueError("fault 'slow': delay_ms must be > 0")
        elif kind == "garbage":
            params["mode"] = params.get("mode", "truncated")
            if params["mode"] not in GARBAGE_MODES:
                raise ValueError(f"fault 'garbage': mode must be one of {', '.join(GARBAGE_MODES)}")
        elif kind == "bad_status":
            params["status"] = params.get("status", "BadDeviceFailure")
            if not str(params["status"]).startswith("Bad") or not hasattr(
                StatusCodes, params["status"]
            ):
                raise ValueError(
                    f"fault 'bad_status': {params['status']!r} is not a Bad status code"
                )
        elif kind == "disconnect" and unit is not None:
            raise ValueError("fault 'disconnect' takes the whole Modbus server down; remove unit")
        end = math.inf if spec.duration_s is None else spec.at_s + spec.duration_s
        self._faults.add(Fault(kind, unit, spec.at_s, end, params, scheduled))

    def _add_process_fault(
        self, spec: PlcFault, unit: int | None, params: dict[str, Any], scheduled: bool
    ) -> None:
        tag = params.get("tag")
        if tag not in _SIGNALS:
            raise ValueError(f"fault {spec.kind!r}: tag must be one of {', '.join(_SIGNALS)}")
        if unit is not None and unit not in self._pumps:
            raise ValueError(f"fault {spec.kind!r}: unit {unit} is not a pump")
        fc = FaultConfig(
            kind=spec.kind,  # type: ignore[arg-type]
            at_s=spec.at_s,
            duration_s=spec.duration_s or _FOREVER_S,
            tag=tag,
            magnitude=float(params.get("magnitude", 0.0)),
        )
        for p in self._pumps.values():
            if unit is None or unit == p.unit:
                (p.scheduled if scheduled else p.injected).append(fc)

    # --- writes from clients ------------------------------------------------------------------

    def _on_write(self, unit: int, name: str, new: PlainValue) -> None:
        pump = self._pumps.get(unit)
        if pump is None:
            return
        if name == "setpoint_m3h":
            pump.setpoint_m3h = float(new)
        elif name == "run_command":
            pump.run = bool(new)
        else:
            return
        self._values[unit][name] = new
        self._image.set(unit, name, new)

    # --- the process loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._loop is not None
        period = self.update_ms / 1000.0
        deadline = self._loop.time()
        while True:
            deadline += period
            await asyncio.sleep(max(0.0, deadline - self._loop.time()))
            if deadline < self._loop.time():
                deadline = self._loop.time()  # overran: skip, don't burst
            try:
                self._update()
                await self._publish_opcua()
                await self._apply_disconnect()
            except Exception:
                log.exception("virtual PLC: update failed")

    def _update(self) -> None:
        t = self.elapsed_s()
        total_kw = _BASE_KW
        for p in self._pumps.values():
            v = self._pump_values(p, t)
            self._values[p.unit] = v
            for name, x in v.items():
                self._image.set(p.unit, name, x)
            if p.run:
                flow, bar = float(v["flow_m3h"]), float(v["pressure_bar"])
                total_kw += flow * bar / 36.0 / _EFFICIENCY + _PUMP_AUX_KW
        if METER_UNIT in self.units:
            m = self._meter_values(t, total_kw)
            self._values[METER_UNIT] = m
            for name, x in m.items():
                self._image.set(METER_UNIT, name, x)

    def _pump_values(self, p: _Pump, t: float) -> dict[str, PlainValue]:
        faults = [*p.scheduled, *p.injected]
        raw = {s: value("pump", p.seed, s, t, faults) for s in _SIGNALS}
        off = p.setpoint_m3h - _MEAN_FLOW
        if p.run:
            flow = max(0.0, raw["flow_m3h"] + off)
            bar = max(0.0, raw["pressure_bar"] - _BAR_PER_M3H * off)
            vib = max(0.0, raw["vibration_mm_s"])
        else:
            flow = bar = vib = 0.0
        temp = raw["temperature_c"]
        dt = t - p.t_last if t >= p.t_last else 0.0
        p.t_last = t
        if p.run:
            p.run_s += dt
            p.volume_m3 += flow * dt / 3600.0
        shifted = {"flow_m3h": off, "pressure_bar": -_BAR_PER_M3H * off}
        fault = p.run and any(
            not (s.low + shifted.get(s.name, 0.0) <= x <= s.high + shifted.get(s.name, 0.0))
            for s, x in zip(_SIGNALS.values(), (flow, bar, temp, vib), strict=True)
        )
        return {
            "flow_m3h": flow,
            "pressure_bar": bar,
            "temperature_c": temp,
            "vibration_mm_s": vib,
            "run_hours": int(p.run_s // 3600),
            "status": (STATUS_RUNNING if p.run else 0) | (STATUS_FAULT if fault else 0),
            "reserved_9": 0,
            "total_volume_m3": p.volume_m3,
            "setpoint_m3h": p.setpoint_m3h,
            "device_name": f"VPLC PUMP {p.unit}",
            "run_command": p.run,
            "running": p.run,
            "fault": fault,
        }

    def _meter_values(self, t: float, power_kw: float) -> dict[str, PlainValue]:
        step = math.floor(t / 0.1)
        volts = 230.0 + 2.0 * unit_noise(self._seed, "meter.voltage", step)
        hz = 50.0 + 0.02 * unit_noise(self._seed, "meter.frequency", step)
        pf = 0.87 + 0.01 * unit_noise(self._seed, "meter.power_factor", step)
        self._energy_kwh += power_kw * max(0.0, t - self._t_meter) / 3600.0
        self._t_meter = t
        return {
            "voltage_v": volts,
            "current_a": power_kw * 1000.0 / (3.0 * volts * pf),
            "power_kw": power_kw,
            "power_factor": pf,
            "frequency_hz": hz,
            "energy_kwh": self._energy_kwh,
            "device_name": "VPLC METER",
        }

    async def _publish_opcua(self) -> None:
        if self._opcua is None:
            return
        for obj in self._ua_objects:
            bad = self._faults.active("bad_status", obj.unit)
            status = str(bad[0].params["status"]) if bad else None
            await self._opcua.publish(obj, self._values[obj.unit], bad_status=status)

    async def _apply_disconnect(self) -> None:
        down = bool(self._faults.active("disconnect"))
        if down == self._down_by_fault or not self._endpoints:
            return
        async with self._modbus_lock:
            if down:
                await self._stop_modbus()
            else:
                await self._start_modbus()
            self._down_by_fault = down
