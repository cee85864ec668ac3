"""The gateway's config: one TOML file validated into typed models, every problem with its path.

The loader is imported on first use: adapters import `gateway.config.fragments`, and the models
import the adapters' config, so loading it eagerly here would make an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config.loader import LoadedConfig, config_json_schema, load_config, parse_config

__all__ = ["LoadedConfig", "config_json_schema", "load_config", "parse_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("gateway.config.loader"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
