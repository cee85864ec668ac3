"""The virtual ESP32's 4 MB SPI flash as a file on disk: every write reaches the file atomically
(temp file, fsync, rename), so a restarted emulator or a test reading the file sees it whole."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from gateway.errors import FogmeshError

FLASH_SIZE = 4 * 1024 * 1024
SECTOR_SIZE = 0x1000
ERASED = 0xFF


class VirtualEsp32Error(FogmeshError):
    """The virtual ESP32 was misused: a bad flash image, an out-of-range access, a bad fault."""


class FlashImage:
    """A 4 MB NOR flash image, held in memory and mirrored to `path` (None: memory only).

    A missing file is created erased (all 0xFF); an existing file of any other size is refused
    rather than padded, because a wrong-sized image means the wrong file was given.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is None or not self.path.exists():
            self._data = bytearray(b"\xff" * FLASH_SIZE)
            if self.path is not None:
                self._persist()
            return
        try:
            size = self.path.stat().st_size
            if size != FLASH_SIZE:
                raise VirtualEsp32Error(
                    f"flash image {self.path} is {size} bytes, expected {FLASH_SIZE} (4 MB)"
                )
            self._data = bytearray(self.path.read_bytes())
        except OSError as exc:
            raise VirtualEsp32Error(f"cannot read flash image {self.path}: {exc}") from exc

    @property
    def size(self) -> int:
        return FLASH_SIZE

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        with self._lock:
            return bytes(self._data[offset : offset + size])

    def md5(self, offset: int, size: int) -> str:
        return hashlib.md5(self.read(offset, size)).hexdigest()

    def write(self, offset: int, data: bytes) -> None:
        """Replace `data` at `offset` (no NOR AND semantics: the caller decides what to store)."""
        self.commit([(offset, data)])

    def erase(self, offset: int, size: int) -> None:
        self.commit([(offset, b"\xff" * size)])

    def commit(self, regions: Iterable[tuple[int, bytes]]) -> None:
        """Apply several regions as one change: the file holds all of them or none."""
        regions = list(regions)
        for offset, data in regions:
            self._check(offset, len(data))
        with self._lock:
            updated = bytearray(self._data)
            for offset, data in regions:
                updated[offset : offset + len(data)] = data
            previous, self._data = self._data, updated
            try:
                self._persist()
            except VirtualEsp32Error:
                self._data = previous
                raise

    def _persist(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(self._data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise VirtualEsp32Error(f"cannot write flash image {self.path}: {exc}") from exc

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > FLASH_SIZE:
            raise VirtualEsp32Error(f"flash access {offset:#x}+{size:#x} is outside the 4 MB flash")
