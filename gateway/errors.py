"""The project's error tree: every error fogmesh raises on purpose derives from FogmeshError.

    FogmeshError
    ├── ConfigError            invalid configuration; carries every problem with its dotted path
    ├── DeviceError            a device or its adapter failed (vendor exceptions mapped here)
    │   ├── DeviceTimeout      a device did not answer in time
    │   └── BadData            a device answered with values that make no sense
    ├── StoreError             the durable queue or a fog store could not do its job
    ├── UplinkError            the fog sink refused or lost a connection
    └── WireError              a message can't be encoded, or bytes are not one CBOR item or a valid envelope

Vendor exceptions are mapped at the boundary and raised `from` the original.
"""

from __future__ import annotations

from dataclasses import dataclass


class FogmeshError(Exception):
    """Root of every error fogmesh raises on purpose; the CLI turns it into exit code 1."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    path: str  # dotted path, e.g. "devices[2].tags[5].address"; "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(FogmeshError):
    def __init__(self, problems: list[ConfigProblem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(p) for p in problems))


class DeviceError(FogmeshError):
    pass


class DeviceTimeout(DeviceError):
    pass


class BadData(DeviceError):
    pass


class StoreError(FogmeshError):
    pass


class UplinkError(FogmeshError):
    pass


class WireError(FogmeshError):
    """A message could not be encoded, or bytes from the wire are not a valid envelope."""
