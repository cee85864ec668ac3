"""A virtual ESP32 for tests, demos and HIL rigs: its ROM serial bootloader on a loopback TCP port
that the real esptool flashes unmodified (`socket://127.0.0.1:PORT`, a 4 MB flash image file,
injectable faults), and the running board: MicroPython with its own filesystem behind a pty that
the real mpremote drives (`resume`). Names are exported lazily: importing the package starts nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "BoardError": "tools.virtual_esp32.board",
    "BoardStats": "tools.virtual_esp32.board",
    "VirtualBoard": "tools.virtual_esp32.board",
    "FLASH_SIZE": "tools.virtual_esp32.flash_image",
    "FlashImage": "tools.virtual_esp32.flash_image",
    "VirtualEsp32Error": "tools.virtual_esp32.flash_image",
    "RomFaults": "tools.virtual_esp32.rom",
    "RomStats": "tools.virtual_esp32.rom",
    "VirtualEsp32Rom": "tools.virtual_esp32.rom",
    "checksum": "tools.virtual_esp32.rom",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tools.virtual_esp32' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
