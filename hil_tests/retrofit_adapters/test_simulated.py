"""The simulated device: a deterministic pump process within documented bands, and every fault."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError
from retrofit_adapters.base import Reading
from retrofit_adapters.simulated.adapter import GARBAGE_TAG, SimulatedAdapter
from retrofit_adapters.simulated.config import PROCESS_SIGNALS, SimulatedDevice
from retrofit_adapters.simulated.process import (
    MODELS,
    NOISE_STEP_S,
    device_fault,
    normal_value,
    unit_noise,
    value,
)

SIGNALS = PROCESS_SIGNALS["pump"]
# The bands docs/adapters.md promises; the demo's alarm rules sit outside them.
DOCUMENTED_BANDS = {
    "flow_m3h": (36.0, 44.0),
    "pressure_bar": (3.8, 4.2),
    "temperature_c": (40.0, 50.0),
    "vibration_mm_s": (1.5, 2.5),
}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def device(**kw: Any) -> SimulatedDevice:
    return SimulatedDevice.model_validate({"id": "pump1", "type": "simulated", **kw})


def fault(kind: str, at_s: float, duration_s: float, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "at_s": at_s, "duration_s": duration_s, **kw}


def read_at(adapter: SimulatedAdapter, clock: FakeClock, t: float) -> dict[str, Any]:
    """Read at process time t (the adapter must be open and its t0 at clock 1000)."""
    clock.now = 1000.0 + t
    return {r.tag: r.value for r in asyncio.run(adapter.read())}


def opened(dev: SimulatedDevice, clock: FakeClock) -> SimulatedAdapter:
    adapter = SimulatedAdapter(dev, clock=clock)
    clock.now = 1000.0
    asyncio.run(adapter.open())
    return adapter


# --- the process model ---------------------------------------------------------------


def test_model_signals_match_config_and_documented_bands() -> None:
    assert tuple(MODELS["pump"]) == SIGNALS
    for name, sig in MODELS["pump"].items():
        assert (sig.low, sig.high) == DOCUMENTED_BANDS[name]
        reach = abs(sig.amplitude) + sig.noise
        # strictly inside: rounding can never carry a normal value onto an alarm limit
        assert sig.low < sig.mean - reach and sig.mean + reach < sig.high, name


def test_same_seed_same_values_and_different_seed_different() -> None:
    times = [0.0, 0.05, 1.0, 17.3, 3600.0]
    for sig in SIGNALS:
        a = [normal_value("pump", 7, sig, t) for t in times]
        assert a == [normal_value("pump", 7, sig, t) for t in times]
        assert a != [normal_value("pump", 8, sig, t) for t in times]


def test_noise_is_bounded_uniform_and_changes_every_step() -> None:
    draws = [unit_noise(3, "flow_m3h", i) for i in range(20_000)]
    assert all(-1.0 <= d < 1.0 for d in draws)
    assert min(draws) < -0.99 and max(draws) > 0.99  # uses the whole band
    assert abs(sum(draws) / len(draws)) < 0.02  # centred
    # Uniform: each tenth of the band holds about a tenth of the draws (Gaussian would not).
    deciles = [sum(1 for d in draws if -1 + 0.2 * k <= d < -1 + 0.2 * (k + 1)) for k in range(10)]
    assert all(1700 < n < 2300 for n in deciles), deciles

    # Noise holds within a step (only the slow wave moves) and is redrawn at the next one.
    def vib(t: float) -> float:
        return normal_value("pump", 3, "vibration_mm_s", t)

    assert abs(vib(5.02) - vib(5.08)) < 1e-3
    jumps = [
        abs(vib(5.05 + k * NOISE_STEP_S) - vib(5.05 + (k + 1) * NOISE_STEP_S)) for k in range(50)
    ]
    assert max(jumps) > 0.1


def test_normal_values_stay_in_band_over_many_steps() -> None:
    for seed in range(4):
        for step in range(0, 40_000, 3):  # more than an hour of process time, every 0.3 s
            t = step * NOISE_STEP_S
            for name in SIGNALS:
                lo, hi = DOCUMENTED_BANDS[name]
                assert lo <= normal_value("pump", seed, name, t) <= hi, (seed, t, name)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(min_value=-(2**63), max_value=2**64),
    t=st.floats(min_value=0.0, max_value=1e7, allow_nan=False),
)
def test_normal_values_in_band_for_any_seed_and_time(seed: int, t: float) -> None:
    for name in SIGNALS:
        lo, hi = DOCUMENTED_BANDS[name]
        assert lo <= normal_value("pump", seed, name, t) <= hi


def test_pressure_runs_against_flow() -> None:
    # Shared phase, opposite sign: averaged over a cycle, high flow comes with low pressure.
    ts = [i * 5.0 for i in range(120)]
    flow = [normal_value("pump", 1, "flow_m3h", t) - 40.0 for t in ts]
    press = [normal_value("pump", 1, "pressure_bar", t) - 4.0 for t in ts]
    assert sum(f * p for f, p in zip(flow, press, strict=True)) < 0


def test_tag_faults_spike_drift_stuck() -> None:
    faults = [
        *device(
            faults=[
                fault("spike", 10.0, 2.0, tag="vibration_mm_s", magnitude=5.0),
                fault("drift", 10.0, 5.0, tag="temperature_c", magnitude=2.0),
                fault("stuck", 10.0, 3.0, tag="flow_m3h"),
            ]
        ).faults
    ]

    def v(name: str, t: float) -> float:
        return value("pump", 1, name, t, faults)

    def n(name: str, t: float) -> float:
        return normal_value("pump", 1, name, t)

    for t in (9.99, 12.0, 20.0):  # spike: outside its window nothing changes
        assert v("vibration_mm_s", t) == n("vibration_mm_s", t)
    for t in (10.0, 11.0, 11.99):
        assert v("vibration_mm_s", t) == pytest.approx(n("vibration_mm_s", t) + 5.0)
        assert v("vibration_mm_s", t) > DOCUMENTED_BANDS["vibration_mm_s"][1] + 2.0
    assert v("temperature_c", 10.0) == pytest.approx(n("temperature_c", 10.0))
    assert v("temperature_c", 13.0) == pytest.approx(n("temperature_c", 13.0) + 6.0)
    assert v("temperature_c", 15.0) == n("temperature_c", 15.0)  # ended
    frozen = n("flow_m3h", 10.0)
    assert [v("flow_m3h", t) for t in (10.0, 10.5, 12.9)] == [frozen] * 3
    assert n("flow_m3h", 12.9) != frozen  # so the freeze is real
    assert v("flow_m3h", 13.0) == n("flow_m3h", 13.0)


def test_stuck_freezes_the_faulted_value_including_other_faults() -> None:
    faults = device(
        faults=[
            fault("drift", 0.0, 100.0, tag="pressure_bar", magnitude=-0.1),
            fault("stuck", 5.0, 10.0, tag="pressure_bar"),
        ]
    ).faults
    at_start = normal_value("pump", 2, "pressure_bar", 5.0) - 0.5
    assert value("pump", 2, "pressure_bar", 9.0, faults) == pytest.approx(at_start)


def test_device_fault_precedence() -> None:
    faults = device(
        faults=[
            fault("garbage", 0.0, 10.0),
            fault("raise", 2.0, 2.0),
            fault("disconnect", 3.0, 0.5),
        ]
    ).faults
    assert [device_fault(faults, t) for t in (1.0, 2.5, 3.2, 5.0, 10.0)] == [
        "garbage",
        "raise",
        "disconnect",
        "garbage",
        None,
    ]


# --- the adapter ---------------------------------------------------------------------


def test_adapter_declares_its_contract() -> None:
    assert SimulatedAdapter.type_name == "simulated"
    assert SimulatedAdapter.config_model is SimulatedDevice
    assert SimulatedAdapter.capabilities == frozenset({"read"})


def test_reads_every_signal_as_a_pure_function_of_time_since_first_open() -> None:
    clock = FakeClock()
    dev = device(seed=5)
    adapter = opened(dev, clock)
    got = read_at(adapter, clock, 12.25)  # exact in binary, so 1012.25 - 1000 is too
    assert list(got) == list(SIGNALS)
    assert got == {s: normal_value("pump", 5, s, 12.25) for s in SIGNALS}
    readings = asyncio.run(adapter.read())
    assert all(isinstance(r, Reading) and r.ts is None for r in readings)
    # A reconnect does not restart the process.
    asyncio.run(adapter.close())
    clock.now = 1020.0
    asyncio.run(adapter.open())
    assert read_at(adapter, clock, 30.0)["flow_m3h"] == normal_value("pump", 5, "flow_m3h", 30.0)
    # Two adapters with the same seed agree; another seed does not.
    twin = opened(device(seed=5), clock)
    other = opened(device(seed=6), clock)
    assert read_at(twin, clock, 7.0) == read_at(adapter, clock, 7.0)
    assert read_at(other, clock, 7.0) != read_at(adapter, clock, 7.0)


def test_only_configured_tags_are_returned() -> None:
    clock = FakeClock()
    dev = device(tags=[{"name": "vibration_mm_s"}, {"name": "flow_m3h"}])
    adapter = opened(dev, clock)
    assert adapter.tag_names() == ["vibration_mm_s", "flow_m3h"]
    assert list(read_at(adapter, clock, 1.0)) == ["vibration_mm_s", "flow_m3h"]


def test_tag_the_model_lacks_is_refused() -> None:
    with pytest.raises(DeviceError, match="no signal 'rpm'"):
        SimulatedAdapter(device(tags=[{"name": "rpm"}]))


def test_needs_a_simulated_config() -> None:
    with pytest.raises(TypeError):
        SimulatedAdapter(DeviceBase(id="x"))


def test_read_before_open_and_after_exit_fails() -> None:
    async def go() -> None:
        adapter = SimulatedAdapter(device(), clock=FakeClock())
        with pytest.raises(DeviceError, match="not open"):
            await adapter.read()
        async with adapter as a:
            assert len(await a.read()) == 4
        with pytest.raises(DeviceError, match="not open"):
            await adapter.read()

    asyncio.run(go())


def test_writes_are_refused() -> None:
    adapter = SimulatedAdapter(device())
    with pytest.raises(DeviceError, match="does not support writes"):
        asyncio.run(adapter.write("flow_m3h", 1.0))


def test_tag_fault_shows_through_the_adapter() -> None:
    clock = FakeClock()
    dev = device(faults=[fault("spike", 4.0, 1.0, tag="vibration_mm_s", magnitude=5.0)])
    adapter = opened(dev, clock)
    assert read_at(adapter, clock, 3.9)["vibration_mm_s"] <= 2.5
    assert read_at(adapter, clock, 4.5)["vibration_mm_s"] >= 6.5


def test_raise_fault() -> None:
    clock = FakeClock()
    adapter = opened(device(faults=[fault("raise", 2.0, 1.0)]), clock)
    assert len(read_at(adapter, clock, 1.9)) == 4
    with pytest.raises(DeviceError, match="raise fault"):
        read_at(adapter, clock, 2.0)
    assert len(read_at(adapter, clock, 3.0)) == 4


def test_hang_fault_blocks_the_read_until_cancelled() -> None:
    clock = FakeClock()
    adapter = opened(device(faults=[fault("hang", 2.0, 1.0)]), clock)

    async def go() -> None:
        clock.now = 1002.5
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(adapter.read(), 0.02)
        clock.now = 1003.0
        assert len(await asyncio.wait_for(adapter.read(), 0.5)) == 4

    asyncio.run(go())


def test_garbage_fault() -> None:
    clock = FakeClock()
    adapter = opened(device(faults=[fault("garbage", 1.0, 5.0)]), clock)
    for t in (1.0, 1.1, 1.2, 1.3, 1.4, 2.0):  # the junk rotates; every read is garbage
        clock.now = 1000.0 + t
        assert_all_garbage(list(asyncio.run(adapter.read())))
    clock.now = 1006.0
    assert len(asyncio.run(adapter.read())) == 4


def assert_all_garbage(junk: list[Any]) -> None:
    readings = [r for r in junk if isinstance(r, Reading)]
    assert len(junk) > len(readings)  # something that is not a Reading at all
    assert GARBAGE_TAG in {r.tag for r in readings}
    values = [r.value for r in readings if r.tag in SIGNALS]
    assert len(values) == 4
    # Every configured value is non-finite or not a value type at all.
    for v in values:
        assert not isinstance(v, bool | int | str)
        assert not (isinstance(v, float) and math.isfinite(v))
    assert any(isinstance(v, float) and math.isnan(v) for v in values)
    assert any(not isinstance(v, float) for v in values)


def test_disconnect_fault_drops_the_connection_and_refuses_reopen() -> None:
    clock = FakeClock()
    adapter = opened(device(faults=[fault("disconnect", 2.0, 1.0)]), clock)

    async def go() -> None:
        clock.now = 1002.2
        with pytest.raises(DeviceError, match="connection lost"):
            await adapter.read()
        clock.now = 1002.3
        with pytest.raises(DeviceError, match="not open"):
            await adapter.read()  # dropped: stays down until reopened
        with pytest.raises(DeviceError, match="connection refused"):
            await adapter.open()
        clock.now = 1003.0
        await adapter.open()
        assert len(await adapter.read()) == 4

    asyncio.run(go())


def test_disconnect_from_the_start_still_starts_the_process_clock() -> None:
    clock = FakeClock()
    adapter = SimulatedAdapter(device(faults=[fault("disconnect", 0.0, 1.0)]), clock=clock)
    with pytest.raises(DeviceError):
        asyncio.run(adapter.open())
    clock.now = 1001.5
    asyncio.run(adapter.open())
    assert adapter.elapsed_s() == 1.5
