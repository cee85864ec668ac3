"""Protocol adapters behind one contract (`Adapter`), found by device `type` through the registry.

Adapter modules are imported lazily by `adapter_class`, so vendor libraries load only when a
configured device needs them.
"""

from __future__ import annotations

from retrofit_adapters.base import (
    CAP_READ,
    CAP_SUBSCRIBE,
    CAP_WRITE,
    KNOWN_CAPABILITIES,
    Adapter,
    Reading,
)
from retrofit_adapters.registry import adapter_class, known_types

__all__ = [
    "CAP_READ",
    "CAP_SUBSCRIBE",
    "CAP_WRITE",
    "KNOWN_CAPABILITIES",
    "Adapter",
    "Reading",
    "adapter_class",
    "known_types",
]
