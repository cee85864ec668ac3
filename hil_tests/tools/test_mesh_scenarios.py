"""Mesh scenarios with the real node firmware (firmware/main.py: fogmesh.mesh, app, border) in
real MicroPython processes over the simulated radio (tools/mesh/sim.py). Each scenario is small
(<= 8 nodes), seeded and bounded in time; on failure it prints the tree and every node's last
log lines."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import pytest

from hil_tests.aio import run
from tools.mesh.bench import hops_travelled
from tools.mesh.medium import Captured
from tools.mesh.sim import Sim
from tools.mesh.topology import Link, Topology, grid, line

pytestmark = pytest.mark.slow

T_DATA = 1
Body = Callable[[Sim], Awaitable[None]]


def scenario(topo: Topology, body: Body, *, seed: int, limit_s: float = 60.0) -> None:
    async def main() -> None:
        async with Sim(topo, seed=seed, summary_s=1.0, sample_hz=2.0) as sim:
            try:
                await body(sim)
            except BaseException:
                print(_diagnose(sim))
                raise

    run(main(), timeout_s=limit_s)


def _diagnose(sim: Sim) -> str:
    out = [f"t={sim.elapsed():.1f}s tree:", sim.tree()]
    for n in sim.nodes.values():
        out.append(
            f"node {n.id}: alive={n.alive} joined={n.joined} parent={n.parent} rank={n.rank} "
            f"gens={len(n.gens)} drops={n.drops} exits={n.exits} stats={n.stats}"
        )
        out.extend(f"    error: {e}" for e in n.errors[-5:])
        out.extend("    " + line for line in list(n.logs)[-8:])
    out.append(f"uart: {sim.uart_frames} dups={sim.uart_dups} missing={sorted(sim.missing())}")
    out.append(f"medium: {sim.medium.stats()}")
    return "\n".join(out)


def diamond() -> Topology:
    """1 = root; 4 reaches it through 2 or 3 (a backup parent); 5 hangs off 4."""
    pairs = [(1, 2), (1, 3), (2, 4), (3, 4), (4, 5)]
    nodes = {1: (0.0, 0.0), 2: (10.0, -5.0), 3: (10.0, 5.0), 4: (20.0, 0.0), 5: (30.0, 0.0)}
    return Topology(nodes, {frozenset(p): Link(0.0, 2.0) for p in pairs})


def delivered_from(sim: Sim, node: int) -> set[int]:
    return {seq for origin, seq in sim.received() if origin == node}


def data_copies(sim: Sim, src: int, dst: int | None = None) -> list[Captured]:
    return [
        c
        for c in sim.medium.capture
        if c.src == src and c.typ == T_DATA and c.delivered and (dst is None or c.dst == dst)
    ]


def ctr(frame: bytes) -> int:
    value: int = struct.unpack_from(">I", frame, 12)[0]
    return value


async def drain(
    sim: Sim, timeout_s: float = 20.0, excused: frozenset[tuple[int, int]] = frozenset()
) -> None:
    """Stop new messages, then wait until everything created reached the UART, except the
    `excused` ones (lost on purpose: in the RAM of a killed node)."""
    sim.quiet(True)
    await sim.wait_for(lambda: not (sim.missing() - excused), timeout_s, "every message delivered")


# ---------------------------------------------------------------------------------------


def test_six_hop_line_delivers() -> None:
    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        await sim.wait_for(lambda: len(delivered_from(sim, 7)) >= 3, 20, "3 messages from 7")
        far = [r for r in sim.uart_up.values() if r.origin == 7]
        assert {hops_travelled(r.origin, r.hops, sim.root) for r in far} == {6}
        await drain(sim)
        assert sim.uart_dups == 0
        assert not sim.missing()

    scenario(line(7, loss=0.05), body, seed=11)


def test_grid_forms_a_tree_of_real_links() -> None:
    topo = grid(4, 2, loss=0.05)

    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        for n in sim.nodes.values():
            if n.root:
                continue
            assert n.parent in topo.neighbours(n.id), (n.id, n.parent)
            seen, cur = set(), n.id  # every path of parents ends at the root, without a loop
            while cur != sim.root:
                assert cur not in seen, f"parent loop through {cur}"
                seen.add(cur)
                parent = sim.nodes[cur].parent
                assert parent is not None
                cur = parent
        await sim.wait_for(
            lambda: all(delivered_from(sim, i) for i in sim.nodes if i != sim.root),
            20,
            "a message from every node",
        )

    scenario(topo, body, seed=12)


def test_parent_killed_children_reroute_and_deliver() -> None:
    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        await sim.wait_for(lambda: len(delivered_from(sim, 5)) >= 2, 20, "traffic from 5")
        old = sim.nodes[4].parent
        assert old in (2, 3)
        other = 5 - old
        before = {4: max(sim.nodes[4].gens), 5: max(sim.nodes[5].gens)}
        sim.kill(old)
        # What the dead relay had ACKed and not passed on died with it (its RAM queue);
        # everything else created by 4 and 5 must arrive.
        died = {(c.origin, c.seq) for c in data_copies(sim, 4, old)} - {
            (c.origin, c.seq) for c in data_copies(sim, old)
        }
        await sim.wait_for(lambda: sim.nodes[4].parent == other, 20, f"4 moved to {other}")
        await sim.wait_for(
            lambda: all(max(delivered_from(sim, i)) > before[i] for i in (4, 5)),
            20,
            "messages created after the kill delivered",
        )
        assert sim.nodes[4].reroutes, "a reroute log line from node 4"
        await sim.restart(old)
        sim.quiet(True)
        wanted = {k for k in sim.generated() if k[0] in (4, 5)} - died
        await sim.wait_for(lambda: wanted <= sim.received(), 20, "4 and 5 drained")
        assert len(died) <= 12  # at most a relay queue's worth
        assert sim.uart_dups == 0

    scenario(diamond(), body, seed=13)


def test_degraded_link_traffic_moves_off_it() -> None:
    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        await sim.wait_for(lambda: len(delivered_from(sim, 4)) >= 2, 20, "traffic from 4")
        bad = sim.nodes[4].parent
        assert bad in (2, 3)
        good = 5 - bad
        sim.medium.set_loss(4, bad, 0.8)
        await sim.wait_for(lambda: sim.nodes[4].parent == good, 30, "4 left the lossy link")
        n = len(delivered_from(sim, 4))
        await sim.wait_for(lambda: len(delivered_from(sim, 4)) >= n + 3, 20, "3 more from 4")
        last = data_copies(sim, 4)[-3:]
        assert [c.dst for c in last] == [good] * 3

    scenario(diamond(), body, seed=14)


def test_rebooted_node_rejoins_with_a_higher_frame_counter() -> None:
    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        node = sim.nodes[3]
        await sim.wait_for(lambda: len(delivered_from(sim, 3)) >= 2, 20, "traffic from 3")
        sim.kill(3)
        # created and not delivered yet: maybe queued in the killed node's RAM, lost with it
        in_ram = frozenset(k for k in sim.missing() if k[0] == 3)
        assert len(in_ram) <= 8
        high = max(ctr(c.frame) for c in sim.medium.capture if c.src == 3)
        t_restart = sim.medium.now_ms()
        replays_before = sim.nodes[2].counter("replay")
        gens_before = max(node.gens)
        await sim.restart(3)
        await sim.wait_for(lambda: node.booted == 2 and node.joined, 30, "3 rejoined")
        await sim.wait_for(
            lambda: any(s > gens_before for s in delivered_from(sim, 3)),
            20,
            "a message created after the reboot delivered",
        )
        after = [ctr(c.frame) for c in sim.medium.capture if c.src == 3 and c.t_ms > t_restart]
        assert after and min(after) > high
        assert sim.nodes[2].counter("replay") == replays_before
        await drain(sim, excused=in_ram)

    scenario(line(3), body, seed=15)


def test_forged_and_replayed_frames_are_dropped_and_counted() -> None:
    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        await sim.wait_for(lambda: len(data_copies(sim, 4, 3)) >= 2, 20, "DATA 4 -> 3")
        await sim.wait_for(lambda: len(data_copies(sim, 3, 2)) >= 1, 20, "DATA 3 -> 2")
        old = data_copies(sim, 4, 3)[0].frame  # older than the last frame 3 heard from 4
        forged = bytearray(data_copies(sim, 3, 2)[-1].frame)
        forged[-1] ^= 0x01  # one flipped bit in the MIC
        mic_before, replay_before = sim.nodes[2].counter("bad_mic"), sim.nodes[3].counter("replay")
        dups_before = sim.uart_dups
        assert sim.medium.inject(3, 2, bytes(forged))
        assert sim.medium.inject(4, 3, old)
        # counted in a `drop` line (rate limited) or in the next `stats` line (every 30 s)
        await sim.wait_for(
            lambda: (
                sim.nodes[2].counter("bad_mic") > mic_before
                and sim.nodes[3].counter("replay") > replay_before
            ),
            40,
            "bad_mic at node 2 and replay at node 3",
        )
        assert sim.uart_dups == dups_before

    scenario(line(4), body, seed=16, limit_s=90)


def test_partition_buffers_and_heal_delivers_everything() -> None:
    async def body(sim: Sim) -> None:
        await sim.wait_joined(timeout_s=30)
        await sim.wait_for(lambda: len(delivered_from(sim, 4)) >= 1, 20, "traffic from 4")
        sim.medium.partition({1, 2}, {3, 4})
        cut_at = {i: max(sim.nodes[i].gens) for i in (3, 4)}
        # 12 messages each while cut off: more than the mesh queue holds, so the flash ring
        # buffer takes the rest.
        await sim.wait_for(
            lambda: all(max(sim.nodes[i].gens) >= cut_at[i] + 12 for i in (3, 4)),
            25,
            "12 messages created by 3 and 4 during the partition",
        )
        sim.medium.heal()
        await drain(sim, timeout_s=30)
        assert sim.uart_dups == 0
        for i in (3, 4):
            assert set(range(min(sim.nodes[i].gens), max(sim.nodes[i].gens) + 1)) <= (
                delivered_from(sim, i)
            )

    scenario(line(4), body, seed=17, limit_s=90)
