"""A virtual PLC for tests, demos and benchmarks: the simulated pump plant behind real Modbus TCP,
Modbus RTU and OPC-UA servers, with injectable faults (docs/virtual-plc.md).

`fogmesh virtual plc` runs it from the command line (`tools.virtual_plc.cli`). The benchmark's
many-device farm is `tools.virtual_plc.farm`. Names are exported lazily, so importing the
package does not load pymodbus and asyncua until a server is wanted.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "FAULT_KINDS": "tools.virtual_plc.plc",
    "PlcFault": "tools.virtual_plc.plc",
    "VirtualPlc": "tools.virtual_plc.plc",
    "METER_POINTS": "tools.virtual_plc.registers",
    "METER_UNIT": "tools.virtual_plc.registers",
    "PUMP_POINTS": "tools.virtual_plc.registers",
    "Point": "tools.virtual_plc.registers",
    "VirtualPlcError": "tools.virtual_plc.registers",
    "decode": "tools.virtual_plc.registers",
    "encode": "tools.virtual_plc.registers",
    "add_arguments": "tools.virtual_plc.cli",
    "command_virtual_plc": "tools.virtual_plc.cli",
    "main": "tools.virtual_plc.cli",
    "parse_fault": "tools.virtual_plc.cli",
    "serve": "tools.virtual_plc.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tools.virtual_plc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
