"""`fogmesh provision` (tools.field.provision) against the virtual ESP32's running board: keys
derived as tools.mesh.frames derives them, the site key never on the board nor in any output,
secrets only from a file or the environment, the firmware's own config check on the board."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tools.field.deploy import deploy
from tools.field.provision import (
    MODEL_NAME,
    REDACTED,
    SITE_KEY_ENV,
    ProvisionToolError,
    add_arguments,
    command_provision,
    load_site_key,
    parse_nodes,
    provision,
    redact,
)
from tools.mesh import frames
from tools.virtual_esp32.board import VirtualBoard

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
MPREMOTE = str(Path(sys.executable).parent / "mpremote")
PUMP_MODEL = ROOT / "models" / "shipped" / "pump.bin"


@pytest.fixture
def site_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def key_file(tmp_path: Path, site_key: bytes) -> Path:
    f = tmp_path / "site.key"
    f.write_text(site_key.hex() + "\n")
    f.chmod(0o600)
    return f


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SITE_KEY_ENV, raising=False)


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


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != SITE_KEY_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tools.field.provision", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=25,
        env=full_env,
    )


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def all_board_bytes(fs: Path) -> bytes:
    return b"".join(p.read_bytes() for p in fs.rglob("*") if p.is_file())


def test_node_config_holds_its_derived_key_never_the_site_key(
    board: VirtualBoard, fs: Path, site_key: bytes
) -> None:
    result = provision(board.link, 5, site_key, channel=6, sim_medium=("127.0.0.1", 40000))
    assert result.status == "written" and result.config_written and not result.model_written
    assert not result.checked_on_board  # no firmware on this board yet
    cfg = json.loads((fs / "config.json").read_text())
    assert cfg["id"] == 5 and cfg["role"] == "node" and cfg["channel"] == 6
    assert cfg["node_key"] == frames.node_key(site_key, 5).hex()
    assert cfg["sensor"] == {"kind": "gen", "channels": ["temp", "vib"], "seed": 5}
    assert cfg["sim"] == {"medium": ["127.0.0.1", 40000]}
    assert "net_key" not in cfg and "allow" not in cfg
    everything = all_board_bytes(fs)
    assert site_key.hex().encode() not in everything and site_key not in everything
    assert site_key.hex().upper().encode() not in everything
    assert not (fs / "config.json.tmp").exists()
    assert result.config["node_key"] == REDACTED


def test_root_config_has_net_key_and_allow_list(
    board: VirtualBoard, fs: Path, site_key: bytes
) -> None:
    provision(board.link, 1, site_key, role="root", nodes=parse_nodes("2-30"), epoch=3)
    cfg = json.loads((fs / "config.json").read_text())
    assert cfg["role"] == "root" and cfg["epoch"] == 3
    assert cfg["net_key"] == frames.net_key(site_key, 3).hex()
    assert cfg["node_key"] == frames.node_key(site_key, 1).hex()
    assert cfg["allow"] == {str(n): frames.node_key(site_key, n).hex() for n in range(2, 31)}
    assert cfg["uart"] == {"id": 1, "baud": 115200} and "sensor" not in cfg
    assert site_key.hex().encode() not in all_board_bytes(fs)


def test_the_firmware_on_the_board_accepts_the_config(
    board: VirtualBoard, fs: Path, site_key: bytes
) -> None:
    deploy(board.link)  # the firmware, so its own config.py can judge
    result = provision(board.link, 7, site_key, model=PUMP_MODEL)
    assert result.checked_on_board and result.model == MODEL_NAME and result.model_written
    assert (fs / MODEL_NAME).read_bytes() == PUMP_MODEL.read_bytes()
    key = frames.node_key(site_key, 7).hex()
    out = mpremote(
        board,
        "exec",
        "from fogmesh import config\n"
        "c = config.load('/config.json')\n"
        f"print(c['id'], c['model'], c['sensor']['channels'][0], c['node_key'] == {key!r})",
    )
    assert out == "7 model.bin Accelerometer1RMS True\n"  # the model's channels, as the sensor's
    root = provision(board.link, 1, site_key, role="root", nodes=[2, 3, 7])
    assert root.checked_on_board
    out = mpremote(
        board,
        "exec",
        "from fogmesh import config\nc = config.load('/config.json')\n"
        "print(c['role'], sorted(c['allow']), c['epoch'])",
    )
    assert out == "root ['2', '3', '7'] 1\n"
    # A config the firmware refuses is never written: the root's file stays.
    with pytest.raises(ProvisionToolError, match=r"firmware refuses this config: sensor\.kind"):
        provision(board.link, 8, site_key, sensor={"kind": "magic", "channels": ["x"]})
    assert json.loads((fs / "config.json").read_text())["role"] == "root"


def test_provisioning_again_identically_is_unchanged(
    board: VirtualBoard, fs: Path, site_key: bytes
) -> None:
    first = provision(board.link, 9, site_key, model=PUMP_MODEL)
    assert first.status == "written" and first.model_written
    stamps = {n: (fs / n).stat().st_mtime_ns for n in ("config.json", MODEL_NAME)}
    again = provision(board.link, 9, site_key, model=PUMP_MODEL)
    assert again.status == "unchanged" and not again.config_written and not again.model_written
    assert {n: (fs / n).stat().st_mtime_ns for n in stamps} == stamps
    moved = provision(board.link, 9, site_key, model=PUMP_MODEL, channel=11)
    assert moved.status == "written" and moved.config_written and not moved.model_written
    assert json.loads((fs / "config.json").read_text())["channel"] == 11


def test_every_output_redacts_keys(
    board: VirtualBoard,
    site_key: bytes,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # what -v shows
    nodes = [2, 3, 4]
    for extra in (["--json"], []):
        args = parse(
            "--port",
            board.link,
            "--node-id",
            "1",
            "--site-key-file",
            str(key_file),
            "--role",
            "root",
            "--nodes",
            "2-4",
            *extra,
        )
        assert command_provision(args) == 0
    out = capsys.readouterr()
    shown = out.out + out.err + caplog.text
    secrets_ = [site_key.hex(), frames.net_key(site_key, 1).hex()]
    secrets_ += [frames.node_key(site_key, n).hex() for n in [1, *nodes]]
    for s in secrets_:
        assert s not in shown and s.upper() not in shown
    result = json.loads(out.out.splitlines()[0])
    assert result["config"]["node_key"] == REDACTED and result["config"]["net_key"] == REDACTED
    assert result["config"]["allow"] == {"2": REDACTED, "3": REDACTED, "4": REDACTED}
    assert "unchanged" in out.out.splitlines()[1]
    assert '"node_key": "<redacted>"' in caplog.text  # the config is logged, keys hidden
    assert redact({"id": 1, "allow": {"2": "ab"}}) == {"id": 1, "allow": {"2": REDACTED}}


def test_cli_with_the_key_in_the_environment_and_verbose_logging(
    board: VirtualBoard, fs: Path, site_key: bytes
) -> None:
    r = run_cli(
        "-v",
        "--port",
        board.link,
        "--node-id",
        "12",
        "--json",
        env={SITE_KEY_ENV: site_key.hex()},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "written"
    assert "DEBUG" in r.stderr and "<redacted>" in r.stderr  # -v really logged the config
    node_key = frames.node_key(site_key, 12).hex()
    for s in (site_key.hex(), node_key):
        assert s not in r.stdout + r.stderr
    assert json.loads((fs / "config.json").read_text())["node_key"] == node_key
    # A key file others may read works, with a warning.
    loose = fs.parent / "loose.key"
    loose.write_text(site_key.hex())
    loose.chmod(0o644)
    r = run_cli("--port", board.link, "--node-id", "12", "--site-key-file", str(loose))
    assert r.returncode == 0 and "unchanged" in r.stdout, r.stderr
    assert "can be read by others: chmod 600" in r.stderr


def test_secrets_never_come_from_the_command_line(tmp_path: Path, site_key: bytes) -> None:
    for option in ("--site-key", "--node-key", "--net-key", "--key"):
        r = run_cli("--port", "x", "--node-id", "5", option, site_key.hex())
        assert r.returncode == 2 and "refused" in r.stderr, r.stderr
        assert site_key.hex() not in r.stderr + r.stdout
    r = run_cli("--port", "x", "--node-id", "5", f"--site-key={site_key.hex()}")
    assert r.returncode == 2 and site_key.hex() not in r.stderr
    # no abbreviations: a prefix of --site-key-file is not taken for it
    r = run_cli("--port", "x", "--node-id", "5", "--site-key-f", str(tmp_path / "k"))
    assert r.returncode == 2 and "unrecognized" in r.stderr
    r = run_cli("--port", "x", "--node-id", "5")
    assert r.returncode == 2 and "--site-key-file" in r.stderr and SITE_KEY_ENV in r.stderr


def test_a_bad_site_key_file_is_a_clear_error(
    board: VirtualBoard, fs: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("this is not hex at all, zz\n")
    short = tmp_path / "short.key"
    short.write_text("00112233")
    for f in (bad, short):
        f.chmod(0o600)  # (a key file others may read gets a warning line as well)
    cases = [
        (bad, "does not hold a hex site key"),
        (short, "4-byte key: a site key is 16 to 64 bytes"),
        (tmp_path / "missing.key", "does not exist"),
    ]
    for path, message in cases:
        r = run_cli("--port", board.link, "--node-id", "5", "--site-key-file", str(path))
        assert r.returncode == 1, r.stderr
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "not hex at all" not in r.stderr  # the file's content is never echoed
    r = run_cli("--port", board.link, "--node-id", "5", "--json", env={SITE_KEY_ENV: "xyz"})
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False
    assert f"environment's {SITE_KEY_ENV}" in r.stderr
    assert not (fs / "config.json").exists()
    with pytest.raises(ProvisionToolError, match="does not hold a hex"):
        load_site_key(None, {SITE_KEY_ENV: "12345"})
    assert load_site_key(None, {SITE_KEY_ENV: "ab" * 16}) == b"\xab" * 16


def test_bad_arguments_exit_2(key_file: Path) -> None:
    for node_id in ("0", "65535", "abc", "-3"):
        r = run_cli("--port", "x", "--node-id", node_id, "--site-key-file", str(key_file))
        assert r.returncode == 2 and "node id" in r.stderr, (node_id, r.stderr)
    for extra in (["--channel", "15"], ["--nodes", "5-2"], ["--sensor-json", "[1]"]):
        r = run_cli("--port", "x", "--node-id", "1", "--site-key-file", str(key_file), *extra)
        assert r.returncode == 2, (extra, r.stderr)
    assert parse_nodes("2,3,7-9") == [2, 3, 7, 8, 9]


def test_bad_model_and_misfit_options_are_refused_before_the_board(
    board: VirtualBoard, fs: Path, tmp_path: Path, site_key: bytes
) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all, just bytes" * 4)
    with pytest.raises(ProvisionToolError, match="not a fogmesh model blob"):
        provision(board.link, 5, site_key, model=junk)
    with pytest.raises(ProvisionToolError, match="reads channels"):
        provision(
            board.link, 5, site_key, model=PUMP_MODEL, sensor={"kind": "gen", "channels": ["t"]}
        )
    with pytest.raises(ProvisionToolError, match="--nodes is the root's allow list"):
        provision(board.link, 5, site_key, nodes=[2, 3])
    assert list(fs.iterdir()) == []
