"""Schema fragments shared by the gateway config and every adapter's device config.

Adapters build their device models from `DeviceBase` and `TagBase`; validators are plain
functions here so that every error message reads the same way.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# MQTT topic levels must not contain these; names end up in topics.
_NAME_HELP = (
    "must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit"
)


def _check_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise PydanticCustomError("name", _NAME_HELP)
    return v


# The constraints behind an AfterValidator never reach the JSON schema (pydantic drops or
# misnames them), so each type states its schema for editors explicitly.
Name = Annotated[
    str,
    AfterValidator(_check_name),
    Field(pattern=NAME_RE.pattern),
    WithJsonSchema({"type": "string", "pattern": NAME_RE.pattern}),
]


def int_range(lo: int, hi: int) -> object:
    """An int constrained to lo..hi with the message `must be lo..hi`."""

    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise PydanticCustomError("range", "must be {lo}..{hi}", {"lo": lo, "hi": hi})
        return v

    return Annotated[
        int,
        AfterValidator(check),
        Field(ge=lo, le=hi),
        WithJsonSchema({"type": "integer", "minimum": lo, "maximum": hi}),
    ]


def positive(v: float) -> float:
    if not v > 0:
        raise PydanticCustomError("positive", "must be greater than 0")
    return v


def non_negative(v: float) -> float:
    if v < 0:
        raise PydanticCustomError("non_negative", "must be 0 or more")
    return v


PositiveFloat = Annotated[
    float,
    AfterValidator(positive),
    Field(gt=0),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0}),
]
NonNegativeFloat = Annotated[
    float,
    AfterValidator(non_negative),
    Field(ge=0),
    WithJsonSchema({"type": "number", "minimum": 0}),
]
PositiveInt = Annotated[
    int,
    AfterValidator(positive),
    Field(gt=0),
    WithJsonSchema({"type": "integer", "exclusiveMinimum": 0}),
]
Port = int_range(1, 65535)


class Strict(BaseModel):
    """Base of every config model: no unknown keys, no silent type coercion."""

    # TOML has inf and nan; neither is a sensible period, limit or deadband.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class SecretRef(Strict):
    """A secret taken from a file or an environment variable, never written inline."""

    file: str | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise PydanticCustomError("secret", "give exactly one of `file` or `env`")
        return self


Forward = Literal["summary", "raw", "none"]


class TagBase(Strict):
    """What every tag has, whatever its protocol: a name and how the edge stage treats it."""

    name: Name
    unit: str = ""
    # raw forwarding (forward = "raw"): report by exception
    deadband: NonNegativeFloat | None = None  # absolute change that counts as new
    deadband_percent: Annotated[float, Field(ge=0, le=100)] | None = None  # of the last value sent
    heartbeat_s: PositiveFloat | None = None  # send at least this often even without change
    # summaries: count/min/max/mean/std over aligned windows of this length
    window_s: PositiveFloat | None = None  # None: the gateway's [edge] default
    forward: Forward = "summary"

    @model_validator(mode="after")
    def _one_deadband(self) -> TagBase:
        if self.deadband is not None and self.deadband_percent is not None:
            raise PydanticCustomError("deadband", "give `deadband` or `deadband_percent`, not both")
        return self


class SupervisorConfig(Strict):
    """How a device service recovers: exponential backoff with jitter and a circuit breaker."""

    backoff_initial_ms: PositiveInt = 200
    backoff_max_ms: PositiveInt = 30_000
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.2  # fraction of the delay, drawn uniformly
    breaker_failures: PositiveInt = 5  # consecutive failures that open the breaker
    breaker_cooldown_s: PositiveFloat = 30.0  # open time before a half-open trial
    degraded_window_s: PositiveFloat = 60.0  # errors within this window keep health degraded


class DeviceBase(Strict):
    """What every device has; adapters subclass this with `type: Literal[...]` and their tags."""

    id: Name
    enabled: bool = True
    period_ms: PositiveInt = 1000
    timeout_ms: PositiveInt = 2000
    supervisor: SupervisorConfig = SupervisorConfig()


Loc = tuple[str | int, ...]


def fail_at(title: str, kind: str, problems: list[tuple[Loc, str, object]]) -> NoReturn:
    """Raise every problem at its own key, all at once; pydantic nests these locs under the
    model's own path. For checks that look at several fields of a model together."""
    raise ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError(kind, "{message}", {"message": msg}),
                loc=loc,
                input=value,
            )
            for loc, msg, value in problems
        ],
    )
