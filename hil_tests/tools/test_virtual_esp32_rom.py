"""The virtual ESP32 ROM bootloader against the real esptool 5: its CLI as a subprocess and its
Python API in-process over `socket://` on loopback, raw protocol checks with a small SLIP client
written here from the documented protocol, and every injectable fault."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from esptool.cmds import attach_flash, detect_chip, write_flash  # type: ignore[import-untyped]

import tools.virtual_esp32 as virtual_esp32
from tools.virtual_esp32 import (
    FLASH_SIZE,
    FlashImage,
    RomFaults,
    VirtualEsp32Error,
    VirtualEsp32Rom,
    checksum,
)

pytestmark = pytest.mark.timeout(20)

SYNC, READ_REG, FLASH_BEGIN, FLASH_DATA, GET_SECURITY_INFO = 0x08, 0x0A, 0x02, 0x03, 0x14
NOT_WRITTEN = "No more data to read from the serial port"


def payload(size: int, seed: int = 1, compressible: bool = False) -> bytes:
    rng = random.Random(seed)
    if compressible:  # text-like, so esptool's zlib really shrinks it
        words = [bytes(rng.choices(b"abcdefgh", k=rng.randint(2, 9))) for _ in range(64)]
        body = b" ".join(rng.choice(words) for _ in range(size // 3))
    else:
        body = rng.randbytes(size)
    return b"\x00" + body[: size - 1]  # not 0xE9, so esptool never treats it as an app image


def run_esptool(
    rom: VirtualEsp32Rom, cwd: Path, *args: str, fast: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ESPTOOL_CFGFILE"}
    if fast:  # short timeouts so a failure shows within the test's bound
        cfg = cwd / "fast-esptool.cfg"
        cfg.write_text("[esptool]\ntimeout = 1\nconnect_attempts = 2\n")
        env["ESPTOOL_CFGFILE"] = str(cfg)
    command = [sys.executable, "-m", "esptool", "--port", rom.url, "--before", "no-reset"]
    command += ["--after", "no-reset", "--no-stub", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=18)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


class RawClient:
    """A host written from the serial-protocol docs, to check framing byte by byte."""

    def __init__(self, rom: VirtualEsp32Rom) -> None:
        self.sock = socket.create_connection(("127.0.0.1", rom.port), timeout=5)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, data: bytes = b"", chk: int = 0) -> None:
        packet = struct.pack("<BBHI", 0, op, len(data), chk) + data
        escaped = packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
        self.sock.sendall(b"\xc0" + escaped + b"\xc0")

    def read(self) -> tuple[int, int, int, bytes]:
        """One reply as (direction, command, value, data)."""
        while True:
            start = self.buf.find(b"\xc0")
            end = self.buf.find(b"\xc0", start + 1)
            if start >= 0 and end > start + 1:
                frame, self.buf = self.buf[start + 1 : end], self.buf[end + 1 :]
                frame = frame.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
                direction, op, size, value = struct.unpack_from("<BBHI", frame)
                assert size == len(frame) - 8
                return direction, op, value, frame[8:]
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the emulator closed the connection")
            self.buf += chunk

    def sync(self) -> int:
        self.send(SYNC, b"\x07\x07\x12\x20" + b"\x55" * 32)
        replies = [self.read() for _ in range(8)]  # the ROM answers a SYNC eight times
        return replies[0][2]

    def close(self) -> None:
        self.sock.close()


def settle(rom: VirtualEsp32Rom) -> None:
    """Return once the emulator serves a new client, so it has finished with the previous one."""
    client = RawClient(rom)
    try:
        client.sync()
    finally:
        client.close()


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    return tmp_path / "flash.bin"


@pytest.fixture
def rom(image_path: Path) -> Iterator[VirtualEsp32Rom]:
    with VirtualEsp32Rom(image_path, mac="24:6f:28:01:02:03") as started:
        yield started


# -- esptool CLI ---------------------------------------------------------------------------


def test_read_mac_shows_chip_and_the_configured_mac(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    result = run_esptool(rom, tmp_path, "read-mac")
    text = output(result)
    assert result.returncode == 0, text
    assert re.search(r"Chip type:\s+ESP32-D0WD-V3 \(revision v3\.0\)", text)
    assert re.search(r"Features:\s+Wi-Fi, BT, Dual Core", text)
    assert re.search(r"Crystal frequency:\s+40MHz", text)
    assert re.search(r"^MAC:\s+24:6f:28:01:02:03$", text, re.MULTILINE)
    # the ESP32 ROM has no GET_SECURITY_INFO; esptool fell back to the magic register
    assert rom.stats.invalid_commands >= 1


def test_default_mac_comes_from_the_seed(tmp_path: Path) -> None:
    a, b, c = (VirtualEsp32Rom(None, seed=s) for s in (5, 5, 6))
    assert a.mac == b.mac != c.mac
    with c:
        result = run_esptool(c, tmp_path, "read-mac")
    assert re.search(rf"^MAC:\s+{c.mac}$", output(result), re.MULTILINE), output(result)


def test_flash_id_reports_a_4mb_flash(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    result = run_esptool(rom, tmp_path, "flash-id")
    text = output(result)
    assert result.returncode == 0, text
    assert "Manufacturer: c8" in text
    assert "Device: 4016" in text
    assert "Detected flash size: 4MB" in text


def test_chip_id_falls_back_to_the_mac(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    result = run_esptool(rom, tmp_path, "chip-id")
    assert result.returncode == 0, output(result)
    assert "has no chip ID" in output(result)
    assert re.search(r"MAC:\s+24:6f:28:01:02:03", output(result))


def test_write_flash_uncompressed_erases_writes_and_verifies(
    image_path: Path, tmp_path: Path
) -> None:
    FlashImage(image_path).commit([(0x0000, b"\x11" * 0x1000), (0xD000, b"\x22" * 0x2000)])
    data = payload(50_000)
    (tmp_path / "app.bin").write_bytes(data)
    with VirtualEsp32Rom(str(image_path)) as rom:
        result = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin")
    text = output(result)
    assert result.returncode == 0, text
    assert "Hash of data verified." in text
    assert "compressed" not in text  # --no-stub defaults to plain FLASH_DATA
    on_disk = image_path.read_bytes()
    end = 0x1000 + len(data)
    assert on_disk[0x1000:end] == data
    assert on_disk[end:0xE000] == b"\xff" * (0xE000 - end)  # rest of the last sector erased
    assert on_disk[:0x1000] == b"\x11" * 0x1000  # outside the erased sectors: untouched
    assert on_disk[0xE000:0xF000] == b"\x22" * 0x1000


def test_write_flash_compressed_at_a_higher_baud(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    data = payload(120_000, seed=2, compressible=True)
    assert len(zlib.compress(data, 9)) < len(data) // 2
    (tmp_path / "fs.bin").write_bytes(data)
    result = run_esptool(
        rom, tmp_path, "--baud", "460800", "write-flash", "-z", "0x10000", "fs.bin"
    )
    text = output(result)
    assert result.returncode == 0, text
    assert "Changing baud rate to 460800" in text
    assert re.search(rf"Wrote {len(data)} bytes \(\d+ compressed\)", text), text
    assert "Hash of data verified." in text
    assert rom.flash.read(0x10000, len(data)) == data
    assert rom.stats.sessions_committed == 1


def test_restarted_emulator_reads_back_what_was_written(image_path: Path, tmp_path: Path) -> None:
    data = payload(3000, seed=3)
    (tmp_path / "cfg.bin").write_bytes(data)
    with VirtualEsp32Rom(str(image_path)) as rom:
        assert run_esptool(rom, tmp_path, "write-flash", "0x9000", "cfg.bin").returncode == 0
    with VirtualEsp32Rom(str(image_path)) as restarted:
        result = run_esptool(restarted, tmp_path, "read-flash", "0x9000", "3000", "back.bin")
    assert result.returncode == 0, output(result)
    assert (tmp_path / "back.bin").read_bytes() == data


# -- esptool Python API --------------------------------------------------------------------


def test_python_api_detects_attaches_and_writes(rom: VirtualEsp32Rom) -> None:
    data = payload(40_000, seed=4, compressible=True)
    esp = detect_chip(rom.url, connect_mode="no-reset")
    try:
        assert esp.CHIP_NAME == "ESP32"
        assert esp.read_mac() == tuple(bytes.fromhex("246f28010203"))
        attach_flash(esp)
        write_flash(esp, [(0x20000, data)], compress=True)
        assert esp.flash_md5sum(0x20000, len(data)) == hashlib.md5(data).hexdigest()
    finally:
        esp._port.close()
    assert rom.flash.read(0x20000, len(data)) == data


def test_client_leaving_mid_write_leaves_the_image_unchanged(
    rom: VirtualEsp32Rom, image_path: Path
) -> None:
    before = image_path.read_bytes()
    data = payload(8192, seed=5)
    esp = detect_chip(rom.url, connect_mode="no-reset")
    try:
        attach_flash(esp)
        blocks = esp.flash_begin(len(data), 0x1000)
        assert blocks == 8
        for seq in range(3):
            esp.flash_block(data[seq * 1024 : (seq + 1) * 1024], seq)
    finally:
        esp._port.close()
    settle(rom)
    assert rom.stats.sessions_aborted == 1
    assert rom.stats.sessions_committed == 0
    assert image_path.read_bytes() == before


# -- raw protocol --------------------------------------------------------------------------


def test_raw_protocol_replies_like_the_esp32_rom(rom: VirtualEsp32Rom) -> None:
    client = RawClient(rom)
    try:
        client.send(SYNC, b"\x07\x07\x12\x20" + b"\x55" * 32)
        replies = [client.read() for _ in range(8)]  # one SYNC, eight answers
        assert all(r[:2] == (1, SYNC) and r[2] != 0 and r[3] == b"\0\0\0\0" for r in replies)

        client.send(READ_REG, struct.pack("<I", 0x40001000))
        assert client.read() == (1, READ_REG, 0x00F01D83, b"\0\0\0\0")

        client.send(GET_SECURITY_INFO)
        direction, op, _, data = client.read()
        assert (direction, data[:2]) == (1, b"\x01\x05")
        assert op != GET_SECURITY_INFO  # so esptool raises UnsupportedCommandError
        client.send(0x77)
        assert client.read()[3][:2] == b"\x01\x05"

        block = bytes(range(256)) * 4
        header = struct.pack("<IIII", len(block), 0, 0, 0)
        client.send(FLASH_DATA, header + block, checksum(block))
        assert client.read()[3][:2] == b"\x01\x06"  # no FLASH_BEGIN yet
        client.send(FLASH_BEGIN, struct.pack("<IIII", 1024, 1, 1024, 0x3000))
        assert client.read()[3][:2] == b"\x00\x00"
        client.send(FLASH_DATA, header + block, checksum(block) ^ 1)
        assert client.read()[3][:2] == b"\x01\x07"  # checksum error
        client.send(FLASH_DATA, header + block, checksum(block))
        assert client.read()[3][:2] == b"\x00\x00"
    finally:
        client.close()
    assert rom.flash.read(0x3000, 1024) == block
    assert rom.stats.checksum_errors == 1


def test_bad_input_is_counted_and_never_kills_the_server(
    rom: VirtualEsp32Rom, tmp_path: Path
) -> None:
    client = RawClient(rom)
    try:
        client.send_raw(b"junk")  # outside any frame
        client.send_raw(b"\xc0\x00\x0a\xdb\x01\xc0")  # invalid escape
        client.send_raw(b"\xc0\x00\x08\xc0")  # shorter than a header
        client.send_raw(b"\xc0" + b"\x01" * 12 + b"\xc0")  # a response, not a request
        client.send_raw(b"\xc0" + b"\x55" * 0x9000 + b"\xc0")  # oversize
        client.send(READ_REG, struct.pack("<I", 0x40001000))
        assert client.read()[2] == 0x00F01D83  # the same connection still works
        client.send_raw(b"\xc0\x00\x0a\x04\x00")  # the host goes away mid-frame
    finally:
        client.close()
    result = run_esptool(rom, tmp_path, "read-mac")
    assert result.returncode == 0, output(result)
    stats = rom.stats
    assert stats.garbage_bytes == 4
    assert stats.bad_frames == 3
    assert stats.oversize_frames == 1
    assert stats.truncated_frames == 1


def test_a_second_client_is_turned_away_while_one_is_served(rom: VirtualEsp32Rom) -> None:
    first = RawClient(rom)
    try:
        assert first.sync() != 0
        second = RawClient(rom)
        try:
            assert second.sock.recv(1) == b""  # closed at once, as a busy serial port
        finally:
            second.close()
        first.send(READ_REG, struct.pack("<I", 0x40001000))
        assert first.read()[2] == 0x00F01D83
    finally:
        first.close()
    assert rom.stats.refused == 1


# -- faults --------------------------------------------------------------------------------


def test_dropped_sync_frames_are_retried(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    rom.inject(drop=2, command=SYNC)
    result = run_esptool(rom, tmp_path, "read-mac", fast=True)
    assert result.returncode == 0, output(result)
    assert rom.stats.dropped == 2


def test_a_chip_that_never_answers_fails_to_connect(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    rom.inject(drop=10_000)
    result = run_esptool(rom, tmp_path, "read-mac", fast=True)
    assert result.returncode != 0
    assert "Failed to connect" in output(result)
    assert "No serial data received" in output(result)


def test_dropped_data_frame_fails_and_leaves_the_image(
    rom: VirtualEsp32Rom, image_path: Path, tmp_path: Path
) -> None:
    before = image_path.read_bytes()
    (tmp_path / "app.bin").write_bytes(payload(20_000))
    rom.inject(drop=1, command=FLASH_DATA)
    result = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin", fast=True)
    assert result.returncode != 0
    assert NOT_WRITTEN in output(result)  # esptool cannot resume its reader after a timeout
    settle(rom)
    assert rom.stats.dropped == 1
    assert rom.stats.sessions_aborted == 1
    assert image_path.read_bytes() == before


def test_garbled_sync_replies_are_retried(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    rom.inject(garble=2, command=SYNC)
    result = run_esptool(rom, tmp_path, "read-mac", fast=True)
    assert result.returncode == 0, output(result)
    assert rom.stats.garbled == 2


def test_garbled_data_reply_fails_and_leaves_the_image(
    rom: VirtualEsp32Rom, image_path: Path, tmp_path: Path
) -> None:
    before = image_path.read_bytes()
    (tmp_path / "app.bin").write_bytes(payload(20_000))
    rom.inject(garble=1, command=FLASH_DATA)
    result = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin", fast=True)
    assert result.returncode != 0
    assert NOT_WRITTEN in output(result)
    settle(rom)
    assert rom.stats.garbled == 1
    assert image_path.read_bytes() == before


def test_one_bad_checksum_is_retried(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    data = payload(20_000)
    (tmp_path / "app.bin").write_bytes(data)
    rom.inject(bad_checksum=1)
    result = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin", fast=True)
    assert result.returncode == 0, output(result)
    assert "Hash of data verified." in output(result)
    assert rom.stats.checksum_errors == 1
    assert rom.flash.read(0x1000, len(data)) == data


def test_bad_checksum_on_every_retry_fails_and_leaves_the_image(
    rom: VirtualEsp32Rom, image_path: Path, tmp_path: Path
) -> None:
    before = image_path.read_bytes()
    (tmp_path / "app.bin").write_bytes(payload(20_000))
    rom.inject(bad_checksum=3)  # esptool tries each block three times
    result = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin", fast=True)
    assert result.returncode != 0
    assert "result was 0107: Checksum error" in output(result)
    settle(rom)
    assert rom.stats.checksum_errors == 3
    assert image_path.read_bytes() == before


def test_md5_mismatch_fails_verification(
    rom: VirtualEsp32Rom, image_path: Path, tmp_path: Path
) -> None:
    data = payload(20_000)
    (tmp_path / "app.bin").write_bytes(data)
    rom.inject(md5_mismatch=1)
    result = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin", fast=True)
    assert result.returncode != 0
    assert "MD5 of file does not match data in flash!" in output(result)
    # The session was complete before the (lying) MD5: the image holds all of it, not part.
    assert image_path.read_bytes()[0x1000 : 0x1000 + len(data)] == data
    again = run_esptool(rom, tmp_path, "write-flash", "0x1000", "app.bin", fast=True)
    assert again.returncode == 0, output(again)
    assert "Hash of data verified." in output(again)


def test_slow_replies_set_while_running(rom: VirtualEsp32Rom, tmp_path: Path) -> None:
    rom.inject(delay_ms=20)  # below esptool's 100 ms sync timeout
    slow = run_esptool(rom, tmp_path, "read-mac", fast=True)
    assert slow.returncode == 0, output(slow)
    rom.inject(delay_ms=300)
    too_slow = run_esptool(rom, tmp_path, "read-mac", fast=True)
    assert too_slow.returncode != 0
    assert "No serial data received" in output(too_slow)
    rom.inject(delay_ms=0)
    assert run_esptool(rom, tmp_path, "read-mac", fast=True).returncode == 0


# -- flash image, configuration and package ------------------------------------------------


def test_flash_image_is_created_erased_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "img" / "flash.bin"
    image = FlashImage(path)
    assert path.stat().st_size == FLASH_SIZE
    assert image.read(0, 16) == b"\xff" * 16
    image.write(0x1234, b"hello")
    image.write(0x1000, b"abcdefgh")
    image.erase(0x1000, 4)
    reopened = FlashImage(path)
    assert reopened.read(0x1000, 8) == b"\xff\xff\xff\xffefgh"
    assert reopened.read(0x1234, 5) == b"hello"
    assert reopened.md5(0x1234, 5) == hashlib.md5(b"hello").hexdigest()
    assert list(path.parent.iterdir()) == [path]  # no temp files left behind


def test_flash_image_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"\xff" * 1024)
    with pytest.raises(VirtualEsp32Error, match=r"1024 bytes, expected 4194304"):
        FlashImage(path)
    with pytest.raises(VirtualEsp32Error, match="outside the 4 MB flash"):
        FlashImage(None).write(FLASH_SIZE - 2, b"abc")


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VirtualEsp32Error, match="6 bytes"):
        VirtualEsp32Rom(None, mac="24:6f:28")
    with pytest.raises(VirtualEsp32Error, match="6 bytes"):
        VirtualEsp32Rom(None, mac="zz:6f:28:01:02:03")
    with pytest.raises(VirtualEsp32Error, match="must not be negative"):
        VirtualEsp32Rom(None, faults=RomFaults(drop=-1))
    rom = VirtualEsp32Rom(None)
    with pytest.raises(VirtualEsp32Error, match="unknown fault explode"):
        rom.inject(explode=1)
    with pytest.raises(VirtualEsp32Error, match="must not be negative"):
        rom.inject(drop=3, delay_ms=-5)
    assert rom.faults == RomFaults()  # the refused change left nothing behind
    with pytest.raises(VirtualEsp32Error, match="not started"):
        _ = rom.url


def test_package_exports_resolve() -> None:
    for name in virtual_esp32.__all__:
        assert getattr(virtual_esp32, name) is not None
    with pytest.raises(AttributeError):
        _ = virtual_esp32.nothing_here
