"""The contract between the uplink and a fog sink: connect, publish with acknowledgements, close.

A sink never deletes anything: it reports which seqs the fog acknowledged, and the uplink deletes
exactly those from the durable queue.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from gateway.errors import UplinkError

__all__ = ["OutMessage", "Sink", "SinkListener", "redact_url", "sqlite_path"]

# (seq, topic, payload): what the uplink hands a sink; the payload is a finished CBOR envelope.
OutMessage = tuple[int, str, bytes]


class SinkListener(Protocol):
    """The uplink's side; sinks call these on the event loop thread only."""

    def sink_acked(self, seqs: list[int]) -> None:
        """The fog has these seqs for good (MQTT PUBACK with a success code, a committed insert)."""

    def sink_refused(self, seqs: list[int], reason: str) -> None:
        """The fog answered but refused these (MQTT 5 PUBACK reason >= 0x80): not delivered."""

    def sink_lost(self, reason: str) -> None:
        """The connection is gone; whatever was not acknowledged must be sent again."""


class Sink(abc.ABC):
    """One connection to the fog. `publish` never blocks: acknowledgements arrive later."""

    def __init__(self, url: str, listener: SinkListener) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.listener = listener

    @property
    @abc.abstractmethod
    def window(self) -> int:
        """How many messages may be published and not yet acknowledged (valid once connected)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection; UplinkError when the fog can't be reached or refuses us."""

    @abc.abstractmethod
    def publish(self, batch: Sequence[OutMessage]) -> None:
        """Hand messages to the fog; UplinkError if not connected."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close gracefully; safe to call when not connected."""


def redact_url(url: str) -> str:
    """The URL without user name and password, fit for logs and metrics."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def sqlite_path(url: str) -> Path:
    """`sqlite:////abs/fog.db` -> /abs/fog.db; `sqlite:///rel/fog.db` -> rel/fog.db (as SQLAlchemy)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise UplinkError(f"not a sqlite URL: {redact_url(url)}")
    if parts.netloc:
        raise UplinkError(f"sqlite URL takes no host: use sqlite:////abs/path, got {url}")
    path = unquote(parts.path)
    if not path.startswith("/") or len(path) < 2:
        raise UplinkError(f"sqlite URL needs a path: sqlite:////abs/path/fog.db, got {url}")
    return Path(path[1:])
