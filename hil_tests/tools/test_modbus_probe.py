"""`fogmesh modbus probe` against the virtual PLC: every decoding shown, errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil_tests.tools.cli_runner import ROOT, fogmesh


@pytest.fixture(scope="module")
def plc_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ready = tmp_path_factory.mktemp("plc") / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "virtual",
            "plc",
            "--pumps",
            "1",
            "--modbus-port",
            "0",
            "--no-opcua",
            "--ready-file",
            str(ready),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    waiter = threading.Event()
    for _ in range(200):
        if ready.exists() or proc.poll() is not None:
            break
        waiter.wait(0.05)
    assert ready.exists(), proc.stderr.read() if proc.stderr else ""
    try:
        yield json.loads(ready.read_text())["modbus_tcp"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_probe_finds_the_meters_float32_cdab(plc_url: str) -> None:
    # The meter's voltage (unit 10, input 0..1) is float32 with the low word first.
    r = fogmesh(
        "modbus", "probe", plc_url, "--unit", "10", "--address", "30001", "--count", "2", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["table"] == "input" and out["start"] == 0 and len(out["registers"]) == 2
    rows = {(d["offset"], d["type"], d["order"]): d["value"] for d in out["decodings"]}
    assert 200.0 < rows[(0, "float32", "CDAB")] < 260.0
    assert not 200.0 < abs(rows[(0, "float32", "ABCD")]) < 260.0  # the wrong order is nonsense

    human = fogmesh(
        "modbus", "probe", plc_url, "--unit", "10", "--address", "30001", "--count", "2"
    )
    assert human.returncode == 0
    assert "float32" in human.stdout and "CDAB" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "40000"], "classic notation starts at 40001"),
        (["--address", "12"], "give --table holding|input"),
        (["--address", "30001", "--count", "0"], "--count must be 1..125"),
        (["--address", "30101", "--count", "2"], "illegal data address (2)"),
    ],
)
def test_probe_errors_are_one_clear_line(plc_url: str, args: list[str], message: str) -> None:
    r = fogmesh("modbus", "probe", plc_url, *args)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fogmesh: error:") and message in last, r.stderr
    assert "Traceback" not in r.stderr


def test_probe_of_an_unreachable_device(tmp_path: Path) -> None:
    r = fogmesh("modbus", "probe", "tcp://127.0.0.1:1", "--address", "40001", "--timeout-s", "1")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "fogmesh: error: tcp://127.0.0.1:1: cannot connect"
