"""A small asyncio HTTP/1.1 server and router for the gateway's API, on the standard library only.

Every connection is bounded in time and memory (`Limits`); routes declare their method, path
parameters and body size limit, so write routes can be added without touching the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gateway.errors import FogmeshError

__all__ = [
    "JSON_TYPE",
    "TEXT_TYPE",
    "Handler",
    "HttpError",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "Route",
    "Router",
    "dump_json",
    "error_response",
    "json_response",
    "text_response",
]

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: methods, field names
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than HTAB


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection bounds; the defaults suit a gateway on a plant network."""

    header_timeout_s: float = 10.0  # the whole request head, so a trickling client cannot hold on
    body_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0  # idle time allowed between two requests on one connection
    write_timeout_s: float = 10.0  # a client that does not read its response is dropped
    max_header_bytes: int = 16 * 1024  # request line and header fields together
    max_header_count: int = 100
    max_requests_per_connection: int = 100
    max_connections: int = 64  # more are closed at once: the gateway's file descriptors matter more


class HttpError(Exception):
    """An error answer in exception form; the server turns it into a response.

    It never leaves the server (handlers raise it, the server catches it), so it is not part of
    the FogmeshError tree.
    """

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        close: bool = False,
        plain_text: bool = False,
    ) -> None:
        self.status = status
        self.message = message or _phrase(status)
        self.headers = list(headers)
        self.close = close  # the connection cannot be reused (request not fully read)
        self.plain_text = plain_text
        super().__init__(f"{status} {self.message}")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent, for logs
    path: str  # percent-encoded, without the query
    query: Mapping[str, list[str]]
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: Mapping[str, str]  # lower-case names; repeated fields joined with ", "
    params: Mapping[str, str] = field(default_factory=dict)  # decoded path parameters
    body: bytes = b""
    remote_addr: str | None = None  # the client's IP address (a proxy's, behind a proxy)

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    @property
    def bearer_token(self) -> str | None:
        """The token of an `Authorization: Bearer <token>` header, else None."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None

    def json(self) -> Any:
        """The body parsed as JSON; 415 or 400 for anything else."""
        ctype = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != JSON_TYPE:
            raise HttpError(415, f"expected Content-Type: {JSON_TYPE}")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"invalid JSON body: {exc}") from exc


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def _finite(obj: object) -> object:
    # JSON has no NaN or Infinity; a strict client would reject the whole document.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def dump_json(data: object) -> bytes:
    """Strict JSON: NaN and infinities become null."""
    return json.dumps(_finite(data), allow_nan=False, separators=(",", ":")).encode()


def json_response(
    data: object, status: int = 200, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    return Response(status, dump_json(data), JSON_TYPE, list(headers))


def text_response(text: str, status: int = 200, content_type: str = TEXT_TYPE) -> Response:
    return Response(status, text.encode(), content_type)


def error_response(err: HttpError, *, plain_text: bool = False) -> Response:
    if plain_text:
        resp = text_response(f"{err.status} {err.message}\n", err.status)
    else:
        resp = json_response({"error": err.message, "status": err.status}, err.status)
    resp.headers.extend(err.headers)
    return resp


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # e.g. "/api/v1/devices/{id}"
    handler: Handler
    max_body_bytes: int = 0  # 0: the route takes no body
    plain_errors: bool = False  # errors as text/plain (for /metrics scrapers), not JSON
    parts: tuple[str, ...] = ()  # the pattern split on "/"; "{name}" marks a parameter

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.parts):
            return None
        params: dict[str, str] = {}
        for part, seg in zip(self.parts, segments, strict=True):
            m = _PARAM.fullmatch(part)
            if m is None:
                if part != seg:
                    return None
            elif seg:
                params[m.group(1)] = seg
            else:
                return None
        return params


class Router:
    """Routes by method and path; a path parameter matches one non-empty, decoded segment."""

    def __init__(self) -> None:
        self._routes: list[Route] = []

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    def add(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        max_body_bytes: int = 0,
        plain_errors: bool = False,
    ) -> Route:
        if not _TOKEN.fullmatch(method) or method != method.upper():
            raise ValueError(f"bad method: {method!r}")
        if not pattern.startswith("/"):
            raise ValueError(f"pattern must start with '/': {pattern!r}")
        parts = tuple(pattern[1:].split("/"))
        names = [m.group(1) for p in parts if (m := _PARAM.fullmatch(p))]
        if len(names) != len(set(names)):
            raise ValueError(f"repeated parameter in {pattern!r}")
        if any(("{" in p or "}" in p) and not _PARAM.fullmatch(p) for p in parts):
            raise ValueError(f"a parameter must be a whole segment: {pattern!r}")
        shape = _shape(parts)
        if any(r.method == method and _shape(r.parts) == shape for r in self._routes):
            raise ValueError(f"duplicate route: {method} {pattern}")
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        route = Route(method, pattern, handler, max_body_bytes, plain_errors, parts)
        self._routes.append(route)
        return route

    def get(self, pattern: str, *, plain_errors: bool = False) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add("GET", pattern, handler, plain_errors=plain_errors)
            return handler

        return register

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its parameters; HttpError 404 or 405 (with Allow) otherwise.

        HEAD is answered by the GET route; the server leaves the body out.
        """
        try:
            # Decode after splitting, so that an encoded "/" stays inside its segment.
            segments = [unquote(s, errors="strict") for s in path[1:].split("/")]
        except UnicodeDecodeError:
            raise HttpError(400, "path is not valid UTF-8") from None
        found = [(r, p) for r in self._routes if (p := r.match(segments)) is not None]
        # A literal segment beats a parameter ("/devices/all" over "/devices/{id}").
        found.sort(key=lambda rp: -sum(not _PARAM.fullmatch(x) for x in rp[0].parts))
        if not found:
            raise HttpError(404, f"no such resource: {path}")
        for want in (method, "GET") if method == "HEAD" else (method,):
            for route, params in found:
                if route.method == want:
                    return route, params
        allowed = {r.method for r, _ in found}
        if "GET" in allowed:
            allowed.add("HEAD")
        raise HttpError(
            405,
            f"method {method} not allowed on {path}",
            headers=[("Allow", ", ".join(sorted(allowed)))],
            plain_text=any(r.plain_errors for r, _ in found),
        )


class _Idle(Exception):
    """The client closed or stayed silent before sending a request: close without an answer."""


class HttpServer:
    """Serves a Router on one listening address; an async context manager owns the sockets.

    HTTP/1.1 keep-alive up to `Limits.max_requests_per_connection`; HTTP/1.0 clients and any
    request that was not read completely get `Connection: close`.
    """

    def __init__(
        self,
        router: Router,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: Limits | None = None,
    ) -> None:
        self._router = router
        self._host = host
        self._port = port
        self._limits = limits or Limits()
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the server is not running")
        return self._address

    async def __aenter__(self) -> HttpServer:
        self._closing = False
        try:
            self._server = await asyncio.start_server(
                self._on_connect, self._host, self._port, limit=self._limits.max_header_bytes
            )
        except OSError as exc:  # a port in use or a wrong host: one clear line from the CLI
            raise FogmeshError(f"HTTP: cannot listen on {self._host}:{self._port}: {exc}") from exc
        sockname = self._server.sockets[0].getsockname()
        self._address = (str(sockname[0]), int(sockname[1]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        # Python 3.11's Server.close() leaves accepted connections open: end them here.
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._address = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._closing or len(self._connections) >= self._limits.max_connections:
            log.warning("HTTP: refusing a connection (%d open)", len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or would not read; nothing to answer
        except asyncio.CancelledError:
            # Our own __aexit__ ends connections this way; finishing quietly keeps asyncio's
            # stream callback from logging the cancellation as an error.
            if not self._closing:
                raise
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        most = self._limits.max_requests_per_connection
        for n in range(most):
            if not await self._exchange(reader, writer, first=n == 0, last=n + 1 == most):
                return

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, first: bool, last: bool
    ) -> bool:
        """Reads one request and answers it; True if the connection may carry another."""
        try:
            lines = await self._read_head(reader, first=first)
        except _Idle:
            return False
        except HttpError as err:
            await self._send(writer, error_response(err), keep_alive=False, head_only=False)
            return False

        request: Request | None = None
        route: Route | None = None
        body_read = False
        close = last or self._closing
        try:
            request = _parse_head(lines)
            length = _body_length(request.headers)
            body_read = length == 0
            route, params = self._router.resolve(request.method, request.path)
            body = await self._read_body(reader, writer, request, route, length)
            body_read = True
            request = replace(request, params=params, body=body, remote_addr=_peer(writer))
            response = await _call(route, request)
        except HttpError as err:
            plain = err.plain_text or (route is not None and route.plain_errors)
            response = error_response(err, plain_text=plain)
            close = close or err.close
        if request is None:
            close = True
            method = target = "-"
        else:
            method, target = request.method, request.target
            wants_close = "close" in _tokens(request.headers.get("connection", ""))
            close = close or wants_close or not body_read or request.version != "HTTP/1.1"
        log.debug("HTTP %s %s -> %d", method, target, response.status)
        await self._send(writer, response, keep_alive=not close, head_only=method == "HEAD")
        return not close

    async def _read_head(self, reader: asyncio.StreamReader, *, first: bool) -> list[str]:
        limits = self._limits
        started = False
        try:
            idle_s = limits.header_timeout_s if first else limits.keepalive_timeout_s
            async with asyncio.timeout(idle_s) as deadline:
                prefix = await reader.readexactly(1)
                started = True
                if not first:
                    # The head deadline starts with its first byte on a reused connection.
                    loop = asyncio.get_running_loop()
                    deadline.reschedule(loop.time() + limits.header_timeout_s)
                return await self._read_lines(reader, prefix)
        except asyncio.IncompleteReadError:
            raise _Idle from None  # closed, before or halfway through a request: no one to answer
        except TimeoutError:
            if not started:
                raise _Idle from None
            raise HttpError(408, "request header not received in time", close=True) from None

    async def _read_lines(self, reader: asyncio.StreamReader, prefix: bytes) -> list[str]:
        limits = self._limits
        lines: list[str] = []
        total = 0
        while True:
            try:
                raw = prefix if prefix == b"\n" else prefix + await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise HttpError(431, "request header too large", close=True) from None
            prefix = b""
            total += len(raw)
            if total > limits.max_header_bytes:
                raise HttpError(431, "request header too large", close=True)
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if not line:
                if lines:
                    return lines
                continue  # RFC 9112 §2.2: ignore empty lines before the request line
            if len(lines) > limits.max_header_count:
                raise HttpError(431, "too many header fields", close=True)
            # Latin-1 maps every byte, so odd bytes are judged by the parser, not the decoder.
            lines.append(line.decode("latin-1"))

    async def _read_body(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Request,
        route: Route,
        length: int,
    ) -> bytes:
        if length > route.max_body_bytes:
            limit = route.max_body_bytes
            raise HttpError(413, f"request body larger than {limit} bytes", close=True)
        if length == 0:
            return b""
        expect = request.headers.get("expect", "").lower()
        if expect == "100-continue":
            if request.version == "HTTP/1.1":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif expect:
            raise HttpError(417, f"unsupported Expect: {expect}", close=True)
        try:
            async with asyncio.timeout(self._limits.body_timeout_s):
                return await reader.readexactly(length)
        except TimeoutError:
            raise HttpError(408, "request body not received in time", close=True) from None
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("client closed during the body") from None

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool, head_only: bool
    ) -> None:
        head = [
            f"HTTP/1.1 {response.status} {_phrase(response.status)}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: fogmesh",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",  # live status: never serve it from a cache
        ]
        if keep_alive:
            head += [
                "Connection: keep-alive",
                f"Keep-Alive: timeout={self._limits.keepalive_timeout_s:g}",
            ]
        else:
            head.append("Connection: close")
        for name, value in response.headers:
            if not _TOKEN.fullmatch(name) or _CTL.search(value):
                raise ValueError(f"invalid response header {name!r}: {value!r}")
            head.append(f"{name}: {value}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        writer.write(data if head_only else data + response.body)
        async with asyncio.timeout(self._limits.write_timeout_s):
            await writer.drain()


async def _call(route: Route, request: Request) -> Response:
    try:
        return await route.handler(request)
    except HttpError:
        raise
    except Exception:
        # A bug in one handler costs one 500, never the server or the connection.
        log.exception("HTTP handler for %s %s failed", request.method, request.target)
        err = HttpError(500, "internal server error")
        return error_response(err, plain_text=route.plain_errors)


def _parse_head(lines: list[str]) -> Request:
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line", close=True)
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method", close=True)
    m = _VERSION.fullmatch(version)
    if m is None:
        raise HttpError(400, "malformed HTTP version", close=True)
    if m.group(1) != "1":
        raise HttpError(505, close=True)
    version = "HTTP/1.0" if m.group(2) == "0" else "HTTP/1.1"
    if not target or _CTL.search(target) or "\t" in target:
        raise HttpError(400, "malformed request target", close=True)
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):  # absolute form (RFC 9112 §3.2.2)
        split = urlsplit(target)
        path, query = split.path or "/", split.query
    else:
        raise HttpError(400, "malformed request target", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line[0] in " \t":
            raise HttpError(400, "obsolete header line folding", close=True)
        name, sep, value = line.partition(":")
        value = value.strip(" \t")
        if not sep or not _TOKEN.fullmatch(name) or _CTL.search(value):
            raise HttpError(400, "malformed header field", close=True)
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "missing Host header", close=True)
    return Request(method, target, path, parse_qs(query), version, headers)


def _body_length(headers: Mapping[str, str]) -> int:
    if "transfer-encoding" in headers:
        # Chunked bodies are not read; without framing the connection cannot be reused.
        raise HttpError(411, "send the body with Content-Length", close=True)
    raw = headers.get("content-length")
    if raw is None:
        return 0
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1 or not all(v.isdigit() and v.isascii() for v in values):
        raise HttpError(400, "invalid Content-Length", close=True)
    return int(values.pop())


def _peer(writer: asyncio.StreamWriter) -> str | None:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def _shape(parts: tuple[str, ...]) -> tuple[str, ...]:
    # Two patterns that differ only in parameter names match the same paths.
    return tuple("{}" if _PARAM.fullmatch(p) else p for p in parts)


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}
