"""`fogmesh doctor` without hardware: a virtual board's REPL, a silent pty, a port held by another
process, a missing path, permission denied, and the CLI in a subprocess."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.field.doctor import (
    DIALOUT_FIX,
    Finding,
    check_port,
    finding_for_open_error,
    holders,
    list_ports,
)
from tools.virtual_esp32.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(20)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


@pytest.fixture
def board(tmp_path: Path) -> Iterator[VirtualBoard]:
    fs = tmp_path / "fs"
    fs.mkdir()
    # a busy main.py: the doctor's Ctrl-C has to interrupt it before a prompt appears
    (fs / "main.py").write_text(
        "import time\nwhile True:\n    print('busy')\n    time.sleep(0.2)\n"
    )
    with VirtualBoard(fs, tmp_path / "ttyESP32") as b:
        yield b


@pytest.fixture
def silent_pty() -> Iterator[str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def doctor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.field.doctor", *args],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=ROOT,
        check=False,
    )


def test_repl_answers_on_a_virtual_board(board: VirtualBoard) -> None:
    found = by_check(check_port(board.link))
    assert [f.check for f in found.values()] == ["permission", "busy", "repl"]
    assert all(f.ok for f in found.values()), found
    assert found["repl"].detail == "MicroPython REPL answers"
    assert board.stats.bytes_in >= 2  # the probe really sent its Ctrl-C


def test_silent_pty_means_no_serial_data(silent_pty: str) -> None:
    found = by_check(check_port(silent_pty, timeout_s=1.0))
    assert found["permission"].ok and found["busy"].ok
    repl = found["repl"]
    assert not repl.ok and repl.level == "error"
    assert "no serial data" in repl.detail and "hold BOOT, press EN" in repl.fix


def test_port_held_by_another_process_names_its_pid(silent_pty: str) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; f = open(sys.argv[1], 'rb', buffering=0); print('ready', "
            "flush=True); sys.stdin.read()",
            silent_pty,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        users, _ = holders(silent_pty)
        assert [pid for pid, _ in users] == [holder.pid]
        busy = by_check(check_port(silent_pty, timeout_s=0.3))["busy"]
        assert not busy.ok and busy.level == "warning"
        assert busy.pids == (holder.pid,) and f"pid {holder.pid}" in busy.detail
        assert "-c" in busy.detail  # the holder's command line is named
    finally:
        holder.kill()
        holder.wait(timeout=5)
    assert by_check(check_port(silent_pty, timeout_s=0.3))["busy"].ok


def test_missing_path(tmp_path: Path) -> None:
    gone = tmp_path / "ttyUSB9"
    [finding] = check_port(str(gone))
    assert finding.check == "exists" and not finding.ok
    assert str(gone) in finding.detail
    ports = list_ports()
    assert (ports[0].device if ports else "no serial ports at all") in finding.fix
    dangling = tmp_path / "ttyLink"
    dangling.symlink_to(gone)
    [finding] = check_port(str(dangling))
    assert finding.check == "exists" and "symlink to missing" in finding.detail


def as_nobody(port: str) -> dict[str, object]:
    """check_port run in a forked child that dropped root for uid/gid 65534 (nobody)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only opens one file and writes one pipe: safe after fork
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            [finding] = check_port(port)
            os.write(w, json.dumps(finding.to_json()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the unprivileged check died"
    result: dict[str, object] = json.loads(data)
    return result


def test_permission_denied() -> None:
    # pytest's tmp_path is private to its user; the unprivileged check below must reach the file
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        port = Path(d) / "ttyLocked"
        port.write_bytes(b"")
        port.chmod(0)
        if os.geteuid() != 0:
            [finding] = check_port(str(port))
            assert finding.to_json()["check"] == "permission"
            text = finding.fix
        else:  # root opens a mode-000 file anyway: a forked child checks it as nobody
            found = as_nobody(str(port))
            assert found["check"] == "permission" and found["ok"] is False
            text = str(found["fix"])
        assert text == DIALOUT_FIX and "dialout" in text
    # and the mapping itself, with the errors injected
    denied = finding_for_open_error("/dev/ttyUSB0", PermissionError(errno.EACCES, "denied"))
    assert denied.check == "permission" and not denied.ok and denied.fix == DIALOUT_FIX
    busy = finding_for_open_error("/dev/ttyUSB0", OSError(errno.EBUSY, "Device or resource busy"))
    assert busy.check == "busy" and not busy.ok and "close" in busy.fix


def test_network_port_is_reported_not_probed() -> None:
    [finding] = check_port("socket://127.0.0.1:1")
    assert finding.check == "network" and finding.ok and "not probed" in finding.detail


def test_cli_json_and_exit_codes(board: VirtualBoard, tmp_path: Path) -> None:
    r = doctor_cli("--port", board.link, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and isinstance(out["ports"], list)
    checks = {f["check"]: f for f in out["findings"]}
    assert checks["repl"]["detail"] == "MicroPython REPL answers"
    # this test process holds the pty's master (the board): the device end, not a competitor
    assert checks["busy"]["ok"] and f"pid {os.getpid()}" in checks["busy"]["detail"]

    r = doctor_cli("--port", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert "ERROR   exists:" in r.stdout and "fix:" in r.stdout

    r = doctor_cli("--json")
    out = json.loads(r.stdout)
    assert r.returncode == (0 if out["ports"] else 1)
    assert out["findings"][0]["check"] == "ports"
