"""Finds the adapter class for a device `type`, importing its module only when it is asked for,
so that a gateway without Modbus devices never imports pymodbus.
"""

from __future__ import annotations

import importlib

from gateway.errors import DeviceError
from retrofit_adapters.base import Adapter

# type -> "module:Class". A new adapter adds one line here and its config model to
# gateway.config.models.DEVICE_MODELS (a test checks that the two lists agree).
_ADAPTERS: dict[str, str] = {
    "simulated": "retrofit_adapters.simulated.adapter:SimulatedAdapter",
    "modbus_tcp": "retrofit_adapters.modbus.adapter:ModbusTcpAdapter",
    "modbus_rtu": "retrofit_adapters.modbus.adapter:ModbusRtuAdapter",
    "opcua": "retrofit_adapters.opcua.adapter:OpcUaAdapter",
    "mesh": "retrofit_adapters.mesh.adapter:MeshAdapter",
}


def known_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(type_name: str) -> type[Adapter]:
    """The adapter class registered for `type_name`; DeviceError if unknown or not loadable."""
    target = _ADAPTERS.get(type_name)
    if target is None:
        raise DeviceError(
            f"unknown device type {type_name!r}; known types: {', '.join(known_types())}"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Usually a vendor library that is not installed; say which one.
        missing = f" (missing module {exc.name!r})" if exc.name else ""
        raise DeviceError(f"device type {type_name!r} could not be loaded{missing}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise DeviceError(f"device type {type_name!r}: {target} is not an Adapter subclass")
    if cls.type_name != type_name:
        raise DeviceError(
            f"device type {type_name!r}: {target} declares type_name {cls.type_name!r}"
        )
    return cls
