"""The fog wire format: the CBOR (RFC 8949) envelope every uplink message travels in, and its topic.

An envelope is encoded deterministically, so `historical` is always its last key and a backlog
message is flagged by rewriting one byte instead of re-encoding (see `as_historical`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import cbor2

from gateway.errors import WireError

__all__ = [
    "ENVELOPE_VERSION",
    "TOPIC_PREFIX",
    "Envelope",
    "WireError",
    "as_historical",
    "decode",
    "encode",
    "parse_topic",
    "topic_for",
]

ENVELOPE_VERSION = 1
TOPIC_PREFIX = "fogmesh/v1"

_FALSE = 0xF4  # CBOR simple value false
_TRUE = 0xF5  # CBOR simple value true
_TOPIC_FORBIDDEN = frozenset("/+#\x00")
# Keys of a version-1 envelope and the Python types their values must have.
_FIELDS: tuple[tuple[str, type], ...] = (
    ("site", str),
    ("gateway", str),
    ("device", str),
    ("kind", str),
    ("seq", int),
    ("ts_ms", int),
    ("historical", bool),
    ("data", dict),
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message as the fog sees it; `seq` is per gateway, starts at 1 and only grows."""

    site: str
    gateway: str
    device: str
    kind: str
    seq: int
    ts_ms: int  # original time of the data, kept through backfill
    historical: bool  # True when sent as backlog after a reconnect
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": ENVELOPE_VERSION,
            "site": self.site,
            "gateway": self.gateway,
            "device": self.device,
            "kind": self.kind,
            "seq": self.seq,
            "ts_ms": self.ts_ms,
            "historical": self.historical,
            "data": self.data,
        }


def encode(env: Envelope) -> bytes:
    """Deterministic CBOR of an envelope; raises WireError if `data` holds something CBOR can't carry."""
    if isinstance(env.seq, bool) or not isinstance(env.seq, int) or env.seq < 1:
        raise WireError(f"seq must be a positive integer, got {env.seq!r}")
    if isinstance(env.ts_ms, bool) or not isinstance(env.ts_ms, int):
        raise WireError(f"ts_ms must be an integer, got {env.ts_ms!r}")
    if not isinstance(env.data, dict):
        raise WireError(f"data must be a map, got {type(env.data).__name__}")
    try:
        out: bytes = cbor2.dumps(env.to_dict(), canonical=True)
    except Exception as exc:  # cbor2 raises several unrelated types; map them all at the boundary
        raise WireError(
            f"cannot encode {env.device}/{env.kind} seq {env.seq} as CBOR: {exc}"
        ) from exc
    return out


def as_historical(payload: bytes) -> bytes:
    """The same envelope with `historical: true`; it is the last key in deterministic order."""
    if not payload or payload[-1] not in (_FALSE, _TRUE):
        raise WireError("not a deterministic fogmesh envelope (historical is not the last value)")
    if payload[-1] == _TRUE:
        return payload
    return payload[:-1] + b"\xf5"


def loads_one(payload: bytes | bytearray | memoryview) -> object:
    """Exactly one CBOR item: garbage or bytes after it are WireError (cbor2.loads ignores
    trailing bytes). Envelopes, mesh node payloads and the shared test vectors decode with it."""
    raw = bytes(payload)
    stream = io.BytesIO(raw)
    try:
        obj: object = cbor2.CBORDecoder(stream, max_depth=64).decode()
    except Exception as exc:  # CBORDecodeError, but also ValueError/RecursionError on hostile input
        raise WireError(f"not CBOR: {exc}") from exc
    if stream.tell() != len(raw):
        raise WireError(f"{len(raw) - stream.tell()} trailing bytes after the CBOR item")
    return obj


def decode(payload: bytes | bytearray | memoryview) -> Envelope:
    """Parse and check an envelope; anything else (garbage, trailing bytes, wrong types) is WireError."""
    if not payload:
        raise WireError("empty payload")
    obj = loads_one(payload)
    if not isinstance(obj, dict):
        raise WireError(f"envelope must be a CBOR map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != ENVELOPE_VERSION or isinstance(version, bool):
        raise WireError(f"unsupported envelope version {version!r} (expected {ENVELOPE_VERSION})")
    values: dict[str, Any] = {}
    for key, typ in _FIELDS:
        if key not in obj:
            raise WireError(f"envelope lacks {key!r}")
        value = obj[key]
        # bool is an int subclass: a `true` seq must not pass as 1
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise WireError(f"envelope field {key!r} must be {typ.__name__}, got {value!r:.40}")
        values[key] = value
    if values["seq"] < 1:
        raise WireError(f"envelope seq must be >= 1, got {values['seq']}")
    # Unknown keys are ignored: a later minor revision may add fields without a new version.
    return Envelope(**values)


def _check_level(name: str, what: str) -> None:
    if not name or any(c in _TOPIC_FORBIDDEN for c in name):
        raise WireError(f"{what} {name!r} cannot be an MQTT topic level (empty, or has / + # NUL)")


def topic_for(site: str, gateway: str, device: str, kind: str) -> str:
    """`fogmesh/v1/<site>/<gateway>/<device>/<kind>`; each level checked, since a `/` would shift them."""
    _check_level(site, "site")
    _check_level(gateway, "gateway")
    _check_level(device, "device")
    _check_level(kind, "kind")
    return f"{TOPIC_PREFIX}/{site}/{gateway}/{device}/{kind}"


def parse_topic(topic: str) -> tuple[str, str, str, str]:
    """(site, gateway, device, kind) of a fogmesh topic; WireError for anything else."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != TOPIC_PREFIX or not all(parts[2:]):
        raise WireError(f"not a fogmesh/v1 topic: {topic!r}")
    return parts[2], parts[3], parts[4], parts[5]
