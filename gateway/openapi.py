"""The OpenAPI 3.1 description of the gateway's HTTP API, served at /api/v1/openapi.json.

Kept by hand next to the routes; a test checks that it validates and that it describes exactly
the routes `gateway.api.build_router` serves.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["API_VERSION", "OPENAPI", "openapi_document"]

API_VERSION = "1.0.0"

_JSON = "application/json"
_TEXT = "text/plain"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, description: str) -> dict[str, Any]:
    return {"type": [kind, "null"], "description": description}


def _obj(required: list[str], properties: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": required,
        "properties": properties,
    }


def _count(description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "description": description}


_HEALTH_STATES = ["starting", "ok", "degraded", "down"]
_TS = "seconds since the epoch; null if never"

_SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        ["error", "status"],
        {
            "error": {"type": "string", "description": "what went wrong, for a human"},
            "status": {"type": "integer", "description": "the HTTP status code, repeated"},
        },
        "Every error of /api/v1 (errors of /metrics are text/plain).",
    ),
    "Health": _obj(
        ["status", "reasons", "site", "gateway", "uptime_s", "devices", "uplink"],
        {
            "status": {
                "type": "string",
                "enum": ["ok", "degraded", "down"],
                "description": (
                    "down: the queue is rejecting new messages (its `reject_new` drop count rose "
                    "within the last 60 s), or there are devices and all of them are down. "
                    "degraded: otherwise, any device not ok (starting, degraded, down), the "
                    "uplink disconnected, or the queue dropping old messages (a drop count rose "
                    "within the last 60 s). ok: everything else."
                ),
            },
            "reasons": {
                "type": "array",
                "items": {"type": "string"},
                "description": "why the status is not ok; empty when ok",
            },
            "site": {"type": "string"},
            "gateway": {"type": "string", "description": "the gateway's id"},
            "uptime_s": {"type": "number", "minimum": 0},
            "devices": _obj(
                _HEALTH_STATES,
                {s: _count(f"devices whose health is {s}") for s in _HEALTH_STATES},
                "number of devices per health state",
            ),
            "uplink": _obj(
                ["connected", "queue_depth", "backlog", "drops_total"],
                {
                    "connected": {"type": "boolean", "description": "the fog sink is connected"},
                    "queue_depth": _count("messages waiting for an acknowledgement"),
                    "backlog": _count("of those, messages queued before the current connection"),
                    "drops_total": _count("messages the queue dropped on purpose, all reasons"),
                },
                "the store-and-forward queue and the fog sink",
            ),
        },
        "Overall status of the gateway.",
    ),
    "HealthState": {"type": "string", "enum": _HEALTH_STATES},
    "DeviceSummary": _obj(
        ["id", "type", "health", "last_success_ts", "last_error"],
        {
            "id": {"type": "string"},
            "type": {"type": "string", "description": "adapter type, e.g. simulated, modbus_tcp"},
            "health": _ref("HealthState"),
            "last_success_ts": _nullable("number", _TS),
            "last_error": _nullable("string", "the last error message; null if none"),
        },
        "One device, briefly.",
    ),
    "LastValue": _obj(
        ["value", "quality", "ts"],
        {
            "value": {
                "type": ["number", "boolean", "string", "null"],
                "description": "null for a NaN or infinite reading",
            },
            "quality": {"type": "string", "enum": ["good", "uncertain", "bad"]},
            "ts": {"type": "number", "description": "when it was read, seconds since the epoch"},
        },
        "The latest value of one tag.",
    ),
    "Device": _obj(
        [
            "id",
            "type",
            "health",
            "last_error",
            "last_error_ts",
            "last_success_ts",
            "consecutive_failures",
            "counters",
            "poll_latency_s",
            "last_values",
        ],
        {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "health": _ref("HealthState"),
            "last_error": _nullable("string", "the last error message; null if none"),
            "last_error_ts": _nullable("number", _TS),
            "last_success_ts": _nullable("number", _TS),
            "consecutive_failures": _count("failures since the last successful poll"),
            "counters": _obj(
                ["polls", "errors", "reconnects", "bad_data", "skipped_polls"],
                {
                    "polls": _count("polls attempted"),
                    "errors": _count("polls that failed"),
                    "reconnects": _count("connections re-established"),
                    "bad_data": _count("reads with values that make no sense"),
                    "skipped_polls": _count("poll deadlines skipped because a poll overran"),
                },
                "totals since the gateway started",
            ),
            "poll_latency_s": _obj(
                ["p50", "p99", "count", "sum"],
                {
                    "p50": _nullable("number", "median, as a histogram bucket's upper bound"),
                    "p99": _nullable(
                        "number", "99th percentile; null with no polls or beyond the last bucket"
                    ),
                    "count": _count("polls measured"),
                    "sum": {"type": "number", "minimum": 0, "description": "seconds in total"},
                },
                "poll latency in seconds",
            ),
            "last_values": {
                "type": "object",
                "description": "the latest value of each tag, by tag name",
                "additionalProperties": _ref("LastValue"),
            },
        },
        "One device in full.",
    ),
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {_JSON: {"schema": _ref("Error")}},
    }
    if headers:
        out["headers"] = headers
    return out


_RESPONSES: dict[str, Any] = {
    "BadRequest": _error("Malformed request line or header fields."),
    "NotFound": _error("No such resource."),
    "MethodNotAllowed": _error(
        "The path exists but not with this method.",
        {"Allow": {"description": "the methods the path takes", "schema": {"type": "string"}}},
    ),
    "RequestTimeout": _error("The request head or body did not arrive in time."),
    "PayloadTooLarge": _error("The request has a body larger than the route accepts."),
    "HeadersTooLarge": _error("The request line and header fields are too large."),
    "InternalError": _error("A handler failed; the traceback is in the gateway's log."),
}

# The answers every route can give, whatever it does.
_COMMON = {
    "400": "BadRequest",
    "405": "MethodNotAllowed",
    "408": "RequestTimeout",
    "413": "PayloadTooLarge",
    "431": "HeadersTooLarge",
    "500": "InternalError",
}


def _common() -> dict[str, Any]:
    return {code: {"$ref": f"#/components/responses/{name}"} for code, name in _COMMON.items()}


def _json_ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_TEXT: {"schema": {"type": "string"}}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "fogmesh gateway API",
        "version": API_VERSION,
        "description": (
            "Read-only status of one fogmesh gateway: overall health, its devices and their "
            "latest values, and Prometheus metrics. Every response carries "
            "`Cache-Control: no-store`."
        ),
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "tags": [
        {"name": "status", "description": "health and devices"},
        {"name": "meta", "description": "metrics and this document"},
    ],
    "paths": {
        "/api/v1/health": {
            "get": {
                "operationId": "getHealth",
                "tags": ["status"],
                "summary": "Overall status, for people and for load-balancer or Kubernetes probes",
                "responses": {
                    "200": _json_ok("ok or degraded", _ref("Health")),
                    "503": _json_ok("down", _ref("Health")),
                    **_common(),
                },
            }
        },
        "/api/v1/devices": {
            "get": {
                "operationId": "listDevices",
                "tags": ["status"],
                "summary": "Every configured device, in configuration order",
                "responses": {
                    "200": _json_ok(
                        "the devices", {"type": "array", "items": _ref("DeviceSummary")}
                    ),
                    **_common(),
                },
            }
        },
        "/api/v1/devices/{id}": {
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "description": "the device id from the configuration, percent-encoded",
                    "schema": {"type": "string"},
                }
            ],
            "get": {
                "operationId": "getDevice",
                "tags": ["status"],
                "summary": "One device: health, counters, poll latency, latest values",
                "responses": {
                    "200": _json_ok("the device", _ref("Device")),
                    "404": {"$ref": "#/components/responses/NotFound"},
                    **_common(),
                },
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "tags": ["meta"],
                "summary": "This document",
                "responses": {
                    "200": _json_ok("the OpenAPI 3.1 document", {"type": "object"}),
                    **_common(),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "tags": ["meta"],
                "summary": "Prometheus text exposition, format 0.0.4",
                "description": (
                    "Content-Type `text/plain; version=0.0.4; charset=utf-8`. Per device "
                    "(labels `device`, `type`): up, one-hot health, polls, errors, reconnects, "
                    "bad data, last success time and a poll latency histogram; the queue and "
                    "uplink; gateway-wide counters of the bus and the edge stage. Errors are "
                    "text/plain too."
                ),
                "responses": {
                    "200": _text("the metrics"),
                    **{code: _text(_RESPONSES[n]["description"]) for code, n in _COMMON.items()},
                },
            }
        },
    },
    "components": {"schemas": _SCHEMAS, "responses": _RESPONSES},
}


def openapi_document() -> dict[str, Any]:
    """A copy of the document, safe for the caller to change."""
    return copy.deepcopy(OPENAPI)
