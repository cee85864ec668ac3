"""`fogmesh flash`: write one firmware file to an ESP32 through esptool 5's public Python API, with
a baud-rate fallback driven by real link failures, a MAC check before anything is written, and
esptool's MD5 read-back verify; esptool's own output is silenced and never parsed."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import FogmeshError
from tools.field.cli_common import ProgressBar, failed, standalone_main, succeeded

if TYPE_CHECKING:
    from esp_pylib.logger import EspLogBase

__all__ = [
    "AFTER_MODES",
    "BEFORE_MODES",
    "FALLBACK_BAUDS",
    "MAX_FIRMWARE_BYTES",
    "FlashError",
    "FlashResult",
    "add_arguments",
    "baud_plan",
    "command_flash",
    "flash",
    "main",
    "normalise_mac",
]

log = logging.getLogger("fogmesh.flash")

MAX_FIRMWARE_BYTES = 4 * 1024 * 1024  # the smallest flash of the ESP32 modules fogmesh targets
SECTOR_BYTES = 0x1000  # the ROM loader erases whole sectors, so writes start on one
ROM_BAUD = 115200  # the ROM auto-bauds its sync at this rate; faster rates need CHANGE_BAUDRATE
FALLBACK_BAUDS = (921600, 460800, 115200)
# Between attempts: a TCP serial server (esp_rfc2217_server, ser2net) serves one client at a time
# and must see the failed attempt's connection go before it accepts the next one.
RETRY_PAUSE_S = 0.1
BEFORE_MODES = ("default-reset", "usb-reset", "no-reset", "no-reset-no-sync")
AFTER_MODES = ("hard-reset", "soft-reset", "no-reset", "no-reset-stub", "watchdog-reset")

Progress = Callable[[int, int], None]

# esptool reports through one process-wide logger singleton, so two flashes in one process
# would swap each other's logger and cross their progress: they take turns instead.
_ESPTOOL_LOGGER_LOCK = threading.Lock()


class FlashError(FogmeshError):
    """Flashing failed or was refused; the message is one line that says what to do."""


@dataclass(frozen=True, slots=True)
class FlashResult:
    port: str
    chip: str  # esptool's description, e.g. "ESP32-D0WD-V3 (revision v3.0)"
    mac: str  # "aa:bb:cc:dd:ee:ff"
    baud: int  # the rate the successful write ran at
    address: int
    bytes_written: int  # the firmware file's size
    md5: str  # of the bytes written: the file padded with 0xFF to 4 bytes, as esptool sends it
    md5_verified: bool  # the digest esptool read back from flash equals `md5`
    seconds: float  # the whole call, failed attempts at higher rates included

    def to_json(self) -> dict[str, object]:
        return {"ok": True, **asdict(self), "seconds": round(self.seconds, 3)}


class _LinkFailure(Exception):
    """One attempt lost the board; a lower rate may still work. Never leaves this module."""

    def __init__(self, rate: int, reason: BaseException, *, answered: bool) -> None:
        super().__init__(_first_line(reason))
        self.rate = rate
        self.answered = answered  # False: not even the bootloader's sync came back


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def normalise_mac(text: str) -> str:
    """`AA:BB:CC:DD:EE:FF`, `aa-bb-..` or `aabbcc..` as lower-case colon form; FlashError if not."""
    digits = text.strip().replace(":", "").replace("-", "").lower()
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits):
        raise FlashError(
            f"{text!r} is not a MAC address: give six hex bytes, e.g. 24:6f:28:01:02:03"
        )
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def baud_plan(baud: int) -> list[int]:
    """The rates to try in order: the requested one, then each slower fallback rate."""
    return [baud, *(rate for rate in FALLBACK_BAUDS if rate < baud)]


def _read_firmware(firmware: Path, address: int) -> bytes:
    if address < 0 or address % SECTOR_BYTES:
        raise FlashError(
            f"address {address:#x} is not on a 4 KB flash sector boundary: use a multiple "
            "of 0x1000 (0x1000 for an ESP32 MicroPython image)"
        )
    if not firmware.exists():
        raise FlashError(f"firmware {firmware} does not exist: check the path")
    if not firmware.is_file():
        raise FlashError(f"firmware {firmware} is not a file: give the .bin image itself")
    try:
        data = firmware.read_bytes()
    except OSError as exc:
        raise FlashError(f"cannot read firmware {firmware}: {exc.strerror or exc}") from exc
    if not data:
        raise FlashError(f"firmware {firmware} is empty: rebuild or download it again")
    if len(data) > MAX_FIRMWARE_BYTES:
        raise FlashError(
            f"firmware {firmware} is {len(data)} bytes, more than the 4 MB flash: "
            "is it the right file?"
        )
    return data


def _quiet_logger(progress: Progress | None) -> EspLogBase:
    """A logger for esptool that prints nothing: its text goes to debug logging, progress out."""
    from esp_pylib.logger import EspLogBase

    def text(args: tuple[Any, ...]) -> str:
        return " ".join(str(a) for a in args)

    class QuietLogger(EspLogBase):
        def print(self, *args: Any, **kwargs: Any) -> None:
            if args:
                log.debug("esptool: %s", text(args))

        def err(self, *args: Any, suggestion: str | None = None) -> None:
            log.debug("esptool error: %s", text(args))

        def warn(self, *args: Any, suggestion: str | None = None) -> None:
            log.debug("esptool warning: %s", text(args))

        def note(self, *args: Any) -> None:
            log.debug("esptool note: %s", text(args))

        def hint(self, *args: Any) -> None:
            log.debug("esptool hint: %s", text(args))

        def debug(self, *args: Any) -> None:
            log.debug("esptool debug: %s", text(args))

        def set_verbosity(self, mode: int | str) -> None:
            pass

        def progress_bar(
            self,
            cur_iter: int,
            total_iters: int,
            prefix: str = "",
            suffix: str = "",
            bar_length: int = 30,
        ) -> None:
            if progress is not None and total_iters > 0:
                progress(cur_iter, total_iters)

    return QuietLogger()


@contextmanager
def _esptool_logger(progress: Progress | None) -> Iterator[None]:
    # esptool installs its own logger when first imported: import it before ours goes in, so
    # restoring the previous logger afterwards leaves esptool exactly as it was.
    import esptool.cmds  # type: ignore[import-untyped]  # noqa: F401
    from esp_pylib.logger import EspLog

    with _ESPTOOL_LOGGER_LOCK:
        previous = EspLog.instance
        EspLog.set_logger(_quiet_logger(progress))
        try:
            yield
        finally:
            EspLog.instance = previous


def _open_port(port: str) -> Any:
    import serial  # pyserial: /dev/..., COM3, socket://, rfc2217:// alike

    try:
        link = serial.serial_for_url(port, do_not_open=True, exclusive=True)
        if sys.platform == "win32":  # as esptool does: keep RTS/DTR from resetting the board
            link.rts = False
            link.dtr = False
        link.open()
    except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
        raise FlashError(
            f"cannot open {port} ({_first_line(exc)}): check the port name and cable, that no "
            "serial monitor holds it, and that you may use it (dialout group)"
        ) from exc
    return link


def _mac_text(raw: Any) -> str:
    if isinstance(raw, tuple | list | bytes) and len(raw) == 6:
        return ":".join(f"{b:02x}" for b in raw)
    return "unknown"


def _watch_md5(esp: Any) -> list[str]:
    """Record every digest esptool reads back from flash.

    write_flash verifies by itself and signals a mismatch with a FatalError that only its text
    tells apart from a lost link; seeing the digest it compared tells the two apart without
    parsing esptool's words, and proves the verify ran at all.
    """
    seen: list[str] = []
    read_back = esp.flash_md5sum

    def recording(addr: int, size: int) -> Any:
        digest = read_back(addr, size)
        seen.append(str(digest))
        return digest

    esp.flash_md5sum = recording
    return seen


@dataclass(frozen=True, slots=True)
class _Written:
    chip: str
    mac: str
    baud: int
    verified: bool


def _attempt(
    port: str,
    rate: int,
    data: bytes,
    address: int,
    expected_md5: str,
    *,
    expect_mac: str | None,
    stub: bool,
    before: str,
    after: str,
    connect_attempts: int | None,
) -> _Written:
    """Connect at the ROM rate, check the board, switch to `rate`, write and verify once."""
    from esptool.cmds import (
        attach_flash,
        detect_chip,
        detect_flash_size,
        reset_chip,
        run_stub,
        write_flash,
    )
    from esptool.loader import DEFAULT_CONNECT_ATTEMPTS  # type: ignore[import-untyped]
    from esptool.util import (  # type: ignore[import-untyped]
        FatalError,
        NotImplementedInROMError,
        flash_size_bytes,
    )

    link_errors = (FatalError, OSError)
    initial = min(rate, ROM_BAUD)
    link = _open_port(port)
    try:
        try:
            esp = detect_chip(
                link,  # an open pyserial port: esptool's loader takes one in place of a name
                baud=initial,
                connect_mode=before,
                connect_attempts=connect_attempts or DEFAULT_CONNECT_ATTEMPTS,
            )
        except link_errors as exc:
            raise _LinkFailure(rate, exc, answered=False) from exc
        try:
            mac = _mac_text(esp.read_mac())
            chip = str(esp.get_chip_description())
        except link_errors as exc:
            raise _LinkFailure(rate, exc, answered=True) from exc
        if expect_mac is not None and mac != expect_mac:
            raise FlashError(f"board MAC {mac} is not the expected {expect_mac}: refusing to flash")

        used = initial
        try:
            if stub:
                esp = run_stub(esp)
            if rate > initial:
                try:
                    esp.change_baud(rate)
                    used = rate
                except NotImplementedInROMError:
                    pass  # an ESP8266 ROM cannot change rate: stay at the one that works
            attach_flash(esp)
            flash_size = None if esp.secure_download_mode else detect_flash_size(esp)
        except link_errors as exc:
            raise _LinkFailure(rate, exc, answered=True) from exc
        if flash_size is not None and address + len(data) > flash_size_bytes(flash_size):
            raise FlashError(
                f"{len(data)} bytes at {address:#x} do not fit the board's {flash_size} flash: "
                "use a lower --address or a smaller image"
            )

        digests = _watch_md5(esp)
        try:
            write_flash(esp, [(address, data)])
        except link_errors as exc:
            if digests and digests[-1] != expected_md5:
                raise FlashError(
                    f"verify failed: flash holds MD5 {digests[-1]} at {address:#x}, the file "
                    f"{expected_md5}: flash again, and if it fails again check the board's power"
                ) from exc
            raise _LinkFailure(rate, exc, answered=True) from exc
        verified = bool(digests) and digests[-1] == expected_md5
        try:
            reset_chip(esp, after)
        except link_errors as exc:
            raise FlashError(
                f"the firmware is written{' and verified' if verified else ''} but the "
                f"{after} afterwards failed ({_first_line(exc)}): press EN to restart the board"
            ) from exc
        return _Written(chip=chip, mac=mac, baud=used, verified=verified)
    finally:
        link.close()


def _give_up(port: str, rates: list[int], failures: list[_LinkFailure]) -> FlashError:
    tried = ", ".join(str(r) for r in rates)
    last = failures[-1]
    if not last.answered:
        return FlashError(
            f"no answer from the bootloader on {port}: hold BOOT and press EN, or try a lower "
            f"--baud (tried {tried} baud)"
        )
    return FlashError(
        f"lost the board on {port} at every rate tried ({tried} baud; last: {last}): check the "
        "cable and power, or try a lower --baud"
    )


def flash(
    port: str,
    firmware: Path,
    *,
    address: int = 0x1000,
    baud: int = 921600,
    expect_mac: str | None = None,
    progress: Progress | None = None,
    stub: bool = False,
    before: str = "no-reset",
    after: str = "no-reset",
    connect_attempts: int | None = None,
) -> FlashResult:
    """Write `firmware` at `address` on the board behind `port` and verify it by MD5.

    The file is checked before the port is opened. Each rate of `baud_plan(baud)` gets one
    attempt (connect, MAC check, rate switch, write, verify); only a lost link moves on to the
    next rate, while a wrong MAC, an image that does not fit or a failed verify stop at once.
    A real ROM that switched rates before the link broke needs a reset to sync again: with
    `before="default-reset"` esptool does it, with "no-reset" the engineer presses EN.
    `progress(done, total)` gets firmware bytes; a retry at a lower rate starts again from 0.
    `connect_attempts` is esptool's per-rate sync retry count (None: esptool's default).
    """
    started = time.monotonic()
    if baud <= 0:
        raise FlashError(f"baud rate {baud} is not positive: use e.g. 921600 or 115200")
    if before not in BEFORE_MODES:
        raise FlashError(f"--before {before!r} is not one of {', '.join(BEFORE_MODES)}")
    if after not in AFTER_MODES:
        raise FlashError(f"--after {after!r} is not one of {', '.join(AFTER_MODES)}")
    if connect_attempts is not None and connect_attempts <= 0:
        raise FlashError(f"connect attempts must be at least 1, got {connect_attempts}")
    wanted_mac = normalise_mac(expect_mac) if expect_mac is not None else None
    data = _read_firmware(Path(firmware), address)
    padded = data + b"\xff" * (-len(data) % 4)  # esptool pads to a 4-byte word before writing
    expected_md5 = hashlib.md5(padded).hexdigest()

    def file_progress(done: int, total: int) -> None:
        # esptool counts the bytes it sends (padded, or compressed with the stub): scale to the
        # file so the caller's total is the firmware's size
        if progress is not None:
            progress(min(len(data), done * len(data) // total), len(data))

    rates = baud_plan(baud)
    failures: list[_LinkFailure] = []
    with _esptool_logger(file_progress):
        for rate in rates:
            try:
                written = _attempt(
                    port,
                    rate,
                    data,
                    address,
                    expected_md5,
                    expect_mac=wanted_mac,
                    stub=stub,
                    before=before,
                    after=after,
                    connect_attempts=connect_attempts,
                )
            except _LinkFailure as failure:
                failures.append(failure)
                if rate != rates[-1]:
                    # a ROM that switched rates before the link broke only syncs again after a
                    # reset: automatic with --before default-reset, by hand with no-reset
                    log.warning(
                        "%s at %d baud: %s; trying %d baud (hold BOOT and press EN if the "
                        "board does not answer)",
                        port,
                        rate,
                        failure,
                        rates[rates.index(rate) + 1],
                    )
                    time.sleep(RETRY_PAUSE_S)
                continue
            return FlashResult(
                port=port,
                chip=written.chip,
                mac=written.mac,
                baud=written.baud,
                address=address,
                bytes_written=len(data),
                md5=expected_md5,
                md5_verified=written.verified,
                seconds=time.monotonic() - started,
            )
    raise _give_up(port, rates, failures)


# --- command line ------------------------------------------------------------------------


def _address_arg(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (e.g. 0x1000)") from None


def _positive_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _mac_arg(text: str) -> str:
    try:
        return normalise_mac(text)
    except FlashError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port",
        required=True,
        help="serial port or pyserial URL: /dev/ttyUSB0, COM3, socket://HOST:PORT, rfc2217://...",
    )
    p.add_argument("--firmware", required=True, type=Path, help="the .bin image to write")
    p.add_argument(
        "--address",
        type=_address_arg,
        default=0x1000,
        help="flash offset, 4 KB aligned (default 0x1000: where an ESP32 MicroPython image goes)",
    )
    p.add_argument(
        "--baud",
        type=_positive_arg,
        default=921600,
        help="fastest rate to try (default 921600); on a lost link 460800, then 115200",
    )
    p.add_argument(
        "--expect-mac",
        type=_mac_arg,
        default=None,
        metavar="MAC",
        help="refuse to write unless the board has this MAC (checked before writing)",
    )
    p.add_argument("--stub", action="store_true", help="run esptool's flasher stub first")
    p.add_argument(
        "--before",
        choices=BEFORE_MODES,
        default="no-reset",
        help="how to get into the bootloader (default no-reset: hold BOOT, press EN)",
    )
    p.add_argument(
        "--after", choices=AFTER_MODES, default="no-reset", help="what to do after the write"
    )
    p.add_argument(
        "--connect-attempts",
        type=_positive_arg,
        default=None,
        help="esptool's sync attempts per rate (default: esptool's own)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _bad_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with a namespace built by hand rather than by add_arguments' parser."""
    if not isinstance(args.baud, int) or args.baud <= 0:
        return f"--baud {args.baud!r} is not a positive whole number"
    if not isinstance(args.address, int):
        return f"--address {args.address!r} is not a number"
    if args.before not in BEFORE_MODES:
        return f"--before {args.before!r} is not one of {', '.join(BEFORE_MODES)}"
    if args.after not in AFTER_MODES:
        return f"--after {args.after!r} is not one of {', '.join(AFTER_MODES)}"
    if args.expect_mac is not None:
        try:
            normalise_mac(args.expect_mac)
        except FlashError as exc:
            return str(exc)
    return None


def command_flash(args: argparse.Namespace) -> int:
    """Exit 0 written and verified, 1 a FlashError, 2 bad arguments."""
    problem = _bad_arguments(args)
    if problem is not None:
        print(f"fogmesh flash: error: {problem}", file=sys.stderr)
        return 2
    bar = None if args.json else ProgressBar(sys.stderr, "writing")
    try:
        result = flash(
            args.port,
            Path(args.firmware),
            address=args.address,
            baud=args.baud,
            expect_mac=args.expect_mac,
            progress=bar,
            stub=args.stub,
            before=args.before,
            after=args.after,
            connect_attempts=args.connect_attempts,
        )
    except FlashError as exc:
        return failed("fogmesh flash", exc, bar, args.json)
    if succeeded(bar, args.json, result.to_json()):
        return 0
    check = "MD5 verified" if result.md5_verified else "MD5 NOT verified"
    print(
        f"flashed {result.bytes_written} bytes at {result.address:#x} to {result.chip} "
        f"{result.mac} on {result.port} at {result.baud} baud in {result.seconds:.1f} s, {check}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        argv,
        "fogmesh flash",
        "Write a firmware image to an ESP32 in its ROM bootloader and verify it.",
        add_arguments,
        command_flash,
    )


if __name__ == "__main__":
    sys.exit(main())
