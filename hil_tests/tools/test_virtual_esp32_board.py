"""The virtual ESP32's running board against the real mpremote (CLI as a subprocess, and its
SerialTransport API), always in `resume` mode: the unix port cannot soft-reset."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
from mpremote.transport_serial import SerialTransport  # type: ignore[import-untyped]

from tools.virtual_esp32.board import DEFAULT_MAC, BoardError, VirtualBoard

ROOT = Path(__file__).resolve().parents[2]
MPREMOTE = str(Path(sys.executable).parent / "mpremote")

pytestmark = pytest.mark.timeout(30)


def mpremote(b: VirtualBoard, *args: str, timeout_s: float = 15.0) -> str:
    r = subprocess.run(
        [MPREMOTE, "connect", b.link, "resume", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert r.returncode == 0, f"mpremote {args}: rc={r.returncode} {r.stdout!r} {r.stderr!r}"
    return r.stdout


def read_until(port: serial.Serial, needle: bytes, timeout_s: float = 10.0) -> bytes:
    data = b""
    end = time.monotonic() + timeout_s
    while needle not in data:
        assert time.monotonic() < end, f"{needle!r} not seen; got {data[-300:]!r}"
        data += port.read(port.in_waiting or 1)
    return data


def drain_until_idle(port: serial.Serial, idle_s: float = 0.5, timeout_s: float = 10.0) -> bytes:
    """Read until the board has said nothing for idle_s: it has finished reacting to our input."""
    data = b""
    port.timeout = idle_s
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        chunk = port.read(4096)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"board never went quiet; last output {data[-200:]!r}")


def board_processes(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (the board's unique directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_mpremote_cli_exec_eval_run_and_fs(board: VirtualBoard, fs: Path, tmp_path: Path) -> None:
    assert os.path.realpath(board.link) == board.pty
    assert mpremote(board, "exec", "print(1+1)") == "2\n"
    assert mpremote(board, "eval", "6*7") == "42\n"
    mac = mpremote(board, "exec", "import os; print(os.getenv('FOGMESH_MAC'))")
    assert mac == DEFAULT_MAC.hex(":") + "\n"
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint('ran', sys.platform)\n")
    assert mpremote(board, "run", str(script)) == "ran linux\n"

    local = tmp_path / "local.py"
    local.write_text("VALUE = 17\n")
    mpremote(board, "fs", "cp", str(local), ":x.py")
    assert (fs / "x.py").read_text() == "VALUE = 17\n"
    assert mpremote(board, "fs", "cat", ":x.py") == "VALUE = 17\n"
    mpremote(board, "fs", "mkdir", ":lib")
    assert (fs / "lib").is_dir()
    listing = mpremote(board, "fs", "ls", ":")
    assert "lib/" in listing
    assert " 11 x.py" in listing  # sizes, as a board's filesystem reports them
    assert mpremote(board, "exec", "import x; print(x.VALUE)") == "17\n"
    mpremote(board, "fs", "rm", ":x.py")
    assert not (fs / "x.py").exists()
    assert board.stats.restarts == 0


def test_filesystem_root_is_fs_dir_only(board: VirtualBoard, fs: Path, tmp_path: Path) -> None:
    (tmp_path / "host_secret.txt").write_text("host only")
    (fs / "mine.txt").write_text("board file")
    code = (
        "import os\n"
        "print(sorted(os.listdir('/')), sorted(os.listdir('/..')), os.getcwd())\n"
        "for p in ('/../host_secret.txt', '../../host_secret.txt', '/etc/hostname'):\n"
        "  try:\n"
        "    open(p).read(); print('LEAK', p)\n"
        "  except OSError:\n"
        "    print('blocked')\n"
        "open('/../escape.txt', 'w').write('x')\n"
        "os.chdir('/sub') if 'sub' in os.listdir() else os.mkdir('sub')\n"
        "os.rename('mine.txt', 'sub/moved.txt')\n"
    )
    out = mpremote(board, "exec", code).splitlines()
    assert out[0] == "['mine.txt'] ['mine.txt'] /"
    assert out[1:] == ["blocked"] * 3
    assert (fs / "escape.txt").read_text() == "x"  # "/.." is clamped to the board's root
    assert not (tmp_path / "escape.txt").exists()
    assert (fs / "sub" / "moved.txt").read_text() == "board file"


def test_raw_paste_copies_a_large_file_byte_identical(
    board: VirtualBoard, fs: Path, tmp_path: Path
) -> None:
    data = random.Random(6).randbytes(6000) + bytes(range(256))  # every byte value, > 4 KB
    src, back = tmp_path / "big.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    before = board.stats.raw_pastes
    mpremote(board, "fs", "cp", str(src), ":big.bin")
    assert (fs / "big.bin").read_bytes() == data
    mpremote(board, "fs", "cp", ":big.bin", str(back))
    assert back.read_bytes() == data
    # One mpremote session asks for raw-paste on every exec (a 256-byte chunk each) and stops
    # asking after the first refusal: this many requests means the board accepted them.
    assert board.stats.raw_pastes - before >= len(data) // 256
    big_code = "x = %r\nprint(len(x))\n" % ("y" * 5000)
    assert mpremote(board, "exec", big_code) == "5000\n"


def test_python_api_serial_transport(board: VirtualBoard, fs: Path) -> None:
    t = SerialTransport(board.link, baudrate=115200)
    try:
        t.enter_raw_repl(soft_reset=False)
        assert t.exec("print('api', 3*3)") == b"api 9\n"
        assert t.eval("[1, 2] + [3]") == [1, 2, 3]
        t.fs_mkdir("data")
        t.fs_writefile("data/blob.bin", b"\x00\x01\xff" * 2000)
        assert (fs / "data" / "blob.bin").read_bytes() == b"\x00\x01\xff" * 2000
        assert t.fs_readfile("data/blob.bin") == b"\x00\x01\xff" * 2000
        assert t.fs_stat("data/blob.bin").st_size == 6000
        assert [e[0] for e in t.fs_listdir("data")] == ["blob.bin"]
        t.fs_rmfile("data/blob.bin")
        t.fs_rmdir("data")
        assert not (fs / "data").exists()
        with pytest.raises(FileNotFoundError):
            t.fs_readfile("missing.txt")
        t.exit_raw_repl()
    finally:
        t.close()
    assert board.stats.raw_pastes >= 6


def test_boot_then_main_run_output_on_pty_and_ctrl_c_breaks_in(fs: Path, tmp_path: Path) -> None:
    (fs / "boot.py").write_text("BOOTED = 'yes'\nprint('boot.py ran')\n")
    (fs / "main.py").write_text(
        "import time\nn = 0\nwhile True:\n    print('tick', n, BOOTED)\n    n += 1\n"
        "    time.sleep(0.05)\n"
    )
    with VirtualBoard(fs, tmp_path / "tty") as b, serial.Serial(b.link, timeout=0.2) as port:
        read_until(port, b"tick")  # main.py's output is the serial console, as on a board
        line = read_until(port, b"\n", timeout_s=2.0)
        assert b"yes" in line  # boot.py ran first, in the same globals
    with VirtualBoard(fs, tmp_path / "tty2") as b:
        # main.py never ends: mpremote's Ctrl-C must interrupt it to reach the raw REPL.
        out = mpremote(b, "exec", "print(n > 0, BOOTED)")
        assert out == "True yes\n"
        assert b.stats.restarts == 0
        # Straight after a reset, main.py runs again and Ctrl-C must still break in.
        b.reset()
        b.wait_ready(10.0, starts=2)
        assert mpremote(b, "exec", "print(BOOTED)") == "yes\n"


def test_process_end_restarts_the_board(board: VirtualBoard, fs: Path) -> None:
    link_target = board.pty
    first_pid = board.pid
    # Ctrl-D on an empty raw-REPL line ends the unix port: the board comes back by itself.
    t = SerialTransport(board.link)
    try:
        t.enter_raw_repl(soft_reset=False)
        t.serial.write(b"\x04")
    finally:
        t.close()
    board.wait_ready(10.0, starts=2)
    assert board.pid not in (None, first_pid)
    assert mpremote(board, "exec", "print('after ctrl-d')") == "after ctrl-d\n"
    # sys.exit() from a client's code ends it too.
    mpremote(board, "exec", "import sys\nsys.exit(7)")
    board.wait_ready(10.0, starts=3)
    assert board.stats.last_exit == 7
    # A crash (the process killed).
    pid = board.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    board.wait_ready(10.0, starts=4)
    assert mpremote(board, "eval", "'alive'") == "alive\n"
    assert board.stats.restarts == 3 and board.stats.resets == 0
    assert board.pty == link_target and os.path.realpath(board.link) == link_target


def test_reset_and_main_sys_exit_rerun_boot(fs: Path, tmp_path: Path) -> None:
    (fs / "main.py").write_text("open('boots.txt', 'a').write('b')\n")
    with VirtualBoard(fs, tmp_path / "tty") as b:
        assert mpremote(b, "exec", "print(open('boots.txt').read())") == "b\n"
        b.reset()
        b.wait_ready(10.0, starts=2)
        assert mpremote(b, "exec", "print(open('boots.txt').read())") == "bb\n"
        assert b.stats.resets == 1
        # main.py ending in SystemExit is a soft reset on a board: it runs again.
        (fs / "main.py").write_text(
            "n = len(open('boots.txt').read())\nopen('boots.txt', 'a').write('b')\n"
            "import sys\nif n < 4:\n    sys.exit()\n"
        )
        b.reset()
        b.wait_ready(10.0, starts=5)
        assert mpremote(b, "exec", "print(open('boots.txt').read())") == "bbbbb\n"
        assert b.stats.resets == 4


def test_unplug_and_replug(board: VirtualBoard) -> None:
    mpremote(board, "exec", "keep = 'still here'")
    old_pty, pid = board.pty, board.pid
    assert old_pty is not None
    board.unplug()
    assert not os.path.lexists(board.link)
    assert board.pty is None and not os.path.exists(old_pty)
    r = subprocess.run(
        [MPREMOTE, "connect", board.link, "resume", "exec", "print(1)"],
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert r.returncode != 0
    Path(board.link).write_text("someone else's file")
    with pytest.raises(BoardError, match="not a symlink"):
        board.replug()  # refused in the caller's thread; the board itself carries on
    os.unlink(board.link)
    board.replug()
    assert board.pty is not None and os.path.realpath(board.link) == board.pty
    assert board.pid == pid  # the board kept running: only the cable came and went
    assert mpremote(board, "exec", "print(keep)") == "still here\n"


def test_garbage_never_wedges_the_board(board: VirtualBoard) -> None:
    rng = random.Random(1)
    with serial.Serial(board.link, timeout=0.5) as port:
        for chunk in (
            rng.randbytes(4096),
            b"\x01",  # a lone Ctrl-A: raw REPL entered, no code follows
            b"\r\x01\x05A\x01print(",  # raw-paste begun and abandoned mid-code
            bytes(range(256)) * 4,
            b"\x01",
        ):
            port.write(chunk)
            drain_until_idle(port)
    board.wait_ready(10.0, starts=board.stats.starts)
    assert mpremote(board, "exec", "print('survived')") == "survived\n"
    assert mpremote(board, "eval", "1+1") == "2\n"


def test_stop_leaves_nothing_behind(fs: Path, tmp_path: Path) -> None:
    (fs / "main.py").write_text("while True:\n    pass\n")
    b = VirtualBoard(fs, tmp_path / "tty").start()
    pid, pty = b.pid, b.pty
    assert pid is not None and pty is not None and board_processes(str(fs))
    b.stop()
    b.stop()  # twice is harmless
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.lexists(b.link) and not os.path.exists(pty)
    assert board_processes(str(fs)) == []


def test_environment_heap_and_mac(fs: Path, tmp_path: Path) -> None:
    mac = bytes.fromhex("02aabbccddee")
    with VirtualBoard(fs, tmp_path / "tty", heapsize="64k", mac=mac) as b:
        out = mpremote(
            b,
            "exec",
            "import gc, os\nprint(gc.mem_free() + gc.mem_alloc())\nprint(os.getenv('FOGMESH_MAC'))",
        )
        heap, seen_mac = out.split()
        assert 60 * 1024 <= int(heap) <= 64 * 1024
        assert seen_mac == "02:aa:bb:cc:dd:ee"


def test_bad_arguments(fs: Path, tmp_path: Path) -> None:
    with pytest.raises(BoardError, match="heapsize"):
        VirtualBoard(fs, tmp_path / "tty", heapsize="lots")
    with pytest.raises(BoardError, match="6 bytes"):
        VirtualBoard(fs, tmp_path / "tty", mac=b"\x01\x02")
    with pytest.raises(BoardError, match="not a directory"):
        VirtualBoard(tmp_path / "missing", tmp_path / "tty")
    regular = tmp_path / "regular"
    regular.write_text("do not clobber")
    with pytest.raises(BoardError, match="not a symlink"):
        VirtualBoard(fs, regular).start()
    assert regular.read_text() == "do not clobber"
    with pytest.raises(BoardError, match="not running"):
        VirtualBoard(fs, tmp_path / "tty").reset()
    assert board_processes(str(fs)) == []


def test_fogmesh_virtual_esp32_cli(fs: Path, tmp_path: Path) -> None:
    # Both halves from one command: esptool reads the MAC from the ROM, mpremote runs code on the
    # board, and the board sees the same MAC; SIGTERM leaves nothing behind.
    link = tmp_path / "served"
    image = tmp_path / "flash.bin"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "virtual",
            "esp32",
            "--repl-link",
            str(link),
            "--flash-image",
            str(image),
            "--fs",
            str(fs),
            "--mac",
            "24:0a:c4:12:34:56",
            "--heapsize",
            "80k",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["repl"] == str(link) and info["pty"] == os.path.realpath(link)
        assert info["fs"] == str(fs.resolve()) and info["mac"] == "24:0a:c4:12:34:56"
        assert info["rom"].startswith("socket://127.0.0.1:") and image.stat().st_size == 4 << 20
        esptool = str(Path(sys.executable).with_name("esptool"))
        r = subprocess.run(
            [
                esptool,
                "--port",
                info["rom"],
                "--before",
                "no-reset",
                "--after",
                "no-reset",
                "--no-stub",
                "read-mac",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0 and "24:0a:c4:12:34:56" in r.stdout, r.stdout + r.stderr
        r = subprocess.run(
            [
                MPREMOTE,
                "connect",
                info["repl"],
                "resume",
                "exec",
                "import os; print(os.getenv('FOGMESH_MAC'))",
            ],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
        assert r.stdout == "24:0a:c4:12:34:56\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert not os.path.lexists(link)
    assert board_processes(str(fs.resolve())) == []


def test_fogmesh_virtual_esp32_refuses_a_bad_image(tmp_path: Path) -> None:
    image = tmp_path / "short.bin"
    image.write_bytes(b"\xff" * 1000)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "virtual",
            "esp32",
            "--repl-link",
            str(tmp_path / "l"),
            "--flash-image",
            str(image),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "fogmesh: error:" in r.stderr, r.stderr
    assert r.stdout == "" and not os.path.lexists(tmp_path / "l")
