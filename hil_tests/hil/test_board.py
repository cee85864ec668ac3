"""One HIL suite, two targets: `virtual` (a VirtualBoard, always, in CI) and `real` (the board
given with `--hil-port /dev/serial/by-id/...`; marked real_board, reported as skipped with the
reason when no port is given). Every test runs the field tools as an engineer would."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tools.field.deploy import deploy
from tools.field.device import open_board
from tools.field.doctor import check_port
from tools.field.provision import provision
from tools.mesh import frames
from tools.virtual_esp32.board import VirtualBoard

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(
    params=["virtual", pytest.param("real", marks=pytest.mark.real_board)], scope="module"
)
def port(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The board's port for this target."""
    if request.param == "real":
        real = request.config.getoption("--hil-port")
        if not real:
            pytest.skip("needs a real board: pass --hil-port /dev/serial/by-id/...")
        yield str(real)
        return
    d = tmp_path_factory.mktemp("hil")
    (d / "fs").mkdir()
    with VirtualBoard(d / "fs", d / "ttyESP32") as board:
        yield board.link


def test_doctor_finds_the_repl(port: str) -> None:
    findings = check_port(port)
    assert all(f.ok for f in findings), [f.to_json() for f in findings]
    assert any("REPL answers" in f.detail for f in findings)


def test_deploy_then_the_firmware_imports(port: str) -> None:
    result = deploy(port)
    assert result.uploaded or result.skipped
    again = deploy(port)
    assert not again.uploaded and len(again.skipped) == len(result.uploaded) + len(result.skipped)
    with open_board(port) as b:
        out = b.exec("import fogmesh.mesh, fogmesh.app\nprint('ok')")
    assert out.strip() == b"ok"


def test_provision_and_the_firmware_accepts_it(port: str) -> None:
    site_key = secrets.token_bytes(32)
    deploy(port)
    result = provision(port, 7, site_key)
    assert result.checked_on_board
    with open_board(port) as b:
        out = b.exec(
            "from fogmesh import config\nc = config.load('/config.json')\n"
            "print(c['id'], c['node_key'])"
        )
    nid, key = out.decode().split()
    assert nid == "7" and key == frames.node_key(site_key, 7).hex()
    with open_board(port) as b:
        files = b.listdir("/")
        data = b"".join(b.read("/" + n) or b"" for n in files if n.endswith(".json"))
    assert site_key.hex().encode() not in data  # the board never holds the site key
