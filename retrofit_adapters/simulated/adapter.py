"""The `simulated` device: a process model read through the adapter contract, with device faults
(raise, hang, garbage, disconnect) that exercise the supervisor the way a broken PLC would.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, cast

from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError
from gateway.model import Value
from retrofit_adapters.base import CAP_READ, Adapter, Reading
from retrofit_adapters.simulated.config import SimulatedDevice
from retrofit_adapters.simulated.process import MODELS, NOISE_STEP_S, device_fault, value

GARBAGE_TAG = "no_such_tag"  # the unknown tag a garbage read adds
# What a garbage read puts in place of the values after the first (which is always NaN),
# rotating with tag and time step.
_JUNK: tuple[object, ...] = (None, math.inf, b"\xff\xfe", -math.inf, [1, 2])


class SimulatedAdapter(Adapter):
    type_name = "simulated"
    config_model = SimulatedDevice
    capabilities = frozenset({CAP_READ})

    def __init__(self, cfg: DeviceBase, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(cfg, clock=clock)
        if not isinstance(cfg, SimulatedDevice):
            raise TypeError(f"SimulatedAdapter needs a SimulatedDevice, got {type(cfg).__name__}")
        self._dev = cfg
        self._tags = cfg.tag_names()
        signals = MODELS[cfg.model]
        unknown = [n for n in self._tags if n not in signals]
        if unknown:
            raise DeviceError(
                f"simulated device {cfg.id!r}: model {cfg.model!r} has no signal "
                f"{', '.join(map(repr, unknown))}; it has {', '.join(signals)}"
            )
        self._t0: float | None = None  # set by the first open(); the process keeps running after
        self._connected = False

    def tag_names(self) -> list[str]:
        return list(self._tags)

    def elapsed_s(self) -> float:
        """Process time: seconds since the first open(), 0 before it."""
        return 0.0 if self._t0 is None else self.clock() - self._t0

    async def open(self) -> None:
        if self._t0 is None:
            self._t0 = self.clock()
        if device_fault(self._dev.faults, self.elapsed_s()) == "disconnect":
            raise DeviceError(f"simulated device {self._dev.id!r}: connection refused (disconnect)")
        self._connected = True

    async def read(self) -> list[Reading]:
        if not self._connected:
            raise DeviceError(f"simulated device {self._dev.id!r}: not open")
        t = self.elapsed_s()
        fault = device_fault(self._dev.faults, t)
        if fault == "disconnect":
            self._connected = False
            raise DeviceError(f"simulated device {self._dev.id!r}: connection lost (disconnect)")
        if fault == "raise":
            raise DeviceError(f"simulated device {self._dev.id!r}: read failed (raise fault)")
        if fault == "hang":
            # Never returns: only the caller's timeout (or cancellation) ends this read.
            await asyncio.Event().wait()
        if fault == "garbage":
            return self._garbage(t)
        d = self._dev
        return [Reading(tag, value(d.model, d.seed, tag, t, d.faults)) for tag in self._tags]

    async def close(self) -> None:
        self._connected = False

    def _garbage(self, t: float) -> list[Reading]:
        step = math.floor(t / NOISE_STEP_S)
        # Deliberately outside the types the contract allows: that is the point of the fault.
        out = [
            Reading(tag, cast(Value, math.nan if i == 0 else _JUNK[(i + step) % len(_JUNK)]))
            for i, tag in enumerate(self._tags)
        ]
        out.append(Reading(GARBAGE_TAG, 1.0))
        out.append(cast(Reading, cast(Any, ("flow_m3h", 40.0))))  # not a Reading at all
        return out
