"""What every field command shares: its progress bar, its argument types, its JSON output, and
the `python -m tools.field.<command>` entry point beside `fogmesh <command>`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import TextIO


class ProgressBar:
    """A one-line text bar redrawn with \\r on a stream; redraws only when the percent moves."""

    def __init__(self, stream: TextIO, label: str = "uploading", width: int = 30) -> None:
        self._stream, self._label, self._width = stream, label, width
        self._percent = -1
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        percent = done * 100 // total if total > 0 else 100
        if percent == self._percent:
            return
        self._percent = percent
        filled = self._width * percent // 100
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {percent:3d}% {done}/{total} bytes")
        self._stream.flush()
        self._open = True

    def close(self) -> None:
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def failed(prog: str, exc: Exception, bar: ProgressBar | None, as_json: bool) -> int:
    """A command's error: the bar ended, one line on stderr (and a JSON object); exit 1."""
    if bar is not None:
        bar.close()
    print(f"{prog}: error: {exc}", file=sys.stderr)
    if as_json:
        print_json({"ok": False, "error": str(exc)})
    return 1


def succeeded(bar: ProgressBar | None, as_json: bool, result: object) -> bool:
    """The bar ended and, with --json, the result printed: True when the caller prints nothing."""
    if bar is not None:
        bar.close()
    if as_json:
        print_json(result)
    return as_json


def standalone_main(
    argv: list[str] | None,
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    command: Callable[[argparse.Namespace], int],
) -> int:
    """Parse, set up logging (-v: debug), run; exit 2 for bad arguments, 130 on Ctrl-C."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits with 0 for --help and 2 for bad arguments
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"{prog}: %(levelname)s %(name)s: %(message)s",
    )
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
