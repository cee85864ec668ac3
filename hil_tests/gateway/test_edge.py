"""Tests of the edge stage: window maths and alignment, deadband and heartbeat forwarding, rules,
routing by `forward`; properties checked with hypothesis against naive reference computations."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.models import GatewayConfig
from gateway.edge import EdgeStage
from gateway.model import KIND_EVENT, KIND_RAW, KIND_SUMMARY, Outgoing, Quality, Sample, Value

GOOD = Quality.GOOD
BAD = Quality.BAD
UNCERTAIN = Quality.UNCERTAIN
T0 = 1_700_000_000.0  # a multiple of 10 s and 20 s: windows of those lengths start here
DEV = "pump1"

PROPS = settings(max_examples=150, deadline=None)


def make_cfg(
    tags: list[dict[str, Any]] | None,
    rules: list[dict[str, Any]] | None = None,
    window_s: float = 10.0,
    extra_devices: list[dict[str, Any]] | None = None,
) -> GatewayConfig:
    device: dict[str, Any] = {"id": DEV, "type": "simulated"}
    if tags is not None:
        device["tags"] = tags
    return GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw1", "site": "plant"},
            "edge": {"window_s": window_s},
            "devices": [device, *(extra_devices or [])],
            "rules": rules or [],
        }
    )


def stage(tags: list[dict[str, Any]] | None, **kw: Any) -> EdgeStage:
    grace_s = kw.pop("grace_s", 0.0)
    return EdgeStage(make_cfg(tags, **kw), grace_s=grace_s)


def s(tag: str, value: Value, ts: float, q: Quality = GOOD, device: str = DEV) -> Sample:
    return Sample(device, tag, value, q, ts)


def of_kind(msgs: list[Outgoing], kind: str) -> list[Outgoing]:
    return [m for m in msgs if m.kind == kind]


# ---------------------------------------------------------------------------------------------
# windows


@PROPS
@given(
    points=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=39.999, allow_nan=False),  # offset from T0
            st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
            st.booleans(),  # BAD quality?
        ),
        min_size=1,
        max_size=60,
    ),
    order=st.randoms(use_true_random=False),
)
def test_window_stats_match_naive_computation(
    points: list[tuple[float, float, bool]], order: Any
) -> None:
    edge = stage([{"name": "flow_m3h", "unit": "m3/h"}], window_s=10.0)
    samples = [s("flow_m3h", v, T0 + off, BAD if bad else GOOD) for off, v, bad in points]
    order.shuffle(samples)  # arrival order within open windows does not matter
    assert edge.process(samples) == []
    summaries = edge.tick(T0 + 40.0)

    expected: dict[int, tuple[list[float], int]] = {}
    for off, v, bad in points:
        k = math.floor(round((T0 + off) * 1000) / 10_000)
        vals, nbad = expected.setdefault(k, ([], 0))
        if bad:
            expected[k] = (vals, nbad + 1)
        else:
            vals.append(v)
    assert [m.ts_ms for m in summaries] == sorted(k * 10_000 for k in expected)
    for m in summaries:
        vals, nbad = expected[m.ts_ms // 10_000]
        body = m.data["tags"]["flow_m3h"]
        assert m.kind == KIND_SUMMARY and m.device == DEV and m.data["partial"] is False
        assert body["count"] == len(vals)
        assert body["bad"] == nbad
        assert body["unit"] == "m3/h"
        if not vals:
            assert body["min"] is body["max"] is body["mean"] is body["std"] is None
            continue
        arr = np.array(vals, dtype=np.float64)
        scale = 1e-9 * (1.0 + float(np.max(np.abs(arr))))
        assert body["min"] == float(arr.min())
        assert body["max"] == float(arr.max())
        assert math.isclose(body["mean"], float(arr.mean()), rel_tol=1e-9, abs_tol=scale)
        assert math.isclose(body["std"], float(arr.std(ddof=0)), rel_tol=1e-7, abs_tol=scale)
    assert edge.stats().summaries_out == len(summaries)


def test_std_is_population_std_and_stable_with_a_large_offset() -> None:
    edge = stage([{"name": "pressure_bar"}])
    base = 1e9  # a naive sum-of-squares would lose every digit of the spread here
    vals = [base + 4, base + 7, base + 13, base + 16]
    edge.process([s("pressure_bar", v, T0 + i) for i, v in enumerate(vals)])
    (m,) = edge.tick(T0 + 10)
    body = m.data["tags"]["pressure_bar"]
    assert body["count"] == 4
    assert body["mean"] == pytest.approx(base + 10, abs=1e-6)
    assert body["std"] == pytest.approx(math.sqrt(22.5), abs=1e-6)  # population, not sample (√30)


def test_single_value_window_has_zero_std() -> None:
    edge = stage([{"name": "flow_m3h"}])
    edge.process([s("flow_m3h", 3, T0 + 1)])
    (m,) = edge.tick(T0 + 10)
    assert m.data["tags"]["flow_m3h"] == {
        "count": 1,
        "min": 3.0,
        "max": 3.0,
        "mean": 3.0,
        "std": 0.0,
        "bad": 0,
        "unit": "",
    }


def test_windows_are_aligned_to_epoch_multiples_by_sample_ts() -> None:
    edge = stage([{"name": "flow_m3h"}], window_s=60.0)
    # 1700000030 s lies in [1699999980, 1700000040); arrival time plays no part
    edge.process([s("flow_m3h", 1.0, 1_700_000_030.0), s("flow_m3h", 2.0, 1_700_000_039.999)])
    edge.process([s("flow_m3h", 5.0, 1_700_000_040.0)])  # start is inclusive: next window
    assert edge.tick(1_700_000_039.999) == []  # end not reached yet
    (first,) = edge.tick(1_700_000_040.0)  # end <= now closes it
    assert first.ts_ms == 1_699_999_980_000
    assert first.data["start_ms"] == 1_699_999_980_000
    assert first.data["end_ms"] == 1_700_000_040_000
    assert first.data["window_s"] == 60.0
    assert first.data["tags"]["flow_m3h"]["count"] == 2
    assert edge.tick(1_700_000_050.0) == []  # nothing is summarised twice
    (second,) = edge.tick(1_700_000_100.0)
    assert second.data["start_ms"] == 1_700_000_040_000
    assert second.data["tags"]["flow_m3h"]["mean"] == 5.0


def test_fractional_window_length_uses_whole_milliseconds() -> None:
    edge = stage([{"name": "flow_m3h", "window_s": 0.1}])
    # 1.0 // 0.1 == 9.0 in float arithmetic; in milliseconds 1000 // 100 == 10 exactly
    edge.process([s("flow_m3h", 1.0, 1.0), s("flow_m3h", 2.0, 1.05)])
    (m,) = edge.tick(1.1)
    assert (m.data["start_ms"], m.data["end_ms"], m.data["window_s"]) == (1000, 1100, 0.1)
    assert m.data["tags"]["flow_m3h"]["count"] == 2


def test_timestamps_are_rounded_to_the_nearest_millisecond() -> None:
    edge = stage([{"name": "flow_m3h", "window_s": 0.1, "forward": "raw"}])
    ts = 0.7 + 0.1  # 0.7999999999999999: float noise must not move it out of [0.8, 0.9)
    (raw,) = edge.process([s("flow_m3h", 1.0, ts)])
    (m,) = edge.tick(0.9)
    assert (raw.ts_ms, m.data["start_ms"]) == (800, 800)


def test_late_sample_is_counted_and_dropped_not_mixed_into_the_next_window() -> None:
    edge = stage([{"name": "flow_m3h"}])
    edge.process([s("flow_m3h", 1.0, T0 + 5)])
    (closed,) = edge.tick(T0 + 10.5)
    assert closed.data["tags"]["flow_m3h"]["count"] == 1
    edge.process([s("flow_m3h", 1000.0, T0 + 9.9), s("flow_m3h", 2.0, T0 + 10.2)])
    assert edge.stats().samples_late == 1
    (nxt,) = edge.tick(T0 + 20)
    body = nxt.data["tags"]["flow_m3h"]
    assert (nxt.data["start_ms"], body["count"], body["max"]) == (round((T0 + 10) * 1000), 1, 2.0)


def test_a_tick_closes_windows_that_had_no_data_too() -> None:
    edge = stage([{"name": "flow_m3h"}])
    assert edge.tick(T0 + 30) == []
    edge.process([s("flow_m3h", 1.0, T0 + 15)])  # its window ended at T0+20 <= 30
    assert edge.stats().samples_late == 1
    assert edge.flush(T0 + 31) == []


def test_grace_keeps_a_window_open_for_samples_processed_after_its_end() -> None:
    edge = stage([{"name": "flow_m3h"}], grace_s=2.0)
    edge.process([s("flow_m3h", 1.0, T0 + 1)])
    assert edge.tick(T0 + 11.0) == []
    edge.process([s("flow_m3h", 3.0, T0 + 9.8)])  # read before the end, arrives after it
    (m,) = edge.tick(T0 + 12.0)
    assert m.data["tags"]["flow_m3h"]["count"] == 2
    assert edge.stats().samples_late == 0


def test_several_open_windows_close_in_order_on_one_tick() -> None:
    edge = stage([{"name": "flow_m3h"}])
    edge.process([s("flow_m3h", float(i), T0 + 10 * i + 1) for i in range(3)])
    msgs = edge.tick(T0 + 30)
    assert [m.data["tags"]["flow_m3h"]["mean"] for m in msgs] == [0.0, 1.0, 2.0]
    assert [m.ts_ms for m in msgs] == sorted(m.ts_ms for m in msgs)


def test_flush_marks_partial_windows_and_leaves_nothing_behind() -> None:
    edge = stage([{"name": "flow_m3h"}])
    edge.process([s("flow_m3h", 1.0, T0 + 1), s("flow_m3h", 2.0, T0 + 12)])
    msgs = edge.flush(T0 + 14)
    assert [(m.data["start_ms"], m.data["partial"]) for m in msgs] == [
        (round(T0 * 1000), False),  # ended at T0+10 <= now: complete, merely not ticked yet
        (round((T0 + 10) * 1000), True),
    ]
    assert edge.flush(T0 + 15) == []
    edge.process([s("flow_m3h", 9.0, T0 + 19)])  # its window was summarised by the flush
    assert edge.stats().samples_late == 1
    assert edge.tick(T0 + 100) == []
    assert edge.stats().summaries_out == 2


def test_one_summary_per_device_and_window_length_groups_its_tags() -> None:
    edge = stage(
        [
            {"name": "flow_m3h", "unit": "m3/h"},
            {"name": "pressure_bar", "unit": "bar"},
            {"name": "temperature_c", "window_s": 20.0, "unit": "degC"},
            {"name": "vibration_mm_s"},
        ],
        extra_devices=[{"id": "pump2", "type": "simulated", "tags": [{"name": "flow_m3h"}]}],
    )
    edge.process(
        [
            s("flow_m3h", 1.0, T0 + 1),
            s("pressure_bar", 2.0, T0 + 2),
            s("temperature_c", 3.0, T0 + 3),
            s("flow_m3h", 4.0, T0 + 4, device="pump2"),
        ]
    )
    msgs = edge.tick(T0 + 20)
    by_key = {(m.device, m.data["window_s"]): m.data["tags"] for m in msgs}
    assert len(msgs) == 3
    assert set(by_key[(DEV, 10.0)]) == {"flow_m3h", "pressure_bar"}  # silent tag is absent
    assert by_key[(DEV, 10.0)]["pressure_bar"]["unit"] == "bar"
    assert set(by_key[(DEV, 20.0)]) == {"temperature_c"}
    assert set(by_key[("pump2", 10.0)]) == {"flow_m3h"}


def test_value_types_in_windows_bool_string_nan_bad() -> None:
    edge = stage([{"name": "flow_m3h"}, {"name": "pressure_bar"}, {"name": "temperature_c"}])
    edge.process(
        [
            s("flow_m3h", True, T0 + 1),
            s("flow_m3h", False, T0 + 2),
            s("flow_m3h", True, T0 + 3),
            s("flow_m3h", True, T0 + 4),
            s("pressure_bar", "OPEN", T0 + 1),  # strings never enter statistics
            s("temperature_c", math.nan, T0 + 1),  # non-finite: counted as bad
            s("temperature_c", 7.0, T0 + 2, BAD),
            s("temperature_c", 8.0, T0 + 3, UNCERTAIN),
        ]
    )
    (m,) = edge.tick(T0 + 10)
    tags = m.data["tags"]
    assert tags["flow_m3h"]["mean"] == 0.75  # duty cycle
    assert "pressure_bar" not in tags
    assert tags["temperature_c"]["bad"] == 2
    assert tags["temperature_c"]["count"] == 1 and tags["temperature_c"]["mean"] == 8.0
    assert edge.stats().samples_bad == 2


def test_a_window_with_only_bad_samples_reports_them() -> None:
    edge = stage([{"name": "flow_m3h"}])
    edge.process([s("flow_m3h", 1.0, T0 + 1, BAD)])
    (m,) = edge.tick(T0 + 10)
    assert m.data["tags"]["flow_m3h"]["count"] == 0
    assert m.data["tags"]["flow_m3h"]["bad"] == 1
    assert m.data["tags"]["flow_m3h"]["mean"] is None


# ---------------------------------------------------------------------------------------------
# routing and unknown tags


def test_forward_none_summary_raw_routing() -> None:
    edge = stage(
        [
            {"name": "flow_m3h", "forward": "none"},
            {"name": "pressure_bar"},  # default: summary
            {"name": "temperature_c", "forward": "raw"},
        ]
    )
    out = edge.process([s(n, 1.0, T0 + 1) for n in ("flow_m3h", "pressure_bar", "temperature_c")])
    assert [(m.kind, m.data["tag"]) for m in out] == [(KIND_RAW, "temperature_c")]
    (summary,) = edge.tick(T0 + 10)
    assert set(summary.data["tags"]) == {"pressure_bar", "temperature_c"}
    assert edge.flush(T0 + 11) == []
    st_ = edge.stats()
    assert (st_.raw_out, st_.summaries_out, st_.samples_in) == (1, 1, 3)


def test_unknown_devices_tags_and_disabled_devices_are_counted_not_raised() -> None:
    edge = stage(
        [{"name": "flow_m3h"}],
        extra_devices=[{"id": "pump9", "type": "simulated", "enabled": False}],
        rules=[{"name": "ghost", "device": "pump9", "tag": "flow_m3h", "above": 1.0}],
    )
    out = edge.process(
        [
            s("nope", 1.0, T0, device="pump1"),
            s("flow_m3h", 1.0, T0, device="pump7"),
            s("flow_m3h", 99.0, T0, device="pump9"),
        ]
    )
    assert out == []
    assert edge.tick(T0 + 100) == []
    stats = edge.stats()
    assert (stats.unknown_tag_samples, stats.samples_in) == (3, 3)
    assert edge.unbound_rules == ("ghost",)


def test_simulated_device_without_tags_gets_every_pump_signal() -> None:
    edge = stage(None)
    names = ("flow_m3h", "pressure_bar", "temperature_c", "vibration_mm_s")
    edge.process([s(n, 1.0, T0 + 1) for n in names])
    (m,) = edge.tick(T0 + 10)
    assert set(m.data["tags"]) == set(names)
    assert edge.stats().unknown_tag_samples == 0


def test_non_finite_timestamp_is_counted_bad_not_raised() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw"}])
    assert edge.process([s("flow_m3h", 1.0, math.nan), s("flow_m3h", 10**400, T0)]) == []
    assert edge.stats().samples_bad == 2


def test_stats_is_a_snapshot() -> None:
    edge = stage([{"name": "flow_m3h"}])
    snap = edge.stats()
    edge.process([s("flow_m3h", 1.0, T0)])
    assert (snap.samples_in, edge.stats().samples_in) == (0, 1)


# ---------------------------------------------------------------------------------------------
# raw forwarding: deadband, heartbeat, quality


def raw_values(msgs: list[Outgoing]) -> list[tuple[int, Any]]:
    return [(m.ts_ms, m.data["value"]) for m in msgs if m.kind == KIND_RAW]


values_st = st.lists(
    st.one_of(
        st.floats(min_value=-1000, max_value=1000, allow_nan=False),
        st.integers(min_value=-1000, max_value=1000),
    ),
    min_size=1,
    max_size=80,
)


@PROPS
@given(values=values_st, deadband=st.floats(min_value=0.0, max_value=50.0))
def test_absolute_deadband_property(values: list[float], deadband: float) -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw", "deadband": deadband}])
    sent = raw_values(edge.process([s("flow_m3h", v, T0 + i) for i, v in enumerate(values)]))
    # no two consecutive forwarded values are within the deadband
    for (_, a), (_, b) in itertools.pairwise(sent):
        assert abs(b - a) > deadband
    # and a value is forwarded exactly when it is first or beyond the deadband of the last sent
    expect: list[tuple[int, Any]] = []
    for i, v in enumerate(values):
        if not expect or abs(v - expect[-1][1]) > deadband:
            expect.append((round((T0 + i) * 1000), v))
    assert sent == expect


@PROPS
@given(values=values_st, percent=st.floats(min_value=0.0, max_value=100.0))
def test_percent_deadband_property(values: list[float], percent: float) -> None:
    edge = stage([{"name": "pressure_bar", "forward": "raw", "deadband_percent": percent}])
    sent = raw_values(edge.process([s("pressure_bar", v, T0 + i) for i, v in enumerate(values)]))
    for (_, a), (_, b) in itertools.pairwise(sent):
        assert abs(b - a) > percent / 100.0 * abs(a)
    expect: list[Any] = []
    for v in values:
        if not expect or abs(v - expect[-1]) > percent / 100.0 * abs(expect[-1]):
            expect.append(v)
    assert [v for _, v in sent] == expect


def test_percent_deadband_from_zero_sends_any_change() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw", "deadband_percent": 50.0}])
    out = edge.process([s("flow_m3h", v, T0 + i) for i, v in enumerate([0.0, 0.0, 0.001, 0.0014])])
    assert [v for _, v in raw_values(out)] == [0.0, 0.001]


def test_no_deadband_sends_every_change_and_no_repeat() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw"}])
    vals = [1.0, 1.0, 1.0000001, 1.0000001, 2, 2.0, 1.0]
    out = edge.process([s("flow_m3h", v, T0 + i) for i, v in enumerate(vals)])
    assert [v for _, v in raw_values(out)] == [1.0, 1.0000001, 2, 1.0]
    assert out[0].data == {"tag": "flow_m3h", "value": 1.0, "quality": "good", "unit": ""}
    assert out[0].device == DEV and out[0].ts_ms == round(T0 * 1000)


def test_quality_change_is_forwarded_even_inside_the_deadband() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw", "deadband": 10.0}])
    out = edge.process(
        [
            s("flow_m3h", 5.0, T0),
            s("flow_m3h", 5.1, T0 + 1, UNCERTAIN),
            s("flow_m3h", 5.2, T0 + 2, UNCERTAIN),
            s("flow_m3h", 5.3, T0 + 3, BAD),
            s("flow_m3h", 5.4, T0 + 4),
        ]
    )
    assert [(m.data["value"], m.data["quality"]) for m in out] == [
        (5.0, "good"),
        (5.1, "uncertain"),
        (5.3, "bad"),
        (5.4, "good"),
    ]


def test_non_numeric_and_bool_values_are_sent_when_changed() -> None:
    edge = stage(
        [
            {"name": "flow_m3h", "forward": "raw", "deadband": 5.0},
            {"name": "pressure_bar", "forward": "raw", "deadband": 5.0},
            {"name": "temperature_c", "forward": "raw"},
        ]
    )
    out = edge.process(
        [
            s("flow_m3h", "RUN", T0),
            s("flow_m3h", "RUN", T0 + 1),
            s("flow_m3h", "STOP", T0 + 2),
            s("pressure_bar", False, T0),
            s("pressure_bar", False, T0 + 1),
            s("pressure_bar", True, T0 + 2),  # a deadband of 5 does not swallow a bool change
            s("temperature_c", math.nan, T0),
            s("temperature_c", math.nan, T0 + 1),  # a NaN repeated is not news
            s("temperature_c", 20.0, T0 + 2),
        ]
    )
    assert [
        (m.data["tag"], m.data["value"]) for m in out if not isinstance(m.data["value"], float)
    ] == [
        ("flow_m3h", "RUN"),
        ("flow_m3h", "STOP"),
        ("pressure_bar", False),
        ("pressure_bar", True),
    ]
    temps = [m.data for m in out if m.data["tag"] == "temperature_c"]
    assert len(temps) == 2 and math.isnan(temps[0]["value"]) and temps[0]["quality"] == "bad"
    assert temps[1]["value"] == 20.0 and temps[1]["quality"] == "good"


def test_older_sample_is_not_forwarded_raw() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw"}])
    out = edge.process([s("flow_m3h", 1.0, T0 + 5), s("flow_m3h", 9.0, T0 + 4)])
    assert raw_values(out) == [(round((T0 + 5) * 1000), 1.0)]


@PROPS
@given(
    values=st.lists(
        st.floats(min_value=0, max_value=10, allow_nan=False), min_size=2, max_size=100
    ),
    period_ms=st.integers(min_value=50, max_value=3000),
    heartbeat_ms=st.integers(min_value=100, max_value=20_000),
    deadband=st.floats(min_value=0.0, max_value=20.0),
)
def test_heartbeat_bounds_the_silent_interval(
    values: list[float], period_ms: int, heartbeat_ms: int, deadband: float
) -> None:
    edge = stage(
        [
            {
                "name": "vibration_mm_s",
                "forward": "raw",
                "deadband": deadband,
                "heartbeat_s": heartbeat_ms / 1000.0,
            }
        ]
    )
    start_ms = round(T0 * 1000)
    out: list[Outgoing] = []
    for i, v in enumerate(values):
        ts = (start_ms + i * period_ms) / 1000.0
        out += edge.process([s("vibration_mm_s", v, ts)])
        out += edge.tick(ts)  # a tick right after each sample, as the runtime's 100 ms loop does
    stamps = [m.ts_ms for m in of_kind(out, KIND_RAW)]
    assert stamps[0] == start_ms
    assert len(stamps) == len(set(stamps))  # no sample is ever sent twice
    assert stamps == sorted(stamps)
    for a, b in itertools.pairwise(stamps):
        assert b - a <= heartbeat_ms + period_ms
    last_ms = start_ms + (len(values) - 1) * period_ms
    assert last_ms - stamps[-1] <= heartbeat_ms + period_ms


def test_heartbeat_from_process_resends_an_unchanged_value() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw", "deadband": 1.0, "heartbeat_s": 5.0}])
    out = edge.process([s("flow_m3h", 3.0, T0 + i) for i in range(12)])
    assert [ts for ts, _ in raw_values(out)] == [round((T0 + i) * 1000) for i in (0, 5, 10)]


def test_heartbeat_from_tick_sends_the_newest_unsent_value_once() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw", "deadband": 1.0, "heartbeat_s": 10.0}])
    edge.process([s("flow_m3h", 3.0, T0), s("flow_m3h", 3.4, T0 + 9)])
    assert of_kind(edge.tick(T0 + 9.999), KIND_RAW) == []  # not due yet
    (hb,) = of_kind(edge.tick(T0 + 10), KIND_RAW)
    assert (hb.ts_ms, hb.data["value"]) == (round((T0 + 9) * 1000), 3.4)  # its original ts
    assert edge.tick(T0 + 30) == []  # nothing newer: the stage never repeats a value
    assert edge.flush(T0 + 40) == []
    assert edge.stats().raw_out == 2


def test_flush_sends_the_newest_unsent_raw_value() -> None:
    edge = stage([{"name": "flow_m3h", "forward": "raw", "deadband": 1.0, "window_s": 100.0}])
    edge.process([s("flow_m3h", 3.0, T0), s("flow_m3h", 3.4, T0 + 1), s("flow_m3h", 3.5, T0 + 2)])
    msgs = edge.flush(T0 + 3)
    assert [m.kind for m in msgs] == [KIND_SUMMARY, KIND_RAW]
    assert msgs[0].data["partial"] is True
    assert raw_values(msgs) == [(round((T0 + 2) * 1000), 3.5)]


# ---------------------------------------------------------------------------------------------
# rules


def events(msgs: list[Outgoing]) -> list[tuple[str, str, Any, int]]:
    return [
        (m.data["state"], m.data["direction"], m.data["value"], m.ts_ms)
        for m in msgs
        if m.kind == KIND_EVENT
    ]


def ms(t: float) -> int:
    return round(t * 1000)


def rule_stage(**rule: Any) -> EdgeStage:
    base = {"name": "hot", "device": DEV, "tag": "temperature_c"}
    return stage([{"name": "temperature_c"}], rules=[{**base, **rule}])


def feed(edge: EdgeStage, values: list[float]) -> list[Outgoing]:
    return edge.process([s("temperature_c", v, T0 + i) for i, v in enumerate(values)])


def test_rule_above_activates_strictly_and_clears_with_hysteresis() -> None:
    edge = rule_stage(above=80.0, hysteresis=5.0, severity="critical")
    out = feed(edge, [70.0, 80.0, 80.5, 90.0, 76.0, 75.0, 81.0])
    assert events(out) == [
        ("active", "above", 80.5, ms(T0 + 2)),  # 80.0 is not above 80
        ("cleared", "above", 75.0, ms(T0 + 5)),  # 76 is still inside the hysteresis
        ("active", "above", 81.0, ms(T0 + 6)),
    ]
    first = next(m for m in out if m.kind == KIND_EVENT)
    assert first.device == DEV
    assert first.data == {
        "rule": "hot",
        "tag": "temperature_c",
        "state": "active",
        "value": 80.5,
        "limit": 80.0,
        "direction": "above",
        "severity": "critical",
    }
    assert edge.stats().events_out == 3


def test_rule_event_is_returned_by_the_process_call_of_its_sample() -> None:
    edge = rule_stage(above=80.0)
    assert edge.process([s("temperature_c", 50.0, T0)]) == []
    (ev,) = edge.process([s("temperature_c", 85.0, T0 + 1)])
    assert ev.kind == KIND_EVENT and ev.ts_ms == ms(T0 + 1)


def test_rule_for_ms_needs_the_condition_to_hold_by_sample_time() -> None:
    edge = rule_stage(above=80.0, for_ms=2000)
    # 81 at +1, 82 at +2: 1 s held only; 70 resets; then 81..83 at +4..+6 holds 2 s at +6
    out = feed(edge, [70.0, 81.0, 82.0, 70.0, 81.0, 82.0, 83.0, 84.0])
    assert events(out) == [("active", "above", 83.0, ms(T0 + 6))]


def test_rule_for_ms_restarts_when_the_band_side_changes() -> None:
    edge = rule_stage(above=80.0, below=20.0, for_ms=2000)
    out = feed(edge, [85.0, 10.0, 10.0, 10.0])  # timed from the first 10, not from the 85
    assert events(out) == [("active", "below", 10.0, ms(T0 + 3))]


def test_rule_below() -> None:
    edge = rule_stage(below=10.0, hysteresis=2.0)
    out = feed(edge, [15.0, 10.0, 9.0, 11.0, 12.0])
    assert events(out) == [
        ("active", "below", 9.0, ms(T0 + 2)),
        ("cleared", "below", 12.0, ms(T0 + 4)),
    ]
    assert [m.data["limit"] for m in out] == [10.0, 10.0]


def test_rule_band_crossing_from_one_side_to_the_other() -> None:
    edge = rule_stage(above=80.0, below=20.0, hysteresis=5.0)
    out = feed(edge, [50.0, 90.0, 10.0, 22.0, 26.0, 85.0, 74.0])
    assert events(out) == [
        ("active", "above", 90.0, ms(T0 + 1)),
        ("cleared", "above", 10.0, ms(T0 + 2)),  # straight across: old side clears ...
        ("active", "below", 10.0, ms(T0 + 2)),  # ... and the new side fires (for_ms = 0)
        ("cleared", "below", 26.0, ms(T0 + 4)),  # 22 is within below + hysteresis
        ("active", "above", 85.0, ms(T0 + 5)),
        ("cleared", "above", 74.0, ms(T0 + 6)),
    ]


def test_bad_samples_never_trigger_or_clear_a_rule() -> None:
    edge = rule_stage(above=80.0)
    out = edge.process(
        [
            s("temperature_c", 99.0, T0, BAD),
            s("temperature_c", math.inf, T0 + 1),
            s("temperature_c", "hot", T0 + 2),
            s("temperature_c", 99.0, T0 + 3, UNCERTAIN),
            s("temperature_c", 10.0, T0 + 4, BAD),
        ]
    )
    assert events(out) == [("active", "above", 99.0, ms(T0 + 3))]


def test_rules_apply_to_tags_that_forward_nothing() -> None:
    edge = stage(
        [{"name": "vibration_mm_s", "forward": "none"}],
        rules=[{"name": "shake", "device": DEV, "tag": "vibration_mm_s", "above": 7.1}],
    )
    out = edge.process([s("vibration_mm_s", 9.0, T0)])
    assert [m.kind for m in out] == [KIND_EVENT]
    assert edge.flush(T0 + 100) == []


def test_windows_that_began_before_the_stage_started_are_partial() -> None:
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw", "site": "s"},
            "edge": {"window_s": 10},
            "devices": [{"id": "p1", "type": "simulated", "tags": [{"name": "flow_m3h"}]}],
        }
    )
    stage = EdgeStage(cfg, started=1005.0)  # mid-way through the window [1000, 1010)
    stage.process([Sample("p1", "flow_m3h", 1.0, Quality.GOOD, 1006.0)])
    stage.process([Sample("p1", "flow_m3h", 2.0, Quality.GOOD, 1012.0)])
    first = stage.tick(1010.5)
    assert [m.data["partial"] for m in first] == [True]
    second = stage.tick(1020.5)
    assert [m.data["partial"] for m in second] == [False]
