"""The `mesh` adapter and its serial link against a root node played on the master side of a
real pty (hil_tests/retrofit_adapters/fake_root.py): readings from HELLO, UP and STATUS,
resynchronization after garbage, malformed payloads, duplicates, writes and their DOWNACKs, the
port vanishing under a supervisor, the config's errors, and a whole gateway on the pty."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from pydantic import ValidationError

from gateway.config import parse_config
from gateway.config.fragments import DeviceBase
from gateway.errors import ConfigError, DeviceError, DeviceTimeout
from gateway.model import Health, Sample
from gateway.runtime import Gateway
from gateway.supervisor import DeviceService
from hil_tests.aio import eventually, run
from hil_tests.gateway.gateway_runner import running
from hil_tests.gateway.http_client import fetch
from hil_tests.retrofit_adapters.fake_root import FakeRoot, cbor
from models.parity import find_micropython
from retrofit_adapters.base import Reading
from retrofit_adapters.mesh import uart
from retrofit_adapters.mesh.adapter import MeshAdapter
from retrofit_adapters.mesh.config import MeshDevice, MeshWriteTag
from retrofit_adapters.mesh.link import MeshLink
from retrofit_adapters.registry import adapter_class

SUMMARY = {
    "k": "sum",
    "u": 120,
    "n": 10,
    "ch": {"temp": [20.5, 22.0, 21.25], "vib": [0, 2, 1]},
    "score": 0.25,
    "alarm": False,
}
COMMANDS = [
    {"key": "summary_s", "type": "integer", "min": 1, "max": 3600},
    {"key": "sample_hz", "min": 0.1, "max": 50.0},
]


def device(port: str, **kw: Any) -> MeshDevice:
    return MeshDevice.model_validate({"id": "mesh", "type": "mesh", "port": port, **kw})


class Wall:
    """A wall clock the test moves by hand."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def values(readings: list[Reading]) -> dict[str, object]:
    return {r.tag: r.value for r in readings if not r.tag.startswith("mesh.gw.")}


async def opened(root: FakeRoot, **kw: Any) -> MeshAdapter:
    adapter = MeshAdapter(device(root.path, **kw), wall=Wall())
    await adapter.open()
    return adapter


def new_adapter(
    root: FakeRoot, *, wall: Callable[[], float] | None = None, **kw: Any
) -> MeshAdapter:
    return MeshAdapter(device(root.path, **kw), wall=wall or Wall())


# --- readings --------------------------------------------------------------------------------


def test_hello_up_and_status_become_readings_stamped_at_receipt() -> None:
    async def go() -> None:
        root = FakeRoot()
        wall = Wall()
        adapter = new_adapter(root, wall=wall)
        try:
            await adapter.open()
            assert await adapter.read() == [
                Reading("mesh.gw.duplicates", 0),
                Reading("mesh.gw.malformed", 0),
                Reading("mesh.gw.bad_frames", 0),
            ]
            root.hello(root=1)
            await eventually(lambda: adapter.counters["hellos"] == 1)
            wall.t += 10
            root.up(5, 1, SUMMARY, hops=13)
            await eventually(lambda: adapter.counters["up"] == 1)
            wall.t += 10
            root.up(6, 1, {"k": "evt", "u": 50, "score": 0.9, "thr": 0.5, "ch": {"temp": 80.5}})
            root.up(7, 1, {"k": "st", "u": 7, "parent": 5, "rank": 384, "heap": 30000, "buf": 2})
            root.up(7, 2, {"k": "pong", "tok": 42})
            root.status({5: [1, 256, 3], 6: [5, 512, 0]}, root=1, rx=10, dup=2)
            await eventually(lambda: adapter.counters["statuses"] == 1)
            readings = await adapter.read()
        finally:
            await adapter.close()
            root.close()
        got = values(readings)
        assert got == {
            "mesh.root_id": 1,
            "n5.samples": 10,
            "n5.temp.min": 20.5,
            "n5.temp.max": 22.0,
            "n5.temp.mean": 21.25,
            "n5.vib.min": 0,
            "n5.vib.max": 2,
            "n5.vib.mean": 1,
            "n5.score": 0.25,
            "n5.alarm": False,
            "n5.uptime_s": 120,
            "n5.hops": 3,
            "n6.temp": 80.5,
            "n6.score": 0.9,
            "n6.alarm": True,
            "n6.uptime_s": 50,
            "n6.hops": 2,
            "n7.parent": 5,
            "n7.rank": 384,
            "n7.heap": 30000,
            "n7.buf": 2,
            "n7.uptime_s": 7,
            "n7.hops": 2,
            "n7.pong": 42,
            "mesh.nodes": 2,
            "n5.parent": 1,
            "n5.rank": 256,
            "n5.last_seen_s": 3,
            "n6.parent": 5,
            "n6.rank": 512,
            "n6.last_seen_s": 0,
            "mesh.root.rx": 10,
            "mesh.root.dup": 2,
        }
        # Each reading carries the wall time its frame arrived at; the node's uptime is not one.
        stamps = {r.tag: r.ts for r in readings}
        assert readings[0] == Reading("mesh.root_id", 1, ts=1_700_000_000.0)
        assert stamps["n5.temp.mean"] == 1_700_000_010.0
        assert stamps["n6.alarm"] == stamps["mesh.nodes"] == 1_700_000_020.0
        assert all(isinstance(r.value, bool | int | float) for r in readings)

    run(go())


def test_read_drains_and_an_event_below_threshold_clears_the_alarm() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            await adapter.read()
            assert await adapter.read() == []  # nothing new: nothing, not even counters
            root.up(6, 1, {"k": "evt", "u": 1, "score": 0.9, "thr": 0.5, "ch": {}})
            root.up(6, 2, {"k": "evt", "u": 2, "score": 0.1, "thr": 0.5, "ch": {}})
            root.up(6, 3, {"k": "evt", "u": 3, "score": 0.1, "alarm": True})
            await eventually(lambda: adapter.counters["up"] == 3)
            alarms = [r.value for r in await adapter.read() if r.tag == "n6.alarm"]
            assert alarms == [True, False, True]
            assert await adapter.read() == []
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_nodes_filter_ignores_other_nodes() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root, nodes=[5])
        try:
            root.up(9, 1, SUMMARY)
            root.up(5, 1, SUMMARY)
            root.status({5: [1, 256, 3], 9: [5, 512, 0]})
            await eventually(lambda: adapter.counters["statuses"] == 1)
            got = values(await adapter.read())
        finally:
            await adapter.close()
            root.close()
        assert adapter.counters["ignored"] == 1
        assert not any(t.startswith("n9.") for t in got)
        assert got["n5.temp.mean"] == 21.25 and got["n5.rank"] == 256
        assert got["mesh.nodes"] == 2  # the root's count, whatever the filter

    run(go())


def test_a_status_split_in_parts_counts_nodes_once_all_parts_are_in() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            await adapter.read()

            def part(i: int, n: int, nodes: dict[int, list[int]]) -> None:
                root.send(uart.T_STATUS, cbor({"id": 1, "nodes": nodes, "part": [i, n]}))

            part(0, 2, {5: [1, 256, 0], 6: [1, 256, 1]})
            part(1, 2, {7: [5, 512, 2]})
            part(0, 3, {5: [1, 256, 0]})
            part(2, 3, {7: [5, 512, 2]})  # part 1 of 3 was lost: no count this time
            root.send(uart.T_STATUS, cbor({"id": 1, "nodes": {}, "part": [2, 1]}))
            await eventually(lambda: adapter.counters["statuses"] == 5)
            readings = await adapter.read()
        finally:
            await adapter.close()
            root.close()
        assert [r.value for r in readings if r.tag == "mesh.nodes"] == [3]
        assert [r.value for r in readings if r.tag == "n7.rank"] == [512, 512]
        assert adapter.counters["malformed"] == 1

    run(go())


# --- bad bytes -------------------------------------------------------------------------------


def test_garbage_between_and_inside_frames_resyncs_and_counts() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            await adapter.read()
            good = uart.encode(uart.T_UP, uart.up_body(5, 1, 14, cbor(SUMMARY)))
            root.write(b"ets Jun  8 2016 00:22:57\r\nrst:0x1\x00")  # boot noise, then a 0x00
            root.write(good)
            inside = bytearray(uart.encode(uart.T_UP, uart.up_body(5, 2, 14, cbor(SUMMARY))))
            inside[20:20] = b"\x13\x37"  # two bytes of line noise inside a frame
            root.write(bytes(inside))
            root.write(good[:9])  # a frame cut short by a root reset...
            root.write(b"\x00")  # ...ended by the root's next delimiter
            root.up(5, 3, SUMMARY)
            await eventually(lambda: adapter.counters["up"] == 2)
            readings = await adapter.read()
        finally:
            await adapter.close()
            root.close()
        stats = adapter.stats
        assert stats["frames"] == 2
        assert stats["bad_cobs"] + stats["bad_crc"] == 3
        assert [r.value for r in readings if r.tag == "n5.samples"] == [10, 10]
        assert Reading("mesh.gw.bad_frames", 3) in readings

    run(go())


def test_bad_crc_frame_is_dropped_and_counted_and_the_next_one_delivered() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            frame = bytearray(uart.encode(uart.T_UP, uart.up_body(5, 1, 14, cbor(SUMMARY))))
            i = next(k for k in range(12, len(frame)) if frame[k] not in (0, 1, 0x40))
            frame[i] ^= 0x40  # a data byte, so the COBS stays valid and the CRC does not
            root.write(bytes(frame))
            root.up(5, 2, {"k": "st", "parent": 1})
            await eventually(lambda: adapter.counters["up"] == 1)
            got = values(await adapter.read())
        finally:
            await adapter.close()
            root.close()
        assert adapter.stats["bad_crc"] == 1
        assert got == {"n5.parent": 1, "n5.hops": 2}

    run(go())


def test_malformed_payloads_are_counted_logged_once_per_node_and_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            root.up(5, 1, b"\xa1\x61")  # truncated CBOR
            root.up(5, 2, b"\xff\xff")  # not CBOR at all
            root.up(5, 3, cbor([1, 2, 3]))  # CBOR, but not a map
            root.up(6, 1, {"k": "sum", "ch": {"temp": [1, 2]}})  # a channel without its mean
            root.up(6, 2, {"k": "st", "parent": "one"})
            root.up(6, 3, {"k": "sum", "ch": {"bad name!": [1, 2, 3]}})
            root.up(6, 4, {"k": "mystery"})
            root.up(6, 5, {"no": "kind"})
            root.up(6, 6, cbor({"k": "st"}) + b"\x00")  # trailing bytes
            root.send(uart.T_UP, b"\x00\x05")  # an UP too short for its header
            root.up(0xFFFF, 1, {"k": "st"})  # from no node
            root.send(uart.T_STATUS, cbor({"nodes": [1, 2]}))
            root.send(uart.T_HELLO, cbor({"v": 1}))
            root.send(uart.T_DOWN, b"\x00\x05\x00\x01")  # the root never sends DOWN
            root.up(5, 4, {"k": "sum", "u": 1, "ch": {"temp": [1.0, float("nan"), 2.0]}})
            root.up(5, 5, {"k": "st", "parent": 1})  # good again
            await eventually(lambda: adapter.counters["up"] == 2)
            got = values(await adapter.read())
        finally:
            await adapter.close()
            root.close()
        assert adapter.counters["malformed"] == 13
        assert adapter.counters["unknown_types"] == 1
        assert adapter.counters["bad_values"] == 1  # the NaN, skipped; its message kept
        assert got == {
            "n5.temp.min": 1.0,
            "n5.temp.mean": 2.0,
            "n5.uptime_s": 1,
            "n5.hops": 2,
            "n5.parent": 1,
        }
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # once per node (5, 6, and the root's own frames as node 0), once per unknown type
        assert len([w for w in warnings if "further ones are logged at DEBUG" in w]) == 4
        assert any("node 5 seq 1: bad CBOR" in w for w in warnings)
        assert any("node 6 seq 1: ch.temp is not [min, max, mean]" in w for w in warnings)
        assert any("frame type 2 from the root" in w for w in warnings)

    with caplog.at_level(logging.DEBUG, logger="fogmesh.mesh"):
        run(go())


def test_duplicates_are_dropped_even_across_a_root_restart() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            root.hello()
            root.up(5, 1, SUMMARY)
            root.up(5, 1, SUMMARY)  # the same frame again: a retransmission
            root.up(5, 2, SUMMARY)
            await eventually(lambda: adapter.counters["up"] == 2)
            first = await adapter.read()
            # The root restarts (its own duplicate filter is empty) while the gateway keeps
            # running; the node retransmits seq 2 whose ACK was lost.
            await adapter.close()
            await adapter.open()
            root.hello()
            root.up(5, 2, SUMMARY)
            # A node that rebooted and restarted its seqs sends seq 1 with another payload.
            root.up(5, 1, {**SUMMARY, "u": 3})
            await eventually(lambda: adapter.counters["up"] == 3)
            second = await adapter.read()
        finally:
            await adapter.close()
            root.close()
        assert [r.value for r in first if r.tag == "n5.uptime_s"] == [120, 120]
        assert [r.value for r in second if r.tag == "n5.uptime_s"] == [3]
        assert adapter.counters["duplicates"] == 2
        assert adapter.counters["seq_resets"] == 1
        assert Reading("mesh.gw.duplicates", 2) in second

    run(go())


# --- writes and commands ---------------------------------------------------------------------


def test_write_sends_down_with_a_token_and_returns_on_its_downack() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root, nodes=[5, 6], commands=COMMANDS)
        try:
            task = asyncio.create_task(adapter.write("n5.summary_s", 30.0))
            _, body = await root.next_frame(uart.T_DOWN)
            dest, token, payload = uart.parse_down(body)
            assert dest == 5
            assert cbor2.loads(payload) == {"c": "cfg", "set": {"summary_s": 30}}
            assert isinstance(cbor2.loads(payload)["set"]["summary_s"], int)
            await asyncio.sleep(0.05)
            assert not task.done()  # it waits for the DOWNACK
            root.send(uart.T_DOWNACK, uart.downack_body(token ^ 0x5555, 0))  # not ours
            await eventually(lambda: adapter.counters["stray_acks"] == 1)
            assert not task.done()
            root.send(uart.T_DOWNACK, uart.downack_body(token, 0))
            await asyncio.wait_for(task, 2.0)
            # the next command gets the next token
            root.ack = lambda dest, tok, payload: 0
            assert await adapter.command(6, {"c": "ping", "tok": 7}) == 0
            _, body = await root.next_frame(uart.T_DOWN)
            assert uart.parse_down(body)[1] == (token + 1) & 0xFFFF
            assert cbor2.loads(uart.parse_down(body)[2]) == {"c": "ping", "tok": 7}
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_downack_no_route_is_a_clear_error() -> None:
    async def go() -> None:
        root = FakeRoot(ack=lambda dest, tok, payload: uart.ACK_NO_ROUTE)
        adapter = await opened(root, nodes=[5], commands=COMMANDS)
        try:
            with pytest.raises(DeviceError, match=r"'no route' \(DOWNACK status 1\): node 5"):
                await adapter.write("n5.sample_hz", 2.5)
            assert await adapter.command(5, {"c": "ping", "tok": 1}) == uart.ACK_NO_ROUTE
            root.ack = lambda dest, tok, payload: uart.ACK_TOO_LONG
            with pytest.raises(DeviceError, match="'too long'"):
                await adapter.write("n5.sample_hz", 2.5)
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_downack_timeout() -> None:
    async def go() -> None:
        root = FakeRoot()  # never answers
        adapter = await opened(root, nodes=[5], commands=COMMANDS, timeout_ms=300)
        try:
            started = time.monotonic()
            with pytest.raises(DeviceTimeout, match=r"no DOWNACK .* node 5 .* within 270 ms"):
                await adapter.write("n5.sample_hz", 1.0)
            assert 0.25 < time.monotonic() - started < 2.0
            await root.next_frame(uart.T_DOWN)  # it was sent
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_a_root_restart_fails_the_commands_it_had_not_acknowledged() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root, timeout_ms=5000)
        try:
            task = asyncio.create_task(adapter.command(5, {"c": "ping", "tok": 1}))
            await root.next_frame(uart.T_DOWN)
            root.hello()
            with pytest.raises(DeviceError, match="root restarted before it acknowledged"):
                await asyncio.wait_for(task, 2.0)
        finally:
            await adapter.close()
            root.close()

    run(go())


@pytest.mark.parametrize(
    ("tag", "value", "message"),
    [
        ("n5.model", 1.0, r"'model' is not a command \(summary_s, sample_hz\)"),
        ("n7.sample_hz", 1.0, "node 7 is not in `nodes`"),
        ("mesh.nodes", 1, "write tags are n<node id>.<cfg key>"),
        ("temp", 1, "write tags are n<node id>.<cfg key>"),
        ("n5.sample_hz", 99.0, r"99.0 is out of range 0.1..50"),
        ("n5.sample_hz", "fast", "takes a finite number"),
        ("n5.sample_hz", True, "takes a finite number"),
        ("n5.sample_hz", math.inf, "takes a finite number"),
        ("n5.summary_s", 2.5, "takes an integer"),
        ("n5.summary_s", 0, r"out of range 1..3600"),
    ],
)
def test_refused_writes_send_nothing(tag: str, value: Any, message: str) -> None:
    async def go() -> None:
        root = FakeRoot(ack=lambda dest, tok, payload: 0)
        adapter = await opened(root, nodes=[5, 6], commands=COMMANDS)
        try:
            with pytest.raises(DeviceError, match=message):
                await adapter.write(tag, value)
            await asyncio.sleep(0.05)
        finally:
            await adapter.close()
            root.close()
        assert [t for t, _ in root.received if t == uart.T_DOWN] == []

    run(go())


def test_commands_that_cannot_be_sent() -> None:
    async def go() -> None:
        root = FakeRoot(ack=lambda dest, tok, payload: 0)
        adapter = new_adapter(root)
        with pytest.raises(DeviceError, match="is not open"):
            await adapter.command(5, {"c": "ping"})
        await adapter.open()
        try:
            with pytest.raises(DeviceError, match=r"node id 65535 is not 1\.\.65534"):
                await adapter.command(0xFFFF, {"c": "ping"})
            with pytest.raises(DeviceError, match="a DOWN frame carries at most 503 B"):
                await adapter.command(5, {"c": "mdl", "data": bytes(600)})
            with pytest.raises(DeviceError, match="cannot be encoded as CBOR"):
                await adapter.command(5, {"c": object()})
            assert (
                await adapter.command(5, {"c": "mdl", "off": 0, "total": 100, "data": bytes(100)})
                == 0
            )
        finally:
            await adapter.close()
            root.close()

    run(go())


# --- the port, open and close ----------------------------------------------------------------


def test_open_failures_close_and_reopen() -> None:
    async def go() -> None:
        missing = MeshAdapter(device("/dev/fogmesh-no-such-port"))
        with pytest.raises(DeviceError, match="cannot open /dev/fogmesh-no-such-port"):
            await missing.open()
        await missing.close()  # after a failed open
        await missing.close()
        with pytest.raises(DeviceError, match="is not open"):
            await missing.read()
        root = FakeRoot()
        adapter = await opened(root)
        try:
            # the port is ours alone
            other = MeshLink(root.path)
            with pytest.raises(DeviceError, match="cannot open"):
                await other.open()
            await adapter.close()
            await adapter.close()
            await adapter.open()  # and back
            root.up(5, 1, SUMMARY)
            await eventually(lambda: adapter.counters["up"] == 1)
            assert values(await adapter.read())["n5.temp.max"] == 22.0
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_a_silent_root_is_a_failed_read_not_a_hang() -> None:
    async def go() -> None:
        root = FakeRoot()
        mono = [100.0]
        adapter = MeshAdapter(
            device(root.path, silence_timeout_s=30.0), clock=lambda: mono[0], wall=Wall()
        )
        await adapter.open()
        try:
            await adapter.read()
            mono[0] += 29.0
            assert await adapter.read() == []
            mono[0] += 2.0
            with pytest.raises(DeviceTimeout, match=r"no frame since open from the root .* 31 s"):
                await adapter.read()
            root.send(uart.T_LOG, b"still here")
            await eventually(lambda: adapter.counters["logs"] == 1)
            assert await adapter.read() == []
            mono[0] += 31.0
            with pytest.raises(DeviceTimeout, match=r"^no frame from the root"):
                await adapter.read()
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_the_port_vanishing_hands_over_what_came_then_fails() -> None:
    async def go() -> None:
        root = FakeRoot()
        adapter = await opened(root)
        try:
            root.up(5, 1, SUMMARY)
            await eventually(lambda: adapter.counters["up"] == 1)
            root.unplug()  # the USB adapter is pulled
            await eventually(lambda: adapter.stats["link_failures"] == 1)
            # what arrived before is not lost...
            assert values(await adapter.read())["n5.temp.mean"] == 21.25
            # ...then the failure, every time, until closed and reopened
            for _ in range(2):
                with pytest.raises(DeviceError, match=r"returned no data|Input/output error"):
                    await adapter.read()
            with pytest.raises(DeviceError):
                await adapter.command(5, {"c": "ping", "tok": 1})
        finally:
            await adapter.close()
            root.close()

    run(go())


def test_the_supervisor_reopens_after_the_port_comes_back(tmp_path: Path) -> None:
    async def go() -> None:
        root = FakeRoot(link=tmp_path / "ttyMESH")
        cfg = device(
            root.path,
            period_ms=50,
            timeout_ms=1000,
            supervisor={"backoff_initial_ms": 20, "backoff_max_ms": 100},
        )
        batches: list[list[Sample]] = []

        async def publish(batch: list[Sample]) -> bool:
            batches.append(batch)
            return True

        service = DeviceService(cfg, lambda c: MeshAdapter(c), publish)
        task = asyncio.create_task(service.run())

        def uptime() -> object:
            s = service.status.last_values.get("n5.uptime_s")
            return None if s is None else s.value

        try:
            await eventually(lambda: service.status.polls_total >= 1)
            root.up(5, 1, SUMMARY)
            await eventually(lambda: uptime() == 120)
            root.unplug()  # pulled...
            await eventually(lambda: service.status.errors_total >= 1, 5.0)
            assert service.status.health is Health.DEGRADED
            assert service.status.last_error
            root.replug()  # ...and plugged back in: the same by-id path, a new tty behind it
            await eventually(lambda: service.status.reconnects_total >= 1, 5.0)
            root.up(5, 2, {**SUMMARY, "u": 140})
            await eventually(lambda: uptime() == 140, 5.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            root.close()
        assert [s.value for b in batches for s in b if s.tag == "n5.uptime_s"] == [120, 140]

    run(go(), 30.0)


def test_link_alone_over_a_socket_url() -> None:
    # The simulator and tools use MeshLink without any gateway config; socket:// works too.
    async def go() -> None:
        got: list[bytes] = []
        done = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while not done.is_set():
                data = await reader.read(100)
                if not data:
                    break
                if not got:
                    # The link's opening 0x00 says it is ready: pyserial discards whatever
                    # arrived before its open() returned, as a serial port flushes its input.
                    assert data[:1] == b"\x00"
                    writer.write(uart.encode(uart.T_HELLO, cbor({"v": 1, "id": 1})))
                got.append(data)
                if b"".join(got).count(b"\x00") >= 2:  # the opening 0x00 and one frame
                    done.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, MeshLink(f"socket://127.0.0.1:{port}") as link:
            typ, body = await asyncio.wait_for(link.recv(), 5.0)
            assert (typ, cbor2.loads(body)) == (uart.T_HELLO, {"v": 1, "id": 1})
            await link.send(uart.T_DOWN, uart.down_body(5, 1, b"\xa0"))
            await asyncio.wait_for(done.wait(), 5.0)
            frames = uart.Decoder().feed(b"".join(got))
            assert frames == [(uart.T_DOWN, uart.down_body(5, 1, b"\xa0"))]
            # the server hangs up: the link fails with a DeviceError, and stays failed
            with pytest.raises(DeviceError, match="socket disconnected"):
                await asyncio.wait_for(link.recv(), 5.0)
            assert link.error is not None and not link.is_open
            with pytest.raises(DeviceError):
                await link.send(uart.T_DOWN, b"\x00\x05\x00\x01")
        await link.close()
        with pytest.raises(DeviceError, match="is closed"):
            await link.recv()
        assert link.stats.frames_in == 1 and link.stats.frames_out == 1 and link.stats.failures == 1

    run(go())


def test_link_refuses_a_body_too_long_and_a_closed_port() -> None:
    async def go() -> None:
        root = FakeRoot()
        link = MeshLink(root.path)
        with pytest.raises(DeviceError, match="is not open"):
            await link.send(uart.T_LOG, b"x")
        async with link:
            with pytest.raises(uart.UartError, match="exceeds 507 B"):
                await link.send(uart.T_LOG, bytes(600))
            await link.send(uart.T_LOG, b"ok")
            assert (await root.next_frame(uart.T_LOG))[1] == b"ok"
        root.close()

    run(go())


def test_a_stuck_write_times_out_and_close_does_not_hang() -> None:
    # Nobody reads the root's side: the pty fills up and writes block.
    async def go() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        link = MeshLink(os.ttyname(slave), write_timeout_s=0.3)
        await link.open()

        async def fill() -> None:
            with pytest.raises(DeviceTimeout, match=r"could not write a frame within 0\.3 s"):
                for _ in range(10_000):
                    await link.send(uart.T_LOG, b"x" * uart.MAX_BODY)

        try:
            await fill()
            # The frame cut short is ended by a 0x00 before the next one.
            before = link.stats.bytes_out
            os.set_blocking(master, False)
            with contextlib.suppress(BlockingIOError):
                while os.read(master, 65536):
                    pass
            await link.send(uart.T_LOG, b"x")
            assert link.stats.bytes_out - before == 1 + len(uart.encode(uart.T_LOG, b"x"))
            await fill()
            stuck = asyncio.create_task(link.send(uart.T_LOG, b"x" * uart.MAX_BODY))
            await asyncio.sleep(0.05)
            assert not stuck.done()
            started = time.monotonic()
            await link.close()
            assert time.monotonic() - started < 0.25  # the blocked write was interrupted
            with pytest.raises(DeviceError):
                await stuck
            await link.close()
        finally:
            await link.close()
            os.close(master)
            os.close(slave)

    run(go())


def test_frames_nobody_takes_are_bounded() -> None:
    async def go() -> None:
        root = FakeRoot()
        async with MeshLink(root.path, max_queue=5) as link:
            for i in range(8):
                root.send(uart.T_LOG, b"%d" % i)
            await eventually(lambda: link.stats.frames_in == 8)
            assert link.queued() == 5 and link.stats.overflow == 3
            assert [link.recv_nowait() for _ in range(6)] == [
                *((uart.T_LOG, b"%d" % i) for i in range(3, 8)),
                None,
            ]
        root.close()

    run(go())


def test_link_unknown_url_scheme_is_a_device_error() -> None:
    async def go() -> None:
        with pytest.raises(DeviceError, match="cannot open nosuch://x"):
            await MeshLink("nosuch://x").open()
        # loop:// opens but has no file descriptor to wait on
        with pytest.raises(DeviceError, match="no file descriptor"):
            await MeshLink("loop://").open()

    run(go())


# --- the config ------------------------------------------------------------------------------


TOKEN = "mesh-test-token-0123456789"
ENV = {"FOGMESH_TEST_TOKEN": TOKEN}


def _gateway_toml(port: str, device_extra: str = "") -> str:
    return f"""
[gateway]
id = "gw"
site = "plant"

[http]
port = 0
token = {{ env = "FOGMESH_TEST_TOKEN" }}

[uplink]
url = "sqlite:///var/fog.db"

[[devices]]
id = "mesh"
type = "mesh"
port = "{port}"
period_ms = 100
{device_extra}
"""


BAD_DEVICE = """
baudrate = 0
nodes = [5, 0, 5, 70000]
silence_timeout_s = -1.0
[[devices.commands]]
key = "Sample Hz"
[[devices.commands]]
key = "rank"
[[devices.commands]]
key = "mode"
type = "bool"
max = 1.0
[[devices.commands]]
key = "summary_s"
min = 10.0
max = 1.0
[[devices.commands]]
key = "summary_s"
[[devices.tags]]
name = "temp"
[[devices.tags]]
name = "n9.temp.mean"
[[devices.tags]]
name = "n5.summary_s"
"""


def test_config_errors_have_dotted_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_gateway_toml("/dev/ttyUSB0", BAD_DEVICE), base_dir=tmp_path, env=ENV)
    problems = [str(p) for p in exc.value.problems]
    assert problems == [
        "devices[0].baudrate: must be greater than 0",
        "devices[0].nodes[1]: must be 1..65534",
        "devices[0].nodes[3]: must be 1..65534",
        "devices[0].silence_timeout_s: must be greater than 0",
        "devices[0].commands[0].key: must be 1-32 characters of a-z, 0-9 and '_', starting with a letter",
        "devices[0].commands[1].key: 'rank' is a value nodes report; it cannot be a command",
        "devices[0].commands[2].max: `max` applies to numbers; this command takes a bool",
        "devices[0].commands[3].min: min 10 is greater than max 1",
    ], problems


def test_config_cross_checks_have_dotted_paths(tmp_path: Path) -> None:
    extra = BAD_DEVICE.split("[[devices.commands]]", 1)[0].replace("baudrate = 0\n", "")
    extra = extra.replace("[5, 0, 5, 70000]", "[5, 6, 5]").replace("-1.0", "5.0")
    extra += '[[devices.commands]]\nkey = "summary_s"\n[[devices.commands]]\nkey = "summary_s"\n'
    extra += BAD_DEVICE.split('key = "summary_s"\n', 2)[2]
    with pytest.raises(ConfigError) as exc:
        parse_config(_gateway_toml("/dev/ttyUSB0", extra), base_dir=tmp_path, env=ENV)
    problems = [str(p) for p in exc.value.problems]
    assert problems == [
        "devices[0].nodes[2]: node 5 is listed twice (also nodes[0])",
        "devices[0].commands[1].key: command 'summary_s' is listed twice (also commands[0])",
        "devices[0].tags[0].name: a mesh tag is n<node id>.<field> (n5.temp.mean, n5.alarm) or mesh.<field> (mesh.nodes)",
        "devices[0].tags[1].name: node 9 is not in `nodes` (its frames are ignored)",
        "devices[0].tags[2].name: 'n5.summary_s' is the write tag of command 'summary_s'; it has no readings",
    ], problems


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("", "must be a serial device"),
        (" /dev/ttyUSB0", "must be a serial device"),
        ("rfc2217://host:2217", "only socket://host:port is supported as a URL"),
        ("socket://host", "socket:// needs a host and a port"),
    ],
)
def test_bad_ports(port: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_gateway_toml(port), base_dir=tmp_path, env=ENV)
    assert [p.path for p in exc.value.problems] == ["devices[0].port"]
    assert message in exc.value.problems[0].message


def test_commands_need_nodes() -> None:
    with pytest.raises(ValidationError, match="commands need `nodes`"):
        device("/dev/ttyUSB0", commands=COMMANDS)


def test_config_defaults_write_tags_and_registry(tmp_path: Path) -> None:
    loaded = parse_config(
        _gateway_toml(
            "socket://10.0.0.7:4000",
            'nodes = [5, 6]\ncommands = [{ key = "summary_s", type = "integer", min = 1, max = 60 }]\n'
            '[[devices.tags]]\nname = "n5.temp.mean"\n[[devices.tags]]\nname = "mesh.nodes"\n',
        ),
        base_dir=tmp_path,
        env=ENV,
    )
    dev = loaded.config.devices[0]
    assert isinstance(dev, MeshDevice)
    assert (dev.baudrate, dev.silence_timeout_s, dev.nodes) == (115200, 30.0, [5, 6])
    tags = dev.effective_tags()
    assert [t.name for t in tags] == ["n5.temp.mean", "mesh.nodes", "n5.summary_s", "n6.summary_s"]
    w = tags[2]
    assert isinstance(w, MeshWriteTag)
    assert (w.writable, w.forward, w.min, w.max, w.value_kind()) == (True, "none", 1, 60, "number")
    assert adapter_class("mesh") is MeshAdapter
    adapter = MeshAdapter(dev)  # no I/O: the port is never touched
    assert adapter.tag_names() is None
    assert adapter.capabilities == frozenset({"read", "write"})
    with pytest.raises(TypeError, match="needs a MeshDevice config, got DeviceBase"):
        MeshAdapter(DeviceBase(id="x"))


# --- the root's own bridge -----------------------------------------------------------------

ROOT_STUB = """
# The root's real UART bridge (firmware/fogmesh/border.py) over a real pty fd, with a stand-in
# for the mesh: what the gateway sees is what a root node sends.
import asyncio
from fogmesh import cbor
from fogmesh.border import Border
from fogmesh.hal.linux import Uart

FD = int(open("fd.txt").read())


class Mesh:
    id = 1
    stats = {"tx": 5, "rx": 7}
    on_data = None

    def routes(self):
        return {2: (1, 256, 0), 3: (2, 512, 1)}

    def send_down(self, dest, payload):
        return 0 if dest in (2, 3) else 1

    def queued(self):
        return 0


async def main():
    m = Mesh()
    b = Border(m, Uart(FD), lambda ev, fields: print(ev, fields), {"uart": {"fd": FD}})
    asyncio.create_task(b.run())
    await asyncio.sleep_ms(200)
    for seq in (1, 2, 2):  # the last one a duplicate
        m.on_data(3, seq, 2, cbor.dumps({"k": "sum", "u": seq, "n": 5,
                                          "ch": {"temp": [1.0, 2.0, 1.5]}, "alarm": False}))
    b.status()
    await asyncio.sleep_ms(20000)


asyncio.run(main())
"""


def test_the_roots_own_bridge_on_micropython(tmp_path: Path) -> None:
    firmware = Path(__file__).resolve().parents[2] / "firmware"
    (tmp_path / "root_stub.py").write_text(ROOT_STUB)

    async def go() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        (tmp_path / "fd.txt").write_text(str(master))
        adapter = MeshAdapter(
            device(os.ttyname(slave), nodes=[2, 3], commands=COMMANDS[:1], timeout_ms=3000)
        )
        await adapter.open()
        proc = await asyncio.create_subprocess_exec(
            str(find_micropython()),
            "-X",
            "heapsize=100k",
            "root_stub.py",
            cwd=tmp_path,
            pass_fds=(master,),
            env={**os.environ, "MICROPYPATH": f".frozen:{firmware}"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await eventually(lambda: adapter.counters["statuses"] == 1, 10.0)
            await adapter.write("n3.summary_s", 5)
            assert await adapter.command(9, {"c": "ping", "tok": 1}) == uart.ACK_NO_ROUTE
            assert await adapter.command(2, {"no": "command"}) == uart.ACK_BAD
            readings = await adapter.read()
        finally:
            if proc.returncode is None:
                proc.kill()
            out, _ = await proc.communicate()
            await adapter.close()
            os.close(master)
            os.close(slave)
        assert adapter.counters["hellos"] == 1, out.decode()
        got = values(readings)
        assert [r.value for r in readings if r.tag == "n3.uptime_s"] == [1, 2]
        assert adapter.counters["duplicates"] == 1
        assert got["n3.temp.mean"] == 1.5 and got["n3.hops"] == 2
        assert (got["mesh.nodes"], got["n3.parent"], got["n3.rank"]) == (2, 2, 512)
        assert got["mesh.root.uart_up"] == 3
        assert adapter.stats["bad_frames"] == 0

    run(go(), 30.0)


# --- a whole gateway ------------------------------------------------------------------------


def test_a_gateway_with_a_mesh_device_on_the_pty(tmp_path: Path) -> None:
    async def go() -> None:
        root = FakeRoot(ack=lambda dest, tok, payload: 0 if dest == 5 else 1)
        extra = (
            "nodes = [5, 6]\n"
            'commands = [{ key = "summary_s", type = "integer", min = 1, max = 3600 }]\n'
            '[[devices.tags]]\nname = "n5.temp.mean"\nforward = "raw"\n'
        )
        loaded = parse_config(
            _gateway_toml(root.path, extra),
            base_dir=tmp_path,
            env=ENV,
        )
        gw = Gateway(loaded)
        try:
            async with running(gw) as addr:

                def mesh_status() -> Any:
                    return {s.id: s for s in gw.device_statuses()}["mesh"]

                def seen() -> dict[str, Any]:
                    return {t: s.value for t, s in mesh_status().last_values.items()}

                # Opening a serial port discards what it had buffered: talk once it is open.
                await eventually(lambda: mesh_status().health is Health.OK, 5.0)
                root.hello()
                root.up(5, 1, SUMMARY)
                root.status({5: [1, 256, 3]})
                await eventually(lambda: "mesh.nodes" in seen(), 5.0)
                status, _, raw = await fetch(addr, "GET", "/api/v1/devices/mesh")
                assert status == 200
                detail = json.loads(raw)
                last = detail["last_values"]
                assert last["n5.temp.mean"]["value"] == 21.25
                assert last["mesh.nodes"]["value"] == 1
                assert last["mesh.root_id"]["value"] == 1
                assert detail["health"] == "ok"

                async def put(tag: str, value: Any) -> tuple[int, Any]:
                    status, _, body = await fetch(
                        addr,
                        "PUT",
                        f"/api/v1/devices/mesh/tags/{tag}",
                        json.dumps({"value": value}).encode(),
                        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                    )
                    return status, json.loads(body)

                code, body = await put("n5.summary_s", 20)
                assert code == 200, body
                _, down = await root.next_frame(uart.T_DOWN)
                assert cbor2.loads(uart.parse_down(down)[2]) == {
                    "c": "cfg",
                    "set": {"summary_s": 20},
                }
                code, body = await put("n6.summary_s", 20)  # the root has no route to 6
                assert code == 502 and "no route" in body["error"], body
                code, body = await put("n5.summary_s", 9999)  # refused by the gateway itself
                assert code == 422, body
                code, body = await put("n5.temp.mean", 1.0)
                assert code == 403, body
                # the declared tag went through the edge stage as a raw forward
                await eventually(lambda: gw.edge.stats().samples_in >= 3, 5.0)
        finally:
            root.close()

    run(go(), 30.0)


def test_a_socket_url_to_a_closed_port_is_a_device_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def go() -> None:
        with pytest.raises(DeviceError, match=f"cannot open socket://127.0.0.1:{port}"):
            await MeshLink(f"socket://127.0.0.1:{port}").open()

    run(go())
