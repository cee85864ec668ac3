"""The virtual PLC's OPC-UA side: an asyncua server publishing the plant under
Objects/Plant with stable string NodeIds (ns=2;s=Pump1.Flow) and writable setpoints."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.server.address_space import NodeData
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import BadOutOfRange

from tools.net import free_port
from tools.virtual_plc.registers import PlainValue, VirtualPlcError

__all__ = [
    "APPLICATION_URI",
    "METER_VARIABLES",
    "NAMESPACE_URI",
    "PUMP_VARIABLES",
    "OpcUaObject",
    "OpcUaServer",
    "UaVariable",
]

NAMESPACE_URI = "urn:fogmesh:virtual-plc"
# The application URI must differ from the namespace URI, or the namespace lands on index 1.
APPLICATION_URI = "urn:fogmesh:virtual-plc:server"


@dataclass(frozen=True, slots=True)
class UaVariable:
    browse_name: str  # also the last part of the NodeId: ns=2;s=<Object>.<browse_name>
    point: str  # the process value it publishes (same names as the Modbus register map)
    vtype: str  # ua.VariantType member name
    unit: str = ""
    writable: bool = False
    low: float | None = None
    high: float | None = None


PUMP_VARIABLES: tuple[UaVariable, ...] = (
    UaVariable("Flow", "flow_m3h", "Double", "m3/h"),
    UaVariable("Pressure", "pressure_bar", "Double", "bar"),
    UaVariable("Temperature", "temperature_c", "Double", "degC"),
    UaVariable("Vibration", "vibration_mm_s", "Double", "mm/s"),
    UaVariable("Running", "running", "Boolean"),
    UaVariable("Fault", "fault", "Boolean"),
    UaVariable("RunHours", "run_hours", "UInt32", "h"),
    UaVariable("TotalVolume", "total_volume_m3", "Double", "m3"),
    UaVariable("Setpoint", "setpoint_m3h", "Double", "m3/h", writable=True, low=0.0, high=60.0),
    UaVariable("RunCommand", "run_command", "Boolean", writable=True),
    UaVariable("DeviceName", "device_name", "String"),
)

METER_VARIABLES: tuple[UaVariable, ...] = (
    UaVariable("Voltage", "voltage_v", "Double", "V"),
    UaVariable("Current", "current_a", "Double", "A"),
    UaVariable("Power", "power_kw", "Double", "kW"),
    UaVariable("PowerFactor", "power_factor", "Double"),
    UaVariable("Frequency", "frequency_hz", "Double", "Hz"),
    UaVariable("Energy", "energy_kwh", "Double", "kWh"),
)

_DEFAULTS: dict[str, PlainValue] = {"Double": 0.0, "Boolean": False, "UInt32": 0, "String": ""}


def _nodeid(name: str, idx: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(idx))


def _qname(name: str, idx: int) -> ua.QualifiedName:
    return ua.QualifiedName(ua.String(name), ua.Int16(idx))


@dataclass(frozen=True, slots=True)
class OpcUaObject:
    name: str  # "Pump1", "Meter"
    unit: int  # the Modbus unit id of the same device
    variables: tuple[UaVariable, ...]


class OpcUaServer:
    """One asyncua server; `restart` builds a fresh one on the same port (sessions are lost, as
    on a real restart), published values and setpoints survive in the PLC."""

    def __init__(
        self,
        objects: Sequence[OpcUaObject],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cert: Path | None = None,
        key: Path | None = None,
        on_write: Callable[[int, str, PlainValue], None] | None = None,
    ) -> None:
        if (cert is None) != (key is None):
            raise VirtualPlcError("virtual PLC: OPC-UA security needs both a certificate and a key")
        self.objects = list(objects)
        self.host = host
        self.port = port
        self.cert = cert
        self.key = key
        self.on_write = on_write
        self._server: Server | None = None
        self._nodes: dict[tuple[str, str], ua.NodeId] = {}  # (object, point) → NodeId
        self._writable: dict[ua.NodeId, tuple[int, UaVariable]] = {}
        self._last: dict[tuple[str, str], Any] = {}  # last published value per node
        self._own: ua.DataValue | None = None  # the DataValue this class is writing right now

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/fogmesh/"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        if not self.port:
            self.port = free_port(self.host)
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("fogmesh virtual PLC")
        await server.set_application_uri(APPLICATION_URI)
        if self.cert is not None and self.key is not None:
            try:
                await server.load_certificate(str(self.cert))
                await server.load_private_key(str(self.key))
            except (OSError, ValueError) as exc:
                raise VirtualPlcError(
                    f"virtual PLC: cannot load OPC-UA certificate: {exc}"
                ) from exc
            server.set_security_policy(
                [
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    ua.SecurityPolicyType.Basic256Sha256_Sign,
                ]
            )
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        idx = await server.register_namespace(NAMESPACE_URI)
        plant = await server.nodes.objects.add_folder(_nodeid("Plant", idx), _qname("Plant", idx))
        for obj in self.objects:
            node = await plant.add_object(_nodeid(obj.name, idx), _qname(obj.name, idx))
            for v in obj.variables:
                nodeid = _nodeid(f"{obj.name}.{v.browse_name}", idx)
                initial = self._last.get((obj.name, v.point), _DEFAULTS[v.vtype])
                var = await node.add_variable(
                    nodeid,
                    _qname(v.browse_name, idx),
                    initial,
                    varianttype=getattr(ua.VariantType, v.vtype),
                )
                self._nodes[(obj.name, v.point)] = var.nodeid
                if v.writable:
                    await var.set_writable()
                    self._writable[var.nodeid] = (obj.unit, v)
                    server.set_attribute_value_setter(var.nodeid, self._setter)
        try:
            await server.start()
        except OSError as exc:
            raise VirtualPlcError(
                f"virtual PLC: cannot serve OPC-UA on {self.endpoint}: {exc}"
            ) from exc
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()

    async def publish(
        self, obj: OpcUaObject, values: Mapping[str, PlainValue], *, bad_status: str | None = None
    ) -> None:
        """Write the object's current values (SourceTimestamp = now); a measured value becomes
        a bad DataValue while `bad_status` (a StatusCodes name) is set."""
        server = self._server
        if server is None:
            for v in obj.variables:
                if v.point in values:
                    self._last[(obj.name, v.point)] = values[v.point]
            return
        now = ua.DateTime.now(UTC)
        bad = getattr(StatusCodes, bad_status) if bad_status else None
        for v in obj.variables:
            if v.point not in values:
                continue
            value = values[v.point]
            key = (obj.name, v.point)
            if v.writable and self._last.get(key) == value:
                continue  # unchanged setpoints are not rewritten (a client may have just set one)
            self._last[key] = value
            if bad is not None and not v.writable:
                dv = ua.DataValue(
                    StatusCode=ua.StatusCode(bad), SourceTimestamp=now, ServerTimestamp=now
                )
            else:
                variant = ua.Variant(value, getattr(ua.VariantType, v.vtype))
                dv = ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now)
            self._own = dv
            try:
                await server.write_attribute_value(self._nodes[key], dv)
            finally:
                self._own = None

    def _setter(self, node: NodeData, attr: AttributeIds, dv: ua.DataValue) -> None:
        # Called by asyncua for every write of a writable node, ours included. A client write is
        # checked here; raising makes asyncua answer the Write with that status.
        if dv is not self._own and node.nodeid in self._writable:
            unit, var = self._writable[node.nodeid]
            value = dv.Value.Value if dv.Value is not None else None
            if not isinstance(value, float | int | bool | str):
                raise BadOutOfRange()  # type: ignore[no-untyped-call]
            if var.vtype == "Double":
                if not isinstance(value, float) or not math.isfinite(value):
                    raise BadOutOfRange()  # type: ignore[no-untyped-call]
                if (var.low is not None and value < var.low) or (
                    var.high is not None and value > var.high
                ):
                    raise BadOutOfRange()  # type: ignore[no-untyped-call]
            obj = next(o.name for o in self.objects if o.unit == unit)
            self._last[(obj, var.point)] = value
            if self.on_write is not None:
                self.on_write(unit, var.point, value)
        attval = node.attributes[attr]
        attval.value = dv
        attval.value_callback = None
