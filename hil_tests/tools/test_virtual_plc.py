"""The virtual PLC against plain protocol clients: pymodbus (TCP, RTU over TCP, RTU on a pty) and
asyncua, decoding with `struct` here so the PLC's own codec is checked, not trusted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.uaerrors import (
    BadDeviceFailure,
    BadOutOfRange,
    BadTypeMismatch,
    BadUserAccessDenied,
)
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from retrofit_adapters.simulated.config import FaultConfig
from tools.virtual_plc import (
    METER_POINTS,
    PUMP_POINTS,
    PlcFault,
    VirtualPlc,
    decode,
    encode,
    parse_fault,
)
from tools.virtual_plc.farm import Kind, ServerFarm, farm_value
from tools.virtual_plc.opcua_server import METER_VARIABLES, PUMP_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def tcp_client(
    port: int, *, wait_s: float = 1.0, framer: FramerType = FramerType.SOCKET
) -> AsyncIterator[AsyncModbusTcpClient]:
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=wait_s, retries=0, framer=framer)
    assert await c.connect()
    try:
        yield c
    finally:
        c.close()


def exc_code(rsp: ModbusPDU) -> int:
    assert rsp.isError(), f"expected an exception response, got {rsp}"
    return int(getattr(rsp, "exception_code"))  # noqa: B009


# --- decoding with struct, independently of tools.virtual_plc.registers ----------------------


def f32_abcd(r: Sequence[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", r[0], r[1]))[0])


def f32_cdab(r: Sequence[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", r[1], r[0]))[0])


def f64_dcba(r: Sequence[int]) -> float:
    return float(struct.unpack("<d", struct.pack(">4H", *r))[0])


def i16(r: int) -> int:
    return int(struct.unpack(">h", struct.pack(">H", r))[0])


def close_f32(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def cdab(x: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", x))
    return [lo, hi]


# --- codec ------------------------------------------------------------------------------------


def test_codec_word_orders_match_the_documented_vectors() -> None:
    from tools.virtual_plc.registers import Point

    f = 123.456  # 0x42F6E979
    for order, regs in {
        "ABCD": [0x42F6, 0xE979],
        "CDAB": [0xE979, 0x42F6],
        "BADC": [0xF642, 0x79E9],
        "DCBA": [0x79E9, 0xF642],
    }.items():
        p = Point("x", "input", 0, "float32", order)  # type: ignore[arg-type]
        assert encode(p, f) == regs
        assert close_f32(float(decode(p, regs)), f)
    p64 = Point("v", "input", 0, "float64", "DCBA")
    assert encode(p64, 250000.5) == [0x0000, 0x0000, 0x8484, 0x0E41]
    assert f64_dcba(encode(p64, -1.25e10)) == -1.25e10
    t = Point("t", "input", 0, "int16", scale=10)
    assert encode(t, 45.3) == [453] and encode(t, -5.2) == [0xFFCC]
    assert encode(t, 1e9) == [0x7FFF]  # saturates
    v = Point("v", "input", 0, "uint16", scale=100)
    assert encode(v, -1.0) == [0] and decode(v, [207]) == 2.07
    u32 = Point("h", "input", 0, "uint32", "ABCD")
    assert encode(u32, 66000) == [0x0001, 0x01D0] and decode(u32, [1, 0x01D0]) == 66000
    s = Point("n", "holding", 100, "string", chars=16)
    regs = encode(s, "VPLC PUMP 1")
    assert len(regs) == 8 and regs[0] == 0x5650 and regs[-1] == 0
    assert decode(s, regs) == "VPLC PUMP 1"


def test_docs_publish_exactly_the_register_map() -> None:
    text = (ROOT / "docs" / "virtual-plc.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| (input|holding|coil|discrete) \| (\d+) \| [\d–]+ \| (\w+) \| ([\w()]+) \| (\w+|—) \|",
        text,
        re.M,
    )
    pump_doc, meter_doc = text.split("### Energy meter")[0], text.split("### Energy meter")[1]
    for points, section in ((PUMP_POINTS, pump_doc), (METER_POINTS, meter_doc)):
        documented = {
            (t, int(a), n, d, o)
            for t, a, n, d, o in re.findall(
                r"^\| (input|holding|coil|discrete) \| (\d+) \| [\d–]+ \| (\w+) \| ([\w()]+) \| (\w+|—) \|",
                section.split("###")[0] if points is METER_POINTS else section,
                re.M,
            )
        }
        expected = {
            (
                p.table,
                p.address,
                p.name,
                f"string({p.chars})" if p.dtype == "string" else p.dtype,
                p.order if p.count > 1 and p.dtype != "string" else "—",
            )
            for p in points
        }
        assert documented == expected
    assert len(rows) == len(PUMP_POINTS) + len(METER_POINTS)


# --- Modbus TCP: every published register -----------------------------------------------------


def test_every_register_decodes_to_the_model_values() -> None:
    async def go() -> None:
        # A long update period keeps the values still while the test reads them.
        async with (
            VirtualPlc(pumps=2, opcua=False, update_ms=60_000) as plc,
            tcp_client(plc.modbus_port) as c,
        ):
            assert plc.modbus_url == f"tcp://127.0.0.1:{plc.modbus_port}"
            for unit in (1, 2):
                want = plc.values(unit)
                r = (await c.read_input_registers(0, count=14, device_id=unit)).registers
                assert close_f32(f32_cdab(r[0:2]), float(want["flow_m3h"]))
                assert close_f32(f32_abcd(r[2:4]), float(want["pressure_bar"]))
                assert abs(i16(r[4]) / 10 - float(want["temperature_c"])) <= 0.05 + 1e-9
                assert abs(r[5] / 100 - float(want["vibration_mm_s"])) <= 0.005 + 1e-9
                assert (r[6] << 16 | r[7]) == want["run_hours"] == 65_000 + 1_000 * unit
                assert r[8] == want["status"] == 0x0001  # running, no fault
                assert r[9] == 0
                assert f64_dcba(r[10:14]) == want["total_volume_m3"]
                assert 36 <= f32_cdab(r[0:2]) <= 44 and 3.8 <= f32_abcd(r[2:4]) <= 4.2
                assert 40 <= i16(r[4]) / 10 <= 50 and 1.5 <= r[5] / 100 <= 2.5
                h = (await c.read_holding_registers(0, count=2, device_id=unit)).registers
                assert f32_cdab(h) == 40.0
                name = (await c.read_holding_registers(100, count=8, device_id=unit)).registers
                assert struct.pack(">8H", *name).rstrip(b"\0") == f"VPLC PUMP {unit}".encode()
                assert (await c.read_coils(0, count=1, device_id=unit)).bits[0] is True
                assert (await c.read_discrete_inputs(0, count=2, device_id=unit)).bits[:2] == [
                    True,
                    False,
                ]
            want = plc.values(10)
            r = (await c.read_input_registers(0, count=12, device_id=10)).registers
            names = [
                "voltage_v",
                "current_a",
                "power_kw",
                "power_factor",
                "frequency_hz",
                "energy_kwh",
            ]
            for i, n in enumerate(names):
                assert close_f32(f32_cdab(r[2 * i : 2 * i + 2]), float(want[n])), n
            v, a, kw, pf = (f32_cdab(r[i : i + 2]) for i in (0, 2, 4, 6))
            assert 228 <= v <= 232 and 49.98 <= f32_cdab(r[8:10]) <= 50.02
            assert math.isclose(a, kw * 1000 / (3 * v * pf), rel_tol=1e-4)
            name = (await c.read_holding_registers(100, count=8, device_id=10)).registers
            assert struct.pack(">8H", *name).rstrip(b"\0") == b"VPLC METER"
            # What is not published is refused the way a device refuses it.
            assert exc_code(await c.read_holding_registers(2, count=1, device_id=1)) == 2
            assert exc_code(await c.read_holding_registers(0, count=101, device_id=1)) == 2
            assert exc_code(await c.read_input_registers(12, count=4, device_id=10)) == 2
            assert exc_code(await c.read_coils(0, count=1, device_id=10)) == 1
            assert exc_code(await c.read_input_registers(0, count=1, device_id=7)) == 0x0B
            assert plc.requests_served == 17
            assert plc.requests_by_unit == {1: 7, 2: 5, 10: 4, 7: 1}

    run(go())


def test_values_follow_the_process_over_time() -> None:
    async def go() -> None:
        async with (
            VirtualPlc(pumps=1, opcua=False, update_ms=50) as plc,
            tcp_client(plc.modbus_port) as c,
        ):
            seen = set()
            for _ in range(6):
                r = (await c.read_input_registers(0, count=14, device_id=1)).registers
                seen.add(f32_cdab(r[0:2]))
                await asyncio.sleep(0.12)
            assert len(seen) >= 4  # noise is redrawn every 100 ms
            r1 = (await c.read_input_registers(10, count=4, device_id=1)).registers
            assert f64_dcba(r1) > 250_000.5  # the volume integrates the flow

    run(go())


def test_writes_read_back_and_move_the_process() -> None:
    async def go() -> None:
        async with (
            VirtualPlc(pumps=2, opcua=False, update_ms=50) as plc,
            tcp_client(plc.modbus_port) as c,
        ):
            rsp = await c.write_registers(0, cdab(55.0), device_id=1)
            assert not rsp.isError()
            h = (await c.read_holding_registers(0, count=2, device_id=1)).registers
            assert f32_cdab(h) == 55.0 and plc.values(1)["setpoint_m3h"] == 55.0
            await asyncio.sleep(0.15)
            r = (await c.read_input_registers(0, count=9, device_id=1)).registers
            assert 51 <= f32_cdab(r[0:2]) <= 59  # flow follows the setpoint
            assert r[8] == 0x0001  # the normal band moved with it: no fault
            assert (
                36
                <= f32_cdab((await c.read_input_registers(0, count=2, device_id=2)).registers)
                <= 44
            )
            # Refused writes change nothing.
            assert exc_code(await c.write_registers(0, cdab(70.0), device_id=1)) == 3
            assert exc_code(await c.write_registers(0, cdab(math.nan), device_id=1)) == 3
            assert exc_code(await c.write_register(0, 0, device_id=1)) == 2  # half a float
            assert exc_code(await c.write_registers(100, [0x4142], device_id=1)) == 2
            assert exc_code(await c.write_registers(0, cdab(30.0), device_id=10)) == 2
            assert exc_code(await c.write_coil(1, True, device_id=1)) == 2
            assert plc.values(1)["setpoint_m3h"] == 55.0
            # The run command stops the pump.
            assert not (await c.write_coil(0, False, device_id=1)).isError()
            assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is False
            await asyncio.sleep(0.15)
            r = (await c.read_input_registers(0, count=9, device_id=1)).registers
            assert f32_cdab(r[0:2]) == 0.0 and r[8] == 0
            assert (await c.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is False
            assert not (await c.write_coil(0, True, device_id=1)).isError()
            await asyncio.sleep(0.15)
            r = (await c.read_input_registers(0, count=9, device_id=1)).registers
            assert f32_cdab(r[0:2]) > 50 and r[8] == 1

    run(go())


# --- Modbus faults ----------------------------------------------------------------------------


def test_exception_injection_answers_the_code_for_that_unit_only() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=2, opcua=False) as plc, tcp_client(plc.modbus_port) as c:
            plc.inject("exception", unit=1, code="server_device_busy")
            assert exc_code(await c.read_input_registers(0, count=2, device_id=1)) == 6
            assert exc_code(await c.write_registers(0, cdab(50.0), device_id=1)) == 6
            assert not (await c.read_input_registers(0, count=2, device_id=2)).isError()
            plc.clear("exception", unit=1)
            assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
            assert plc.values(1)["setpoint_m3h"] == 40.0  # the refused write did nothing
            plc.inject("exception", code=2, duration_s=0.3)  # every unit, for a while
            assert exc_code(await c.read_input_registers(0, count=2, device_id=10)) == 2
            plc.clear(unit=10)  # ends what was given for unit 10 only: nothing here
            assert exc_code(await c.read_input_registers(0, count=2, device_id=10)) == 2
            await asyncio.sleep(0.35)
            assert not (await c.read_input_registers(0, count=2, device_id=10)).isError()

    run(go())


def test_stop_answering_times_out_and_clearing_recovers() -> None:
    async def go() -> None:
        async with (
            VirtualPlc(pumps=2, opcua=False) as plc,
            tcp_client(plc.modbus_port, wait_s=0.3) as c,
        ):
            plc.inject("stop_answering", unit=1)
            before = plc.requests_served
            t = time.monotonic()
            with pytest.raises(ModbusException):
                await c.read_input_registers(0, count=2, device_id=1)
            assert time.monotonic() - t >= 0.29
            assert plc.requests_served == before + 1  # received, not answered
            assert c.connected  # the socket stays open
            assert not (await c.read_input_registers(0, count=2, device_id=2)).isError()
            with pytest.raises(ModbusException):  # a write is neither answered nor applied
                await c.write_registers(0, cdab(50.0), device_id=1)
            plc.clear()
            assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()
            assert plc.values(1)["setpoint_m3h"] == 40.0

    run(go())


def test_slow_replies_arrive_late() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=1, opcua=False) as plc:
            async with tcp_client(plc.modbus_port, wait_s=2.0) as c:
                plc.inject("slow", unit=1, delay_ms=300)
                t = time.monotonic()
                rsp = await c.read_input_registers(0, count=14, device_id=1)
                assert not rsp.isError() and len(rsp.registers) == 14
                assert 0.29 <= time.monotonic() - t < 1.0
            async with tcp_client(plc.modbus_port, wait_s=0.15) as c:
                with pytest.raises(ModbusException):  # slower than the client waits
                    await c.read_input_registers(0, count=2, device_id=1)
                plc.clear("slow")
                await asyncio.sleep(0.35)  # let the late reply land before asking again
                c.close()
                assert await c.connect()
                assert not (await c.read_input_registers(0, count=2, device_id=1)).isError()

    run(go())


def test_garbage_is_an_error_or_a_short_reply_for_pymodbus() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=1, opcua=False) as plc:
            for mode in ("truncated", "noise"):
                async with tcp_client(plc.modbus_port, wait_s=0.3) as c:
                    plc.inject("garbage", unit=1, mode=mode)
                    with pytest.raises(ModbusException):
                        await c.read_input_registers(0, count=14, device_id=1)
                    plc.clear("garbage")
                    c.close()
                    assert await c.connect()
                    rsp = await c.read_input_registers(0, count=14, device_id=1)
                    assert len(rsp.registers) == 14
            async with tcp_client(plc.modbus_port, wait_s=0.3) as c:
                plc.inject("garbage", unit=1, mode="short_count")
                rsp = await c.read_input_registers(0, count=14, device_id=1)
                assert not rsp.isError() and len(rsp.registers) == 13  # no error: count it
                plc.clear()
                assert len((await c.read_input_registers(0, count=14, device_id=1)).registers) == 14

    run(go())


def test_restart_on_the_same_port() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=1, opcua=False) as plc:
            port = plc.modbus_port
            async with tcp_client(port) as c:
                assert not (await c.write_registers(0, cdab(45.5), device_id=1)).isError()
            restart = asyncio.create_task(plc.restart_modbus(down_s=0.5))
            await asyncio.sleep(0.2)
            with pytest.raises(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
            await restart
            assert plc.modbus_port == port
            async with tcp_client(port) as c:
                h = (await c.read_holding_registers(0, count=2, device_id=1)).registers
                assert f32_cdab(h) == 45.5  # writes survive a restart

    run(go())


def test_scheduled_faults_start_and_end_on_time() -> None:
    faults: dict[str, list[FaultConfig | PlcFault]] = {
        "pump1": [FaultConfig(kind="spike", at_s=0, duration_s=60, tag="flow_m3h", magnitude=20)],
        "pump2": [FaultConfig(kind="hang", at_s=0.3, duration_s=0.6)],
    }

    async def go() -> None:
        async with (
            VirtualPlc(pumps=2, opcua=False, faults=faults) as plc,
            tcp_client(plc.modbus_port, wait_s=0.25) as c,
        ):
            r = (await c.read_input_registers(0, count=9, device_id=1)).registers
            assert f32_cdab(r[0:2]) > 55 and r[8] == 0x0003  # running + fault bit
            assert not (await c.read_input_registers(0, count=2, device_id=2)).isError()
            await asyncio.sleep(0.4 - plc.elapsed_s())
            with pytest.raises(ModbusException):
                await c.read_input_registers(0, count=2, device_id=2)
            await asyncio.sleep(max(0.0, 1.0 - plc.elapsed_s()))
            assert not (await c.read_input_registers(0, count=2, device_id=2)).isError()

    run(go())


def test_scheduled_disconnect_takes_the_server_down_for_a_while() -> None:
    async def connects(port: int) -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    async def go() -> None:
        fault = FaultConfig(kind="disconnect", at_s=0.3, duration_s=0.6)
        async with VirtualPlc(pumps=1, opcua=False, faults=[fault], update_ms=50) as plc:
            assert await connects(plc.modbus_port)
            await asyncio.sleep(0.5 - plc.elapsed_s())
            assert not await connects(plc.modbus_port)
            await asyncio.sleep(1.1 - plc.elapsed_s())
            assert await connects(plc.modbus_port)

    run(go())


def test_bad_fault_requests_are_refused() -> None:
    plc = VirtualPlc(pumps=2, opcua=False)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("melt", {}),
        ("exception", {"code": 99}),
        ("exception", {"code": "oops"}),
        ("slow", {"delay_ms": 0}),
        ("garbage", {"mode": "confetti"}),
        ("spike", {"tag": "nope", "magnitude": 1}),
        ("stop_answering", {"unit": 5}),
        ("stop_answering", {"delay_ms": 5}),
        ("spike", {"unit": 10, "tag": "flow_m3h"}),
        ("disconnect", {"unit": 1}),
        ("bad_status", {"status": "Good"}),
    ]
    for kind, kw in cases:
        with pytest.raises(ValueError):
            plc.inject(kind, **kw)
    with pytest.raises(ValueError):
        VirtualPlc(faults={"pump9": []})
    assert parse_fault("kind=slow,unit=2,at_s=5,duration_s=20,delay_ms=800") == PlcFault(
        "slow", 5.0, 20.0, 2, {"delay_ms": 800}
    )


# --- Modbus RTU -------------------------------------------------------------------------------


def test_rtu_on_a_pty_and_over_tcp_serve_the_same_registers() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=2, opcua=False, modbus_rtu=True, update_ms=60_000) as plc:
            assert plc.rtu_port is not None and plc.rtu_port.startswith("/dev/")
            assert plc.rtu_tcp_port is not None
            assert plc.rtu_tcp_url == f"rtu+tcp://127.0.0.1:{plc.rtu_tcp_port}"
            want = plc.values(2)
            serial = AsyncModbusSerialClient(
                plc.rtu_port, framer=FramerType.RTU, baudrate=19200, timeout=0.5, retries=0
            )
            assert await serial.connect()
            try:
                r = (await serial.read_input_registers(0, count=14, device_id=2)).registers
                assert close_f32(f32_cdab(r[0:2]), float(want["flow_m3h"]))
                assert f64_dcba(r[10:14]) == want["total_volume_m3"]
                assert not (await serial.write_registers(0, cdab(33.0), device_id=2)).isError()
                with pytest.raises(ModbusException):  # nobody answers for unit 7 on a line
                    await serial.read_input_registers(0, count=1, device_id=7)
                plc.inject("exception", unit=2, code=4)
                assert exc_code(await serial.read_input_registers(0, count=1, device_id=2)) == 4
                plc.clear()
                await plc.restart_modbus(down_s=0.1)
                r = (await serial.read_holding_registers(0, count=2, device_id=2)).registers
                assert f32_cdab(r) == 33.0
            finally:
                serial.close()
            async with tcp_client(plc.rtu_tcp_port, framer=FramerType.RTU) as c:
                r = (await c.read_input_registers(0, count=14, device_id=1)).registers
                assert close_f32(f32_cdab(r[0:2]), float(plc.values(1)["flow_m3h"]))
                assert (
                    f32_cdab((await c.read_holding_registers(0, count=2, device_id=2)).registers)
                    == 33.0
                )

    run(go())


# --- OPC-UA -----------------------------------------------------------------------------------


async def _wait_for(pred: Callable[[], Awaitable[bool]], timeout_s: float = 2.0) -> None:
    # Polls a remote value: there is no event to wait on across a protocol.
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_opcua_browse_read_every_variable_and_write_the_setpoint() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=2, update_ms=60_000) as plc:
            assert plc.opcua_endpoint == f"opc.tcp://127.0.0.1:{plc.opcua_port}/fogmesh/"
            async with Client(plc.opcua_endpoint) as client, tcp_client(plc.modbus_port) as mb:
                assert await client.get_namespace_index("urn:fogmesh:virtual-plc") == 2
                plant = await client.nodes.objects.get_child(["2:Plant"])
                objects = {
                    (await n.read_browse_name()).to_string(): n for n in await plant.get_children()
                }
                assert set(objects) == {"2:Pump1", "2:Pump2", "2:Meter"}
                for obj_name, unit, variables in (
                    ("Pump1", 1, PUMP_VARIABLES),
                    ("Pump2", 2, PUMP_VARIABLES),
                    ("Meter", 10, METER_VARIABLES),
                ):
                    children = await objects[f"2:{obj_name}"].get_children()
                    names = {(await n.read_browse_name()).to_string() for n in children}
                    assert names == {f"2:{v.browse_name}" for v in variables}
                    want = plc.values(unit)
                    for v in variables:
                        node = client.get_node(f"ns=2;s={obj_name}.{v.browse_name}")
                        path = await plant.get_child([f"2:{obj_name}", f"2:{v.browse_name}"])
                        assert path.nodeid == node.nodeid
                        dv = await node.read_data_value()
                        assert dv.Value is not None and dv.StatusCode is not None
                        assert dv.StatusCode.is_good() and dv.SourceTimestamp is not None
                        assert dv.Value.VariantType == getattr(ua.VariantType, v.vtype)
                        assert dv.Value.Value == want[v.point], (obj_name, v.browse_name)
                # Write the setpoint over OPC-UA: it reads back there and in the registers.
                sp = client.get_node("ns=2;s=Pump1.Setpoint")
                await sp.write_value(52.5)
                assert await sp.read_value() == 52.5 and plc.values(1)["setpoint_m3h"] == 52.5
                h = (await mb.read_holding_registers(0, count=2, device_id=1)).registers
                assert f32_cdab(h) == 52.5
                with pytest.raises(BadOutOfRange):
                    await sp.write_value(61.0)
                with pytest.raises(BadUserAccessDenied):
                    await client.get_node("ns=2;s=Pump1.Flow").write_value(1.0)
                with pytest.raises(BadTypeMismatch):
                    await sp.write_value(True)
                assert plc.values(1)["setpoint_m3h"] == 52.5
                # A restart drops the sessions and keeps the setpoints, whichever side set them.
                await mb.write_registers(0, cdab(20.0), device_id=2)
                await plc.restart_opcua()
                async with Client(plc.opcua_endpoint) as c2:
                    assert await c2.get_node("ns=2;s=Pump2.Setpoint").read_value() == 20.0
                    assert await c2.get_node("ns=2;s=Pump1.Setpoint").read_value() == 52.5

    run(go(), timeout_s=45)


def test_opcua_values_move_and_bad_status_is_injected() -> None:
    async def go() -> None:
        async with VirtualPlc(pumps=1, update_ms=50) as plc:
            assert plc.opcua_endpoint is not None
            async with Client(plc.opcua_endpoint) as client, tcp_client(plc.modbus_port) as mb:
                # A Modbus write shows up in OPC-UA within an update.
                await mb.write_registers(0, cdab(20.0), device_id=1)
                sp = client.get_node("ns=2;s=Pump1.Setpoint")

                async def follows() -> bool:
                    return bool(await sp.read_value() == 20.0)

                await _wait_for(follows)
                flow = client.get_node("ns=2;s=Pump1.Flow")
                first = await flow.read_value()

                async def moved() -> bool:
                    return bool(await flow.read_value() != first)

                await _wait_for(moved)
                plc.inject("bad_status", unit=1)

                async def bad() -> bool:
                    dv = await flow.read_data_value(raise_on_bad_status=False)
                    return dv.StatusCode is not None and dv.StatusCode.is_bad()

                await _wait_for(bad)
                with pytest.raises(BadDeviceFailure):
                    await flow.read_value()
                assert await client.get_node("ns=2;s=Meter.Power").read_value() > 0
                plc.clear("bad_status")

                async def good() -> bool:
                    return not await bad()

                await _wait_for(good)
                plc.inject("spike", unit=1, tag="vibration_mm_s", magnitude=5.0)
                fault = client.get_node("ns=2;s=Pump1.Fault")

                async def faulted() -> bool:
                    return bool(await fault.read_value())

                await _wait_for(faulted)
                assert await client.get_node("ns=2;s=Pump1.Vibration").read_value() > 6

    run(go(), timeout_s=30)


def test_opcua_with_basic256sha256(tmp_path: Path) -> None:
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    async def go() -> None:
        skey, scert = tmp_path / "server-key.pem", tmp_path / "server-cert.der"
        ckey, ccert = tmp_path / "client-key.pem", tmp_path / "client-cert.der"
        await setup_self_signed_certificate(
            skey, scert, "urn:fogmesh:virtual-plc:server", "localhost",
            [ExtendedKeyUsageOID.SERVER_AUTH], {"commonName": "vplc"},
        )  # fmt: skip
        await setup_self_signed_certificate(
            ckey, ccert, "urn:fogmesh:test-client", "localhost",
            [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "client"},
        )  # fmt: skip
        async with VirtualPlc(
            pumps=1, modbus_tcp=False, opcua_cert=scert, opcua_key=skey, update_ms=60_000
        ) as plc:
            assert plc.opcua_endpoint is not None
            client = Client(plc.opcua_endpoint)
            client.application_uri = "urn:fogmesh:test-client"
            await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{ccert},{ckey}")
            async with client:
                got = await client.get_node("ns=2;s=Pump1.Flow").read_value()
                assert got == plc.values(1)["flow_m3h"]
            plain = Client(plc.opcua_endpoint, timeout=2)
            with pytest.raises(Exception):  # noqa: B017 - no None endpoint to talk to
                async with plain:
                    await plain.get_node("ns=2;s=Pump1.Flow").read_value()

    run(go(), timeout_s=40)


# --- the farm ---------------------------------------------------------------------------------


def test_farm_serves_every_device_with_changing_values() -> None:
    kinds: tuple[Kind, ...] = ("uint16", "float32")

    async def go() -> None:
        for kind in kinds:
            async with ServerFarm(20, 10, kind=kind, update_ms=100) as farm:
                assert len(set(farm.ports)) == 20
                for d, port in enumerate(farm.ports):
                    async with tcp_client(port) as c:
                        rsp = await c.read_holding_registers(0, count=farm.registers_per_device)
                        k = farm.step()
                        regs = rsp.registers
                        got: list[float | int] = list(regs)
                        if kind == "float32":
                            got = [f32_abcd(regs[2 * j : 2 * j + 2]) for j in range(10)]
                        # the step may tick between the read and here: accept k or k - 1
                        assert got in (
                            [farm_value(kind, d, j, k) for j in range(10)],
                            [farm_value(kind, d, j, k - 1) for j in range(10)],
                        )
                        fc4 = await c.read_input_registers(0, count=2, device_id=3)
                        assert not fc4.isError()
                assert farm.requests == 40
                async with tcp_client(farm.ports[0]) as c:
                    a = (await c.read_holding_registers(0, count=1)).registers[0]
                    await asyncio.sleep(0.25)
                    b = (await c.read_holding_registers(0, count=1)).registers[0]
                    assert b != a

    run(go())


def test_farm_cli_reports_ports_and_its_own_cpu(tmp_path: Path) -> None:
    ready = tmp_path / "farm.json"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tools.virtual_plc.farm"),
            *("--devices", "8", "--tags", "5", "--ready-file", str(ready)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert len(info["ports"]) == 8 and info["registers_per_device"] == 5

        async def poll_all() -> None:
            for port in info["ports"]:
                async with tcp_client(port) as c:
                    assert len((await c.read_holding_registers(0, count=5)).registers) == 5

        run(poll_all())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines[0]["ports"] == info["ports"]
    report = lines[-1]
    assert report["requests"] == 8 and report["cpu_s"] >= 0 and report["cpu_per_request_us"] > 0


def test_cli_main_serves_until_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "plc.json"
    code = "import sys, tools.virtual_plc as v; sys.exit(v.main())"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-c", code, "--pumps", "1", "--modbus-port", "0", "--no-opcua"),
            *("--fault", "kind=exception,unit=1,code=3", "--ready-file", str(ready)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["units"] == {"1": "pump1", "10": "meter"} and info["opcua"] is None
        port = int(info["modbus_tcp"].rsplit(":", 1)[1])

        async def check() -> None:
            async with tcp_client(port) as c:
                assert exc_code(await c.read_input_registers(0, count=2, device_id=1)) == 3
                assert not (await c.read_input_registers(0, count=2, device_id=10)).isError()

        run(check())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    bad = subprocess.run(
        [sys.executable, "-c", code, "--pumps", "1", "--no-opcua", "--fault", "kind=melt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 1 and "melt" in bad.stderr and "Traceback" not in bad.stderr
