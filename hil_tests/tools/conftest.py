"""Fixtures the tools' tests share: a virtual ESP32 board with its own filesystem directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.virtual_esp32.board import VirtualBoard


@pytest.fixture
def fs(tmp_path: Path) -> Path:
    d = tmp_path / "fs"
    d.mkdir()
    return d


@pytest.fixture
def board(fs: Path, tmp_path: Path) -> Iterator[VirtualBoard]:
    with VirtualBoard(fs, tmp_path / "ttyESP32") as b:
        yield b
