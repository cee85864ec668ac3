"""Config schema of the `mesh` device: the root node's serial port, which nodes to accept, which
`cfg` keys a write may set on a node, and the mesh tags to summarize and forward
(docs/mesh-adapter.md). Everything is checked before any I/O, each error at its dotted path.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, model_validator
from pydantic_core import PydanticCustomError

from gateway.config.fragments import (
    DeviceBase,
    Loc,
    PositiveFloat,
    PositiveInt,
    Strict,
    TagBase,
    fail_at,
    int_range,
)

__all__ = [
    "BROADCAST",
    "COMMAND_KEY_RE",
    "READ_FIELDS",
    "MeshCommand",
    "MeshDevice",
    "MeshTag",
    "MeshWriteTag",
    "NodeId",
    "node_tag",
    "parse_node_tag",
]

BROADCAST = 0xFFFF  # "all nodes / none"; never a node id
MAX_NODE = 0xFFFE
COMMAND_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# n<id>.<field>, and mesh.<field> for the mesh as a whole
_TAG_RE = re.compile(
    r"^(?:n(?P<node>[1-9][0-9]{0,4})|mesh)\.(?P<field>[A-Za-z0-9_][A-Za-z0-9_.-]*)$"
)
# Fields the adapter reads from nodes; a command key may not reuse one (a write tag would then
# shadow a value the node reports).
READ_FIELDS = frozenset(
    [
        "alarm",
        "score",
        "parent",
        "rank",
        "heap",
        "buf",
        "uptime_s",
        "samples",
        "hops",
        "last_seen_s",
        "pong",
    ]
)


def node_tag(node: int, field: str) -> str:
    return f"n{node}.{field}"


def parse_node_tag(name: str) -> tuple[int | None, str] | None:
    """`n5.temp.mean` -> (5, "temp.mean"); "mesh.nodes" -> (None, "nodes"); None if neither."""
    m = _TAG_RE.match(name)
    if m is None:
        return None
    node = m["node"]
    return (int(node) if node is not None else None), m["field"]


def _check_port(v: str) -> str:
    if not v.strip() or v != v.strip():
        raise PydanticCustomError(
            "port",
            "must be a serial device (/dev/ttyUSB0, /dev/serial/by-id/...) or socket://host:port",
        )
    if "://" in v:
        parts = urlsplit(v)
        if parts.scheme != "socket":
            raise PydanticCustomError(
                "port",
                "only socket://host:port is supported as a URL (the link waits on the port's file "
                "descriptor, which {scheme}:// does not have); or give a serial device path",
                {"scheme": parts.scheme},
            )
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise PydanticCustomError(
                "port", "socket:// needs a host and a port: socket://host:port"
            )
    return v


if TYPE_CHECKING:
    NodeId = int
    SerialPort = str
else:
    NodeId = int_range(1, MAX_NODE)  # 0xFFFF is broadcast
    SerialPort = Annotated[str, AfterValidator(_check_port)]


class MeshCommand(Strict):
    """A `cfg` key that writes may set on a node: the tag `n<id>.<key>` becomes writable and a
    write sends DOWN {"c": "cfg", "set": {key: value}} to that node."""

    key: str
    type: Literal["number", "integer", "bool", "string"] = "number"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MeshCommand:
        problems: list[tuple[Loc, str, object]] = []
        if not COMMAND_KEY_RE.match(self.key):
            problems.append(
                (
                    ("key",),
                    "must be 1-32 characters of a-z, 0-9 and '_', starting with a letter",
                    self.key,
                )
            )
        elif self.key in READ_FIELDS:
            problems.append(
                (
                    ("key",),
                    f"{self.key!r} is a value nodes report; it cannot be a command",
                    self.key,
                )
            )
        if self.type in ("bool", "string"):
            for k in ("min", "max"):
                if getattr(self, k) is not None:
                    problems.append(
                        (
                            (k,),
                            f"`{k}` applies to numbers; this command takes a {self.type}",
                            getattr(self, k),
                        )
                    )
        elif self.min is not None and self.max is not None and self.min > self.max:
            problems.append(
                (("min",), f"min {self.min:g} is greater than max {self.max:g}", self.min)
            )
        if problems:
            fail_at("MeshCommand", "mesh", problems)
        return self


class MeshTag(TagBase):
    """A mesh value to summarize and forward upstream: `n<id>.<field>` or `mesh.<field>`.
    Values arrive whether declared or not; declaring one gives it windows, deadband and rules."""


class MeshWriteTag(TagBase):
    """The writable tag `n<id>.<key>` made from a command (never from the config file)."""

    writable: bool = True
    kind: Literal["number", "integer", "bool", "string"] = "number"
    min: float | None = None
    max: float | None = None

    def value_kind(self) -> str:
        """What gateway.writes checks a value against: "number", "bool" or "string"."""
        return "number" if self.kind == "integer" else self.kind


class MeshDevice(DeviceBase):
    """The mesh behind its root node on a serial port."""

    type: Literal["mesh"]
    port: SerialPort
    baudrate: PositiveInt = 115200
    nodes: list[NodeId] = []  # accept only these nodes; empty: every node
    silence_timeout_s: PositiveFloat = 30.0  # no frame at all for this long: the read fails
    commands: list[MeshCommand] = []
    tags: list[MeshTag] = []

    @model_validator(mode="after")
    def _consistent(self) -> MeshDevice:
        problems: list[tuple[Loc, str, object]] = []
        seen: dict[int, int] = {}
        for i, n in enumerate(self.nodes):
            if n in seen:
                problems.append(
                    (("nodes", i), f"node {n} is listed twice (also nodes[{seen[n]}])", n)
                )
            seen.setdefault(n, i)
        keys: dict[str, int] = {}
        for i, c in enumerate(self.commands):
            if c.key in keys:
                problems.append(
                    (
                        ("commands", i, "key"),
                        f"command {c.key!r} is listed twice (also commands[{keys[c.key]}])",
                        c.key,
                    )
                )
            keys.setdefault(c.key, i)
        if self.commands and not self.nodes:
            problems.append(
                (
                    ("commands",),
                    "commands need `nodes`: a write tag n<id>.<key> exists for each node listed",
                    [c.key for c in self.commands],
                )
            )
        for j, t in enumerate(self.tags):
            parsed = parse_node_tag(t.name)
            if parsed is None:
                problems.append(
                    (
                        ("tags", j, "name"),
                        "a mesh tag is n<node id>.<field> (n5.temp.mean, n5.alarm) or "
                        "mesh.<field> (mesh.nodes)",
                        t.name,
                    )
                )
                continue
            node, field = parsed
            if node is not None and not 1 <= node <= MAX_NODE:
                problems.append((("tags", j, "name"), f"node ids are 1..{MAX_NODE}", t.name))
            elif node is not None and self.nodes and node not in self.nodes:
                problems.append(
                    (
                        ("tags", j, "name"),
                        f"node {node} is not in `nodes` (its frames are ignored)",
                        t.name,
                    )
                )
            elif node is not None and field in keys:
                problems.append(
                    (
                        ("tags", j, "name"),
                        f"{t.name!r} is the write tag of command {field!r}; it has no readings",
                        t.name,
                    )
                )
        if problems:
            fail_at("MeshDevice", "mesh", problems)
        return self

    def command(self, key: str) -> MeshCommand | None:
        return next((c for c in self.commands if c.key == key), None)

    def accepts(self, node: int) -> bool:
        return not self.nodes or node in self.nodes

    def effective_tags(self) -> list[TagBase]:
        """The declared tags, then a writable `n<id>.<key>` for every node in `nodes` and every
        command (what gateway.writes looks up)."""
        out: list[TagBase] = list(self.tags)
        for n in self.nodes:
            for c in self.commands:
                out.append(
                    MeshWriteTag(
                        name=node_tag(n, c.key),
                        forward="none",
                        kind=c.type,
                        min=c.min,
                        max=c.max,
                    )
                )
        return out
