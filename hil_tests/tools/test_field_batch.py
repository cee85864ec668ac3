"""`fogmesh batch provision` (tools.field.batch) against virtual ESP32 boards: several boards
deployed and provisioned in parallel from one TOML manifest, per-board logs without keys, a
second run that changes nothing, a dead port among good ones, and manifests refused whole."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tools.field.batch import BatchError, add_arguments, command_batch_provision, load_manifest
from tools.field.provision import SITE_KEY_ENV
from tools.mesh import frames
from tools.virtual_esp32.board import VirtualBoard

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PUMP_MODEL = ROOT / "models" / "shipped" / "pump.bin"


@pytest.fixture
def site_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SITE_KEY_ENV, raising=False)


@pytest.fixture
def boards(tmp_path: Path) -> Iterator[list[tuple[VirtualBoard, Path]]]:
    made: list[tuple[VirtualBoard, Path]] = []
    try:
        for name in ("a", "b"):
            fs = tmp_path / f"fs-{name}"
            fs.mkdir()
            made.append((VirtualBoard(fs, tmp_path / f"tty-{name}").start(), fs))
        yield made
    finally:
        for b, _ in made:
            b.stop()


def write_manifest(tmp_path: Path, site_key: bytes, body: str, name: str = "site.toml") -> Path:
    key = tmp_path / "site.key"
    key.write_text(site_key.hex() + "\n")
    key.chmod(0o600)
    path = tmp_path / name
    path.write_text(body)
    return path


def board_toml(port: str, node_id: int, extra: str = "") -> str:
    return f'[[boards]]\nport = "{port}"\nnode_id = {node_id}\n{extra}\n'


def run(manifest: Path, *extra: str) -> int:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return command_batch_provision(p.parse_args(["--manifest", str(manifest), *extra]))


def secrets_of(site_key: bytes, ids: list[int]) -> list[str]:
    out = [site_key.hex(), frames.net_key(site_key, 1).hex()]
    return out + [frames.node_key(site_key, n).hex() for n in ids]


def span(log: str) -> tuple[datetime, datetime]:
    stamps = [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        for line in log.splitlines()
        if line[:4].isdigit()
    ]
    return stamps[0], stamps[-1]


def test_two_boards_in_parallel_then_unchanged(
    boards: list[tuple[VirtualBoard, Path]],
    tmp_path: Path,
    site_key: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (a, fs_a), (b, fs_b) = boards
    manifest = write_manifest(
        tmp_path,
        site_key,
        'site_key_file = "site.key"\nlog_dir = "logs"\n\n'
        + board_toml(a.link, 7, f'model = "{PUMP_MODEL}"\nchannel = 6')
        + board_toml(b.link, 1, 'role = "root"\nnodes = "2-9"'),
    )
    assert run(manifest, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is True
    by_id = {r["node_id"]: r for r in summary["boards"]}
    assert by_id[7]["status"] == by_id[1]["status"] == "provisioned"
    assert by_id[7]["port"] == a.link and by_id[7]["error"] is None
    assert by_id[7]["deployed"] > 5 and by_id[1]["deployed"] == by_id[7]["deployed"]
    # the firmware and each board's own config
    assert (fs_a / "main.py").is_file() and (fs_b / "fogmesh").is_dir()
    cfg_a = json.loads((fs_a / "config.json").read_text())
    assert cfg_a["id"] == 7 and cfg_a["channel"] == 6 and cfg_a["model"] == "model.bin"
    assert cfg_a["node_key"] == frames.node_key(site_key, 7).hex()
    assert (fs_a / "model.bin").read_bytes() == PUMP_MODEL.read_bytes()
    cfg_b = json.loads((fs_b / "config.json").read_text())
    assert cfg_b["role"] == "root" and sorted(cfg_b["allow"], key=int) == [
        str(n) for n in range(2, 10)
    ]
    # one log per board, holding only its own board's lines and never a key
    logs = {n: (tmp_path / "logs" / f"{n}.log").read_text() for n in (7, 1)}
    assert "node 7" in logs[7] and "node 1 " not in logs[7] and a.link in logs[7]
    assert "<redacted>" in logs[1] and "fogmesh.deploy" in logs[1]
    for text in logs.values():
        for s in secrets_of(site_key, list(range(1, 10))):
            assert s not in text and s.upper() not in text
    # both boards worked at the same time
    (s7, e7), (s1, e1) = span(logs[7]), span(logs[1])
    assert s7 < e1 and s1 < e7
    stamps = {p: p.stat().st_mtime_ns for p in [*fs_a.rglob("*"), *fs_b.rglob("*")]}

    assert run(manifest, "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in again["boards"]] == ["unchanged", "unchanged"]
    assert [r["deployed"] for r in again["boards"]] == [0, 0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "unchanged" in (tmp_path / "logs" / "7.log").read_text()


def test_a_dead_port_fails_alone(
    boards: list[tuple[VirtualBoard, Path]],
    tmp_path: Path,
    site_key: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (a, fs_a), (b, fs_b) = boards
    dead = str(tmp_path / "no-such-tty")
    manifest = write_manifest(
        tmp_path,
        site_key,
        'site_key_file = "site.key"\ndeploy = false\n\n'
        + board_toml(a.link, 3)
        + board_toml(dead, 4)
        + board_toml(b.link, 5),
    )
    assert run(manifest) == 1
    out = capsys.readouterr().out
    assert "node 4 on " + dead + ": failed" in out and "does not exist" in out
    assert "2 provisioned, 0 unchanged, 1 failed" in out
    assert json.loads((fs_a / "config.json").read_text())["id"] == 3
    assert json.loads((fs_b / "config.json").read_text())["id"] == 5
    assert not (fs_a / "main.py").exists()  # deploy = false
    # the default log folder sits beside the manifest, and the failure is in its log
    assert "does not exist" in (tmp_path / "site.toml.logs" / "4.log").read_text()


def test_manifest_errors_are_all_listed_before_any_board(
    boards: list[tuple[VirtualBoard, Path]],
    tmp_path: Path,
    site_key: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (a, fs_a), (b, fs_b) = boards
    manifest = write_manifest(
        tmp_path,
        site_key,
        f'site_key_file = "site.key"\nsite_key = "{site_key.hex()}"\ncolour = "blue"\n\n'
        + board_toml(a.link, 2)
        + board_toml(b.link, 2, "channel = 15")
        + board_toml(a.link, 9, 'node_key = "00"')
        + '[[boards]]\nport = "/dev/ttyX"\n',
    )
    assert run(manifest, "--json") == 2
    out = capsys.readouterr()
    for expected in (
        "site_key: a key is never given in the manifest",
        "colour: unknown key",
        "boards[1].channel: must be a Wi-Fi channel",
        "boards[1].node_id: 2 is already boards[0]'s",
        f"boards[2].port: '{a.link}' is already boards[0]'s",
        "boards[2].node_key: a key is never given",
        "boards[3].node_id: missing",
    ):
        assert expected in out.err, (expected, out.err)
    assert json.loads(out.out)["ok"] is False and len(json.loads(out.out)["problems"]) == 7
    assert site_key.hex() not in out.err + out.out
    assert list(fs_a.iterdir()) == [] and list(fs_b.iterdir()) == []
    assert not (tmp_path / "site.toml.logs").exists()
    # no key anywhere: refused with exit 2 as well, nothing touched
    bare = write_manifest(tmp_path, site_key, board_toml(a.link, 2), name="bare.toml")
    assert run(bare) == 2
    assert SITE_KEY_ENV in capsys.readouterr().err and list(fs_a.iterdir()) == []
    with pytest.raises(BatchError, match="not TOML"):
        load_manifest(write_manifest(tmp_path, site_key, "[[boards]\n", name="broken.toml"))


def test_cli_with_the_key_in_the_environment(
    boards: list[tuple[VirtualBoard, Path]], tmp_path: Path, site_key: bytes
) -> None:
    (a, fs_a), _ = boards
    manifest = write_manifest(tmp_path, site_key, "deploy = false\n" + board_toml(a.link, 12))
    env = {k: v for k, v in os.environ.items() if k != SITE_KEY_ENV}
    env[SITE_KEY_ENV] = site_key.hex()
    r = subprocess.run(
        [sys.executable, "-m", "tools.field.batch", "--manifest", str(manifest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert f"node 12 on {a.link}: provisioned" in r.stdout and "1 provisioned" in r.stdout
    assert r.stderr == ""  # per-board detail goes to the log, not the terminal
    assert json.loads((fs_a / "config.json").read_text())["node_key"] == (
        frames.node_key(site_key, 12).hex()
    )
    assert site_key.hex() not in r.stdout
