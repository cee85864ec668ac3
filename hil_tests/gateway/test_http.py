"""The generic HTTP server and router (gateway.http) over real loopback sockets, with test routes."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import pytest

from gateway.errors import FogmeshError
from gateway.http import (
    HttpError,
    HttpServer,
    Limits,
    Request,
    Response,
    Router,
    dump_json,
    json_response,
    text_response,
)
from hil_tests.gateway.http_client import Addr, fetch

T = TypeVar("T")
FAST = Limits(header_timeout_s=0.3, body_timeout_s=0.3, keepalive_timeout_s=0.3)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(main())


def strict_json(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(body, parse_constant=refuse)


def make_router() -> Router:
    router = Router()
    calls: list[str] = []

    async def hello(req: Request) -> Response:
        calls.append("hello")
        return json_response({"hello": "world", "query": dict(req.query)})

    async def item(req: Request) -> Response:
        return json_response({"name": req.params["name"], "part": req.params["part"]})

    async def echo(req: Request) -> Response:
        return json_response({"got": req.json(), "token": req.bearer_token})

    async def boom(req: Request) -> Response:
        raise RuntimeError("handler bug")

    async def refused(req: Request) -> Response:
        raise ConnectionRefusedError("a backend refused")  # not the client going away

    async def nan(req: Request) -> Response:
        return json_response(
            {"x": float("nan"), "y": [float("inf"), 1.5], "z": {"w": -float("inf")}}
        )

    async def teapot(req: Request) -> Response:
        raise HttpError(418, "short and stout", headers=[("X-Why", "tea")])

    async def bye(req: Request) -> Response:
        raise HttpError(403, "go away", close=True)

    async def plain(req: Request) -> Response:
        return text_response("plain\n")

    router.add("GET", "/hello", hello)
    router.add("GET", "/items/{name}/{part}", item)
    router.add("POST", "/echo", echo, max_body_bytes=64)
    router.add("GET", "/boom", boom)
    router.add("GET", "/refused", refused)
    router.add("GET", "/nan", nan)
    router.add("GET", "/teapot", teapot)
    router.add("GET", "/bye", bye)
    router.add("GET", "/plain", plain, plain_errors=True)
    router.add("GET", "/plain/boom", boom, plain_errors=True)
    return router


@asynccontextmanager
async def serve(limits: Limits = FAST, router: Router | None = None) -> AsyncIterator[Addr]:
    async with HttpServer(router or make_router(), "127.0.0.1", 0, limits=limits) as server:
        yield server.address


async def raw(addr: Addr, data: bytes, *, timeout_s: float = 3.0) -> bytes:
    """Sends bytes, then reads until the server closes."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    finally:
        writer.close()


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def body_of(resp: bytes) -> bytes:
    return resp.split(b"\r\n\r\n", 1)[1]


def header_of(resp: bytes, name: str) -> str | None:
    head = resp.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def test_get_json_with_query() -> None:
    async def go() -> None:
        async with serve() as addr:
            status, headers, body = await fetch(addr, "GET", "/hello?a=1&a=2&b=x")
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert int(headers["content-length"]) == len(body)
            assert headers["cache-control"] == "no-store"
            assert strict_json(body) == {"hello": "world", "query": {"a": ["1", "2"], "b": ["x"]}}

    run(go())


def test_path_params_are_decoded_per_segment() -> None:
    async def go() -> None:
        async with serve() as addr:
            status, _, body = await fetch(addr, "GET", "/items/a%20b%2Fc/%C3%A9t%C3%A9")
            assert status == 200
            assert strict_json(body) == {"name": "a b/c", "part": "été"}
            status, _, body = await fetch(addr, "GET", "/items/%FF/x")  # not UTF-8
            assert status == 400
            status, _, _ = await fetch(addr, "GET", "/items//x")  # empty parameter
            assert status == 404

    run(go())


def test_unknown_path_is_404_json() -> None:
    async def go() -> None:
        async with serve() as addr:
            status, headers, body = await fetch(addr, "GET", "/nope")
            assert status == 404
            assert headers["content-type"] == "application/json"
            assert strict_json(body) == {"error": "no such resource: /nope", "status": 404}
            status, _, _ = await fetch(addr, "GET", "/hello/")  # no trailing-slash alias
            assert status == 404

    run(go())


def test_wrong_method_is_405_with_allow() -> None:
    async def go() -> None:
        async with serve() as addr:
            status, headers, body = await fetch(addr, "DELETE", "/hello")
            assert status == 405
            assert headers["allow"] == "GET, HEAD"
            assert strict_json(body)["status"] == 405
            status, headers, _ = await fetch(addr, "GET", "/echo")
            assert status == 405
            assert headers["allow"] == "POST"
            # A route with plain errors answers its 405 in text.
            status, headers, body = await fetch(addr, "POST", "/plain")
            assert status == 405
            assert headers["content-type"].startswith("text/plain")
            assert body == b"405 method POST not allowed on /plain\n"

    run(go())


def test_head_has_headers_but_no_body() -> None:
    async def go() -> None:
        async with serve() as addr:
            _, _, get_body = await fetch(addr, "GET", "/hello")
            resp = await raw(addr, b"HEAD /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert status_of(resp) == 200
            assert header_of(resp, "Content-Length") == str(len(get_body))
            assert body_of(resp) == b""

    run(go())


def test_body_within_limit_and_bearer_token() -> None:
    async def go() -> None:
        async with serve() as addr:
            headers = {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
            status, _, body = await fetch(addr, "POST", "/echo", b'{"v": [1, 2]}', headers)
            assert status == 200
            assert strict_json(body) == {"got": {"v": [1, 2]}, "token": "s3cret"}
            status, _, body = await fetch(addr, "POST", "/echo", b"{", headers)
            assert status == 400
            status, _, _ = await fetch(addr, "POST", "/echo", b"{}", {"Content-Type": "text/x"})
            assert status == 415

    run(go())


def test_body_too_large_is_413() -> None:
    async def go() -> None:
        async with serve() as addr:
            status, headers, body = await fetch(addr, "POST", "/echo", b"x" * 65)
            assert status == 413
            assert headers["connection"] == "close"  # the unread body spoils the connection
            assert strict_json(body) == {
                "error": "request body larger than 64 bytes",
                "status": 413,
            }
            # A route that takes no body refuses any.
            status, _, _ = await fetch(addr, "GET", "/hello", b"x")
            assert status == 413

    run(go())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /hello\r\n\r\n", 400),
        (b"GET  /hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"G(T /hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET hello HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost : t\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
        (b"GET /hello HTTP/2.0\r\nHost: t\r\n\r\n", 505),
        (b"GET /hello HTTPS/1.1\r\nHost: t\r\n\r\n", 400),
    ],
)
def test_malformed_requests(request_bytes: bytes, status: int) -> None:
    async def go() -> None:
        async with serve() as addr:
            resp = await raw(addr, request_bytes)
            assert status_of(resp) == status
            assert header_of(resp, "Connection") == "close"
            assert strict_json(body_of(resp))["status"] == status

    run(go())


def test_lenient_where_the_rfc_allows() -> None:
    async def go() -> None:
        async with serve() as addr:
            # Leading empty lines, bare LF line ends, absolute-form target, HTTP/1.0 without Host.
            resp = await raw(
                addr, b"\r\n\nGET http://t/hello?b=1 HTTP/1.1\nHost: t\nConnection: close\n\n"
            )
            assert status_of(resp) == 200
            assert strict_json(body_of(resp))["query"] == {"b": ["1"]}
            resp = await raw(addr, b"GET /hello HTTP/1.0\r\n\r\n")
            assert status_of(resp) == 200
            assert header_of(resp, "Connection") == "close"

    run(go())


def test_headers_too_large_is_431() -> None:
    limits = Limits(max_header_bytes=1024, max_header_count=10, header_timeout_s=2)

    async def go() -> None:
        async with serve(limits) as addr:
            long_line = b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
            resp = await raw(addr, long_line)
            assert status_of(resp) == 431
            assert strict_json(body_of(resp)) == {
                "error": "request header too large",
                "status": 431,
            }
            many = b"GET /hello HTTP/1.1\r\nHost: t\r\n" + b"X: 1\r\n" * 11 + b"\r\n"
            resp = await raw(addr, many)
            assert status_of(resp) == 431
            # Lines each short but together over the budget.
            spread = b"GET /hello HTTP/1.1\r\nHost: t\r\n" + (b"X: " + b"b" * 200 + b"\r\n") * 6
            resp = await raw(addr, spread + b"\r\n")
            assert status_of(resp) == 431
            just_fits = (
                b"GET /hello HTTP/1.1\r\nHost: t\r\n"
                + b"X: 1\r\n" * 8
                + b"Connection: close\r\n\r\n"
            )
            assert status_of(await raw(addr, just_fits)) == 200

    run(go())


def test_slow_client_gets_408_and_does_not_block_others() -> None:
    async def go() -> None:
        async with serve() as addr:
            reader, writer = await asyncio.open_connection(*addr)
            t0 = time.monotonic()
            writer.write(b"GET /hello HTTP/1.1\r\nHost: t\r\n")  # ...and never the blank line
            await writer.drain()
            status, _, _ = await fetch(addr, "GET", "/hello")  # served meanwhile
            assert status == 200
            resp = await reader.read()
            elapsed = time.monotonic() - t0
            writer.close()
            assert status_of(resp) == 408
            assert strict_json(body_of(resp))["status"] == 408
            assert 0.25 <= elapsed < 2.0

    run(go())


def test_trickling_client_is_cut_at_the_head_deadline() -> None:
    async def go() -> None:
        async with serve() as addr:
            reader, writer = await asyncio.open_connection(*addr)

            async def trickle() -> None:
                with suppress(OSError):
                    for ch in b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"z" * 200:
                        writer.write(bytes([ch]))
                        await writer.drain()
                        await asyncio.sleep(0.02)  # each byte well within any per-read timeout

            t0 = time.monotonic()
            task = asyncio.create_task(trickle())
            resp = await reader.read()
            elapsed = time.monotonic() - t0
            task.cancel()
            writer.close()
            assert status_of(resp) == 408
            assert elapsed < 1.5

    run(go())


def test_slow_body_gets_408() -> None:
    async def go() -> None:
        async with serve() as addr:
            head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"
            resp = await raw(addr, head)
            assert status_of(resp) == 408

    run(go())


def test_silent_connection_is_closed_without_an_answer() -> None:
    async def go() -> None:
        async with serve() as addr:
            t0 = time.monotonic()
            assert await raw(addr, b"") == b""
            assert 0.25 <= time.monotonic() - t0 < 2.0

    run(go())


def test_keep_alive_reuses_the_connection_up_to_the_limit() -> None:
    limits = Limits(max_requests_per_connection=3, keepalive_timeout_s=2)

    def three(addr: Addr) -> list[tuple[int, str, int]]:
        conn = http.client.HTTPConnection(*addr, timeout=5)
        out = []
        try:
            for _ in range(3):
                conn.request("GET", "/hello")
                assert conn.sock is not None
                fileno = conn.sock.fileno()  # before a "close" answer drops the socket
                resp = conn.getresponse()
                resp.read()
                out.append((resp.status, resp.getheader("Connection") or "", fileno))
        finally:
            conn.close()
        return out

    async def go() -> None:
        async with serve(limits) as addr:
            results = await asyncio.to_thread(three, addr)
            assert [r[:2] for r in results] == [
                (200, "keep-alive"),
                (200, "keep-alive"),
                (200, "close"),
            ]
            assert len({r[2] for r in results}) == 1  # one socket for all three

    run(go())


def test_errors_keep_the_connection_unless_they_must_close() -> None:
    async def go() -> None:
        async with serve() as addr:
            resp = await raw(
                addr,
                b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"  # 404: the connection stays usable
                b"GET /bye HTTP/1.1\r\nHost: t\r\n\r\n"  # the handler asks to close
                b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n",  # never answered
            )
            answers = [a for a in resp.split(b"HTTP/1.1 ")[1:]]
            assert [status_of(b"HTTP/1.1 " + a) for a in answers] == [404, 403]
            assert b"Connection: keep-alive" in answers[0]
            assert b"Connection: close" in answers[1]

    run(go())


def test_head_deadline_restarts_on_a_reused_connection() -> None:
    limits = Limits(keepalive_timeout_s=0.5, header_timeout_s=2.0)

    async def go() -> None:
        async with serve(limits) as addr:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            await reader.readuntil(b'"query":{}}')  # the whole first answer
            await asyncio.sleep(0.3)  # idle, within keep-alive
            for part in (b"GET /items/x/y HTTP/1.1\r\n", b"Host: t\r\n", b"\r\n"):
                writer.write(part)  # the head takes 0.4 s more: past the idle deadline
                await asyncio.sleep(0.2)
            resp = await reader.readuntil(b"}")
            writer.close()
            assert status_of(resp) == 200
            assert resp.endswith(b'{"name":"x","part":"y"}')

    run(go())


def test_pipelined_requests_are_answered_in_order() -> None:
    async def go() -> None:
        async with serve() as addr:
            two = (
                b"GET /items/a/1 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /items/b/2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            resp = await raw(addr, two)
            assert resp.count(b"HTTP/1.1 200 OK") == 2
            assert resp.index(b'"name":"a"') < resp.index(b'"name":"b"')

    run(go())


def test_expect_100_continue() -> None:
    async def go() -> None:
        async with serve() as addr:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"[]")
            resp = await reader.read()
            writer.close()
            assert status_of(resp) == 200
            assert strict_json(body_of(resp)) == {"got": [], "token": None}

    run(go())


def test_handler_exception_is_500_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        async with serve() as addr:
            with caplog.at_level(logging.ERROR, logger="gateway.http"):
                status, _, body = await fetch(addr, "GET", "/boom")
            assert status == 500
            assert strict_json(body) == {"error": "internal server error", "status": 500}
            status, headers, body = await fetch(addr, "GET", "/plain/boom")
            assert status == 500
            assert headers["content-type"].startswith("text/plain")
            status, _, body = await fetch(addr, "GET", "/refused")
            assert (status, strict_json(body)["status"]) == (500, 500)
            status, _, _ = await fetch(addr, "GET", "/hello")
            assert status == 200

    run(go())
    failures = [r for r in caplog.records if "GET /boom" in r.getMessage()]
    assert failures and failures[0].exc_info is not None
    assert "handler bug" in caplog.text  # the traceback is in the log, not in the answer


def test_http_error_from_a_handler_keeps_its_status_and_headers() -> None:
    async def go() -> None:
        async with serve() as addr:
            status, headers, body = await fetch(addr, "GET", "/teapot")
            assert status == 418
            assert headers["x-why"] == "tea"
            assert strict_json(body) == {"error": "short and stout", "status": 418}

    run(go())


def test_non_finite_floats_become_null() -> None:
    assert strict_json(dump_json([float("nan")])) == [None]

    async def go() -> None:
        async with serve() as addr:
            _, _, body = await fetch(addr, "GET", "/nan")
            assert strict_json(body) == {"x": None, "y": [None, 1.5], "z": {"w": None}}

    run(go())


def test_connection_limit_closes_extra_connections() -> None:
    limits = Limits(max_connections=1, header_timeout_s=2)

    async def go() -> None:
        async with serve(limits) as addr:
            _, hog = await asyncio.open_connection(*addr)
            await asyncio.sleep(0.05)  # let the server take the first connection
            reader, writer = await asyncio.open_connection(*addr)
            async with asyncio.timeout(1):
                assert await reader.read() == b""  # closed at once, not served
            writer.close()
            hog.close()
            await asyncio.sleep(0.05)
            status, _, _ = await fetch(addr, "GET", "/hello")
            assert status == 200

    run(go())


def test_exit_closes_open_connections_and_stops_listening() -> None:
    limits = Limits(keepalive_timeout_s=30, header_timeout_s=30)

    async def go() -> None:
        async with serve(limits) as addr:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            await reader.readuntil(b'"world"')  # served; now idle under keep-alive
        t0 = time.monotonic()
        async with asyncio.timeout(2):
            rest = await reader.read()
        assert time.monotonic() - t0 < 1.0
        assert b"HTTP/1.1" not in rest
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(*addr)

    run(go())


def test_address_needs_a_running_server() -> None:
    server = HttpServer(make_router(), "127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        _ = server.address


def test_a_port_in_use_is_a_fogmesh_error() -> None:
    async def go() -> None:
        async with serve() as (host, port):
            with pytest.raises(FogmeshError, match=f"cannot listen on 127.0.0.1:{port}"):
                async with HttpServer(make_router(), host, port):
                    pass

    run(go())


def test_router_rejects_bad_routes() -> None:
    async def h(req: Request) -> Response:
        return json_response({})

    router = Router()
    router.add("GET", "/a/{x}", h)
    with pytest.raises(ValueError, match="duplicate"):
        router.add("GET", "/a/{y}", h)  # same shape, whatever the parameter's name
    with pytest.raises(ValueError, match="repeated"):
        router.add("GET", "/b/{x}/{x}", h)
    with pytest.raises(ValueError, match="whole segment"):
        router.add("GET", "/c/x{y}", h)
    with pytest.raises(ValueError, match="start with"):
        router.add("GET", "c", h)
    with pytest.raises(ValueError, match="method"):
        router.add("get", "/d", h)
    router.add("PUT", "/a/{x}", h, max_body_bytes=10)  # another method on the same path is fine
    route, params = router.resolve("PUT", "/a/1")
    assert (route.method, route.max_body_bytes, params) == ("PUT", 10, {"x": "1"})
    router.add("GET", "/a/all", h)  # registered later, yet more specific
    assert router.resolve("GET", "/a/all")[0].pattern == "/a/all"
    assert router.resolve("GET", "/a/al")[0].pattern == "/a/{x}"
    with pytest.raises(HttpError) as err:
        router.resolve("DELETE", "/a/1")
    assert err.value.status == 405
    assert err.value.headers == [("Allow", "GET, HEAD, PUT")]


def test_request_helpers() -> None:
    req = Request("GET", "/", "/", {}, "HTTP/1.1", {"authorization": "bearer  tok "})
    assert req.bearer_token == "tok"
    assert req.header("Authorization") == "bearer  tok "
    assert (
        Request("GET", "/", "/", {}, "HTTP/1.1", {"authorization": "Basic x"}).bearer_token is None
    )
    assert (
        Request("GET", "/", "/", {}, "HTTP/1.1", {"authorization": "Bearer "}).bearer_token is None
    )


def test_client_gone_halfway_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with serve() as addr:
            for partial in (
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n{",
                b"GET /hello HTTP/1.1\r\nHo",
            ):
                _, writer = await asyncio.open_connection(*addr)
                writer.write(partial)
                await writer.drain()
                writer.close()
            await asyncio.sleep(0.1)
            status, _, _ = await fetch(addr, "GET", "/hello")
            assert status == 200

    with caplog.at_level(logging.DEBUG):
        run(go())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_public_names() -> None:
    import inspect

    from gateway import api, metrics, openapi
    from gateway import http as gw_http

    for module in (gw_http, api, metrics, openapi):
        names = set(module.__all__)
        assert all(hasattr(module, n) for n in names), module.__name__
        defined = {
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__
        }
        assert defined <= names, (module.__name__, defined - names)
