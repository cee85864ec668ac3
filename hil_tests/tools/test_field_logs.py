"""`fogmesh logs` against the virtual ESP32's running board: lines followed read-only, a replug
survived, garbage bytes and split lines handled, and the CLI in a subprocess."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.field.logs import follow, format_json, format_readable
from tools.virtual_esp32.board import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(20)

TICKER = """
import json, time
n = 0
while True:
    print(json.dumps({"ev": "tick", "t": time.ticks_ms(), "n": n}))
    n += 1
    time.sleep(0.1)
"""

GARBAGE = """
import sys, time
out = sys.stdout.buffer
n = 0
while True:
    out.write(b"\\xff\\xfe\\x80 not utf8\\r\\n")
    out.write(b'{"ev": "par')
    time.sleep(0.15)
    out.write(b'tial", "n": %d}\\r\\n' % n)
    n += 1
    time.sleep(0.05)
"""


class Follower:
    """`follow` on a thread; lines and events land in queues the test waits on."""

    def __init__(self, port: str) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(port,), daemon=True)
        self._thread.start()

    def _run(self, port: str) -> None:
        try:
            follow(port, self.lines.put, self.stop, lambda k, d: self.events.put((k, d)))
        except BaseException as exc:  # shown by close(), in the test's thread
            self.errors.append(exc)

    def event(self, timeout_s: float = 5.0) -> tuple[str, str]:
        return self.events.get(timeout=timeout_s)

    def ticks(self, count: int, timeout_s: float = 5.0) -> list[int]:
        seen: list[int] = []
        while len(seen) < count:
            line = self.lines.get(timeout=timeout_s)
            if line.startswith("{"):
                obj = json.loads(line)
                if obj.get("ev") == "tick":
                    seen.append(int(obj["n"]))
        return seen

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5.0)
        assert not self._thread.is_alive(), "follow did not return after stop"
        assert not self.errors, self.errors


def make_board(tmp_path: Path, main_py: str) -> VirtualBoard:
    fs = tmp_path / "fs"
    fs.mkdir()
    (fs / "main.py").write_text(main_py)
    return VirtualBoard(fs, tmp_path / "ttyESP32")


@pytest.fixture
def ticker(tmp_path: Path) -> Iterator[VirtualBoard]:
    with make_board(tmp_path, TICKER) as b:
        yield b


def test_follow_gets_json_lines_and_survives_a_replug(ticker: VirtualBoard) -> None:
    f = Follower(ticker.link)
    try:
        assert f.event() == ("connected", ticker.link)
        before = f.ticks(3)
        assert before == sorted(before) and len(set(before)) == 3  # whole lines, in order
        old_pty = ticker.pty
        ticker.unplug()
        kind, reason = f.event()
        assert kind == "disconnected" and reason
        ticker.replug()
        assert f.event() == ("reconnected", ticker.link)
        assert ticker.pty is not None and old_pty is not None
        while not f.lines.empty():  # lines read before the unplug
            f.lines.get_nowait()
        after = f.ticks(3)
        assert min(after) > max(before)  # the same node, still counting: new output arrives
        assert f.events.empty()
    finally:
        f.close()


def test_follow_waits_for_a_port_that_is_not_there_yet(tmp_path: Path) -> None:
    board = make_board(tmp_path, TICKER)
    f = Follower(board.link)
    try:
        with pytest.raises(queue.Empty):
            f.event(timeout_s=0.8)  # polled, never opened: no event, no crash
        with board:
            assert f.event() == ("connected", board.link)
            assert len(f.ticks(2)) == 2
    finally:
        f.close()


def test_garbage_bytes_and_split_lines(tmp_path: Path) -> None:
    with make_board(tmp_path, GARBAGE) as board:
        f = Follower(board.link)
        try:
            assert f.event()[0] == "connected"
            got: list[str] = []
            while sum(1 for g in got if g.startswith('{"ev": "partial"')) < 2:
                got.append(f.lines.get(timeout=5.0))
            garbage = [g for g in got if "not utf8" in g]
            assert garbage and all(g == "\ufffd\ufffd\ufffd not utf8" for g in garbage)
            joined = [json.loads(g) for g in got if g.startswith("{")]
            assert all(j["ev"] == "partial" for j in joined[1:])  # split reads joined
            assert json.loads(format_json(garbage[0])) == {"ev": "text", "line": garbage[0]}
        finally:
            f.close()


def test_formats() -> None:
    line = '{"ev": "boot", "t": 12, "node": 3, "fw": "1.2 beta", "ok": true}'
    assert format_readable(line) == 'boot t=12 node=3 fw="1.2 beta" ok=true'
    assert format_readable("MicroPython v1.24") == "MicroPython v1.24"
    assert format_json(line + "\r") == line
    assert json.loads(format_json("[1, 2]")) == {"ev": "text", "line": "[1, 2]"}


def test_cli_json_for_some_seconds(ticker: VirtualBoard) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.field.logs",
            "--port",
            ticker.link,
            "--json",
            "--seconds",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    ticks = [o["n"] for o in objs if o.get("ev") == "tick"]
    assert len(ticks) >= 5 and ticks == sorted(ticks)
    assert "connected" in r.stderr
    # read-only: nothing the follower did reached the board's input
    assert ticker.stats.bytes_in == 0


def test_cli_readable_and_missing_port(ticker: VirtualBoard, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tools.field.logs", "--port", ticker.link, "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("tick t=") and " n=" in line for line in r.stdout.splitlines())
    missing = str(tmp_path / "nothing-here")
    r = subprocess.run(
        [sys.executable, "-m", "tools.field.logs", "--port", missing, "--seconds", "0.7"],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 1
    assert "never opened" in r.stderr and r.stdout == ""
