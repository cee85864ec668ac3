"""The gateway's UART codec (retrofit_adapters/mesh/uart.py) against the shared vectors, the
vectors against a fresh regeneration, and the edges the vectors do not reach."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import BadData
from hil_tests.vectors import make_uart_vectors
from retrofit_adapters.mesh import uart

VECTORS = Path(make_uart_vectors.__file__).with_name("uart.json")
V: dict[str, Any] = json.loads(VECTORS.read_text())


def _counters(d: uart.Decoder) -> dict[str, int]:
    return {
        "frames": d.frames,
        "bad_crc": d.bad_crc,
        "bad_cobs": d.bad_cobs,
        "oversize": d.oversize,
    }


def test_committed_vectors_equal_a_fresh_regeneration() -> None:
    assert VECTORS.read_text() == make_uart_vectors.render(), (
        "uart.json is stale: run python -m hil_tests.vectors.make_uart_vectors"
    )


def test_vectors_cover_what_they_must() -> None:
    types = {f["type"] for f in V["frames"]}
    assert {1, 2, 3, 4, 5, 6} <= types
    lengths = {len(bytes.fromhex(f["body"])) for f in V["frames"]}
    assert uart.MAX_BODY in lengths and 0 in lengths
    totals = {k: sum(s["counters"][k] for s in V["streams"]) for k in V["streams"][0]["counters"]}
    assert all(totals[k] > 0 for k in ("bad_crc", "bad_cobs", "oversize")), totals


def test_constants_match_the_firmware() -> None:
    assert (uart.T_UP, uart.T_DOWN, uart.T_DOWNACK, uart.T_STATUS, uart.T_LOG, uart.T_HELLO) == (
        1,
        2,
        3,
        4,
        5,
        6,
    )
    assert uart.MAX_FRAME == V["max_frame"] == 512
    firmware = (Path(__file__).parents[2] / "firmware/fogmesh/uart.py").read_text()
    for name in ("T_UP", "T_DOWN", "T_DOWNACK", "T_STATUS", "T_LOG", "T_HELLO", "MAX_FRAME"):
        assert f"{name} = const({getattr(uart, name)})" in firmware, name


@pytest.mark.parametrize("v", V["frames"], ids=[f["name"] for f in V["frames"]])
def test_frame_vector(v: dict[str, Any]) -> None:
    body = bytes.fromhex(v["body"])
    encoded = bytes.fromhex(v["encoded"])
    assert uart.encode(v["type"], body) == encoded
    assert uart.decode_frame(encoded[:-1]) == (v["type"], body)
    d = uart.Decoder()
    assert d.feed(encoded) == [(v["type"], body)]
    assert _counters(d) == {"frames": 1, "bad_crc": 0, "bad_cobs": 0, "oversize": 0}


@pytest.mark.parametrize("v", V["encode_errors"], ids=[e["name"] for e in V["encode_errors"]])
def test_encode_error_vector(v: dict[str, Any]) -> None:
    with pytest.raises(uart.UartError):
        uart.encode(v["type"], bytes(v["body_len"]))


@pytest.mark.parametrize("v", V["streams"], ids=[s["name"] for s in V["streams"]])
def test_stream_vector(v: dict[str, Any]) -> None:
    for chunking in ("as given", "byte by byte"):
        d = uart.Decoder()
        got: list[list[Any]] = []
        chunks = [bytes.fromhex(c) for c in v["chunks"]]
        if chunking == "byte by byte":
            chunks = [bytes([b]) for c in chunks for b in c]
        for c in chunks:
            got.extend([typ, body.hex()] for typ, body in d.feed(c))
        assert got == v["frames"], chunking
        assert _counters(d) == v["counters"], chunking


def test_body_vectors() -> None:
    for v in V["bodies"]:
        f = v["fields"]
        payload = bytes.fromhex(v["payload"])
        body = bytes.fromhex(v["body"])
        if v["kind"] == "up":
            assert uart.up_body(f[0], f[1], f[2], payload) == body
            assert uart.parse_up(body) == (*f, payload)
        elif v["kind"] == "down":
            assert uart.down_body(f[0], f[1], payload) == body
            assert uart.parse_down(body) == (*f, payload)
        else:
            assert uart.downack_body(*f) == body
            assert uart.parse_downack(body) == tuple(f)
    parsers = {"up": uart.parse_up, "down": uart.parse_down, "downack": uart.parse_downack}
    for v in V["body_errors"]:
        with pytest.raises(uart.UartError, match="B"):
            parsers[v["kind"]](bytes.fromhex(v["body"]))


def test_packers_refuse_out_of_range_fields() -> None:
    with pytest.raises(uart.UartError, match=r"origin 65536 is not 0\.\.65535"):
        uart.up_body(65536, 0, 0, b"")
    with pytest.raises(uart.UartError, match="token -1"):
        uart.down_body(1, -1, b"")
    with pytest.raises(uart.UartError, match="status 256"):
        uart.downack_body(1, 256)


def test_errors_belong_to_the_project_tree() -> None:
    assert issubclass(uart.UartError, BadData)
    assert issubclass(uart.UartError, ValueError)


def test_decode_frame_says_what_is_wrong() -> None:
    good = uart.encode(uart.T_LOG, b"hello")[:-1]
    with pytest.raises(uart.UartError, match="CRC"):
        uart.decode_frame(good[:-1] + bytes([good[-1] ^ 0x40]))
    with pytest.raises(uart.UartError, match="past the end"):
        uart.decode_frame(b"\x09\x01")
    with pytest.raises(uart.UartError, match="shorter than type"):
        uart.decode_frame(b"\x02\x01")
    with pytest.raises(uart.UartError, match="exceeds"):
        uart.decode_frame(b"\x01" * 600)
    with pytest.raises(uart.UartError, match="0x00"):
        uart.uncobs(b"\x03\x00\x01")


def test_random_round_trips_and_random_noise() -> None:
    rng = random.Random(7)
    d = uart.Decoder()
    sent: list[tuple[int, bytes]] = []
    stream = bytearray()
    for _ in range(300):
        n = rng.choice([0, 1, 5, 253, 254, 255, uart.MAX_BODY, rng.randrange(uart.MAX_BODY)])
        body = bytes(rng.choice([0, 0, rng.randrange(256)]) for _ in range(n))
        typ = rng.randrange(256)
        sent.append((typ, body))
        stream += uart.encode(typ, body)
    got: list[tuple[int, bytes]] = []
    i = 0
    while i < len(stream):
        step = rng.randrange(1, 700)
        got.extend(d.feed(stream[i : i + step]))
        i += step
    assert got == sent
    assert d.pending == 0
    # Noise never raises and never leaves more than one encoded frame in the buffer.
    for _ in range(200):
        d.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 900))))
        assert d.pending <= uart.MAX_FRAME + 3
    d.feed(b"\x00")
    assert d.feed(uart.encode(uart.T_HELLO, b"\xa0")) == [(uart.T_HELLO, b"\xa0")]


def test_reset_drops_the_partial_frame() -> None:
    d = uart.Decoder()
    frame = uart.encode(uart.T_LOG, b"hello")
    assert d.feed(frame[:4]) == []
    assert d.pending == 4
    d.reset()
    assert d.pending == 0
    assert d.feed(frame) == [(uart.T_LOG, b"hello")]
