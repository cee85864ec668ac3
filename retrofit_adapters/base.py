"""The one contract every protocol adapter implements: an async context manager that opens,
reads, optionally writes, and closes one device, declaring its config schema and capabilities.

`docs/adapters.md` is the guide for writing one; `gateway.supervisor` is the only caller.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self

from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError
from gateway.model import Quality, Value

# Capability names an adapter may declare; the runtime checks them before routing a request.
CAP_READ = "read"
CAP_WRITE = "write"
CAP_SUBSCRIBE = "subscribe"
KNOWN_CAPABILITIES: frozenset[str] = frozenset({CAP_READ, CAP_WRITE, CAP_SUBSCRIBE})


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one tag as an adapter returns it; the supervisor turns it into a `Sample`."""

    tag: str
    value: Value
    quality: Quality = Quality.GOOD
    ts: float | None = None  # seconds since the epoch; None: the supervisor stamps the read time


class Adapter(ABC):
    """One device behind one protocol. Instances are made by the supervisor, one per device,
    and reused across reconnects: `open()` may follow `close()` any number of times.

    Subclasses set the three class variables and implement `open`, `read` and `close`; they map
    every vendor exception to `DeviceError` (or a subclass) raised `from` the original.
    """

    type_name: ClassVar[str]  # the config's `type`, e.g. "modbus_tcp"
    config_model: ClassVar[type[DeviceBase]]  # the pydantic model of this adapter's devices
    capabilities: ClassVar[frozenset[str]]  # subset of KNOWN_CAPABILITIES

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Catch a misspelt capability when the module is imported, not when a write arrives.
        caps = cls.__dict__.get("capabilities")
        if caps is not None and not caps <= KNOWN_CAPABILITIES:
            unknown = ", ".join(sorted(caps - KNOWN_CAPABILITIES))
            raise TypeError(f"{cls.__name__}: unknown capabilities {unknown}")

    def __init__(self, cfg: DeviceBase, *, clock: Callable[[], float] = time.monotonic) -> None:
        # No I/O here: construction must be cheap and must not fail for a device that is down.
        self.cfg = cfg
        self.clock = clock

    @property
    def device_id(self) -> str:
        return self.cfg.id

    def tag_names(self) -> list[str] | None:
        """Tags this device may report; the supervisor drops readings of any other tag.

        The default takes the names of `cfg.tags`; None (no config tags) disables the check.
        Override when the config derives its tags otherwise.
        """
        tags = getattr(self.cfg, "tags", None)
        if not tags:
            return None
        return [str(t.name) for t in tags]

    @abstractmethod
    async def open(self) -> None:
        """Connect. Raise DeviceError when the device cannot be reached."""

    @abstractmethod
    async def read(self) -> list[Reading]:
        """Read every configured tag once. Raise DeviceError when the device fails."""

    async def write(self, tag: str, value: Value) -> None:
        """Write one tag. Only adapters declaring the "write" capability override this."""
        raise DeviceError(
            f"{self.type_name} device {self.cfg.id!r} does not support writes (tag {tag!r})"
        )

    @abstractmethod
    async def close(self) -> None:
        """Release the connection. Idempotent, and safe after a failed or partial open()."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
