"""A blocking HTTP client for tests, run in a thread so the server's event loop keeps serving."""

from __future__ import annotations

import asyncio
import http.client

Addr = tuple[str, int]


def fetch_sync(
    addr: Addr,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*addr, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def fetch(
    addr: Addr,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch_sync, addr, method, path, body, headers)
