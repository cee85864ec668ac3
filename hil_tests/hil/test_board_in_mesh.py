"""A node deployed and provisioned on a virtual ESP32 joins the simulated mesh and
reports to the gateway's side of the root's UART, like any simulated node (issue 6, item 7)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from hil_tests.aio import run
from tools.field.deploy import deploy
from tools.field.provision import provision
from tools.mesh.sim import Sim
from tools.mesh.topology import line
from tools.virtual_esp32.board import VirtualBoard

pytestmark = pytest.mark.timeout(180)


def test_a_provisioned_virtual_board_joins_the_mesh_and_reports(tmp_path: Path) -> None:
    site_key = secrets.token_bytes(32)
    (tmp_path / "fs").mkdir()

    async def main() -> None:
        # 1 (root) - 2 (simulated) - 3 (the virtual board): the board is two hops out.
        async with Sim(line(3), site_key=site_key, summary_s=1.0, external=[3]) as sim:
            with VirtualBoard(tmp_path / "fs", tmp_path / "ttyESP32") as board:
                host, port = sim.medium.address
                await asyncio.to_thread(deploy, board.link)
                await asyncio.to_thread(provision, board.link, 3, site_key, sim_medium=(host, port))
                board.reset()  # boots main.py: the node firmware, now on the board
                for _ in range(600):
                    if any(o == 3 for o, _ in sim.uart_up):
                        break
                    await asyncio.sleep(0.1)
                got = sorted(r.hops for r in sim.uart_up.values() if r.origin == 3)
                assert got, f"nothing from the board; board restarts {board.stats}"
                assert got[0] == 16 - 2  # UP hops = 16 - radio hops crossed: via node 2

    run(main(), timeout_s=150)
