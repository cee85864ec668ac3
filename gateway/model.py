"""Values that cross the gateway's stages: samples on the bus, messages for the fog, device status."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.stats import LatencyHistogram

Value = float | int | bool | str


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Health(StrEnum):
    STARTING = "starting"  # no successful read yet
    OK = "ok"
    DEGRADED = "degraded"  # reads fail now and then, or return bad data
    DOWN = "down"  # the circuit breaker is open


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one tag, as it enters the bus."""

    device: str
    tag: str
    value: Value
    quality: Quality
    ts: float  # seconds since the epoch, taken when the value was read


# Message kinds that travel to the fog (the last segment of the MQTT topic).
KIND_SUMMARY = "summary"
KIND_EVENT = "event"
KIND_RAW = "raw"
KIND_STATUS = "status"
KIND_GAP = "gap"  # the gateway declares seqs it dropped on purpose (queue policy)

GATEWAY_DEVICE = "_gateway"  # device name used for messages about the gateway itself


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the edge stage hands to the durable queue; `seq` is assigned there."""

    device: str
    kind: str
    ts_ms: int  # original time of the data, kept through backfill
    data: dict[str, Any]


@dataclass(slots=True)
class DeviceStatus:
    """Live status of one device service; read by the HTTP API and the metrics page."""

    id: str
    type: str
    health: Health = Health.STARTING
    last_error: str | None = None
    last_error_ts: float | None = None
    last_success_ts: float | None = None
    last_values: dict[str, Sample] = field(default_factory=dict)
    polls_total: int = 0
    errors_total: int = 0
    reconnects_total: int = 0
    bad_data_total: int = 0
    skipped_polls_total: int = 0  # poll deadlines missed because a poll overran its period
    consecutive_failures: int = 0
    poll_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True)
class UplinkStats:
    """Live status of the store-and-forward queue and the fog sink; read by the API and metrics."""

    url: str = ""  # the sink URL with any credentials removed
    connected: bool = False
    queue_depth: int = 0  # messages waiting for an acknowledgement
    queue_bytes: int = 0
    backlog: int = 0  # of those, messages queued before the current connection (backfill)
    last_seq: int = 0  # highest seq assigned so far
    drops: dict[str, int] = field(default_factory=dict)  # reason -> count, e.g. "drop_oldest"
    sent_total: int = 0
    acked_total: int = 0
    reconnects_total: int = 0
    last_ack_ts: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Counter:
    """A gateway-wide metric other than devices and uplink (bus, edge stage)."""

    name: str  # Prometheus name, e.g. "fogmesh_bus_dropped_total"
    help: str
    kind: str  # "counter" or "gauge"
    value: float
