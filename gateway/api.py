"""The gateway's HTTP API (/api/v1/...) and /metrics: status read from a GatewayView, and the
token-guarded routes (tag writes, the audit log, reload) handed to a `Control`.

`ApiServer` is what the runtime starts; `build_router` and `assess` are public for tests.
Routes and answers: docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import metrics
from gateway.errors import StoreError
from gateway.http import (
    HttpError,
    HttpServer,
    Limits,
    Request,
    Response,
    Router,
    dump_json,
    json_response,
    text_response,
)
from gateway.model import DeviceStatus, Health, UplinkStats
from gateway.openapi import openapi_document
from gateway.reload import ReloadRefused
from gateway.view import GatewayView
from gateway.writes import WRITES_DISABLED, WriteRefused, WriteRequest, WriteService

__all__ = [
    "API_PREFIX",
    "ApiServer",
    "Assessment",
    "Control",
    "DropWatch",
    "assess",
    "build_router",
    "device_detail",
    "device_summary",
]

API_PREFIX = "/api/v1"
DROP_WINDOW_S = 60.0  # how long a rise in a drop counter keeps affecting the health status
REJECT_REASON = "reject_new"  # the queue's drop reason when it refuses new messages
_MAX_IDS = 10  # device ids named in one health reason; the counts say the rest
AUDIT_LIMIT_DEFAULT = 100
AUDIT_LIMIT_MAX = 1000
WRITE_BODY_MAX = 4096  # {"value": ...}; a long string tag fits, a flood does not
RELOAD_BODY_MAX = 1024  # the body of POST /reload is ignored; some clients send `{}`


class Control(Protocol):
    """What the token-guarded routes need of a running gateway (gateway.runtime.Gateway)."""

    @property
    def writes(self) -> WriteService: ...

    async def reload(self, who: str) -> dict[str, Any]: ...

    def metric_families(self) -> Sequence[metrics.Family]: ...


@dataclass(frozen=True, slots=True)
class Assessment:
    status: Health  # OK, DEGRADED or DOWN (never STARTING)
    reasons: tuple[str, ...]  # why it is not OK; empty when OK


def assess(
    devices: Collection[DeviceStatus], uplink: UplinkStats, dropping: Collection[str] = ()
) -> Assessment:
    """The gateway's overall status, from its devices, its uplink and the drop reasons now rising.

    down: the queue is refusing new messages (`reject_new` drops rising), or there are devices
    and every one of them is down; data is being lost or none is produced.
    degraded: otherwise, any device not ok (starting, degraded or down), the uplink
    disconnected, or the queue dropping old messages.
    ok: everything else.
    """
    down: list[str] = []
    degraded: list[str] = []
    if REJECT_REASON in dropping:
        down.append("queue full: new messages are rejected")
    if devices and all(d.health is Health.DOWN for d in devices):
        down.append(f"all {len(devices)} devices down")
    for state in (Health.DOWN, Health.DEGRADED, Health.STARTING):
        ids = [d.id for d in devices if d.health is state]
        if ids:
            more = f" and {len(ids) - _MAX_IDS} more" if len(ids) > _MAX_IDS else ""
            degraded.append(f"devices {state.value}: {', '.join(ids[:_MAX_IDS])}{more}")
    if not uplink.connected:
        degraded.append("uplink disconnected")
    degraded += [f"queue dropping messages ({r})" for r in sorted(dropping) if r != REJECT_REASON]
    if down:
        return Assessment(Health.DOWN, (*down, *degraded))
    return Assessment(Health.DEGRADED if degraded else Health.OK, tuple(degraded))


class DropWatch:
    """Tells which drop reasons rose recently, from the cumulative counts seen on successive reads.

    UplinkStats carries only totals, so "the queue is rejecting now" is inferred: a reason counts
    as rising for `window_s` after a read that found it higher than the read before.
    """

    def __init__(self, window_s: float = DROP_WINDOW_S) -> None:
        self._window_s = window_s
        self._last: dict[str, int] | None = None  # None until the first read: no baseline yet
        self._rose_at: dict[str, float] = {}

    def observe(self, drops: Mapping[str, int], now: float) -> frozenset[str]:
        if self._last is not None:
            for reason, count in drops.items():
                if count > self._last.get(reason, 0):
                    self._rose_at[reason] = now
        self._last = dict(drops)
        return frozenset(r for r, t in self._rose_at.items() if now - t < self._window_s)


def device_summary(d: DeviceStatus) -> dict[str, Any]:
    return {
        "id": d.id,
        "type": d.type,
        "health": d.health.value,
        "last_success_ts": d.last_success_ts,
        "last_error": d.last_error,
    }


def device_detail(d: DeviceStatus) -> dict[str, Any]:
    lat = d.poll_latency
    return {
        "id": d.id,
        "type": d.type,
        "health": d.health.value,
        "last_error": d.last_error,
        "last_error_ts": d.last_error_ts,
        "last_success_ts": d.last_success_ts,
        "consecutive_failures": d.consecutive_failures,
        "counters": {
            "polls": d.polls_total,
            "errors": d.errors_total,
            "reconnects": d.reconnects_total,
            "bad_data": d.bad_data_total,
            "skipped_polls": d.skipped_polls_total,
        },
        # Bucket upper bounds: an over-estimate; null with no polls or beyond the last bucket.
        "poll_latency_s": {
            "p50": lat.quantile(0.5),
            "p99": lat.quantile(0.99),
            "count": lat.total,
            "sum": lat.sum_s,
        },
        "last_values": {
            tag: {"value": s.value, "quality": s.quality.value, "ts": s.ts}
            for tag, s in d.last_values.items()
        },
    }


class _Handlers:
    def __init__(
        self,
        view: GatewayView,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        drop_window_s: float,
        control: Control | None,
    ) -> None:
        self._view = view
        self._control = control
        self._clock = clock
        self._monotonic = monotonic
        self._drops = DropWatch(drop_window_s)
        self._openapi = dump_json(openapi_document())

    def _uplink(self) -> tuple[UplinkStats, frozenset[str]]:
        # Every read feeds the drop watch, so scrapes of /metrics sharpen the health status too.
        uplink = self._view.uplink_stats()
        return uplink, self._drops.observe(uplink.drops, self._monotonic())

    async def health(self, request: Request) -> Response:
        view = self._view
        devices = view.device_statuses()
        uplink, dropping = self._uplink()
        verdict = assess(devices, uplink, dropping)
        counts = {h.value: 0 for h in (Health.OK, Health.DEGRADED, Health.DOWN, Health.STARTING)}
        for d in devices:
            counts[d.health.value] += 1
        body = {
            "status": verdict.status.value,
            "reasons": list(verdict.reasons),
            "site": view.site,
            "gateway": view.gateway_id,
            "uptime_s": max(0.0, self._clock() - view.started_ts),
            "devices": counts,
            "uplink": {
                "connected": uplink.connected,
                "queue_depth": uplink.queue_depth,
                "backlog": uplink.backlog,
                "drops_total": sum(uplink.drops.values()),
            },
        }
        # 503 lets a load balancer or a Kubernetes probe act on "down" without parsing the body.
        return json_response(body, 503 if verdict.status is Health.DOWN else 200)

    async def devices(self, request: Request) -> Response:
        return json_response([device_summary(d) for d in self._view.device_statuses()])

    async def device(self, request: Request) -> Response:
        wanted = request.params["id"]
        for d in self._view.device_statuses():
            if d.id == wanted:
                return json_response(device_detail(d))
        raise HttpError(404, f"no device {wanted!r}")

    async def openapi(self, request: Request) -> Response:
        return Response(200, self._openapi)

    async def metrics(self, request: Request) -> Response:
        self._uplink()
        extra = self._control.metric_families() if self._control is not None else ()
        return text_response(metrics.render(self._view, extra), content_type=metrics.CONTENT_TYPE)

    # --- token-guarded routes -----------------------------------------------------------

    def _guarded(self, request: Request) -> tuple[Control, str]:
        control = self._control
        if control is None:
            raise HttpError(403, WRITES_DISABLED)
        try:
            return control, control.writes.auth.require(request.bearer_token)
        except WriteRefused as refused:
            raise HttpError(refused.status, refused.message, headers=refused.headers) from None

    async def put_tag(self, request: Request) -> Response:
        control = self._control
        if control is None:
            raise HttpError(403, WRITES_DISABLED)
        body: object = None
        body_error: tuple[int, str] | None = None
        try:
            body = request.json()
        except HttpError as err:
            body_error = (err.status, err.message)
        write = WriteRequest(
            device=request.params["id"],
            tag=request.params["tag"],
            token=request.bearer_token,
            remote_addr=request.remote_addr,
            body=body,
            body_error=body_error,
        )
        try:
            # Checked, audited (committed) and performed before this returns or raises.
            result = await control.writes.put(write)
        except WriteRefused as refused:
            raise HttpError(refused.status, refused.message, headers=refused.headers) from None
        return json_response(result)

    async def audit(self, request: Request) -> Response:
        control, _ = self._guarded(request)
        raw = request.query.get("limit", [str(AUDIT_LIMIT_DEFAULT)])[-1]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= AUDIT_LIMIT_MAX:
            raise HttpError(400, f"limit must be an integer 1..{AUDIT_LIMIT_MAX}")
        try:
            entries = await asyncio.to_thread(control.writes.audit.recent, int(raw))
        except StoreError as exc:
            raise HttpError(503, f"audit log unavailable: {exc}") from exc
        return json_response([e.as_dict() for e in entries])

    async def reload(self, request: Request) -> Response:
        control, who = self._guarded(request)
        try:
            report = await control.reload(who)
        except ReloadRefused as refused:
            body: dict[str, Any] = {"error": refused.message, "status": refused.status}
            if refused.problems:
                body["problems"] = refused.problems
            if refused.restart_required:
                body["restart_required"] = refused.restart_required
            return json_response(body, refused.status)
        return json_response(report)


def build_router(
    view: GatewayView,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    drop_window_s: float = DROP_WINDOW_S,
    control: Control | None = None,
) -> Router:
    """Every route of the API; the OpenAPI document must describe exactly these.

    Without a `control` the token-guarded routes exist but answer 403 (writes disabled).
    """
    h = _Handlers(view, clock, monotonic, drop_window_s, control)
    router = Router()
    router.add("GET", f"{API_PREFIX}/health", h.health)
    router.add("GET", f"{API_PREFIX}/devices", h.devices)
    router.add("GET", f"{API_PREFIX}/devices/{{id}}", h.device)
    router.add(
        "PUT", f"{API_PREFIX}/devices/{{id}}/tags/{{tag}}", h.put_tag, max_body_bytes=WRITE_BODY_MAX
    )
    router.add("GET", f"{API_PREFIX}/audit", h.audit)
    router.add("POST", f"{API_PREFIX}/reload", h.reload, max_body_bytes=RELOAD_BODY_MAX)
    router.add("GET", f"{API_PREFIX}/openapi.json", h.openapi)
    router.add("GET", "/metrics", h.metrics, plain_errors=True)
    return router


class ApiServer:
    """The gateway's HTTP API on one address; entering starts listening (port 0: a free port)."""

    def __init__(
        self,
        view: GatewayView,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        limits: Limits | None = None,
        control: Control | None = None,
    ) -> None:
        self._http = HttpServer(build_router(view, control=control), host, port, limits=limits)

    async def __aenter__(self) -> ApiServer:
        await self._http.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.__aexit__(*exc)

    @property
    def address(self) -> tuple[str, int]:
        """The host and port actually listened on."""
        return self._http.address
