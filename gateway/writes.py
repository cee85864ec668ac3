"""Safe writes: a bearer token names who writes, only tags marked writable take a value of their
own type within their own range, every attempt is committed to the audit log before it is
answered and sent upstream, and the write itself goes through the device's service.

There is deliberately no way to write an address that is not a configured tag.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.audit import KIND_AUDIT, AuditEntry, AuditLog
from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError, FogmeshError, StoreError
from gateway.model import GATEWAY_DEVICE, DeviceStatus, Outgoing, Value
from gateway.supervisor import DeviceUnavailable, WriteNotSupported

__all__ = [
    "ANONYMOUS",
    "WRITES_DISABLED",
    "Authenticator",
    "DeviceTarget",
    "WriteRefused",
    "WriteRequest",
    "WriteService",
    "check_value",
    "find_tag",
    "value_kind",
]

log = logging.getLogger("fogmesh.writes")

ANONYMOUS = "anonymous"  # who the audit log names when no valid token came with the request
WRITES_DISABLED = "writes are disabled: no [http] token configured"
_CHALLENGE = 'Bearer realm="fogmesh"'

# Words in a tag's declared data type that say which JSON type it takes.
_BOOL_TYPES = ("bool", "boolean", "coil", "discrete")
_STRING_TYPES = ("str", "string", "text", "char", "bytestring", "localizedtext")
_NUMBER_WORDS = ("int", "float", "double", "real", "word", "byte", "decimal", "number")
_TYPE_ATTRS = ("data_type", "type")  # tag attributes an adapter may declare its type in


class WriteRefused(FogmeshError):
    """A write (or another token-guarded request) answered with an error status."""

    def __init__(
        self,
        status: int,
        result: str,
        message: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.result = result
        self.message = message
        self.headers = list(headers)


class Authenticator:
    """Bearer tokens, by name. Compares in constant time and never shows a token."""

    def __init__(self, tokens: Iterable[tuple[str, str]] = ()) -> None:
        self._tokens: tuple[tuple[str, bytes], ...] = ()
        self.replace(tokens)

    def replace(self, tokens: Iterable[tuple[str, str]]) -> None:
        # Digests of equal length, so that the comparison time says nothing about the length.
        self._tokens = tuple((name, _digest(tok)) for name, tok in tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._tokens]

    def identify(self, presented: str | None) -> str | None:
        """The name of the token presented, or None. Every token is compared, match or not."""
        if presented is None:
            return None
        digest = _digest(presented)
        who: str | None = None
        for name, expected in self._tokens:
            if hmac.compare_digest(digest, expected) and who is None:
                who = name
        return who

    def require(self, presented: str | None) -> str:
        """Who presented the token; WriteRefused 403 with no tokens configured, 401 otherwise."""
        if not self.enabled:
            raise WriteRefused(403, "disabled", WRITES_DISABLED)
        who = self.identify(presented)
        if who is None:
            if presented is None:
                raise WriteRefused(
                    401,
                    "refused",
                    "bearer token required (Authorization: Bearer <token>)",
                    headers=[("WWW-Authenticate", _CHALLENGE)],
                )
            raise WriteRefused(
                401,
                "refused",
                "invalid bearer token",
                headers=[("WWW-Authenticate", f'{_CHALLENGE}, error="invalid_token"')],
            )
        return who

    def __repr__(self) -> str:
        return f"Authenticator(names={self.names!r})"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


# --- tags and values -------------------------------------------------------------------------


def find_tag(cfg: DeviceBase, name: str) -> Any | None:
    """The config of a device's tag by name (a simulated device's implicit tags included)."""
    effective = getattr(cfg, "effective_tags", None)
    tags = effective() if callable(effective) else getattr(cfg, "tags", [])
    for t in tags:
        if getattr(t, "name", None) == name:
            return t
    return None


def value_kind(tag: Any, last: Value | None = None) -> str | None:
    """ "bool", "number" or "string": the JSON type a tag takes; None when nothing says.

    In order: the tag's own `value_kind()`; a coil, discrete input or register bit; a declared
    `data_type` or `type` ("int16", "float32", "bool", "string(8)", "Double"...); the type of
    the last value read. With none of these the adapter alone checks the value.
    """
    declared = getattr(tag, "value_kind", None)
    if callable(declared):
        kind = declared()
        if kind in ("bool", "number", "string"):
            return str(kind)
    if getattr(tag, "table", None) in ("coil", "discrete") or getattr(tag, "bit", None) is not None:
        return "bool"
    for attr in _TYPE_ATTRS:
        text = getattr(tag, attr, None)
        if isinstance(text, str) and text:
            word = text.lower().partition("(")[0].strip()
            if word in _BOOL_TYPES:
                return "bool"
            if word in _STRING_TYPES:
                return "string"
            if any(w in word for w in _NUMBER_WORDS):
                return "number"
    if isinstance(last, bool):
        return "bool"
    if isinstance(last, int | float):
        return "number"
    if isinstance(last, str):
        return "string"
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def check_value(tag: Any, value: object, last: Value | None = None) -> Value:
    """The value if the tag takes it; WriteRefused 400 (type) or 422 (range) otherwise."""
    name = getattr(tag, "name", "?")
    if not isinstance(value, bool | int | float | str):
        raise WriteRefused(
            400,
            "invalid",
            f"tag {name!r} takes a boolean, a number or a string, got {_json_type(value)}",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise WriteRefused(400, "invalid", f"tag {name!r}: {value} is not a finite number")
    kind = value_kind(tag, last)
    got = _json_type(value)
    if kind == "bool" and not isinstance(value, bool):
        raise WriteRefused(400, "invalid", f"tag {name!r} takes a boolean, got {got}")
    if kind == "string" and not isinstance(value, str):
        raise WriteRefused(400, "invalid", f"tag {name!r} takes a string, got {got}")
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise WriteRefused(400, "invalid", f"tag {name!r} takes a number, got {got}")
    lo = getattr(tag, "min", None)
    hi = getattr(tag, "max", None)
    if isinstance(value, int | float) and not isinstance(value, bool):
        below = isinstance(lo, int | float) and value < lo
        above = isinstance(hi, int | float) and value > hi
        if below or above:
            span = f"{'' if lo is None else _num(lo)}..{'' if hi is None else _num(hi)}"
            raise WriteRefused(
                422,
                "out_of_range",
                f"tag {name!r}: {_num(value)} is out of range {span} (min..max)",
            )
    return value


# --- the service -----------------------------------------------------------------------------


class DeviceTarget(Protocol):
    """What a write needs of a device service (gateway.supervisor.DeviceService)."""

    @property
    def cfg(self) -> DeviceBase: ...

    @property
    def status(self) -> DeviceStatus: ...

    async def write(self, tag: str, value: Value) -> None: ...


@dataclass(frozen=True, slots=True)
class WriteRequest:
    device: str
    tag: str
    token: str | None  # the bearer token presented, if any
    remote_addr: str | None
    body: object = None  # the parsed JSON body
    body_error: tuple[int, str] | None = None  # (status, message) when the body did not parse


class WriteService:
    """Checks, audits, performs and reports writes; the HTTP handlers are thin on top of it."""

    def __init__(
        self,
        *,
        auth: Authenticator,
        audit: AuditLog,
        lookup: Callable[[str], DeviceTarget | None],
        emit: Callable[[Outgoing], None],
    ) -> None:
        self.auth = auth
        self.audit = audit
        self._lookup = lookup
        self._emit = emit
        self._counts: dict[tuple[str, str], int] = {}

    def counts(self) -> Mapping[tuple[str, str], int]:
        """(device, result) -> writes answered; unknown devices count as `_gateway`."""
        return dict(self._counts)

    async def put(self, req: WriteRequest) -> dict[str, Any]:
        """Write `req`'s value; the success body, or WriteRefused after the attempt is audited."""
        svc, who, old, value = await self._admit(req)
        known = svc.cfg.id
        # The intent is durable before the device is touched: no audit entry, no write.
        try:
            pending = await self._record(
                who, req, known, "pending", old=old, new=value, error=None, ref=None
            )
        except StoreError as exc:
            log.error("write %s/%s by %s refused: %s", req.device, req.tag, who, exc)
            self._count(known, "unavailable")
            raise WriteRefused(503, "unavailable", f"audit log unavailable: {exc}") from exc
        failure: WriteRefused | None = None
        try:
            await svc.write(req.tag, value)
        except WriteNotSupported as exc:
            failure = WriteRefused(403, "forbidden", str(exc))
        except DeviceUnavailable as exc:
            failure = WriteRefused(503, "unavailable", str(exc))
        except DeviceError as exc:
            failure = WriteRefused(502, "failed", str(exc))
        if failure is not None:
            await self._finish(failure, req, who, known, old, value, pending.id)
            raise failure
        entry = await self._finish(None, req, who, known, old, value, pending.id)
        log.info(
            "write %s/%s = %r by %s from %s: ok (audit %d)",
            req.device,
            req.tag,
            value,
            who,
            req.remote_addr,
            entry.id,
        )
        return {
            "device": req.device,
            "tag": req.tag,
            "old_value": old,
            "new_value": value,
            "result": "ok",
            "audit_id": entry.id,
        }

    async def _admit(self, req: WriteRequest) -> tuple[DeviceTarget, str, Value | None, Value]:
        """Every check before the device: (service, who, old value, value to write); a refusal
        is audited before WriteRefused is raised. Unauthenticated clients learn nothing else:
        the token is checked first."""
        svc = self._lookup(req.device)
        known = svc.cfg.id if svc is not None else None
        who = ANONYMOUS
        old: Value | None = None
        requested: Value | None = None
        try:
            who = self.auth.require(req.token)
            if svc is None:
                raise WriteRefused(404, "not_found", f"no device {req.device!r}")
            tag = find_tag(svc.cfg, req.tag)
            if tag is None:
                raise WriteRefused(
                    404, "not_found", f"device {req.device!r} has no tag {req.tag!r}"
                )
            # The last value polled, not a fresh read: a read would cost a bus transaction
            # and could be stale by the time the write lands anyway.
            last = svc.status.last_values.get(req.tag)
            old = last.value if last is not None else None
            requested = _requested(req.body)
            if getattr(tag, "writable", False) is not True:
                raise WriteRefused(
                    403, "forbidden", f"tag {req.tag!r} of device {req.device!r} is not writable"
                )
            if req.body_error is not None:
                status, message = req.body_error
                raise WriteRefused(status, "invalid", message)
            if not isinstance(req.body, dict) or set(req.body) != {"value"}:
                raise WriteRefused(400, "invalid", 'the body must be a JSON object {"value": ...}')
            return svc, who, old, check_value(tag, req.body["value"], old)
        except WriteRefused as refused:
            await self._finish(refused, req, who, known, old, requested, None)
            raise

    async def _finish(
        self,
        refused: WriteRefused | None,
        req: WriteRequest,
        who: str,
        known: str | None,
        old: Value | None,
        new: Value | None,
        ref: int | None,
    ) -> AuditEntry:
        result = "ok" if refused is None else refused.result
        error = None if refused is None else refused.message
        self._count(known, result)
        try:
            entry = await self._record(
                who, req, known, result, old=old, new=new, error=error, ref=ref
            )
        except StoreError as exc:
            log.error("write %s/%s by %s: %s", req.device, req.tag, who, exc)
            if refused is None:
                # The device took the value but the outcome is not on record: say so rather
                # than claim success; the pending entry becomes `unknown` at the next start.
                raise WriteRefused(
                    500, "failed", f"the write was done but its outcome could not be audited: {exc}"
                ) from exc
            raise refused from exc
        if refused is not None:
            log.warning(
                "write %s/%s by %s from %s refused (%d %s): %s",
                req.device,
                req.tag,
                who,
                req.remote_addr,
                refused.status,
                refused.result,
                refused.message,
            )
        self.emit_upstream(entry, known)
        return entry

    def _count(self, known: str | None, result: str) -> None:
        # Unknown ids come from the request: one label for all of them keeps the series bounded.
        key = (known if known is not None else GATEWAY_DEVICE, result)
        self._counts[key] = self._counts.get(key, 0) + 1

    async def _record(
        self,
        who: str,
        req: WriteRequest,
        known: str | None,
        result: str,
        *,
        old: Value | None,
        new: Value | None,
        error: str | None,
        ref: int | None,
    ) -> AuditEntry:
        # The commit (an fsync) runs in a thread so the event loop keeps polling devices.
        return await asyncio.to_thread(
            self.audit.record,
            who=who,
            remote_addr=req.remote_addr,
            device=known if known is not None else req.device,
            tag=req.tag,
            result=result,
            old_value=old,
            new_value=new,
            error=error,
            ref=ref,
        )

    def emit_recovered(self, entries: Sequence[AuditEntry]) -> None:
        """Send the `unknown` outcomes the audit log added when it opened to the fog."""
        for e in entries:
            svc = self._lookup(e.device)
            self.emit_upstream(e, svc.cfg.id if svc is not None else None)

    def emit_upstream(self, entry: AuditEntry, known: str | None) -> None:
        """Send an outcome to the fog as an `audit` message; a failure is logged, not raised."""
        data = entry.as_dict()
        data.pop("device")
        if known is None:
            data["device"] = entry.device  # the topic says _gateway; keep what was asked for
        try:
            self._emit(Outgoing(known or GATEWAY_DEVICE, KIND_AUDIT, int(entry.ts * 1000), data))
        except Exception:
            # The audit log already holds the entry durably; the uplink is best effort here.
            log.exception("audit entry %d could not be queued for the fog", entry.id)


def _requested(body: object) -> Value | None:
    if isinstance(body, dict):
        v = body.get("value")
        if isinstance(v, bool | int | float | str):
            return v
    return None
