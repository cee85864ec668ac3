"""The gateway's TOML config as typed models; devices are a discriminated union on `type`.

Structural checks live here; references between sections are checked in a second pass
(`gateway.config.loader`), so that every problem is reported with its dotted path at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from gateway.config.fragments import (
    NAME_RE,
    Name,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretRef,
    Strict,
    int_range,
)
from retrofit_adapters.mesh.config import MeshDevice
from retrofit_adapters.modbus.config import ModbusRtuDevice, ModbusTcpDevice
from retrofit_adapters.opcua.config import OpcUaDevice
from retrofit_adapters.simulated.config import SimulatedDevice

# Every adapter's device model, in one tuple; a new adapter adds its model here and its class
# to retrofit_adapters.registry (a test checks that the two agree). Config modules are light:
# they never import the vendor libraries.
DEVICE_MODELS: tuple[type[Strict], ...] = (
    SimulatedDevice,
    ModbusTcpDevice,
    ModbusRtuDevice,
    OpcUaDevice,
    MeshDevice,
)
DEVICE_TYPES: tuple[str, ...] = ("simulated", "modbus_tcp", "modbus_rtu", "opcua", "mesh")

# With one member a Union collapses, so the discriminator is added once there are two.
# mypy sees the plain union of the device models.
if TYPE_CHECKING:
    Device = SimulatedDevice | ModbusTcpDevice | ModbusRtuDevice | OpcUaDevice | MeshDevice
else:
    Device = (
        SimulatedDevice
        if len(DEVICE_MODELS) == 1
        else Annotated[Union[DEVICE_MODELS], Field(discriminator="type")]  # noqa: UP007
    )

SINK_SCHEMES = ("mqtt", "mqtts", "sqlite")
OPERATOR = "operator"  # who the audit log names for a write made with [http] token
MIN_TOKEN_CHARS = 16


def _check_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in SINK_SCHEMES:
        raise PydanticCustomError(
            "url",
            "scheme must be one of {schemes}, e.g. mqtt://127.0.0.1:1883 or sqlite:///var/fog.db",
            {"schemes": ", ".join(SINK_SCHEMES)},
        )
    if parts.scheme == "sqlite" and (parts.netloc or not parts.path):
        # sqlite://var/fog.db would silently make "var" a host and open /fog.db
        raise PydanticCustomError(
            "url", "sqlite URL needs a path: sqlite:///relative or sqlite:////absolute"
        )
    if parts.scheme != "sqlite":
        if not parts.hostname:
            raise PydanticCustomError("url", "MQTT URL needs a host: mqtt://host:port")
        if parts.password:
            raise PydanticCustomError(
                "secret_inline",
                "no password in the URL; use [uplink.mqtt] password = {{ file = ... }} or {{ env = ... }}",
            )
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise PydanticCustomError("url", "bad port: {err}", {"err": str(exc)}) from exc
    return v


SinkUrl = Annotated[str, AfterValidator(_check_url)]


class GatewaySection(Strict):
    id: Name
    site: Name
    data_dir: str = "var"  # queue, audit log and state; relative to the config file


class HttpToken(Strict):
    """One operator's bearer token; `name` is who the audit log says wrote."""

    name: Name
    token: SecretRef


class HttpSection(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int_range(0, 65535) = 8080  # type: ignore[valid-type]  # 0: any free port
    # Writes and reloads need a bearer token; with none configured they are refused (deny by
    # default). `token` is audited as OPERATOR; `tokens` tell several operators apart.
    token: SecretRef | None = None
    tokens: list[HttpToken] = []


class TlsConfig(Strict):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip hostname and certificate checks (test rigs only)

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise PydanticCustomError("tls", "give both `cert_file` and `key_file`, or neither")
        return self


class MqttOptions(Strict):
    version: Literal["3.1.1", "5"] = "3.1.1"
    client_id: str | None = None  # default: fogmesh-<site>-<gateway id>
    username: str | None = None
    password: SecretRef | None = None
    tls: TlsConfig | None = None  # also implied by an mqtts:// URL
    keepalive_s: int_range(5, 3600) = 30  # type: ignore[valid-type]
    inflight: int_range(1, 65535) = 256  # type: ignore[valid-type]  # unacknowledged QoS 1 messages


class QueueConfig(Strict):
    path: str | None = None  # default: <data_dir>/queue.db
    max_bytes: PositiveInt = 256 * 1024 * 1024
    max_age_s: PositiveFloat = 7 * 24 * 3600.0
    full_policy: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    synchronous: Literal["normal", "full"] = "normal"  # "full" also survives power loss


class UplinkSection(Strict):
    url: SinkUrl = "sqlite:///var/fog.db"
    drain_rate_msgs_per_s: PositiveFloat = 2000.0  # backlog rate while live data goes first
    retry_initial_ms: PositiveInt = 500
    retry_max_ms: PositiveInt = 30_000
    flush_timeout_s: NonNegativeFloat = 5.0  # at shutdown, time allowed to send what is queued
    mqtt: MqttOptions = MqttOptions()
    queue: QueueConfig = QueueConfig()


class EdgeSection(Strict):
    window_s: PositiveFloat = 60.0  # default summary window of tags that set none
    # A window stays open this long past its end for samples still on their way (read before
    # the boundary, processed after it); later ones are counted as late and dropped.
    grace_s: NonNegativeFloat = 2.0


class RuleConfig(Strict):
    """A threshold event on one tag: active when beyond the limit for `for_ms`, cleared with hysteresis."""

    name: Name
    device: Name
    tag: Name
    above: float | None = None
    below: float | None = None
    hysteresis: NonNegativeFloat = 0.0
    for_ms: int_range(0, 86_400_000) = 0  # type: ignore[valid-type]
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _limit(self) -> RuleConfig:
        if self.above is None and self.below is None:
            raise PydanticCustomError("rule", "give `above`, `below`, or both")
        if self.above is not None and self.below is not None and self.below >= self.above:
            raise PydanticCustomError(
                "rule", "`below` must be less than `above` (an alarm band outside below..above)"
            )
        return self


def _some_tags(v: list[str]) -> list[str]:
    if not v:
        raise PydanticCustomError("tags", "give at least one tag")
    return v


def _fraction(v: float) -> float:
    if not 0 < v <= 1:
        raise PydanticCustomError("fraction", "must be greater than 0 and 1 or less")
    return v


def _some_path(v: str) -> str:
    if not v.strip():
        raise PydanticCustomError("path", "must not be empty")
    return v


ModelTags = Annotated[
    list[Name],
    AfterValidator(_some_tags),
    WithJsonSchema(
        {"type": "array", "items": {"type": "string", "pattern": NAME_RE.pattern}, "minItems": 1}
    ),
]
Fraction = Annotated[
    float,
    AfterValidator(_fraction),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
]
ModelPath = Annotated[
    str, AfterValidator(_some_path), WithJsonSchema({"type": "string", "minLength": 1})
]


class ModelConfig(Strict):
    """An int8 anomaly model scored on the gateway over some tags of one device (docs/edge.md).

    `path` is NAME.tflite; its pipeline is NAME.pipeline.json next to it. `tags` are the
    pipeline's channels, in order. Active when the smoothed score stays above the pipeline's
    threshold for `for_samples` rows, cleared at or below threshold × `clear_below`.
    """

    name: Name
    device: Name
    tags: ModelTags
    path: ModelPath  # relative to the config file
    severity: Literal["info", "warning", "critical"] = "warning"
    clear_below: Fraction = 1.0
    for_samples: int_range(1, 1_000_000) = 1  # type: ignore[valid-type]


class GatewayConfig(Strict):
    gateway: GatewaySection
    http: HttpSection = HttpSection()
    uplink: UplinkSection = UplinkSection()
    edge: EdgeSection = EdgeSection()
    devices: list[Device] = []
    rules: list[RuleConfig] = []
    models: list[ModelConfig] = []
