"""`fogmesh doctor`: list the serial ports with their USB ids and by-id paths, check one port, and
map what goes wrong on site (permissions, a busy or missing port, a silent board) to its fix."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import FogmeshError
from tools.field.cli_common import standalone_main

__all__ = [
    "DoctorError",
    "Finding",
    "PortInfo",
    "check_port",
    "command_doctor",
    "finding_for_open_error",
    "holders",
    "list_ports",
    "main",
    "probe_repl",
]

BY_ID_DIR = "/dev/serial/by-id"
PROBE_TIMEOUT_S = 2.0  # a running MicroPython answers Ctrl-C within milliseconds
_PROMPTS = (b">>> ", b"raw REPL; CTRL-B to exit\r\n>")
DIALOUT_FIX = (
    "add yourself to the dialout group (sudo usermod -aG dialout $USER, log in again) "
    "or a udev rule"
)


class DoctorError(FogmeshError):
    """The doctor itself could not run (not a finding about the board)."""


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # exists, permission, open, busy, repl, ports, network
    ok: bool
    detail: str
    fix: str = ""
    level: str = ""  # ok, warning, error; derived from ok when not given
    pids: tuple[int, ...] = ()  # for busy: who else has the port open

    def __post_init__(self) -> None:
        if not self.level:
            object.__setattr__(self, "level", "ok" if self.ok else "error")

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["pids"] = list(self.pids)
        return out


@dataclass(frozen=True, slots=True)
class PortInfo:
    device: str
    description: str
    vid_pid: str | None  # "10c4:ea60"; None for a port that is not USB
    serial_number: str | None
    by_id: list[str] = field(default_factory=list)


def _by_id_links(by_id_dir: str = BY_ID_DIR) -> dict[str, list[str]]:
    """Real device -> the stable by-id symlinks that point at it."""
    links: dict[str, list[str]] = {}
    try:
        names = sorted(os.listdir(by_id_dir))
    except OSError:
        return links
    for name in names:
        path = os.path.join(by_id_dir, name)
        links.setdefault(os.path.realpath(path), []).append(path)
    return links


def list_ports(by_id_dir: str = BY_ID_DIR) -> list[PortInfo]:
    """The serial ports pyserial sees, each with its USB VID:PID and by-id paths."""
    from serial.tools.list_ports import comports

    links = _by_id_links(by_id_dir)
    ports = []
    for p in sorted(comports(), key=lambda p: p.device):
        vid_pid = f"{p.vid:04x}:{p.pid:04x}" if p.vid is not None and p.pid is not None else None
        ports.append(
            PortInfo(
                device=p.device,
                description=p.description or "",
                vid_pid=vid_pid,
                serial_number=p.serial_number,
                by_id=links.get(os.path.realpath(p.device), []),
            )
        )
    return ports


def command_of(pid: int) -> str:
    """The process's command line, or "?" once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def _pty_index(path: str) -> int | None:
    parent, name = os.path.split(path)
    return int(name) if parent == "/dev/pts" and name.isdigit() else None


def scan_open(path: str, *, include_self: bool = False) -> list[tuple[int, bool, bool]]:
    """(pid, has `path` open, holds its pty master) for every process that does either, from a
    /proc/*/fd scan (Linux); processes of other users are invisible unless run as root."""
    device = os.path.realpath(path)
    index = _pty_index(device)
    me = os.getpid()
    found: list[tuple[int, bool, bool]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (int(entry.name) == me and not include_self):
            continue
        has_slave = has_master = False
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target == device:
                has_slave = True
            elif index is not None and target in ("/dev/ptmx", "/dev/pts/ptmx"):
                try:
                    info = (entry / "fdinfo" / fd.name).read_text()
                except OSError:
                    continue
                has_master = has_master or f"tty-index:\t{index}\n" in info
        if has_slave or has_master:
            found.append((int(entry.name), has_slave, has_master))
    return found


def holders(path: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(pid, command) of other processes with `path` open, and of those holding its pty master.

    A pty's master holder is the device itself (a virtual board, a ser2net-like bridge), not a
    competing client; it is reported apart so that it does not count as "busy".
    """
    users: list[tuple[int, str]] = []
    masters: list[tuple[int, str]] = []
    for pid, _, has_master in scan_open(path):
        (masters if has_master else users).append((pid, command_of(pid)))
    return users, masters


def finding_for_open_error(path: str, exc: OSError) -> Finding:
    """What an error opening `path` means on site, and what to do about it."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Finding("permission", False, f"{path}: permission denied", DIALOUT_FIX)
    if exc.errno == errno.EBUSY:
        users, _ = holders(path)
        who = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in users) or "another process"
        return Finding(
            "busy",
            False,
            f"{path} is locked by {who}",
            "close that serial monitor (or kill the pid) and try again",
            pids=tuple(pid for pid, _ in users),
        )
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return _missing(path)
    return Finding("open", False, f"cannot open {path}: {reason}", "check the cable and port")


def _missing(path: str) -> Finding:
    ports = list_ports()
    if ports:
        names = "; ".join(
            f"{p.device} ({p.description or 'no description'})"
            + (f" = {', '.join(p.by_id)}" if p.by_id else "")
            for p in ports
        )
        by_id = [link for p in ports for link in p.by_id]
        fix = f"ports that exist: {names}"
        if by_id:
            fix += f"; use a stable by-id path, e.g. --port {by_id[0]}"
    else:
        fix = "no serial ports at all: plug the board in with a data (not charge-only) cable"
    dangling = os.path.islink(path)
    detail = f"{path} does not exist" + (
        f" (symlink to missing {os.readlink(path)})" if dangling else ""
    )
    return Finding("exists", False, detail, fix)


def probe_repl(path: str, baud: int = 115200, timeout_s: float = PROBE_TIMEOUT_S) -> Finding:
    """Send Ctrl-C (then Ctrl-B) and look for a MicroPython prompt; no soft reset is sent."""
    import serial

    try:
        link = serial.serial_for_url(path, do_not_open=True, baudrate=baud, timeout=0.05)
        link.dtr = False
        link.rts = False
        link.open()
    except serial.SerialException as exc:
        inner = exc if exc.errno is not None else OSError(errno.EIO, str(exc))
        return finding_for_open_error(path, inner)
    except OSError as exc:
        return finding_for_open_error(path, exc)
    try:
        seen = b""
        for keys in (b"\r\x03", b"\x02"):  # interrupt; then leave a raw REPL someone left
            link.write(keys)
            link.flush()
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                seen += link.read(link.in_waiting or 1)
                if any(prompt in seen for prompt in _PROMPTS):
                    return Finding("repl", True, "MicroPython REPL answers")
            if not seen:
                break  # silence after Ctrl-C: a second key will not wake it
    except (OSError, serial.SerialException) as exc:
        return Finding("repl", False, f"{path} failed mid-probe: {exc}", "check the cable")
    finally:
        link.close()
    if not seen:
        return Finding(
            "repl",
            False,
            f"no serial data within {timeout_s:g} s after Ctrl-C",
            "no serial data: hold BOOT, press EN (then release BOOT for MicroPython, keep it "
            "held for the ROM bootloader); check the cable carries data and the board has power",
        )
    sample = seen[-60:].decode("utf-8", errors="replace")
    return Finding(
        "repl",
        False,
        f"serial data but no MicroPython prompt after Ctrl-C / Ctrl-B (last: {sample!r})",
        "try a lower baud (--baud 115200); if the text is readable, the running code ignores "
        "Ctrl-C: interrupt and retry without soft reset, or press EN",
    )


def check_port(path: str, baud: int = 115200, timeout_s: float = PROBE_TIMEOUT_S) -> list[Finding]:
    """Every check for one port, in the order a field engineer would go through them."""
    if "://" in path:
        return [
            Finding(
                "network",
                True,
                f"{path} is a network serial port (socket:// or rfc2217://): not probed",
                level="ok",
            )
        ]
    if not os.path.exists(path):
        return [_missing(path)]
    findings = []
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return [finding_for_open_error(path, exc)]
    os.close(fd)
    findings.append(Finding("permission", True, f"{path} opens for reading and writing"))
    users, masters = holders(path)
    if users:
        who = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in users)
        findings.append(
            Finding(
                "busy",
                False,
                f"{path} is also open in {who}",
                "close that serial monitor / mpremote / esptool, or kill the pid, before using "
                "the port: two readers each get part of the data",
                level="warning",
                pids=tuple(pid for pid, _ in users),
            )
        )
    else:
        device_end = (
            f" (its pty's device end is pid {', '.join(str(p) for p, _ in masters)})"
            if masters
            else ""
        )
        findings.append(Finding("busy", True, f"no other process has {path} open{device_end}"))
    findings.append(probe_repl(path, baud, timeout_s))
    return findings


# --- command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", default=None, help="also check this port (path, by-id path or URL)")
    p.add_argument("--baud", type=int, default=115200, help="rate to probe at (default 115200)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def command_doctor(args: argparse.Namespace) -> int:
    """Exit 0 every finding ok, 1 any warning or error, 2 bad arguments."""
    if not isinstance(args.baud, int) or args.baud <= 0:
        print(f"fogmesh doctor: error: --baud {args.baud!r} is not positive", file=sys.stderr)
        return 2
    ports = list_ports()
    findings: list[Finding] = []
    if args.port is None:
        findings.append(
            Finding("ports", True, f"{len(ports)} serial port(s) found")
            if ports
            else Finding(
                "ports",
                False,
                "no serial ports found",
                "plug the board in with a data cable; for a CP210x/CH340 board check the "
                "driver is loaded (dmesg)",
            )
        )
    else:
        findings.extend(check_port(args.port, args.baud))
    ok = all(f.ok for f in findings)
    if args.json:
        out: dict[str, Any] = {
            "ok": ok,
            "ports": [asdict(p) for p in ports],
            "findings": [f.to_json() for f in findings],
        }
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        print(f"serial ports ({len(ports)}):")
        for p in ports:
            ids = f" [{p.vid_pid}]" if p.vid_pid else ""
            sn = f" SN {p.serial_number}" if p.serial_number else ""
            print(f"  {p.device}: {p.description}{ids}{sn}")
            for link in p.by_id:
                print(f"    {link}")
        for f in findings:
            print(f"{f.level.upper():7} {f.check}: {f.detail}")
            if f.fix:
                print(f"        fix: {f.fix}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        argv,
        "fogmesh doctor",
        "List serial ports and find out why a board does not answer.",
        add_arguments,
        command_doctor,
    )


if __name__ == "__main__":
    sys.exit(main())
