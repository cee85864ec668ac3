"""The OpenAPI 3.1 description of the gateway's HTTP API, served at /api/v1/openapi.json.

Kept by hand next to the routes; a test checks that it validates and that it describes exactly
the routes `gateway.api.build_router` serves.
"""

from __future__ import annotations

import copy
from typing import Any

from gateway.audit import RESULTS

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
_SCALAR = ["boolean", "number", "string"]
_NAMES = {"type": "array", "items": {"type": "string"}}


def _names(description: str) -> dict[str, Any]:
    return {**_NAMES, "description": description}


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
    "WriteRequest": {
        "type": "object",
        "description": "The value to write; its JSON type must be the tag's (boolean, number or "
        "string) and a number must lie within the tag's min..max.",
        "required": ["value"],
        "properties": {"value": {"type": _SCALAR}},
        "additionalProperties": False,
    },
    "WriteResult": _obj(
        ["device", "tag", "old_value", "new_value", "result", "audit_id"],
        {
            "device": {"type": "string"},
            "tag": {"type": "string"},
            "old_value": {
                "type": [*_SCALAR, "null"],
                "description": "the last value polled before the write (not a fresh read); "
                "null if the tag was never read",
            },
            "new_value": {"type": _SCALAR, "description": "the value written"},
            "result": {"const": "ok"},
            "audit_id": {"type": "integer", "description": "id of the outcome's audit entry"},
        },
        "A write the device accepted. The value read back appears with the next poll.",
    ),
    "AuditEntry": _obj(
        [
            "id",
            "ts",
            "who",
            "remote_addr",
            "device",
            "tag",
            "old_value",
            "new_value",
            "result",
            "error",
            "ref",
        ],
        {
            "id": {"type": "integer", "description": "grows with every entry, never reused"},
            "ts": {"type": "number", "description": "seconds since the epoch"},
            "who": {
                "type": "string",
                "description": "the token's name (`operator` for [http] token); `anonymous` "
                "without a valid token",
            },
            "remote_addr": _nullable("string", "the client's IP address"),
            "device": {"type": "string"},
            "tag": {"type": "string"},
            "old_value": {"type": [*_SCALAR, "null"]},
            "new_value": {"type": [*_SCALAR, "null"]},
            "result": {"type": "string", "enum": list(RESULTS)},
            "error": _nullable("string", "why it was refused or failed"),
            "ref": _nullable(
                "integer", "for the outcome of a write that reached the device: its pending entry"
            ),
        },
        "One entry of the append-only audit log.",
    ),
    "ReloadReport": _obj(
        ["added", "removed", "restarted", "unchanged", "rules", "windows_rebuilt"],
        {
            "added": _names("devices started"),
            "removed": _names("devices stopped (gone from the file, or disabled)"),
            "restarted": _names("devices whose config changed: stopped, then started"),
            "unchanged": _names("devices left running, untouched"),
            "rules": _obj(
                ["added", "removed", "changed"],
                {
                    "added": _names("rules added"),
                    "removed": _names("rules removed"),
                    "changed": _names("rules changed; they start afresh (inactive)"),
                },
                "rules by name",
            ),
            "windows_rebuilt": _names(
                "devices whose summary windows were closed as partial and started anew (their "
                "tags or [edge] changed)"
            ),
        },
        "What a reload did.",
    ),
    "ReloadError": _obj(
        ["error", "status"],
        {
            "error": {"type": "string"},
            "status": {"type": "integer"},
            "problems": _names("every problem of the new config, `path: message`"),
            "restart_required": _names("settings only a restart can change, e.g. uplink.url"),
        },
        "A reload that changed nothing.",
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
    "Unauthorized": _error(
        "No bearer token, or a wrong one.",
        {
            "WWW-Authenticate": {
                "description": '`Bearer realm="fogmesh"`, with `error="invalid_token"` for a '
                "wrong token",
                "schema": {"type": "string"},
            }
        },
    ),
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


def _ref_response(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{name}"}


_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_DISABLED = "writes are disabled: no [http] token configured"


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "fogmesh gateway API",
        "version": API_VERSION,
        "description": (
            "Status of one fogmesh gateway: overall health, its devices and their latest "
            "values, and Prometheus metrics; and, with a bearer token from the gateway's "
            "config, writes of writable tags, the audit log of write attempts, and config "
            "reloads. Without any token configured those answer 403. Every response carries "
            "`Cache-Control: no-store`."
        ),
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "tags": [
        {"name": "status", "description": "health and devices"},
        {"name": "meta", "description": "metrics and this document"},
        {"name": "control", "description": "writes, audit log and reload; bearer token required"},
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
        "/api/v1/devices/{id}/tags/{tag}": {
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "description": "the device id, percent-encoded",
                    "schema": {"type": "string"},
                },
                {
                    "name": "tag",
                    "in": "path",
                    "required": True,
                    "description": "the tag name, percent-encoded",
                    "schema": {"type": "string"},
                },
            ],
            "put": {
                "operationId": "writeTag",
                "tags": ["control"],
                "summary": "Write one writable tag through its device service",
                "description": (
                    "Checked in this order: token (401, or 403 when no token is configured), "
                    "device and tag (404), writable (403), body and JSON type (415, 400), range "
                    "(422); then the device: stopped, not connected or breaker open (503), the "
                    "adapter failed or timed out (502). Every attempt is committed to the audit "
                    "log before the answer is sent and travels to the fog as an `audit` message."
                ),
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": _ref("WriteRequest")}},
                },
                "responses": {
                    "200": _json_ok("written", _ref("WriteResult")),
                    **_common(),
                    "400": _error(
                        'Malformed request, invalid JSON, a body other than {"value": ...}, or '
                        "a value of the wrong JSON type for the tag."
                    ),
                    "401": _ref_response("Unauthorized"),
                    "403": _error(
                        f"The tag is not writable, the device takes no writes, or {_DISABLED}."
                    ),
                    "404": _error("No such device, or the device has no such tag."),
                    "415": _error("The body is not application/json."),
                    "422": _error(
                        "The value is outside the tag's min..max; the message says the range."
                    ),
                    "502": _error("The device or its adapter failed the write (or timed out)."),
                    "503": _error(
                        "The device is stopped, not connected or down (circuit breaker open), "
                        "or the audit log cannot be written."
                    ),
                },
            },
        },
        "/api/v1/audit": {
            "get": {
                "operationId": "listAudit",
                "tags": ["control"],
                "summary": "The newest entries of the audit log, newest first",
                "security": _BEARER,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "how many entries (default 100)",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    }
                ],
                "responses": {
                    "200": _json_ok("the entries", {"type": "array", "items": _ref("AuditEntry")}),
                    **_common(),
                    "400": _error("Malformed request, or a limit outside 1..1000."),
                    "401": _ref_response("Unauthorized"),
                    "403": _error(_DISABLED[:1].upper() + _DISABLED[1:] + "."),
                    "503": _error("The audit log cannot be read."),
                },
            }
        },
        "/api/v1/reload": {
            "post": {
                "operationId": "reload",
                "tags": ["control"],
                "summary": "Re-read the config file and restart only the devices that changed",
                "description": (
                    "The same as SIGHUP. The new config is checked in full first; on any "
                    "problem, or a change only a restart can apply, nothing changes. A body, "
                    "if sent, is ignored."
                ),
                "security": _BEARER,
                "responses": {
                    "200": _json_ok("applied", _ref("ReloadReport")),
                    **_common(),
                    "401": _ref_response("Unauthorized"),
                    "403": _error(_DISABLED[:1].upper() + _DISABLED[1:] + "."),
                    "409": _json_ok(
                        "A restart is required for the change (`restart_required` lists the "
                        "settings), or the config did not come from a file; nothing changed.",
                        _ref("ReloadError"),
                    ),
                    "422": _json_ok(
                        "The new config has problems (`problems`); nothing changed.",
                        _ref("ReloadError"),
                    ),
                    "503": _json_ok("The gateway is starting or stopping.", _ref("ReloadError")),
                },
            }
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
    "components": {
        "schemas": _SCHEMAS,
        "responses": _RESPONSES,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A token from the gateway's config ([http] token or "
                "[[http.tokens]]); its name is what the audit log records.",
            }
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A copy of the document, safe for the caller to change."""
    return copy.deepcopy(OPENAPI)
