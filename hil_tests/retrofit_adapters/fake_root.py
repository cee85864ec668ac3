"""A mesh root node played by a test on the master side of a real pty: it writes UART frames
(and garbage) the way the root's border bridge does, and decodes what the gateway sends back.
The gateway side opens the slave's path with pyserial exactly like a USB serial port.

Frames are encoded with the gateway's own codec; the codec itself is proven against the shared
vectors (test_mesh_uart.py), so what is tested here is everything above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

from retrofit_adapters.mesh import uart


def cbor(obj: object) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


class FakeRoot:
    """`FakeRoot()` opens a pty pair; `path` is the serial port to configure. With `link`, a
    symlink at that path points at the slave (a /dev/serial/by-id name): `replug()` makes a new
    pty and points the link at it, as when a USB adapter is unplugged and plugged back in.

    `ack`: called with (dest, token, payload) for every DOWN; returns the DOWNACK status to
    answer, or None for no answer."""

    def __init__(
        self,
        link: Path | None = None,
        ack: Callable[[int, int, bytes], int | None] | None = None,
    ) -> None:
        self.link = link
        self.ack = ack
        self.received: list[tuple[int, bytes]] = []  # every good frame from the gateway
        self.decoder = uart.Decoder()
        self._got = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.master = -1
        self.slave = -1
        self.slave_path = ""
        self._open_pty()

    @property
    def path(self) -> str:
        return str(self.link) if self.link is not None else self.slave_path

    def _open_pty(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self.slave)
        if self.link is not None:
            tmp = self.link.with_suffix(".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.slave_path)
            tmp.replace(self.link)
        self._loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError:
            # No slave open at the moment (the gateway closed the port): nothing to read.
            self._loop.remove_reader(self.master)
            return
        for typ, body in self.decoder.feed(data):
            self.received.append((typ, body))
            self._got.set()
            if typ == uart.T_DOWN and self.ack is not None:
                dest, token, payload = uart.parse_down(body)
                status = self.ack(dest, token, payload)
                if status is not None:
                    self.send(uart.T_DOWNACK, uart.downack_body(token, status))

    # --- what the root sends -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        # Tests write far less than a pty buffers; a full buffer would be a test bug.
        n = os.write(self.master, data)
        assert n == len(data), f"pty took {n} of {len(data)} B"

    def send(self, typ: int, body: bytes) -> None:
        self.write(uart.encode(typ, body))

    def hello(self, root: int = 1, version: int = 1) -> None:
        self.send(uart.T_HELLO, cbor({"v": version, "id": root}))

    def up(self, origin: int, seq: int, msg: Any, hops: int = 14) -> None:
        payload = msg if isinstance(msg, bytes) else cbor(msg)
        self.send(uart.T_UP, uart.up_body(origin, seq, hops, payload))

    def status(self, nodes: dict[int, list[int]], root: int = 1, **stats: int) -> None:
        self.send(uart.T_STATUS, cbor({"id": root, "nodes": nodes, "stats": stats}))

    # --- what the gateway sends --------------------------------------------------------

    async def next_frame(self, typ: int, timeout_s: float = 5.0) -> tuple[int, bytes]:
        """The next frame of type `typ` not yet taken (frames are taken in order)."""
        async with asyncio.timeout(timeout_s):
            while True:
                for i, (t, body) in enumerate(self.received):
                    if t == typ:
                        del self.received[i]
                        return t, body
                self._got.clear()
                await self._got.wait()

    # --- faults ------------------------------------------------------------------------

    def unplug(self) -> None:
        """Close the master: the gateway's port reads fail, as when a USB adapter is pulled."""
        if self.master >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.master)
            os.close(self.master)
            self.master = -1

    def replug(self) -> None:
        """A new pty behind the same `link` path."""
        assert self.link is not None, "replug needs a link path"
        self.close()
        self.decoder.reset()
        self._open_pty()

    def close(self) -> None:
        self.unplug()
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
