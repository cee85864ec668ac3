"""Deterministic process models behind the simulated device: every value is a pure function of
(seed, signal, t), with bounded noise, so a normal value never leaves its documented band.

Alarm rules set just outside a signal's band therefore fire only when a fault is injected.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from retrofit_adapters.simulated.config import FaultConfig

NOISE_STEP_S = 0.1  # the noise is redrawn every 100 ms of process time

# Device-wide faults, most severe first: when several are active, the first one wins.
DEVICE_FAULTS: tuple[str, ...] = ("disconnect", "raise", "hang", "garbage")

_MASK64 = (1 << 64) - 1
_PHASE_INDEX = _MASK64  # a noise index no time step reaches, reserved for the phase


@dataclass(frozen=True, slots=True)
class Signal:
    """value(t) = mean + amplitude·sin(2πt/cycle_s + phase(seed)) + noise·u(seed, step),
    u uniform in [-1, 1); so the value stays within mean ± (|amplitude| + noise) ⊂ [low, high].
    """

    name: str
    unit: str
    mean: float
    amplitude: float  # of the slow sinusoid; < 0: opposite to its phase_of signal
    cycle_s: float
    noise: float  # half-width of the uniform noise
    low: float  # documented normal band: alarm limits belong outside it
    high: float
    phase_of: str = ""  # share the phase of another signal (coupled signals); "" = own phase


# A centrifugal pump near its duty point. Pressure shares the flow's phase with a negative
# amplitude: on a pump curve, head falls as flow rises.
PUMP: tuple[Signal, ...] = (
    Signal("flow_m3h", "m3/h", 40.0, 2.5, 600.0, 1.0, 36.0, 44.0),
    Signal("pressure_bar", "bar", 4.0, -0.1, 600.0, 0.05, 3.8, 4.2, phase_of="flow_m3h"),
    Signal("temperature_c", "degC", 45.0, 3.0, 1800.0, 1.0, 40.0, 50.0),
    Signal("vibration_mm_s", "mm/s", 2.0, 0.25, 300.0, 0.15, 1.5, 2.5),
)

MODELS: dict[str, dict[str, Signal]] = {"pump": {s.name: s for s in PUMP}}


def _mix(x: int) -> int:
    # splitmix64's finalizer: cheap, and unlike hash() identical in every process.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def unit_noise(seed: int, key: str, index: int) -> float:
    """A uniform number in [-1, 1), a pure function of its arguments."""
    h = _mix(_mix(seed & _MASK64) ^ zlib.crc32(key.encode()))
    h = _mix(h ^ (index & _MASK64))
    return (h >> 11) * (2.0 / (1 << 53)) - 1.0


def normal_value(model: str, seed: int, signal: str, t: float) -> float:
    """The fault-free value of `signal` at `t` seconds after the device started."""
    s = MODELS[model][signal]
    phase = math.pi * unit_noise(seed, s.phase_of or s.name, _PHASE_INDEX)
    step = math.floor(t / NOISE_STEP_S)
    wave = math.sin(2.0 * math.pi * t / s.cycle_s + phase)
    return s.mean + s.amplitude * wave + s.noise * unit_noise(seed, s.name, step)


def fault_active(fault: FaultConfig, t: float) -> bool:
    return fault.at_s <= t < fault.at_s + fault.duration_s


def value(
    model: str, seed: int, signal: str, t: float, faults: Sequence[FaultConfig] = ()
) -> float:
    """The value of `signal` at `t` with the tag faults (spike, drift, stuck) of `faults` applied."""
    mine = [f for f in faults if f.tag == signal]
    for i, f in enumerate(mine):
        if f.kind == "stuck" and fault_active(f, t):
            # Frozen at what it read when the fault began, other faults included; leaving this
            # fault out of the recursion is what ends it.
            return value(model, seed, signal, f.at_s, mine[:i] + mine[i + 1 :])
    v = normal_value(model, seed, signal, t)
    for f in mine:
        if fault_active(f, t):
            if f.kind == "spike":
                v += f.magnitude
            elif f.kind == "drift":
                v += f.magnitude * (t - f.at_s)
    return v


def device_fault(faults: Sequence[FaultConfig], t: float) -> str | None:
    """The device-wide fault in force at `t` (see DEVICE_FAULTS for precedence), or None."""
    active = {f.kind for f in faults if f.kind in DEVICE_FAULTS and fault_active(f, t)}
    for kind in DEVICE_FAULTS:
        if kind in active:
            return kind
    return None
