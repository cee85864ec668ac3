"""`fogmesh virtual esp32`: one virtual board, its ROM bootloader and its running MicroPython,
served until SIGINT/SIGTERM, with its endpoints printed as one JSON line when ready."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from types import FrameType

from tools.virtual_esp32.board import VirtualBoard
from tools.virtual_esp32.rom import RomFaults, VirtualEsp32Rom

_FAULTS = ("drop", "garble", "bad_checksum", "md5_mismatch", "delay_ms")


def parse_fault(text: str) -> tuple[str, float]:
    """`NAME=VALUE` for --fault, e.g. `drop=3` or `delay_ms=50`."""
    name, sep, value = text.partition("=")
    if not sep or name not in _FAULTS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, NAME one of {_FAULTS}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None
    if number < 0 or (name != "delay_ms" and not number.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r}: a count must be a whole number >= 0")
    return name, number


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rom-port", type=int, default=0, help="ROM bootloader TCP port (default: a free one)"
    )
    p.add_argument("--repl-link", required=True, help="symlink to create for the board's pty")
    p.add_argument(
        "--flash-image", required=True, help="4 MB flash image file (created blank if missing)"
    )
    p.add_argument(
        "--fs", default=None, help="the board's filesystem directory (default: FLASH_IMAGE.fs)"
    )
    p.add_argument("--mac", default=None, help="the board's MAC, aa:bb:cc:dd:ee:ff")
    p.add_argument("--heapsize", default="100k", help="MicroPython heap (default 100k)")
    p.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"inject a ROM fault ({', '.join(_FAULTS)}); repeatable",
    )


def serve(args: argparse.Namespace, stop: threading.Event) -> None:
    """Run the board until `stop` is set; VirtualEsp32Error on a bad image, MAC or link."""
    image = Path(args.flash_image)
    fs = Path(args.fs) if args.fs else image.with_name(image.name + ".fs")
    fs.mkdir(parents=True, exist_ok=True)
    faults = RomFaults(**{k: (v if k == "delay_ms" else int(v)) for k, v in args.fault})
    with (
        VirtualEsp32Rom(image, mac=args.mac, faults=faults, port=args.rom_port) as rom,
        VirtualBoard(fs, args.repl_link, heapsize=args.heapsize, mac=rom.mac_bytes) as board,
    ):
        info = {
            "rom": rom.url,
            "repl": board.link,
            "pty": board.pty,
            "fs": board.fs_dir,
            "flash_image": str(image.resolve()),
            "mac": rom.mac,
        }
        print(json.dumps(info), flush=True)
        while not stop.wait(0.5):
            pass


def command_virtual_esp32(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve(args, stop)  # (a VirtualEsp32Error is a FogmeshError: the CLI prints it, exit 1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0
