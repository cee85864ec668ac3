"""The CBOR envelope and topic: round trips, the one-byte historical flag, garbage rejected cleanly."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import wire
from gateway.errors import FogmeshError
from gateway.wire import Envelope, WireError

pytestmark = pytest.mark.timeout(60)


def _env(**over: object) -> Envelope:
    base: dict[str, object] = {
        "site": "plant1",
        "gateway": "gw1",
        "device": "pump-3",
        "kind": "summary",
        "seq": 42,
        "ts_ms": 1_700_000_000_123,
        "historical": False,
        "data": {"tag": "flow", "mean": 1.25, "count": 10, "ok": True, "raw": b"\x00\x01"},
    }
    base.update(over)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    env = _env()
    assert wire.decode(wire.encode(env)) == env


def test_envelope_is_the_documented_cbor_map() -> None:
    obj = cbor2.loads(wire.encode(_env()))
    assert obj == {
        "v": 1,
        "site": "plant1",
        "gateway": "gw1",
        "device": "pump-3",
        "kind": "summary",
        "seq": 42,
        "ts_ms": 1_700_000_000_123,
        "historical": False,
        "data": {"tag": "flow", "mean": 1.25, "count": 10, "ok": True, "raw": b"\x00\x01"},
    }


def test_encoding_is_deterministic_whatever_the_key_order() -> None:
    a = wire.encode(_env(data={"a": 1, "b": 2}))
    b = wire.encode(_env(data={"b": 2, "a": 1}))
    assert a == b


def test_historical_flag_is_one_byte_and_keeps_the_rest() -> None:
    payload = wire.encode(_env(historical=False))
    flagged = wire.as_historical(payload)
    assert len(flagged) == len(payload)
    assert flagged == wire.encode(_env(historical=True))
    back = wire.decode(flagged)
    assert back.historical is True
    assert back.ts_ms == 1_700_000_000_123  # the original time survives backfill
    assert wire.as_historical(flagged) == flagged


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    ts=st.integers(min_value=-(2**62), max_value=2**62),
    device=st.text(min_size=1, max_size=20),
    data=st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=20),
            st.booleans(),
            st.none(),
            st.binary(max_size=16),
        ),
        max_size=6,
    ),
)
def test_round_trip_and_historical_patch_for_any_content(
    seq: int, ts: int, device: str, data: dict[str, object]
) -> None:
    env = _env(seq=seq, ts_ms=ts, device=device, data=data)
    payload = wire.encode(env)
    assert wire.decode(payload) == env
    assert wire.decode(wire.as_historical(payload)) == _env(
        seq=seq, ts_ms=ts, device=device, data=data, historical=True
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff",
        b"\xa1",  # a map that ends early
        b"\x1c",  # reserved additional information
        b"not cbor at all, just text",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps("a string"),
    ],
)
def test_garbage_raises_a_fogmesh_error(payload: bytes) -> None:
    with pytest.raises(WireError) as info:
        wire.decode(payload)
    assert isinstance(info.value, FogmeshError)
    assert not isinstance(info.value, cbor2.CBORError)


def _obj(**over: object) -> dict[str, object]:
    obj = _env().to_dict()
    obj.update(over)
    return obj


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (_obj(v=2), "version"),
        (_obj(v=True), "version"),
        ({k: v for k, v in _obj().items() if k != "seq"}, "lacks 'seq'"),
        (_obj(seq="42"), "'seq' must be int"),
        (_obj(seq=True), "'seq' must be int"),
        (_obj(seq=0), "seq must be >= 1"),
        (_obj(historical=1), "'historical' must be bool"),
        (_obj(data=[1]), "'data' must be dict"),
        (_obj(site=7), "'site' must be str"),
    ],
)
def test_wrong_fields_are_named(obj: dict[str, object], message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.decode(cbor2.dumps(obj))


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(WireError, match="trailing"):
        wire.decode(wire.encode(_env()) + b"\x00")


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    assert wire.decode(cbor2.dumps(_obj(extra="later"))) == _env()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_wire_error(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.decode(payload)


def test_encode_refuses_what_cbor_cannot_carry() -> None:
    with pytest.raises(WireError, match="cannot encode"):
        wire.encode(_env(data={"x": object()}))
    with pytest.raises(WireError, match="seq"):
        wire.encode(_env(seq=0))


def test_topic_layout_and_parse() -> None:
    topic = wire.topic_for("plant1", "gw1", "pump-3", "event")
    assert topic == "fogmesh/v1/plant1/gw1/pump-3/event"
    assert wire.parse_topic(topic) == ("plant1", "gw1", "pump-3", "event")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\x00"])
def test_topic_levels_that_would_shift_the_layout_are_refused(bad: str) -> None:
    with pytest.raises(WireError):
        wire.topic_for("plant1", "gw1", bad, "raw")


@pytest.mark.parametrize(
    "topic", ["fogmesh/v1/a/b/c", "fogmesh/v2/a/b/c/d", "other/v1/a/b/c/d", "fogmesh/v1/a//c/d"]
)
def test_parse_topic_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(WireError):
        wire.parse_topic(topic)
