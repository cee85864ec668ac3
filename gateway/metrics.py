"""Renders a GatewayView as Prometheus text exposition (format 0.0.4) for the /metrics page.

Timestamps are seconds since the epoch, 0 meaning "never" so that the series always exists.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.model import DeviceStatus, Health
from gateway.view import GatewayView

__all__ = [
    "CONTENT_TYPE",
    "Exposition",
    "Family",
    "escape_help",
    "escape_label_value",
    "format_value",
    "render",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KINDS = ("counter", "gauge")
_POLICY_REASONS = ("drop_oldest", "reject_new")  # always exported, so a rate() starts at 0
_UP = (Health.OK, Health.DEGRADED)

Labels = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Family:
    """A family with labelled samples (writes by device and result, reloads by result)."""

    name: str
    help: str
    kind: str  # "counter" or "gauge"
    samples: tuple[tuple[Labels, float], ...] = ()


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Exposition:
    """Text of families written one after the other: each family's lines must be contiguous."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._names: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> bool:
        """Writes HELP and TYPE; False (and nothing written) if the name is invalid or taken."""
        taken = {name}
        if kind == "histogram":
            taken |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if not _NAME.fullmatch(name) or taken & self._names:
            return False
        self._names |= taken
        self._lines.append(f"# HELP {name} {escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        return True

    def sample(self, name: str, labels: Labels, value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            self._lines.append(f"{name}{{{inner}}} {format_value(value)}")
        else:
            self._lines.append(f"{name} {format_value(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _ts(ts: float | None) -> float:
    return 0.0 if ts is None else ts


def _device_labels(d: DeviceStatus) -> Labels:
    return (("device", d.id), ("type", d.type))


def _devices(out: Exposition, devices: list[DeviceStatus]) -> None:
    def per_device(name: str, kind: str, help_text: str, values: list[float]) -> None:
        out.family(name, kind, help_text)
        for d, v in zip(devices, values, strict=True):
            out.sample(name, _device_labels(d), v)

    per_device(
        "fogmesh_device_up",
        "gauge",
        "1 if the device answers (health ok or degraded), else 0.",
        [d.health in _UP for d in devices],
    )
    out.family("fogmesh_device_health", "gauge", "Health state of the device, one-hot by state.")
    for d in devices:
        for state in Health:
            out.sample(
                "fogmesh_device_health",
                (*_device_labels(d), ("state", state.value)),
                d.health is state,
            )
    per_device(
        "fogmesh_device_polls_total",
        "counter",
        "Polls attempted.",
        [d.polls_total for d in devices],
    )
    per_device(
        "fogmesh_device_errors_total",
        "counter",
        "Polls that failed.",
        [d.errors_total for d in devices],
    )
    per_device(
        "fogmesh_device_reconnects_total",
        "counter",
        "Connections re-established to the device.",
        [d.reconnects_total for d in devices],
    )
    per_device(
        "fogmesh_device_bad_data_total",
        "counter",
        "Reads that returned values that make no sense.",
        [d.bad_data_total for d in devices],
    )
    per_device(
        "fogmesh_device_skipped_polls_total",
        "counter",
        "Poll deadlines skipped because a poll overran its period.",
        [d.skipped_polls_total for d in devices],
    )
    per_device(
        "fogmesh_device_consecutive_failures",
        "gauge",
        "Failures since the last successful poll.",
        [d.consecutive_failures for d in devices],
    )
    per_device(
        "fogmesh_device_last_success_timestamp_seconds",
        "gauge",
        "Time of the last successful poll, seconds since the epoch; 0 if never.",
        [_ts(d.last_success_ts) for d in devices],
    )
    name = "fogmesh_device_poll_latency_seconds"
    out.family(name, "histogram", "Time one poll of the device took.")
    for d in devices:
        labels = _device_labels(d)
        for bound, count in d.poll_latency.cumulative():
            out.sample(f"{name}_bucket", (*labels, ("le", format_value(bound))), count)
        out.sample(f"{name}_sum", labels, d.poll_latency.sum_s)
        out.sample(f"{name}_count", labels, d.poll_latency.total)


def _uplink(out: Exposition, view: GatewayView) -> None:
    up = view.uplink_stats()
    scalars: list[tuple[str, str, str, float]] = [
        ("fogmesh_uplink_connected", "gauge", "1 if the fog sink is connected.", up.connected),
        (
            "fogmesh_queue_depth_messages",
            "gauge",
            "Messages in the durable queue waiting for an acknowledgement.",
            up.queue_depth,
        ),
        ("fogmesh_queue_bytes", "gauge", "Bytes held by the durable queue.", up.queue_bytes),
        (
            "fogmesh_queue_backlog_messages",
            "gauge",
            "Queued messages from before the current connection (backfill).",
            up.backlog,
        ),
    ]
    for name, kind, help_text, value in scalars:
        out.family(name, kind, help_text)
        out.sample(name, (), value)
    name = "fogmesh_queue_drops_total"
    out.family(name, "counter", "Messages the queue dropped on purpose, by reason (policy).")
    drops = {r: 0 for r in _POLICY_REASONS} | up.drops
    for reason in sorted(drops):
        out.sample(name, (("reason", reason),), drops[reason])
    scalars = [
        ("fogmesh_uplink_sent_total", "counter", "Messages sent to the fog sink.", up.sent_total),
        (
            "fogmesh_uplink_acked_total",
            "counter",
            "Messages the fog sink acknowledged.",
            up.acked_total,
        ),
        (
            "fogmesh_uplink_reconnects_total",
            "counter",
            "Connections re-established to the fog sink.",
            up.reconnects_total,
        ),
        (
            "fogmesh_uplink_last_ack_timestamp_seconds",
            "gauge",
            "Time of the last acknowledgement, seconds since the epoch; 0 if never.",
            _ts(up.last_ack_ts),
        ),
        ("fogmesh_queue_last_seq", "gauge", "Highest sequence number assigned.", up.last_seq),
    ]
    for name, kind, help_text, value in scalars:
        out.family(name, kind, help_text)
        out.sample(name, (), value)


def render(view: GatewayView, extra: Sequence[Family] = ()) -> str:
    """The whole /metrics page; `extra` families come last."""
    out = Exposition()
    out.family("fogmesh_gateway_info", "gauge", "Always 1; labels name the site and gateway.")
    out.sample("fogmesh_gateway_info", (("site", view.site), ("gateway", view.gateway_id)), 1)
    out.family(
        "fogmesh_gateway_start_time_seconds", "gauge", "Start time, seconds since the epoch."
    )
    out.sample("fogmesh_gateway_start_time_seconds", (), view.started_ts)
    _devices(out, view.device_statuses())
    _uplink(out, view)
    for c in view.counters():
        # A bad name from elsewhere in the gateway must not cost the whole page.
        kind = c.kind if c.kind in _KINDS else "untyped"
        if out.family(c.name, kind, c.help):
            out.sample(c.name, (), c.value)
        else:
            log.warning("metrics: skipping counter %r (invalid or duplicate name)", c.name)
    for f in extra:
        kind = f.kind if f.kind in _KINDS else "untyped"
        if out.family(f.name, kind, f.help):
            for labels, value in f.samples:
                out.sample(f.name, labels, value)
        else:
            log.warning("metrics: skipping family %r (invalid or duplicate name)", f.name)
    return out.text()
