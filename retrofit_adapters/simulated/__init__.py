"""The `simulated` device type: a deterministic pump with injectable faults, used by the tests and
the demo until real protocol adapters land.
"""

from __future__ import annotations

# Only the config and the pure process model here: gateway.config imports this package for the
# schema, and importing the adapter (and with it the adapter base) from here would make a cycle.
# The adapter is reached through retrofit_adapters.registry or its own module.
from retrofit_adapters.simulated.config import (
    PROCESS_SIGNALS,
    FaultConfig,
    SimulatedDevice,
    SimulatedTag,
)
from retrofit_adapters.simulated.process import MODELS, NOISE_STEP_S, Signal, normal_value, value

__all__ = [
    "MODELS",
    "NOISE_STEP_S",
    "PROCESS_SIGNALS",
    "FaultConfig",
    "Signal",
    "SimulatedDevice",
    "SimulatedTag",
    "normal_value",
    "value",
]
