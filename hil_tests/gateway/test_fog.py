"""The fog side: dedup by (site, gateway, seq), gap reports that tell loss from declared drops, tail."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway import wire
from gateway.config.models import MqttOptions
from gateway.errors import StoreError, UplinkError
from gateway.fog import FogStore, gap_report, gap_report_url, merge_ranges, subtract_ranges, tail
from gateway.model import GATEWAY_DEVICE, KIND_GAP
from tools.mosquitto import Mosquitto

pytestmark = pytest.mark.timeout(60)


def env(seq: int, *, gateway: str = "gw1", data: dict[str, Any] | None = None) -> wire.Envelope:
    return wire.Envelope(
        "s1", gateway, "pump", "raw", seq, 1_700_000_000_000 + seq, False, data or {"v": seq}
    )


def gap_env(seq: int, ranges: list[Any], rejected: dict[str, Any]) -> wire.Envelope:
    return wire.Envelope(
        "s1",
        "gw1",
        GATEWAY_DEVICE,
        KIND_GAP,
        seq,
        0,
        False,
        {"ranges": ranges, "rejected": rejected},
    )


# ---- range arithmetic ------------------------------------------------------------------------

ranges_st = st.lists(
    st.tuples(st.integers(1, 60), st.integers(0, 8)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=8,
)


def _set(ranges: list[tuple[int, int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b + 1)}


@settings(max_examples=300, deadline=None)
@given(ranges_st, ranges_st)
def test_range_arithmetic_matches_sets(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    merged = merge_ranges(a)
    assert _set(merged) == _set(a)
    assert all(x[1] + 1 < y[0] for x, y in itertools.pairwise(merged))  # disjoint
    assert _set(subtract_ranges(a, b)) == _set(a) - _set(b)


# ---- the store -------------------------------------------------------------------------------


def test_insert_counts_duplicates_and_keeps_conflicts(tmp_path: Path) -> None:
    with FogStore(tmp_path / "fog.db") as fog:
        r = fog.insert([env(1), env(2)], received_ms=5)
        assert (r.new, r.duplicates, r.conflicts) == (2, 0, 0)
        resent = wire.Envelope("s1", "gw1", "pump", "raw", 2, env(2).ts_ms, True, {"v": 2})
        r = fog.insert([resent, env(3)])
        assert (r.new, r.duplicates, r.conflicts) == (1, 1, 0)
        assert r.outcomes == ["duplicate", "new"]
        reused = env(1, data={"v": "different"})  # same seq, other content: a reset gateway
        r = fog.insert([reused])
        assert (r.new, r.duplicates, r.conflicts) == (0, 0, 1)
        assert fog.seqs("s1", "gw1") == [1, 2, 3]
        rows = fog.rows()
        assert [(x["seq"], x["historical"], x["data"]) for x in rows] == [
            (1, False, {"v": 1}),
            (2, False, {"v": 2}),  # the first copy is kept
            (3, False, {"v": 3}),
        ]
        assert rows[0]["received_ms"] == 5
        report = fog.gap_report()["gateways"][0]
        assert (report["duplicates"], report["conflicts"]) == (1, 1)
        assert report["complete"] is False  # a reused seq needs a human
        db = fog._conn()
        assert db.execute("SELECT seq, data FROM conflicts").fetchall() != []


def test_gap_report_separates_lost_from_declared(tmp_path: Path) -> None:
    missing = {3, 4, 5, 10, 15, 16, 17}
    with FogStore(tmp_path / "fog.db") as fog:
        fog.insert([env(s) for s in range(1, 21) if s not in missing and s != 19])
        fog.insert(
            [
                gap_env(
                    19,
                    [[3, 5, "drop_oldest"], [15, 16, "expired"], "junk", [9, 2, "x"]],
                    {"reject_new": 4, "disk_full": 1, "weird": "n"},
                )
            ]
        )
        fog.insert([env(22), env(22)])  # 21 missing at the end, and a duplicate
        report = gap_report(fog)
    (g,) = report["gateways"]
    assert (g["site"], g["gateway"]) == ("s1", "gw1")
    assert g["received"] == 20 - len(missing) + 1
    assert (g["first_seq"], g["last_seq"]) == (1, 22)
    assert g["missing"] == [[3, 5], [10, 10], [15, 17], [21, 21]]
    assert g["missing_count"] == 8
    assert g["declared"] == [[3, 5, "drop_oldest"], [15, 16, "expired"]]  # malformed items skipped
    assert g["declared_missing_count"] == 5
    assert g["lost"] == [[10, 10], [17, 17], [21, 21]]
    assert g["lost_count"] == 3
    assert g["rejected"] == {"disk_full": 1, "reject_new": 4}
    assert g["duplicates"] == 1
    assert g["complete"] is False
    assert report["lost"] == 3 and report["complete"] is False


def test_gap_report_from_the_start_or_from_the_first_seen(tmp_path: Path) -> None:
    with FogStore(tmp_path / "fog.db") as fog:
        fog.insert([env(s) for s in (5, 6, 8)])
        fog.insert([env(1, gateway="gw2")])
        (g,) = fog.gap_report(gateway="gw1")["gateways"]
        assert g["lost"] == [[1, 4], [7, 7]]
        (g,) = fog.gap_report(gateway="gw1", from_seq=None)["gateways"]
        assert g["lost"] == [[7, 7]]
        full = fog.gap_report()
        assert [x["gateway"] for x in full["gateways"]] == ["gw1", "gw2"]
        assert full["lost"] == 5
        assert fog.gap_report(gateway="gw2")["complete"] is True


def test_opening_a_missing_store_without_create_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no fog store"):
        FogStore(tmp_path / "nope.db").open(create=False)


# ---- tail over a fog store -------------------------------------------------------------------


def test_tail_sqlite_prints_everything_then_follows_new_rows(tmp_path: Path) -> None:
    path = tmp_path / "fog.db"
    with FogStore(path) as fog:
        fog.insert([env(s) for s in range(1, 4)])
    url = f"sqlite:///{path}"
    seen: list[dict[str, Any]] = []
    assert asyncio.run(tail(url, on_message=seen.append)) == 3
    assert [m["seq"] for m in seen] == [1, 2, 3]
    assert seen[0]["data"] == {"v": 1} and seen[0]["device"] == "pump"

    async def follow() -> list[int]:
        got: list[dict[str, Any]] = []
        stop = asyncio.Event()
        task = asyncio.create_task(
            tail(url, on_message=got.append, follow=True, stop=stop, poll_interval_s=0.02)
        )
        for _ in range(100):
            if len(got) == 3:
                break
            await asyncio.sleep(0.02)
        with FogStore(path) as fog:
            fog.insert([env(4), env(5)])
        for _ in range(200):
            if len(got) == 5:
                break
            await asyncio.sleep(0.02)
        stop.set()
        assert await asyncio.wait_for(task, 5) == 5
        return [m["seq"] for m in got]

    assert asyncio.run(follow()) == [1, 2, 3, 4, 5]
    assert asyncio.run(gap_report_url(url))["complete"] is True


# ---- tail over MQTT --------------------------------------------------------------------------


def publish(
    broker: Mosquitto,
    items: list[tuple[str, bytes]],
    version: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
) -> None:
    """Publish at QoS 1 with a plain paho client and wait for every PUBACK."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=version)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1) for t, p in items]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def topic(e: wire.Envelope) -> str:
    return wire.topic_for(e.site, e.gateway, e.device, e.kind)


@pytest.mark.broker
@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_tail_mqtt_persistent_session_gets_what_was_published_while_away(
    mosquitto: Mosquitto, tmp_path: Path, version: str
) -> None:
    opts = MqttOptions(version=version)  # type: ignore[arg-type]
    paho_version = MQTTProtocolVersion.MQTTv5 if version == "5" else MQTTProtocolVersion.MQTTv311
    url = mosquitto.url

    async def session(store: FogStore | None = None) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        await tail(
            url, on_message=got.append, idle_s=0.5, options=opts, client_id="fog-1", store=store
        )
        return got

    assert asyncio.run(session()) == []  # creates the persistent session
    publish(
        mosquitto,
        [(topic(env(s)), wire.encode(env(s))) for s in (1, 2, 3)]
        + [
            ("fogmesh/v1/s1/gw1/pump/raw", b"\xff garbage"),
            ("fogmesh/v1/s1/gw1/_gateway/state", b"online"),
            (topic(env(2)), wire.encode(env(2))),  # a re-send
        ],
        paho_version,
    )
    with FogStore(tmp_path / "fog.db") as fog:
        got = asyncio.run(session(fog))
        assert [m.get("seq") for m in got if "seq" in m] == [1, 2, 3, 2]
        assert [m["duplicate"] for m in got if "seq" in m] == [False, False, False, True]
        errors = [m for m in got if "error" in m]
        assert len(errors) == 1 and errors[0]["topic"] == "fogmesh/v1/s1/gw1/pump/raw"
        assert [m["state"] for m in got if m.get("kind") == "state"] == ["online"]
        assert fog.seqs("s1", "gw1") == [1, 2, 3]
        assert fog.gap_report()["gateways"][0]["duplicates"] == 1
    # Stored and acknowledged: the broker has nothing left for this session.
    assert [m for m in asyncio.run(session()) if "seq" in m] == []


@pytest.mark.broker
def test_gap_report_url_over_mqtt(mosquitto: Mosquitto) -> None:
    async def report() -> dict[str, Any]:
        return await gap_report_url(mosquitto.url, idle_s=0.5, client_id="fog-gaps")

    asyncio.run(report())  # session
    publish(mosquitto, [(topic(env(s)), wire.encode(env(s))) for s in (1, 2, 4)])
    (g,) = asyncio.run(report())["gateways"]
    assert g["lost"] == [[3, 3]]


@pytest.mark.broker
def test_tail_mqtt_without_follow_reports_an_unreachable_broker(mosquitto: Mosquitto) -> None:
    url = mosquitto.url
    mosquitto.stop()
    with pytest.raises(UplinkError, match="cannot connect"):
        asyncio.run(tail(url, on_message=lambda _m: None, idle_s=0.2))


@pytest.mark.broker
def test_an_error_in_on_message_comes_out_of_tail(mosquitto: Mosquitto) -> None:
    def boom(_msg: dict[str, Any]) -> None:
        raise RuntimeError("printer on fire")

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            tail(mosquitto.url, on_message=boom, follow=True, stop=stop, client_id="fog-boom")
        )
        await asyncio.sleep(0.3)
        await asyncio.to_thread(publish, mosquitto, [(topic(env(1)), wire.encode(env(1)))])
        with pytest.raises(RuntimeError, match="printer on fire"):
            await asyncio.wait_for(task, 10)

    asyncio.run(run())
