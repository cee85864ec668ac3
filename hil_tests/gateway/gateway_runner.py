"""Run a Gateway inside a test and hand back its HTTP API address; stop it cleanly afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.runtime import Gateway
from hil_tests.gateway.http_client import Addr


@asynccontextmanager
async def running(gw: Gateway) -> AsyncIterator[Addr]:
    stop = asyncio.Event()
    task = asyncio.create_task(gw.serve(stop))
    while gw.api is None:
        await asyncio.sleep(0.01)
        if task.done():
            await task
    try:
        yield gw.api.address
    finally:
        stop.set()
        await task
