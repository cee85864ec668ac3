"""Config schema of the `opcua` device: endpoint, security, credentials, and tags that name their
node by NodeId or browse path. The node syntax is parsed here, without asyncua, so that a typo is
a config error with its path and the adapter receives nodes that are already well formed.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from gateway.config.fragments import (
    DeviceBase,
    NonNegativeFloat,
    PositiveFloat,
    SecretRef,
    Strict,
    TagBase,
)

DEFAULT_PORT = 4840  # only for messages: the endpoint must name its port
MAX_NAMESPACE = 65535
MAX_NUMERIC_ID = 2**32 - 1
NODE_EXAMPLES = "'ns=2;s=Pump.Flow', 'ns=2;i=1001' or '/Objects/2:Plant/2:Pump1/2:Flow'"
_GUID_RE = re.compile(
    r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
)
_DIGITS_RE = re.compile(r"^[0-9]+$")

IdentifierType = Literal["i", "s", "g", "b"]


class NodeSyntaxError(ValueError):
    """A node string that is neither a NodeId nor a browse path; the message says why."""


@dataclass(frozen=True, slots=True)
class NodeIdRef:
    """A NodeId in its string form: `[ns=<index>;|nsu=<uri>;]<i|s|g|b>=<identifier>`."""

    identifier_type: IdentifierType
    identifier: int | str | uuid.UUID | bytes  # i: int, s: str, g: UUID, b: bytes
    namespace: int = 0
    namespace_uri: str | None = None  # nsu=...; the adapter looks its index up on the server


@dataclass(frozen=True, slots=True)
class BrowsePathRef:
    """A path of browse names from the Root folder: `/Objects/2:Plant/2:Pump1/2:Flow`.

    Each element is `<namespace index>:<name>`, or a bare name in namespace 0; every step follows
    hierarchical references (Organizes, HasComponent, HasProperty, ...).
    """

    elements: tuple[tuple[int, str], ...]


NodeRef = NodeIdRef | BrowsePathRef


def parse_node(text: str) -> NodeRef:
    """Parse a tag's `node`; raise NodeSyntaxError with a message for the operator."""
    if not text:
        raise NodeSyntaxError(f"must not be empty; write {NODE_EXAMPLES}")
    if text != text.strip():
        raise NodeSyntaxError("must not start or end with spaces")
    if text.startswith("/"):
        return _parse_browse_path(text)
    return _parse_node_id(text)


def _parse_browse_path(text: str) -> BrowsePathRef:
    parts = text[1:].split("/")
    elements: list[tuple[int, str]] = []
    for n, part in enumerate(parts, start=1):
        if not part:
            raise NodeSyntaxError(f"browse path element {n} is empty (in '{text}')")
        prefix, colon, name = part.partition(":")
        if colon and _DIGITS_RE.match(prefix):
            ns = int(prefix)
            if ns > MAX_NAMESPACE:
                raise NodeSyntaxError(
                    f"browse path element '{part}': namespace index must be 0..{MAX_NAMESPACE}"
                )
            if not name:
                raise NodeSyntaxError(f"browse path element '{part}' has no name after the ':'")
            elements.append((ns, name))
        else:
            elements.append((0, part))  # a bare name (which may itself contain ':')
    return BrowsePathRef(tuple(elements))


def _parse_node_id(text: str) -> NodeIdRef:
    namespace = 0
    namespace_uri: str | None = None
    rest = text
    head, semi, tail = text.partition(";")
    if semi and (head.startswith("ns=") or head.startswith("nsu=")):
        key, _, value = head.partition("=")
        if key == "ns":
            if not _DIGITS_RE.match(value) or int(value) > MAX_NAMESPACE:
                raise NodeSyntaxError(
                    f"namespace index '{value}' must be an integer 0..{MAX_NAMESPACE}"
                )
            namespace = int(value)
        else:
            if not value:
                raise NodeSyntaxError("namespace URI after 'nsu=' must not be empty")
            namespace_uri = value
        rest = tail
    kind, eq, ident = rest.partition("=")
    if not eq or kind not in ("i", "s", "g", "b"):
        where = f" after '{text[: len(text) - len(rest)]}'" if rest != text else ""
        raise NodeSyntaxError(
            f"expected an identifier i=, s=, g= or b={where}; write {NODE_EXAMPLES}"
        )
    if kind == "i":
        if not _DIGITS_RE.match(ident) or int(ident) > MAX_NUMERIC_ID:
            raise NodeSyntaxError(
                f"numeric identifier '{ident}' must be an integer 0..{MAX_NUMERIC_ID}"
            )
        return NodeIdRef("i", int(ident), namespace, namespace_uri)
    if not ident:
        raise NodeSyntaxError(f"identifier after '{kind}=' must not be empty")
    if kind == "s":
        return NodeIdRef("s", ident, namespace, namespace_uri)
    if kind == "g":
        if not _GUID_RE.match(ident):
            raise NodeSyntaxError(
                f"GUID identifier '{ident}' must look like 72962b91-fa75-4ae6-8d28-b404dc7daf63"
            )
        return NodeIdRef("g", uuid.UUID(ident), namespace, namespace_uri)
    try:
        raw = base64.b64decode(ident, validate=True)
    except (binascii.Error, ValueError):
        raise NodeSyntaxError(
            f"opaque identifier '{ident}' must be base64, e.g. b=M/RbKBsRVkePCePcx24oRA=="
        ) from None
    return NodeIdRef("b", raw, namespace, namespace_uri)


def _check_node(v: str) -> str:
    try:
        parse_node(v)
    except NodeSyntaxError as exc:
        raise PydanticCustomError("node", "{reason}", {"reason": str(exc)}) from None
    return v


def _check_endpoint(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme != "opc.tcp":
        raise PydanticCustomError(
            "endpoint", "must be an opc.tcp:// URL, e.g. opc.tcp://192.168.1.10:4840"
        )
    if "@" in parts.netloc:
        raise PydanticCustomError(
            "secret_inline",
            "{reason}",  # braces in the message: pass it as context, not as the template
            {
                "reason": "no user name or password in the endpoint; use `username` and "
                "`password = { file = ... }` or `{ env = ... }`"
            },
        )
    if not parts.hostname:
        raise PydanticCustomError("endpoint", "needs a host: opc.tcp://host:port")
    try:
        port = parts.port
    except ValueError as exc:
        raise PydanticCustomError("endpoint", "bad port: {err}", {"err": str(exc)}) from exc
    if port is None:
        raise PydanticCustomError(
            "endpoint",
            "needs a port, e.g. opc.tcp://{host}:{port}",
            {"host": parts.hostname, "port": DEFAULT_PORT},
        )
    return v


# The checks behind an AfterValidator do not reach the JSON schema; these state it for editors.
NodeText = Annotated[
    str, AfterValidator(_check_node), WithJsonSchema({"type": "string", "minLength": 1})
]
Endpoint = Annotated[
    str,
    AfterValidator(_check_endpoint),
    WithJsonSchema({"type": "string", "pattern": "^opc\\.tcp://[^/@]+:[0-9]+"}),
]


def _at_least_one_tag(v: list[OpcUaTag]) -> list[OpcUaTag]:
    if not v:
        raise PydanticCustomError("tags", "give at least one tag")
    return v


class OpcUaTag(TagBase):
    node: NodeText  # NodeId ("ns=2;s=Pump.Flow", "nsu=urn:x;i=5") or browse path ("/Objects/...")
    sampling_interval_ms: NonNegativeFloat | None = None  # None: the device's period_ms
    server_deadband: NonNegativeFloat | None = None  # absolute DataChangeFilter, server side
    writable: bool = False  # the write allow-list: only these nodes may be written
    min: float | None = None  # writes below are refused
    max: float | None = None  # writes above are refused

    @model_validator(mode="after")
    def _write_limits(self) -> OpcUaTag:
        if (self.min is not None or self.max is not None) and not self.writable:
            raise PydanticCustomError(
                "write_limits", "`min` and `max` limit writes; set `writable = true` or remove them"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise PydanticCustomError("write_limits", "`min` must not be greater than `max`")
        return self

    def node_ref(self) -> NodeRef:
        return parse_node(self.node)  # validated when the model was built


SecurityPolicy = Literal["None", "Basic256Sha256"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]


class OpcUaSecurity(Strict):
    """Message security of the connection; Basic128Rsa15 and Basic256 are deprecated and absent."""

    policy: SecurityPolicy = "None"
    mode: SecurityMode = "None"
    certificate_file: str | None = None  # the client's certificate (DER or PEM)
    private_key_file: str | None = None  # the client's private key (PEM or DER, unencrypted)
    server_certificate_file: str | None = None  # pin the server's certificate (DER or PEM)

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaSecurity:
        files = {
            "certificate_file": self.certificate_file,
            "private_key_file": self.private_key_file,
            "server_certificate_file": self.server_certificate_file,
        }
        if self.policy == "None":
            if self.mode != "None":
                raise PydanticCustomError(
                    "security",
                    "mode '{mode}' needs a security policy; set policy = 'Basic256Sha256' "
                    "(or mode = 'None')",
                    {"mode": self.mode},
                )
            given = [k for k, v in files.items() if v is not None]
            if given:
                raise PydanticCustomError(
                    "security",
                    "{keys} apply only with policy 'Basic256Sha256'",
                    {"keys": ", ".join(f"`{k}`" for k in given)},
                )
            return self
        if self.mode == "None":
            raise PydanticCustomError(
                "security",
                "policy '{policy}' needs mode 'Sign' or 'SignAndEncrypt'",
                {"policy": self.policy},
            )
        missing = [k for k in ("certificate_file", "private_key_file") if files[k] is None]
        if missing:
            raise PydanticCustomError(
                "security",
                "policy '{policy}' needs {keys} (the client's certificate and private key)",
                {"policy": self.policy, "keys": " and ".join(f"`{k}`" for k in missing)},
            )
        return self


class OpcUaDevice(DeviceBase):
    type: Literal["opcua"]
    endpoint: Endpoint  # opc.tcp://host:port[/path]
    mode: Literal["subscribe", "poll"] = "subscribe"
    publishing_interval_ms: PositiveFloat = 500.0  # subscribe: how often the server sends changes
    keepalive_s: PositiveFloat = 10.0  # the server is declared gone after about twice this silence
    username: str | None = None
    password: SecretRef | None = None  # resolved by the loader; the adapter receives the value
    security: OpcUaSecurity = OpcUaSecurity()
    tags: Annotated[list[OpcUaTag], AfterValidator(_at_least_one_tag)]

    @model_validator(mode="after")
    def _credentials(self) -> OpcUaDevice:
        if self.password is not None and self.username is None:
            raise PydanticCustomError("credentials", "`password` needs `username`")
        return self

    def sampling_interval_ms(self, tag: OpcUaTag) -> float:
        return self.period_ms if tag.sampling_interval_ms is None else tag.sampling_interval_ms
