"""The radio medium (tools/mesh/medium.py) with stub nodes: small CPython UDP clients speaking
the medium protocol, and a MicroPython process running the real SimRadio."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hil_tests.aio import eventually, run
from tools.mesh.medium import BROADCAST, Medium, MediumError, id_of, mac_of
from tools.mesh.sim import process_cpu_s
from tools.mesh.topology import Link, Topology, line

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "hil_tests" / "tools" / "mesh_stub" / "radio_node.py"
MICROPYTHON = Path(sys.executable).parent / "micropython"


def data_frame(origin: int, seq: int, typ: int = 1, size: int = 30) -> bytes:
    """Bytes with the v1 header layout (type, origin, seq are what the medium reads)."""
    head = struct.pack(">BBHHHHHI", 0x40 | typ << 2, 16, origin, origin, 1, seq, 0, 0)
    return head + bytes(size - len(head))


class _Rx(asyncio.DatagramProtocol):
    def __init__(self, q: asyncio.Queue[bytes]) -> None:
        self.q = q

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.q.put_nowait(data)


class StubNode:
    """A node's two sockets, in CPython: hello, send (waits for the A answer), recv."""

    def __init__(self, node_id: int, medium: Medium) -> None:
        self.id = node_id
        self.medium = medium
        self.rxq: asyncio.Queue[bytes] = asyncio.Queue()
        self.txq: asyncio.Queue[bytes] = asyncio.Queue()
        self.txid = 0

    async def start(self, hello: bool = True) -> StubNode:
        loop = asyncio.get_running_loop()
        self.rx, _ = await loop.create_datagram_endpoint(
            lambda: _Rx(self.rxq), local_addr=("127.0.0.1", 0)
        )
        self.tx, _ = await loop.create_datagram_endpoint(
            lambda: _Rx(self.txq), local_addr=("127.0.0.1", 0)
        )
        if hello:
            await self.hello()
        return self

    async def hello(self) -> None:
        self.rx.sendto(b"H" + mac_of(self.id), self.medium.address)
        assert await asyncio.wait_for(self.rxq.get(), 2) == b"h"

    async def send(self, dst: int, frame: bytes, timeout_s: float = 1.0) -> bool:
        self.txid = (self.txid + 1) & 0xFFFF
        tid = struct.pack(">H", self.txid)
        self.tx.sendto(b"S" + tid + mac_of(self.id) + mac_of(dst) + frame, self.medium.address)
        while True:
            a = await asyncio.wait_for(self.txq.get(), timeout_s)
            if a[1:3] == tid:
                return a[3] == 1

    async def recv(self, timeout_s: float = 1.0) -> tuple[int | None, bytes]:
        d = await asyncio.wait_for(self.rxq.get(), timeout_s)
        assert d[:1] == b"R"
        return id_of(d[1:7]), d[7:]

    async def nothing(self, wait_s: float = 0.15) -> bool:
        try:
            await asyncio.wait_for(self.rxq.get(), wait_s)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def star() -> Topology:
    """1 in the middle of 2, 3, 4; 5 linked only to 4."""
    links = {frozenset((1, n)): Link(0.0, 0.0) for n in (2, 3, 4)}
    links[frozenset((4, 5))] = Link(0.0, 0.0)
    return Topology({n: (0.0, 0.0) for n in range(1, 6)}, links)


def check_accounting(st: dict[str, Any]) -> None:
    assert st["sent"] == st["delivered"] + st["lost"]
    assert sum(st["lost_by_reason"].values()) == st["lost"]
    assert st["transmissions"] == st["unicast"] + st["broadcast"] + st["injected"]
    assert sum(st["frames_by_type"].values()) == st["transmissions"]
    assert sum(c["tx"] for c in st["nodes"].values()) == st["transmissions"]
    assert sum(c["tx_bytes"] for c in st["nodes"].values()) == sum(st["bytes_by_type"].values())
    assert sum(c["rx"] for c in st["nodes"].values()) == st["delivered"]
    assert st["ack_ok"] + st["ack_fail"] == st["unicast"] + st["broadcast"]


# ---------------------------------------------------------------------------------------


def test_mac_mapping() -> None:
    assert mac_of(5) == bytes.fromhex("020000000005")
    assert id_of(mac_of(0x1234)) == 0x1234
    assert mac_of(BROADCAST) == b"\xff" * 6 and id_of(b"\xff" * 6) == BROADCAST
    assert id_of(bytes.fromhex("240ac4000001")) is None  # not a simulated MAC
    assert id_of(bytes.fromhex("020000000000")) is None  # id 0 does not exist


def test_registration_unicast_ack_and_accounting() -> None:
    async def main() -> None:
        async with Medium(line(3), seed=1) as medium:
            seen: list[int] = []
            medium.on_register = seen.append
            a, b = await StubNode(1, medium).start(), await StubNode(2, medium).start()
            assert medium.registered() == {1, 2} and seen == [1, 2]
            f = data_frame(2, 7)
            assert await b.send(1, f) is True
            assert await a.recv() == (2, f)
            st = medium.stats()
            assert st["delivered"] == 1 and st["ack_ok"] == 1
            assert st["frames_by_type"] == {"DATA": 1} and st["bytes_by_type"] == {"DATA": 30}
            assert st["nodes"][2]["tx"] == 1 and st["nodes"][1]["rx"] == 1
            cap = medium.capture[-1]
            assert (cap.src, cap.dst, cap.typ, cap.origin, cap.seq, cap.delivered) == (
                2, 1, 1, 2, 7, True,
            )  # fmt: skip
            check_accounting(st)
            a.close()
            b.close()

    run(main())


def test_unregistered_and_dead_destinations_lose_the_frame_and_the_ack() -> None:
    async def main() -> None:
        async with Medium(line(3), seed=1) as medium:
            a = await StubNode(1, medium).start()
            b = await StubNode(2, medium).start(hello=False)  # never said hello
            assert await a.send(2, data_frame(1, 1)) is False
            assert medium.stats()["lost_by_reason"]["unregistered"] == 1
            await b.hello()
            assert await a.send(2, data_frame(1, 2)) is True
            assert (await b.recv())[0] == 1
            medium.kill(2)  # its process died
            assert await a.send(2, data_frame(1, 3)) is False
            assert await b.nothing()
            st = medium.stats()
            assert st["lost_by_reason"]["dead"] == 1 and st["nodes"][2]["lost"] == 2
            await b.hello()  # restarted: hello again
            assert await a.send(2, data_frame(1, 4)) is True
            check_accounting(medium.stats())
            a.close()
            b.close()

    run(main())


def test_loss_statistics_match_the_link_loss() -> None:
    # 1500 unicasts over a link with loss 0.3: frames arrive with p 0.7 and the ACK of an
    # arrived frame is lost with p 0.3 again, independently (seeded: reproducible).
    async def main() -> None:
        topo = Topology({1: (0.0, 0.0), 2: (1.0, 0.0)}, {frozenset((1, 2)): Link(0.3, 0.0)})
        async with Medium(topo, seed=42) as medium:
            a, b = await StubNode(1, medium).start(), await StubNode(2, medium).start()
            n = 1500
            acked = sum([await a.send(2, data_frame(1, i)) for i in range(n)])
            st = medium.stats()
            delivered = st["delivered"]
            assert abs(delivered / n - 0.7) < 0.04, delivered
            assert abs(st["ack_lost"] / delivered - 0.3) < 0.05, st["ack_lost"]
            assert abs(acked / n - 0.49) < 0.04, acked
            assert acked == st["ack_ok"] == delivered - st["ack_lost"]
            assert st["lost_by_reason"]["link_loss"] == n - delivered
            await eventually(lambda: b.rxq.qsize() == delivered)
            check_accounting(st)
            a.close()
            b.close()

    run(main())


def test_broadcast_reaches_live_neighbours_only() -> None:
    async def main() -> None:
        async with Medium(star(), seed=1) as medium:
            nodes = {n: await StubNode(n, medium).start() for n in range(1, 6)}
            medium.cut(1, 3)
            beacon = data_frame(1, 0, typ=0, size=24)
            assert await nodes[1].send(BROADCAST, beacon) is True
            assert await nodes[2].recv() == (1, beacon)
            assert await nodes[4].recv() == (1, beacon)
            assert await nodes[3].nothing() and await nodes[5].nothing()
            st = medium.stats()
            assert st["broadcast"] == 1 and st["delivered"] == 2 and st["sent"] == 2
            assert st["bytes_by_type"] == {"BEACON": 24}
            assert [c.broadcast for c in medium.capture] == [True, True]
            check_accounting(st)
            for n in nodes.values():
                n.close()

    run(main())


def test_latency_delays_delivery_and_ack() -> None:
    async def main() -> None:
        topo = Topology({1: (0.0, 0.0), 2: (1.0, 0.0)}, {frozenset((1, 2)): Link(0.0, 40.0)})
        async with Medium(topo) as medium:
            a, b = await StubNode(1, medium).start(), await StubNode(2, medium).start()
            t0 = time.monotonic()
            assert await a.send(2, data_frame(1, 1)) is True
            ack_s = time.monotonic() - t0
            await b.recv()
            rx_s = time.monotonic() - t0
            assert 0.038 <= ack_s < 0.5 and 0.038 <= rx_s < 0.5
            a.close()
            b.close()

    run(main())


def test_cut_restore_partition_isolate_heal() -> None:
    async def main() -> None:
        async with Medium(line(4), seed=1) as medium:
            n = {i: await StubNode(i, medium).start() for i in range(1, 5)}
            f = data_frame(2, 1)
            medium.cut(2, 3)
            assert await n[2].send(3, f) is False
            assert await n[3].send(2, f) is False  # a cut is both ways
            assert await n[2].send(1, f) is True
            medium.heal()  # heal() is for partitions: the cut stays
            assert await n[2].send(3, f) is False
            medium.restore(2, 3)
            assert await n[2].send(3, f) is True

            medium.partition({1, 2}, {3, 4})
            assert await n[2].send(3, f) is False
            assert await n[3].send(4, f) is True and await n[1].send(2, f) is True
            medium.heal()
            assert await n[2].send(3, f) is True

            medium.isolate(3)
            assert await n[2].send(3, f) is False and await n[4].send(3, f) is False
            assert await n[1].send(2, f) is True
            medium.heal()
            assert await n[4].send(3, f) is True
            st = medium.stats()
            assert st["lost_by_reason"]["no_link"] == 6
            check_accounting(st)
            for x in n.values():
                x.close()

    run(main())


def test_set_loss_both_ways_one_way_and_all_links() -> None:
    async def main() -> None:
        async with Medium(line(3), seed=1) as medium:
            n = {i: await StubNode(i, medium).start() for i in range(1, 4)}
            f = data_frame(1, 1)
            medium.set_loss(1, 2, 1.0, one_way=True)  # 1 -> 2 always lost, 2 -> 1 clean
            assert await n[1].send(2, f) is False
            assert await n[2].nothing()
            # 2 -> 1 arrives, but its ACK travels 1 -> 2 and is lost.
            assert await n[2].send(1, f) is False
            assert (await n[1].recv())[0] == 2
            st = medium.stats()
            assert st["ack_lost"] == 1 and st["lost_by_reason"]["link_loss"] == 1
            medium.set_loss(1, 2, 0.0)
            assert await n[1].send(2, f) is True and await n[2].send(1, f) is True
            medium.set_loss(2, None, 1.0)  # every link of node 2
            assert await n[1].send(2, f) is False and await n[3].send(2, f) is False
            assert medium.loss(2, 1) == 1.0 and medium.loss(3, 2) == 1.0
            check_accounting(medium.stats())
            for x in n.values():
                x.close()

    run(main())


def test_fault_api_rejects_bad_arguments() -> None:
    async def main() -> None:
        async with Medium(line(3)) as medium:
            with pytest.raises(MediumError, match="no link between 1 and 3"):
                medium.cut(1, 3)
            with pytest.raises(MediumError, match="no node 9"):
                medium.isolate(9)
            with pytest.raises(MediumError, match=r"loss must be in 0\.\.1"):
                medium.set_loss(1, 2, 1.5)
            with pytest.raises(MediumError, match="on both sides"):
                medium.partition({1, 2}, {2, 3})
            with pytest.raises(MediumError, match=r"1\.\.250 bytes"):
                medium.inject(1, 2, b"")
            with pytest.raises(MediumError, match="no node 7"):
                medium.inject(7, 2, b"x")
            # nothing was changed by the refused calls
            assert all(medium.link_up(a, b) for a, b in ((1, 2), (2, 3)))
            assert medium.stats()["transmissions"] == 0

    run(main())


def test_inject_delivers_as_if_from_src_without_a_link() -> None:
    async def main() -> None:
        async with Medium(line(3)) as medium:
            n1, n3 = await StubNode(1, medium).start(), await StubNode(3, medium).start()
            forged = data_frame(1, 99)
            assert medium.inject(1, 3, forged) is True  # 1 and 3 are not linked
            assert await n3.recv() == (1, forged)
            assert medium.inject(1, 2, forged) is False  # 2 never registered
            st = medium.stats()
            assert st["injected"] == 2 and st["lost_by_reason"]["unregistered"] == 1
            assert [c.injected for c in medium.capture] == [True, True]
            check_accounting(st)
            n1.close()
            n3.close()

    run(main())


def test_capture_is_bounded_and_replayable() -> None:
    async def main() -> None:
        async with Medium(line(2), capture=5) as medium:
            a, b = await StubNode(1, medium).start(), await StubNode(2, medium).start()
            for i in range(8):
                assert await a.send(2, data_frame(1, i))
            assert [c.seq for c in medium.capture] == [3, 4, 5, 6, 7]
            for _ in range(8):
                await b.recv()
            medium.inject(1, 2, medium.capture[-1].frame)  # a replay, byte for byte
            assert await b.recv() == (1, data_frame(1, 7))
            entry = medium.capture[-1].to_json()
            assert entry["type"] == "DATA" and entry["frame"] == data_frame(1, 7).hex()
            json.dumps(entry)
            a.close()
            b.close()

    run(main())


def test_hop_latency_is_measured_per_relay() -> None:
    async def main() -> None:
        topo = line(3, latency_ms=5.0)
        async with Medium(topo) as medium:
            n = {i: await StubNode(i, medium).start() for i in range(1, 4)}
            assert await n[3].send(2, data_frame(3, 1))
            await n[2].recv()
            await asyncio.sleep(0.05)  # the relay's processing time being measured
            assert await n[2].send(1, data_frame(3, 1))
            assert await n[3].send(2, data_frame(3, 2))  # not relayed: no sample
            samples = medium.hop_latency_samples()
            assert len(samples) == 1 and 50.0 <= samples[0] < 150.0, samples
            assert medium.stats()["hop_latency_ms"]["n"] == 1
            for x in n.values():
                x.close()

    run(main())


def test_bad_datagrams_are_counted_and_answered() -> None:
    async def main() -> None:
        async with Medium(line(2)) as medium:
            a = await StubNode(1, medium).start()
            a.rx.sendto(b"garbage", medium.address)
            a.rx.sendto(b"H" + bytes.fromhex("240ac4000001"), medium.address)  # not a sim MAC
            bad_s = b"S\x00\x09" + bytes.fromhex("240ac4000001") + mac_of(2) + b"x"
            a.tx.sendto(bad_s, medium.address)
            assert await asyncio.wait_for(a.txq.get(), 1) == b"A\x00\x09\x00"
            await eventually(lambda: medium.stats()["bad_datagrams"] == 3)
            assert medium.stats()["transmissions"] == 0
            a.close()

    run(main())


def test_control_commands() -> None:
    async def main() -> None:
        async with Medium(line(3)) as medium:
            assert medium.control({"op": "cut", "a": 1, "b": 2}) == {"ok": True}
            assert not medium.link_up(1, 2)
            assert medium.control({"op": "restore", "a": 1, "b": 2})["ok"]
            assert medium.control({"op": "set_loss", "a": 2, "b": None, "p": 0.5})["ok"]
            assert medium.loss(3, 2) == 0.5
            assert medium.control({"op": "partition", "a": [1], "b": [2, 3]})["ok"]
            assert not medium.link_up(1, 2)
            assert medium.control({"op": "heal"})["ok"] and medium.link_up(1, 2)
            assert medium.control({"op": "isolate", "node": 3})["ok"]
            r = medium.control({"op": "inject", "src": 1, "dst": 2, "frame": "4400"})
            assert r == {"ok": True, "delivered": False}
            assert medium.control({"op": "capture", "n": 1})["capture"][0]["frame"] == "4400"
            assert medium.control({"op": "stats"})["stats"]["injected"] == 1
            assert medium.control({"op": "kill", "node": 2})["ok"]
            assert medium.control({"op": "fly"}) == {"ok": False, "error": "unknown op 'fly'"}
            assert medium.control({"op": "cut", "a": 1})["error"] == "missing 'b'"
            assert medium.control([1])["ok"] is False
            assert "no link" in medium.control({"op": "cut", "a": 1, "b": 3})["error"]

    run(main())


# --- the real SimRadio on MicroPython against the real medium ------------------------------


async def _mp_node(tmp: Path, node_id: int, port: int, steps: list[dict[str, Any]]) -> Any:
    spec = tmp / f"steps{node_id}.json"
    spec.write_text(json.dumps({"id": node_id, "medium": ["127.0.0.1", port], "steps": steps}))
    env = {**os.environ, "MICROPYPATH": f".frozen:{ROOT / 'firmware'}"}
    return await asyncio.create_subprocess_exec(
        str(MICROPYTHON),
        "-X",
        "heapsize=100k",
        str(STUB),
        str(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def _line(proc: Any, timeout_s: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    if not raw:
        err = await proc.stderr.read()
        raise AssertionError(f"the MicroPython node ended: {err.decode()}")
    obj: dict[str, Any] = json.loads(raw)
    return obj


def test_simradio_on_micropython_against_the_medium(tmp_path: Path) -> None:
    async def main() -> None:
        async with Medium(line(2), seed=1) as medium:
            peer = await StubNode(1, medium).start()
            proc = await _mp_node(
                tmp_path,
                2,
                medium.port,
                [
                    {"op": "registered", "timeout_ms": 3000},
                    {"op": "send", "to": 1, "msg": "a1b2", "n": 3},
                    {"op": "recv", "n": 2, "timeout_ms": 3000},
                    {"op": "bcast", "msg": "beac"},
                    {"op": "send", "to": 9, "msg": "00"},  # no such link: fails fast
                    {"op": "idle", "ms": 1500},
                    {"op": "sleep", "ms": 300},
                    {"op": "stats"},
                ],
            )
            try:
                assert (await _line(proc))["ok"] is True
                sent = await _line(proc)
                assert sent["results"] == [True, True, True]
                for _ in range(3):
                    assert await peer.recv() == (2, bytes.fromhex("a1b2"))
                assert await peer.send(2, b"one") and await peer.send(2, b"two")
                got = await _line(proc)
                assert got["frames"] == [[1, b"one".hex()], [1, b"two".hex()]]
                assert (await _line(proc))["result"] is True
                assert await peer.recv() == (2, bytes.fromhex("beac"))
                fail = await _line(proc)
                assert fail["results"] == [False] and fail["ms"][0] < 80
                assert (await _line(proc))["op"] == "idle"
                # 1.5 s in recv() with nothing arriving: it waited in poll, it did not spin.
                cpu_s = process_cpu_s(proc.pid)
                assert cpu_s is not None and cpu_s < 0.5, cpu_s
                assert (await _line(proc))["op"] == "sleep"
                stats = (await _line(proc))["stats"]
                assert stats["tx"] == 5 and stats["tx_fail"] == 1 and stats["rx"] == 2
                assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            st = medium.stats()
            assert st["lost_by_reason"]["no_link"] == 1 and st["broadcast"] == 1
            peer.close()

    run(main(), timeout_s=30)


def test_simradio_ack_loss_and_medium_gone(tmp_path: Path) -> None:
    async def main() -> None:
        async with Medium(line(2), seed=1) as medium:
            peer = await StubNode(1, medium).start()
            medium.set_loss(1, 2, 1.0, one_way=True)  # the ACKs (1 -> 2) never arrive
            proc = await _mp_node(
                tmp_path,
                2,
                medium.port,
                [
                    {"op": "registered", "timeout_ms": 3000},
                    {"op": "send", "to": 1, "msg": "cc", "n": 2},
                    {"op": "sleep", "ms": 1000},
                    {"op": "send", "to": 1, "msg": "dd", "n": 2},
                ],
            )
            try:
                assert (await _line(proc))["ok"] is True
                assert (await _line(proc))["results"] == [False, False]
                assert (await peer.recv())[1] == b"\xcc"  # delivered, only the ACK was lost
                assert (await _line(proc))["op"] == "sleep"
            except BaseException:
                proc.kill()
                raise
        # The medium is gone: each send times out after 100 ms and returns False.
        try:
            last = await _line(proc)
            assert last["results"] == [False, False]
            assert all(95 <= ms < 400 for ms in last["ms"]), last["ms"]
            assert await asyncio.wait_for(proc.wait(), 5) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        peer.close()

    run(main(), timeout_s=30)
