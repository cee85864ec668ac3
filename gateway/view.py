"""What the HTTP API and the metrics page may read of a running gateway."""

from __future__ import annotations

from typing import Protocol

from gateway.model import Counter, DeviceStatus, UplinkStats


class GatewayView(Protocol):
    site: str
    gateway_id: str
    started_ts: float  # seconds since the epoch

    def device_statuses(self) -> list[DeviceStatus]: ...

    def uplink_stats(self) -> UplinkStats: ...

    def counters(self) -> list[Counter]: ...
