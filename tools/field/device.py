"""A board's MicroPython REPL for the field tools: `open_board(port)` interrupts what runs, enters
the raw REPL without a soft reset (as `mpremote resume` does) through mpremote's SerialTransport,
and offers file operations that run on the device (sha256, atomic writes) with clear errors."""

from __future__ import annotations

import ast
import base64
import contextlib
import errno
import hashlib
import io
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from gateway.errors import FogmeshError

__all__ = [
    "CHUNK_BYTES",
    "Board",
    "DeviceToolError",
    "explain_open_error",
    "open_board",
    "port_holders",
]

_STDOUT_LOCK = threading.Lock()  # redirect_stdout swaps the process-wide sys.stdout

log = logging.getLogger("fogmesh.device")

# Bytes per upload step: one raw-paste exec of base64 text (~2.7 KB of code). The device compiles
# each step before running it, so a step must stay small next to a 100 KB heap.
CHUNK_BYTES = 2048

Progress = Callable[[int, int], None]

# Defined once per session in the REPL's globals, all named _fm_* so that nothing of the user's
# is shadowed; close() deletes them again.
_PRELUDE = """\
import os as _fm_os, sys as _fm_sys, binascii as _fm_ba, hashlib as _fm_hl
_fm_d = _fm_ba.a2b_base64
def _fm_h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = _fm_hl.sha256()
    b = bytearray(256)
    m = memoryview(b)
    try:
        while True:
            n = f.readinto(b)
            if not n:
                break
            h.update(m[:n])
    except OSError:
        return None
    finally:
        f.close()
    return _fm_ba.hexlify(h.digest()).decode()
def _fm_fin(t, p, want):
    h = _fm_h(t)
    if h != want:
        _fm_os.remove(t)
        return 'BAD %s' % h
    try:
        _fm_os.rename(t, p)
    except OSError:
        _fm_os.remove(p)
        _fm_os.rename(t, p)
    return _fm_h(p)
def _fm_mk(p):
    q = ''
    for x in p.split('/'):
        if x:
            q += '/' + x
            try:
                _fm_os.mkdir(q)
            except OSError as e:
                if e.errno != 17:
                    raise
def _fm_rm(p):
    try:
        st = _fm_os.stat(p)
    except OSError:
        return 0
    if st[0] & 0x4000:
        _fm_os.rmdir(p)
    else:
        _fm_os.remove(p)
    return 1
def _fm_tree(p, out):
    try:
        es = list(_fm_os.ilistdir(p))
    except OSError:
        return out
    for e in es:
        q = p.rstrip('/') + '/' + e[0]
        d = 1 if e[1] & 0x4000 else 0
        out.append((q, d))
        if d:
            _fm_tree(q, out)
    return out
"""

_CLEANUP = """\
def _fm_x():
    import gc
    for k in [k for k in globals() if k.startswith('_fm_')]:
        del globals()[k]
    gc.collect()
_fm_x()
"""


class DeviceToolError(FogmeshError):
    """A board could not be opened, did not answer, was lost, or refused an operation."""


def port_holders(port: str) -> list[tuple[int, str]]:
    """(pid, command) of every process with `port` open, this one and a pty's own end included:
    here the question is who has the port open at all (fogmesh doctor's scan, Linux only)."""
    if "://" in port:
        return []
    from tools.field.doctor import command_of, scan_open

    return sorted(
        (pid, command_of(pid)) for pid, opened, _ in scan_open(port, include_self=True) if opened
    )


def explain_open_error(port: str, exc: BaseException) -> str:
    """One line saying why `port` did not open and what to do about it."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return (
            f"{port} does not exist: check the cable and the port name (ls /dev/serial/by-id/), "
            "or run fogmesh doctor"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied on {port}: add yourself to the dialout group "
            "(sudo usermod -aG dialout $USER, then log in again) or add a udev rule for the board"
        )
    if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
        everyone = port_holders(port)
        holders = [h for h in everyone if h[0] != os.getpid()] or everyone
        who = ", ".join(f"pid {pid} ({name})" for pid, name in holders)
        held = f"held by {who}" if who else "held by another program"
        return f"{port} is busy ({held}): close that serial monitor or tool and retry"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot open {port} ({text}): check the port name and cable, or run fogmesh doctor"


def _diagnose_open(port: str, first: BaseException) -> str:
    # SerialTransport swallows the OSError behind "failed to access": open once more to learn it.
    if "://" not in port and not os.path.exists(port):
        return explain_open_error(port, OSError(errno.ENOENT, "missing"))
    import serial

    try:
        link = serial.serial_for_url(port, do_not_open=True, exclusive=True)
        link.open()
        link.close()
    except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
        return explain_open_error(port, exc)
    return explain_open_error(port, first)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class Board:
    """A board in the raw REPL. Use `open_board()`; every method raises DeviceToolError."""

    def __init__(self, transport: Any, port: str, timeout_s: float) -> None:
        self._t = transport
        self.port = port
        self.timeout_s = timeout_s
        self.lost = False  # the link broke: nothing more is sent

    # -- running code ----------------------------------------------------------------------

    def exec(self, code: str | bytes) -> bytes:
        """Run `code` on the device (raw-paste mode when it offers it); returns its stdout."""
        from mpremote.transport import TransportError  # type: ignore[import-untyped]

        if self.lost:
            raise DeviceToolError(f"the link to {self.port} was lost earlier: reconnect first")
        data = code.encode() if isinstance(code, str) else code
        log.debug("exec %d bytes on %s", len(data), self.port)  # never the code: it may hold keys
        try:
            out, err = self._t.exec_raw(data, timeout=self.timeout_s)
        except (OSError, TransportError, struct.error) as exc:
            self.lost = True
            raise DeviceToolError(
                f"lost the board on {self.port} ({_first_line(exc)}): check the cable and "
                "retry; files being written keep their old content"
            ) from exc
        if err:
            raise self._device_error(err.decode("utf-8", "replace"))
        return bytes(out)

    def _device_error(self, traceback: str) -> DeviceToolError:
        lines = [line.strip() for line in traceback.strip().splitlines() if line.strip()]
        return DeviceToolError(f"the board on {self.port} raised {lines[-1] if lines else '?'}")

    def eval(self, expression: str) -> Any:
        """The value of `expression` on the device (a literal: numbers, strings, lists, ...)."""
        out = self.exec(f"print(repr({expression}))").decode("utf-8", "replace").strip()
        try:
            return ast.literal_eval(out)
        except (ValueError, SyntaxError) as exc:
            raise DeviceToolError(
                f"the board on {self.port} answered {out[:60]!r}, not a value"
            ) from exc

    # -- files -------------------------------------------------------------------------------

    def sha256(self, path: str) -> str | None:
        """The file's sha256 (hex), computed on the device; None when it is absent."""
        return self.sha256_many([path])[path]

    def sha256_many(self, paths: list[str]) -> dict[str, str | None]:
        """sha256 of several files in one round trip, computed on the device."""
        if not paths:
            return {}
        got = self.eval(f"[_fm_h(p) for p in {list(paths)!r}]")
        if not isinstance(got, list) or len(got) != len(paths):
            raise DeviceToolError(f"the board on {self.port} gave no sha256 list")
        return {p: (h if isinstance(h, str) else None) for p, h in zip(paths, got, strict=True)}

    def write_atomic(self, path: str, data: bytes, progress: Progress | None = None) -> str:
        """Upload to `path`.tmp, check its sha256 on the device, then rename it over `path`.

        Returns the sha256 the device computes of `path` after the rename. On an error the
        temporary file is removed when the board still answers; `path` keeps its old content
        (or stays absent) either way. `progress(done, total)` gets bytes of `data`.
        """
        tmp = path + ".tmp"
        want = hashlib.sha256(data).hexdigest()
        log.debug("writing %s (%d bytes) on %s", path, len(data), self.port)
        try:
            self.exec(f"_fm_f=open({tmp!r},'wb')\n_fm_w=_fm_f.write")
            for at in range(0, len(data), CHUNK_BYTES):
                piece = data[at : at + CHUNK_BYTES]
                self.exec(f"_fm_w(_fm_d({base64.b64encode(piece)!r}))")
                if progress is not None:
                    progress(at + len(piece), len(data))
            out = self.exec(
                f"_fm_f.close()\n_fm_f=_fm_w=None\nprint(_fm_fin({tmp!r},{path!r},{want!r}))"
            )
        except DeviceToolError:
            if not self.lost:
                with contextlib.suppress(DeviceToolError):
                    self.exec(
                        "try:\n _fm_f.close()\nexcept Exception:\n pass\n"
                        f"_fm_f=_fm_w=None\n_fm_rm({tmp!r})"
                    )
            raise
        got = out.decode("utf-8", "replace").strip()
        if got.startswith("BAD"):
            raise DeviceToolError(
                f"{path} arrived corrupted on {self.port} (sha256 {got[4:]}, expected {want}): "
                "the old file is untouched; retry, and check the cable if it happens again"
            )
        return got

    def mkdir_p(self, path: str) -> None:
        """Make `path` and its parents; existing ones are fine."""
        self.exec(f"_fm_mk({path!r})")

    def listdir(self, path: str) -> list[str]:
        """Names in the directory `path` (DeviceToolError when it does not exist)."""
        got = self.eval(f"sorted(e[0] for e in _fm_os.ilistdir({path!r}))")
        return [str(n) for n in got]

    def tree(self, path: str) -> list[tuple[str, bool]]:
        """Every entry under `path`, recursively: (full path, is a directory); [] if absent."""
        got = self.eval(f"_fm_tree({path!r}, [])")
        return [(str(p), bool(d)) for p, d in got]

    def remove(self, path: str) -> bool:
        """Remove a file or an empty directory; False when there was nothing to remove."""
        return bool(self.eval(f"_fm_rm({path!r})"))

    def read(self, path: str) -> bytes | None:
        """The file's bytes; None when it is absent."""
        out = self.exec(
            f"try:\n _fm_r=open({path!r},'rb')\nexcept OSError:\n _fm_r=None\n"
            "if _fm_r is None:\n print('NONE')\nelse:\n print('OK')\n"
            " while True:\n  _fm_c=_fm_r.read(384)\n  if not _fm_c:\n   break\n"
            "  print(_fm_ba.b2a_base64(_fm_c).decode().strip())\n _fm_r.close()\n"
            "_fm_r=_fm_c=None"
        )
        lines = out.decode("ascii", "replace").split()
        if not lines or lines[0] == "NONE":
            return None
        return b"".join(base64.b64decode(line) for line in lines[1:])

    # -- session ---------------------------------------------------------------------------

    def close(self) -> None:
        """Tidy the REPL's globals, leave the raw REPL, close the port; never raises."""
        if not self.lost:
            with contextlib.suppress(DeviceToolError):
                self.exec(_CLEANUP)
            with contextlib.suppress(OSError):
                self._t.exit_raw_repl()
        try:
            self._t.close()
        except OSError:  # a vanished pty refuses the RTS/DTR change close() makes first
            with contextlib.suppress(OSError):
                self._t.serial.close()


def _enter_raw_repl(transport: Any, port: str, timeout_s: float) -> None:
    from mpremote.transport import TransportError

    # mpremote prints what it read when it fails: kept off stdout (it may carry --json).
    seen = io.StringIO()
    for attempt in (1, 2):  # a board printing at boot may swallow the first Ctrl-C
        try:
            with _STDOUT_LOCK, contextlib.redirect_stdout(seen):
                transport.enter_raw_repl(soft_reset=False, timeout_overall=timeout_s / 2)
            return
        except (OSError, TransportError) as exc:
            log.debug("raw REPL attempt %d on %s: %s %r", attempt, port, exc, seen.getvalue()[-80:])
            if isinstance(exc, OSError):
                raise DeviceToolError(
                    f"lost the board on {port} ({_first_line(exc)}): check the cable and retry"
                ) from exc
    raise DeviceToolError(
        f"no answer from the MicroPython REPL on {port} within {timeout_s:g} s: press Ctrl-C "
        "in a terminal or reset the board (EN), then retry without a soft reset (is it in the "
        "ROM bootloader, or is main.py blocking Ctrl-C?)"
    )


@contextlib.contextmanager
def open_board(port: str, timeout_s: float = 10.0) -> Iterator[Board]:
    """The board behind `port` in the raw REPL, its running program interrupted, not reset."""
    from mpremote.transport import TransportError
    from mpremote.transport_serial import SerialTransport  # type: ignore[import-untyped]

    if timeout_s <= 0:
        raise DeviceToolError(f"timeout {timeout_s:g} s is not positive")
    try:
        transport = SerialTransport(port, baudrate=115200, timeout=timeout_s)
    except (OSError, ValueError, TransportError) as exc:
        raise DeviceToolError(_diagnose_open(port, exc)) from exc
    board = Board(transport, port, timeout_s)
    try:
        _enter_raw_repl(transport, port, timeout_s)
        board.exec(_PRELUDE)
        yield board
    except BaseException as exc:
        # Only our own errors leave the REPL at a prompt; anything else (Ctrl-C, a bug) may
        # have cut an exchange short, and tidying up would wait for answers that never come.
        if not isinstance(exc, FogmeshError) or not transport.in_raw_repl:
            board.lost = True
        raise
    finally:
        board.close()
