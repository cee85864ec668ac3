"""`fogmesh flash` (tools.field.flash) against the virtual ESP32 ROM bootloader on loopback: the
real esptool 5 Python API underneath, faults injected to drive the baud fallback and the
verify, and the command line both in-process and as a subprocess for its exit codes."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tools.field.flash as flash_module
from tools.field.flash import (
    FlashError,
    FlashResult,
    add_arguments,
    baud_plan,
    command_flash,
    flash,
    normalise_mac,
)
from tools.virtual_esp32 import FlashImage, VirtualEsp32Rom

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[2]
MAC = "24:6f:28:01:02:03"
SYNC, FLASH_DATA, CHANGE_BAUDRATE = 0x08, 0x03, 0x0F
NEVER = 1_000_000  # drop count that outlasts every attempt


def payload(size: int, seed: int = 1) -> bytes:
    # not 0xE9 first, so esptool never treats it as an app image it could rewrite
    return b"\x00" + random.Random(seed).randbytes(size - 1)


def written_md5(data: bytes) -> str:
    return hashlib.md5(data + b"\xff" * (-len(data) % 4)).hexdigest()


def settle(rom: VirtualEsp32Rom) -> None:
    """Return once the emulator has answered a new client, so it is done with earlier ones."""
    sock = socket.create_connection(("127.0.0.1", rom.port), timeout=5)
    try:
        packet = struct.pack("<BBHI", 0, SYNC, 36, 0) + b"\x07\x07\x12\x20" + b"\x55" * 32
        sock.sendall(b"\xc0" + packet + b"\xc0")
        got = b""
        while got.count(b"\xc0") < 2:  # one whole reply frame
            chunk = sock.recv(4096)
            assert chunk, "the emulator closed the connection"
            got += chunk
    finally:
        sock.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ESPTOOL_CFGFILE"}
    return subprocess.run(
        [sys.executable, "-m", "tools.field.flash", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=18,
    )


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    return tmp_path / "flash.bin"


@pytest.fixture
def rom(image_path: Path) -> Iterator[VirtualEsp32Rom]:
    with VirtualEsp32Rom(image_path, mac=MAC) as started:
        yield started


@pytest.fixture
def firmware(tmp_path: Path) -> Path:
    path = tmp_path / "firmware.bin"
    path.write_bytes(payload(50_001))  # not a multiple of 4: esptool pads the last word
    return path


# -- the write -----------------------------------------------------------------------------


def test_flash_writes_the_file_and_reports_what_it_did(image_path: Path, firmware: Path) -> None:
    FlashImage(image_path).commit([(0xF000, b"\x22" * 0x1000)])  # the sector before: kept
    data = firmware.read_bytes()
    with VirtualEsp32Rom(image_path, mac=MAC) as rom:
        url = rom.url
        result = flash(url, firmware, address=0x10000)
        assert rom.flash.read(0x10000, len(data)) == data
        assert rom.stats.connections == 1
        assert rom.stats.sessions_committed == 1
    assert result == FlashResult(
        port=url,
        chip="ESP32-D0WD-V3 (revision v3.0)",
        mac=MAC,
        baud=921600,
        address=0x10000,
        bytes_written=len(data),
        md5=written_md5(data),
        md5_verified=True,
        seconds=result.seconds,
    )
    assert 0 < result.seconds < 15
    on_disk = image_path.read_bytes()
    assert on_disk[0xF000:0x10000] == b"\x22" * 0x1000
    assert on_disk[0x10000 : 0x10000 + len(data)] == data


def test_progress_rises_to_the_file_size(rom: VirtualEsp32Rom, firmware: Path) -> None:
    size = firmware.stat().st_size
    calls: list[tuple[int, int]] = []
    flash(rom.url, firmware, progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert {total for _, total in calls} == {size}
    assert len(calls) >= 40  # one per 1 KB block of the ROM loader
    assert done == sorted(done)
    assert done[0] < size
    assert done[-1] == size


def test_esptool_prints_nothing_and_gets_its_logger_back(
    rom: VirtualEsp32Rom, firmware: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import esptool.cmds  # type: ignore[import-untyped]  # noqa: F401
    from esp_pylib.logger import EspLog

    before = EspLog.instance
    flash(rom.url, firmware, progress=lambda done, total: None)
    assert EspLog.instance is before
    rom.inject(md5_mismatch=1)
    with pytest.raises(FlashError):
        flash(rom.url, firmware)
    assert EspLog.instance is before
    out, err = capfd.readouterr()
    assert out == ""  # esptool's own logger would have printed "Connecting..." and more
    assert err == ""


def test_an_expected_mac_in_any_spelling_lets_the_write_through(
    rom: VirtualEsp32Rom, firmware: Path
) -> None:
    result = flash(rom.url, firmware, expect_mac="24-6F-28-01-02-03")
    assert result.mac == MAC
    assert rom.flash.read(0x1000, 100) == firmware.read_bytes()[:100]


def test_a_wrong_mac_is_refused_before_anything_is_written(
    rom: VirtualEsp32Rom, image_path: Path, firmware: Path
) -> None:
    before = image_path.read_bytes()
    with pytest.raises(FlashError) as caught:
        flash(rom.url, firmware, expect_mac="24:6F:28:FF:FF:FF")
    assert str(caught.value) == (
        f"board MAC {MAC} is not the expected 24:6f:28:ff:ff:ff: refusing to flash"
    )
    assert image_path.read_bytes() == before
    assert rom.stats.connections == 1  # a refusal, not a link failure: no slower retry
    assert rom.stats.sessions_committed == rom.stats.sessions_aborted == 0  # no FLASH_BEGIN


# -- baud fallback -------------------------------------------------------------------------


def test_baud_plan_steps_down_from_the_requested_rate() -> None:
    assert baud_plan(921600) == [921600, 460800, 115200]
    assert baud_plan(2_000_000) == [2_000_000, 921600, 460800, 115200]
    assert baud_plan(460800) == [460800, 115200]
    assert baud_plan(115200) == [115200]
    assert baud_plan(57600) == [57600]


def test_a_lost_baud_change_falls_back_to_460800(rom: VirtualEsp32Rom, firmware: Path) -> None:
    rom.inject(drop=1, command=CHANGE_BAUDRATE)
    result = flash(rom.url, firmware)
    assert result.baud == 460800
    assert result.md5_verified
    assert rom.stats.dropped == 1
    assert rom.stats.connections == 2
    assert rom.flash.read(0x1000, firmware.stat().st_size) == firmware.read_bytes()


def test_two_lost_baud_changes_fall_back_to_115200(rom: VirtualEsp32Rom, firmware: Path) -> None:
    rom.inject(drop=2, command=CHANGE_BAUDRATE)
    result = flash(rom.url, firmware)
    assert result.baud == 115200  # the ROM's own rate: no CHANGE_BAUDRATE left to lose
    assert rom.stats.dropped == 2
    assert rom.stats.connections == 3
    assert rom.flash.read(0x1000, firmware.stat().st_size) == firmware.read_bytes()


def test_a_link_lost_mid_write_retries_slower_and_the_image_ends_whole(
    rom: VirtualEsp32Rom, firmware: Path
) -> None:
    rom.inject(drop=1, command=FLASH_DATA)
    result = flash(rom.url, firmware, address=0x20000)
    assert result.baud == 460800
    assert rom.stats.sessions_aborted == 1  # the broken write was thrown away, not half-kept
    assert rom.stats.sessions_committed == 1
    assert rom.flash.read(0x20000, firmware.stat().st_size) == firmware.read_bytes()


def test_a_board_that_never_answers_gets_the_bootloader_hint(
    rom: VirtualEsp32Rom, image_path: Path, firmware: Path
) -> None:
    before = image_path.read_bytes()
    rom.inject(drop=NEVER)
    started = time.monotonic()
    with pytest.raises(FlashError) as caught:
        flash(rom.url, firmware, connect_attempts=2)
    message = str(caught.value)
    assert message == (
        f"no answer from the bootloader on {rom.url}: hold BOOT and press EN, or try a lower "
        "--baud (tried 921600, 460800, 115200 baud)"
    )
    assert time.monotonic() - started < 15
    assert rom.stats.connections == 3  # one attempt per rate
    assert image_path.read_bytes() == before


def test_no_answer_at_115200_has_no_slower_rate_to_try(
    rom: VirtualEsp32Rom, firmware: Path
) -> None:
    rom.inject(drop=NEVER)
    with pytest.raises(FlashError, match=r"\(tried 115200 baud\)$"):
        flash(rom.url, firmware, baud=115200, connect_attempts=1)
    assert rom.stats.connections == 1


def test_a_port_that_cannot_open_fails_at_once(tmp_path: Path, firmware: Path) -> None:
    started = time.monotonic()
    with pytest.raises(FlashError, match=r"^cannot open .*ttyUSB9 .*no serial monitor holds it"):
        flash(str(tmp_path / "ttyUSB9"), firmware)
    assert time.monotonic() - started < 2  # no fallback: a missing port is not a slow link


# -- verify and checks ---------------------------------------------------------------------


def test_a_wrong_md5_after_the_write_fails_verify_without_retrying(
    rom: VirtualEsp32Rom, firmware: Path
) -> None:
    rom.inject(md5_mismatch=1)
    with pytest.raises(FlashError, match=r"^verify failed: flash holds MD5 [0-9a-f]{32} at 0x1000"):
        flash(rom.url, firmware)
    assert rom.stats.md5_mismatches == 1
    assert rom.stats.connections == 1  # a lying flash is not cured by a slower link
    again = flash(rom.url, firmware)
    assert again.md5_verified


@pytest.mark.parametrize(
    ("name", "content", "address", "message"),
    [
        ("missing.bin", None, 0x1000, r"^firmware .*missing\.bin does not exist: check the path$"),
        ("empty.bin", b"", 0x1000, r"^firmware .*empty\.bin is empty"),
        (
            "huge.bin",
            b"\x00" * (4 * 1024 * 1024 + 1),
            0x1000,
            r"is 4194305 bytes, more than the 4 MB",
        ),
        (
            "odd.bin",
            b"\x00" * 64,
            0x1800,
            r"^address 0x1800 is not on a 4 KB flash sector boundary",
        ),
        ("neg.bin", b"\x00" * 64, -0x1000, r"^address -0x1000 is not on a 4 KB"),
        ("dir", "dir", 0x1000, r"^firmware .*dir is not a file"),
    ],
)
def test_bad_firmware_is_refused_before_the_port_is_opened(
    rom: VirtualEsp32Rom,
    tmp_path: Path,
    name: str,
    content: bytes | str | None,
    address: int,
    message: str,
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(FlashError, match=message):
        flash(rom.url, path, address=address)
    settle(rom)
    assert rom.stats.connections == 1  # only settle's


def test_an_image_that_does_not_fit_the_board_is_refused(
    rom: VirtualEsp32Rom, image_path: Path, tmp_path: Path
) -> None:
    before = image_path.read_bytes()
    path = tmp_path / "tail.bin"
    path.write_bytes(payload(8192))
    with pytest.raises(FlashError, match=r"^8192 bytes at 0x3ff000 do not fit the board's 4MB"):
        flash(rom.url, path, address=0x3FF000)
    assert image_path.read_bytes() == before


def test_bad_settings_are_refused(rom: VirtualEsp32Rom, firmware: Path) -> None:
    assert normalise_mac("246F28010203") == MAC
    for bad in ("24:6f:28", "zz:6f:28:01:02:03", ""):
        with pytest.raises(FlashError, match="is not a MAC address"):
            normalise_mac(bad)
    with pytest.raises(FlashError, match="--before 'bogus' is not one of"):
        flash(rom.url, firmware, before="bogus")
    with pytest.raises(FlashError, match="baud rate 0 is not positive"):
        flash(rom.url, firmware, baud=0)
    settle(rom)
    assert rom.stats.connections == 1


def test_public_names_resolve() -> None:
    for name in flash_module.__all__:
        assert getattr(flash_module, name) is not None


# -- command line --------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_command_flash_prints_one_json_object(
    rom: VirtualEsp32Rom, firmware: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--port", rom.url, "--firmware", str(firmware), "--address", "0x8000", "--json")
    assert command_flash(args) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["ok"] is True
    assert result["mac"] == MAC
    assert result["baud"] == 921600
    assert result["address"] == 0x8000
    assert result["bytes_written"] == firmware.stat().st_size
    assert result["md5"] == written_md5(firmware.read_bytes())
    assert result["md5_verified"] is True
    assert err == ""  # no bar with --json
    assert rom.flash.read(0x8000, 64) == firmware.read_bytes()[:64]


def test_command_flash_draws_a_bar_on_stderr_and_one_line_on_stdout(
    rom: VirtualEsp32Rom, firmware: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--port", rom.url, "--firmware", str(firmware), "--expect-mac", MAC.upper())
    assert command_flash(args) == 0
    out, err = capsys.readouterr()
    size = firmware.stat().st_size
    assert re.fullmatch(
        rf"flashed {size} bytes at 0x1000 to ESP32-D0WD-V3 \(revision v3\.0\) {MAC} on "
        rf"{re.escape(rom.url)} at 921600 baud in \d+\.\d s, MD5 verified\n",
        out,
    ), out
    assert err.startswith("\rwriting [")
    assert err.endswith(f"[{'#' * 30}] 100% {size}/{size} bytes\n")
    percents = [int(p) for p in re.findall(r"\] +(\d+)%", err)]
    assert percents == sorted(percents) and len(percents) > 10


def test_command_flash_rejects_a_hand_built_namespace(
    firmware: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--port", "socket://127.0.0.1:9", "--firmware", str(firmware))
    args.baud = -5
    assert command_flash(args) == 2
    assert "--baud -5 is not a positive whole number" in capsys.readouterr().err


def test_cli_exit_codes_for_success_and_refusal(
    rom: VirtualEsp32Rom, image_path: Path, firmware: Path
) -> None:
    ok = run_cli("--port", rom.url, "--firmware", str(firmware), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["md5_verified"] is True

    before = image_path.read_bytes()
    refused = run_cli(
        "--port", rom.url, "--firmware", str(firmware), "--expect-mac", "02:00:00:00:00:01"
    )
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr == (
        f"fogmesh flash: error: board MAC {MAC} is not the expected 02:00:00:00:00:01: "
        "refusing to flash\n"
    )
    assert image_path.read_bytes() == before

    refused_json = run_cli(
        "--port", rom.url, "--firmware", str(firmware), "--address", "0x1800", "--json"
    )
    assert refused_json.returncode == 1
    assert json.loads(refused_json.stdout) == {
        "ok": False,
        "error": "address 0x1800 is not on a 4 KB flash sector boundary: use a multiple of "
        "0x1000 (0x1000 for an ESP32 MicroPython image)",
    }


def test_cli_exit_codes_for_no_answer_and_bad_arguments(
    rom: VirtualEsp32Rom, firmware: Path
) -> None:
    rom.inject(drop=NEVER)
    silent = run_cli("--port", rom.url, "--firmware", str(firmware), "--connect-attempts", "1")
    assert silent.returncode == 1
    lines = silent.stderr.splitlines()
    assert lines[-1].startswith(f"fogmesh flash: error: no answer from the bootloader on {rom.url}")
    assert sum("trying 460800 baud" in line for line in lines) == 1  # the retry is announced
    assert silent.stdout == ""

    for bad in (
        ["--port", rom.url, "--firmware", str(firmware), "--address", "zz"],
        ["--port", rom.url, "--firmware", str(firmware), "--expect-mac", "nope"],
        ["--port", rom.url, "--firmware", str(firmware), "--baud", "0"],
        ["--firmware", str(firmware)],
    ):
        result = run_cli(*bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "usage: fogmesh flash" in result.stderr
        assert result.stdout == ""
