"""Config schema of the `simulated` device: a deterministic process with injectable faults."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator
from pydantic_core import PydanticCustomError

from gateway.config.fragments import (
    DeviceBase,
    Name,
    NonNegativeFloat,
    PositiveFloat,
    Strict,
    TagBase,
)

# Signals of each process model; a simulated device's tags must be named after them.
PROCESS_SIGNALS: dict[str, tuple[str, ...]] = {
    "pump": ("flow_m3h", "pressure_bar", "temperature_c", "vibration_mm_s"),
}

FaultKind = Literal["spike", "drift", "stuck", "raise", "hang", "garbage", "disconnect"]
_TAG_FAULTS = ("spike", "drift", "stuck")


class FaultConfig(Strict):
    """A fault switched on `at_s` seconds after the device starts, for `duration_s` seconds.

    spike: adds `magnitude` to `tag`; drift: adds magnitude × elapsed seconds; stuck: freezes
    `tag`; raise: reads fail; hang: reads never return; garbage: reads return nonsense;
    disconnect: the connection drops and reopening fails.
    """

    kind: FaultKind
    at_s: NonNegativeFloat
    duration_s: PositiveFloat
    tag: Name | None = None
    magnitude: float = 0.0

    @model_validator(mode="after")
    def _tag_needed(self) -> FaultConfig:
        if self.kind in _TAG_FAULTS and self.tag is None:
            raise PydanticCustomError(
                "fault_tag", "fault `{kind}` needs a `tag`", {"kind": self.kind}
            )
        if self.kind not in _TAG_FAULTS and self.tag is not None:
            raise PydanticCustomError(
                "fault_tag",
                "fault `{kind}` applies to the whole device; remove `tag`",
                {"kind": self.kind},
            )
        return self


class SimulatedTag(TagBase):
    pass


class SimulatedDevice(DeviceBase):
    type: Literal["simulated"]
    model: Literal["pump"] = "pump"
    seed: int = 0
    tags: list[SimulatedTag] = []  # empty: every signal of the model, with default settings
    faults: list[FaultConfig] = []

    def tag_names(self) -> list[str]:
        if self.tags:
            return [t.name for t in self.tags]
        return list(PROCESS_SIGNALS[self.model])

    def effective_tags(self) -> list[SimulatedTag]:
        if self.tags:
            return list(self.tags)
        return [SimulatedTag(name=n) for n in PROCESS_SIGNALS[self.model]]
