"""`fogmesh logs`: follow what a node writes on its serial port, read-only, and keep following
across a replug (the port path or by-id symlink disappearing and coming back)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from gateway.errors import FogmeshError
from tools.field.cli_common import positive_seconds, standalone_main

__all__ = [
    "POLL_S",
    "LogsError",
    "add_arguments",
    "command_logs",
    "follow",
    "format_json",
    "format_readable",
    "main",
]

POLL_S = 0.5  # how often a missing port is looked for again
_READ_TIMEOUT_S = 0.2  # one read's wait: bounds how late `stop` and a replug are noticed
_MAX_LINE = 64 * 1024  # a node that never sends a newline must not grow our buffer forever

LineHandler = Callable[[str], None]
EventHandler = Callable[[str, str], None]  # (kind, detail): connected, disconnected, reconnected


class LogsError(FogmeshError):
    """Following a port failed in a way waiting cannot fix (e.g. a malformed URL)."""


def _is_url(port: str) -> bool:
    return "://" in port


def _open(port: str) -> Any:
    import serial

    link = serial.serial_for_url(port, do_not_open=True, timeout=_READ_TIMEOUT_S)
    # Asserting DTR/RTS on a USB-UART holds or resets an ESP32 through its auto-reset circuit;
    # a log follower must leave the board alone.
    link.dtr = False
    link.rts = False
    link.open()
    return link


def _device_of(port: str) -> str | None:
    """The node the path resolves to now; a replug makes a by-id symlink point elsewhere."""
    if _is_url(port):
        return None
    return os.path.realpath(port)


class _Lines:
    """Joins partial reads into whole lines; decodes with replacement so garbage never raises."""

    def __init__(self, on_line: LineHandler) -> None:
        self._buf = bytearray()
        self._on_line = on_line

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            cut = self._buf.find(b"\n")
            if cut < 0:
                break
            raw = bytes(self._buf[:cut])
            del self._buf[: cut + 1]
            self._emit(raw)
        if len(self._buf) > _MAX_LINE:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            raw = bytes(self._buf)
            self._buf.clear()
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        self._on_line(raw.rstrip(b"\r").decode("utf-8", errors="replace"))


def follow(
    port: str,
    on_line: LineHandler,
    stop: threading.Event,
    on_event: EventHandler | None = None,
) -> None:
    """Call `on_line` with each line read from `port` until `stop` is set; never writes to it.

    While the port is missing or fails to open it is tried again every POLL_S seconds. A read
    error, or the path now resolving to another device, counts as an unplug: `on_event` gets
    ("disconnected", reason), then ("reconnected", port) once it opens again; the first open
    gives ("connected", port). A partial line left at an unplug is delivered as it is.
    """

    def event(kind: str, detail: str) -> None:
        if on_event is not None:
            on_event(kind, detail)

    import serial

    lines = _Lines(on_line)
    opened_before = False
    while not stop.is_set():
        try:
            link = _open(port)
        except ValueError as exc:  # pyserial's answer to a malformed URL or setting
            raise LogsError(f"cannot follow {port}: {exc}") from exc
        except (OSError, serial.SerialException):  # missing, or not back yet: look again
            stop.wait(POLL_S)
            continue
        device = _device_of(port)
        event("reconnected" if opened_before else "connected", port)
        opened_before = True
        reason = ""
        try:
            while not stop.is_set():
                try:
                    data = link.read(link.in_waiting or 1)
                except (OSError, serial.SerialException) as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "read error"
                    break
                if data:
                    lines.feed(data)
                elif device is not None and _device_of(port) != device:
                    reason = f"{port} now points at another device"
                    break
        finally:
            with contextlib.suppress(OSError, serial.SerialException):
                link.close()
        lines.flush()
        if reason:
            event("disconnected", reason)
            stop.wait(POLL_S)


def _value(v: object) -> str:
    if isinstance(v, str) and v and not any(c.isspace() or c in "=\"'" for c in v):
        return v
    return json.dumps(v)


def format_readable(line: str) -> str:
    """A node's JSON log line as `ev key=value ...`; any other line unchanged."""
    obj = _json_object(line)
    if obj is None or "ev" not in obj:
        return line
    rest = " ".join(f"{k}={_value(v)}" for k, v in obj.items() if k != "ev")
    return f"{obj['ev']} {rest}".rstrip()


def format_json(line: str) -> str:
    """A JSON object line passed through as it came; any other line wrapped as an "ev": "text"."""
    if _json_object(line) is not None:
        return line.strip()
    return json.dumps({"ev": "text", "line": line})


def _json_object(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


# --- command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port", required=True, help="serial port, by-id path or pyserial URL (socket://...)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--json", action="store_true", help="one JSON object a line (non-JSON lines wrapped)"
    )
    mode.add_argument("--raw", action="store_true", help="the lines exactly as the node wrote them")
    p.add_argument(
        "--seconds",
        type=positive_seconds,
        default=None,
        help="stop after this long (default: follow until Ctrl-C)",
    )


def command_logs(args: argparse.Namespace) -> int:
    """Exit 0 stopped after --seconds having opened the port, 1 the port never opened or an
    error, 2 bad arguments, 130 Ctrl-C."""
    if args.seconds is not None and not args.seconds > 0:
        print(f"fogmesh logs: error: --seconds {args.seconds!r} is not positive", file=sys.stderr)
        return 2
    fmt = format_json if args.json else (lambda s: s) if args.raw else format_readable
    stop = threading.Event()
    opened = threading.Event()
    broken: list[BaseException] = []

    def on_line(line: str) -> None:
        try:
            sys.stdout.write(fmt(line) + "\n")
            sys.stdout.flush()
        except BrokenPipeError as exc:  # `| head`: the reader is gone, so are we
            broken.append(exc)
            stop.set()

    def on_event(kind: str, detail: str) -> None:
        if kind != "disconnected":
            opened.set()
        text = {"disconnected": f"disconnected ({detail}); waiting for {args.port} to return"}
        print(f"fogmesh logs: {text.get(kind, f'{kind} to {detail}')}", file=sys.stderr)

    print(f"fogmesh logs: waiting for {args.port}", file=sys.stderr)
    timer = None
    if args.seconds is not None:
        timer = threading.Timer(args.seconds, stop.set)
        timer.daemon = True
        timer.start()
    try:
        follow(args.port, on_line, stop, on_event)
    except LogsError as exc:
        print(f"fogmesh logs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if timer is not None:
            timer.cancel()
    if broken:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps exit from a 2nd EPIPE
        return 0
    if not opened.is_set():
        print(f"fogmesh logs: error: {args.port} never opened: run fogmesh doctor", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        argv,
        "fogmesh logs",
        "Follow a node's serial output (read-only), reconnecting after a replug.",
        add_arguments,
        command_logs,
    )


if __name__ == "__main__":
    sys.exit(main())
