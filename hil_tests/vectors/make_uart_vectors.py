"""Writes hil_tests/vectors/uart.json, the shared vectors of the root <-> gateway UART framing
(docs/mesh.md "UART between root and gateway"): `python -m hil_tests.vectors.make_uart_vectors`.

Both codecs are tested against every vector: the firmware's (`firmware/fogmesh/uart.py`, on
MicroPython, hil_tests/firmware/mp/test_uart.py) and the gateway's
(`retrofit_adapters/mesh/uart.py`, hil_tests/retrofit_adapters/test_mesh_uart.py). The expected
values come from a third, deliberately naive implementation here (Wikipedia's COBS reference code
transcribed byte by byte), checked against the published COBS examples before anything is written.

Format (bytes as lowercase hex strings):
- `frames`: {name, type, body, encoded}: encode(type, body) == encoded (delimiter included), and
  a decoder fed `encoded` yields exactly [(type, body)].
- `encode_errors`: {name, type, body_len}: encode(type, bytes(body_len)) must raise.
- `streams`: {name, chunks, frames, counters}: a fresh decoder fed each chunk in turn yields
  `frames` ([type, body] in order, over all chunks) and ends with `counters` (frames, bad_crc,
  bad_cobs, oversize).
- `bodies`: {kind, fields, payload, body}: up_body(*fields, payload) / down_body(*fields, payload)
  / downack_body(*fields) == body, and the parser returns fields and payload back.
- `body_errors`: {kind, body}: parse_<kind>(body) must raise.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import cbor2

OUT = Path(__file__).with_name("uart.json")
MAX_FRAME = 512
MAX_ENCODED = MAX_FRAME + 3
T_UP, T_DOWN, T_DOWNACK, T_STATUS, T_LOG, T_HELLO = 1, 2, 3, 4, 5, 6


# --- the naive reference ------------------------------------------------------------------


def ref_cobs(data: bytes) -> bytes:
    # Wikipedia's cobsEncode, transcribed literally.
    out = bytearray([0])
    codep = 0
    code = 1
    for k, b in enumerate(data):
        left = len(data) - k - 1
        if b:
            out.append(b)
            code += 1
        if not b or code == 0xFF:
            out[codep] = code
            code = 1
            codep = len(out)
            if not b or left:
                out.append(0)
    if codep < len(out):  # else the final code lands past the returned length, as in C
        out[codep] = code
    return bytes(out)


def ref_uncobs(data: bytes) -> bytes | None:
    out = bytearray()
    code = 0xFF
    block = 0
    for b in data:
        if block:
            out.append(b)
        else:
            if code != 0xFF:
                out.append(0)
            code = block = b
            if code == 0:
                return None
        block -= 1
    if block:
        return None  # the last block is cut short
    return bytes(out)


def ref_encode(typ: int, body: bytes) -> bytes:
    raw = bytes([typ]) + body
    return ref_cobs(raw + struct.pack("<I", zlib.crc32(raw))) + b"\x00"


def ref_stream(chunks: list[bytes]) -> tuple[list[list[Any]], dict[str, int]]:
    counters = {"frames": 0, "bad_crc": 0, "bad_cobs": 0, "oversize": 0}
    frames: list[list[Any]] = []
    pending = bytearray()
    for b in b"".join(chunks):
        if b:
            pending.append(b)
            continue
        enc = bytes(pending)
        pending.clear()
        if not enc:
            continue
        if len(enc) > MAX_ENCODED:
            counters["oversize"] += 1
            continue
        raw = ref_uncobs(enc)
        if raw is None or len(raw) < 5:
            counters["bad_cobs"] += 1
        elif len(raw) > MAX_FRAME:
            counters["oversize"] += 1
        elif zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
            counters["bad_crc"] += 1
        else:
            counters["frames"] += 1
            frames.append([raw[0], raw[1:-4].hex()])
    return frames, counters


def _self_check() -> None:
    # The published examples (en.wikipedia.org/wiki/Consistent_Overhead_Byte_Stuffing).
    seq = bytes(range(1, 256))
    examples = [
        (b"\x00", "0101"),
        (b"\x00\x00", "010101"),
        (b"\x00\x11\x00", "01021101"),
        (b"\x11\x22\x00\x33", "0311220233"),
        (b"\x11\x22\x33\x44", "0511223344"),
        (b"\x11\x00\x00\x00", "0211010101"),
        (seq[:254], "ff" + seq[:254].hex()),
        (b"\x00" + seq[:254], "01ff" + seq[:254].hex()),
        (seq, "ff" + seq[:254].hex() + "02ff"),
        (seq[1:] + b"\x00", "ff" + seq[1:].hex() + "0101"),
        (seq[2:] + b"\x00\x01", "fe" + seq[2:].hex() + "0201"),
    ]
    for data, want in examples:
        assert ref_cobs(data).hex() == want, (data.hex(), ref_cobs(data).hex())
        assert ref_uncobs(bytes.fromhex(want)) == data


# --- the vectors ----------------------------------------------------------------------------


def _cbor(obj: object) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def _up(origin: int, seq: int, hops: int, payload: bytes) -> bytes:
    return struct.pack(">HHB", origin, seq, hops) + payload


def _down(dest: int, token: int, payload: bytes) -> bytes:
    return struct.pack(">HH", dest, token) + payload


def _frames() -> list[tuple[str, int, bytes]]:
    summary = _cbor(
        {
            "k": "sum",
            "u": 3600,
            "n": 10,
            "ch": {"temp": [20.5, 21.25, 20.875], "vib": [0.0, 1.5, 0.25]},
            "score": 0.125,
            "alarm": False,
        }
    )
    status = _cbor(
        {
            "id": 1,
            "nodes": {2: [1, 256, 3], 3: [2, 512, 0], 300: [2, 768, 12]},
            "stats": {"rx": 100, "tx": 90, "dup": 0},
        }
    )
    runs = []
    for n in (252, 253, 254, 255, 256):
        runs.append((f"nonzero run of {n + 1} B from the type byte", T_LOG, b"\xaa" * n))
    return [
        ("UP summary", T_UP, _up(5, 1, 14, summary)),
        ("UP seq 0xffff, origin 0xfffe", T_UP, _up(0xFFFE, 0xFFFF, 0, _cbor({"k": "st"}))),
        ("DOWN cfg", T_DOWN, _down(5, 0x1234, _cbor({"c": "cfg", "set": {"summary_s": 5}}))),
        ("DOWN token 0", T_DOWN, _down(0x0100, 0, _cbor({"c": "ping", "tok": 0}))),
        ("DOWNACK sent", T_DOWNACK, b"\x12\x34\x00"),
        ("DOWNACK no route", T_DOWNACK, b"\x00\x00\x01"),
        ("STATUS", T_STATUS, status),
        ("LOG text", T_LOG, "root up, 3 nodes ✓".encode()),
        ("LOG empty body", T_LOG, b""),
        ("HELLO", T_HELLO, _cbor({"v": 1, "id": 1})),
        ("unknown type 0", 0, b"\x01"),
        ("unknown type 255", 255, b"\xff\x00\xff"),
        ("body of one zero", T_LOG, b"\x00"),
        ("body of 100 zeros", T_UP, bytes(100)),
        ("zeros and 0xff alternating", T_LOG, b"\x00\xff" * 60),
        *runs,
        ("zero then a 254 B run", T_LOG, b"\x00" + b"\x5a" * 254),
        ("254 B run then zero", T_LOG, b"\x5a" * 253 + b"\x00" + b"\x01"),
        ("max body, nonzero", T_UP, bytes((i % 255) + 1 for i in range(MAX_FRAME - 5))),
        ("max body, zeros", T_DOWN, bytes(MAX_FRAME - 5)),
        ("max body, mixed", T_STATUS, bytes((i * 7) % 256 for i in range(MAX_FRAME - 5))),
    ]


def _streams(frames: dict[str, bytes]) -> list[tuple[str, list[bytes]]]:
    a = frames["UP summary"]
    b = frames["DOWNACK sent"]
    c = frames["HELLO"]
    big = frames["max body, nonzero"]
    bad_crc = bytearray(a)
    bad_crc[10] ^= 0x01  # a data byte, not a code byte: COBS stays valid, the CRC does not
    assert bad_crc[10] != 0
    oversize_zeros = ref_cobs(bytes(MAX_FRAME + 1)) + b"\x00"  # decodes to 513 B
    assert len(oversize_zeros) - 1 <= MAX_ENCODED
    return [
        ("back to back", [a + b + c]),
        ("byte by byte", [bytes([x]) for x in b + c]),
        ("split inside frames", [a[:7], a[7:] + b[:2], b[2:] + c[:1], c[1:]]),
        ("leading and repeated delimiters", [b"\x00\x00" + a + b"\x00\x00\x00" + b]),
        ("garbage with its own delimiter", [b"ets Jun  8 2016\r\n\x00" + a]),
        ("garbage glued to a frame loses that frame only", [b"noise" + a + b]),
        ("garbage between frames", [a + b"\x00\x07\x07\x07\x00" + b + b"\x01\x02\x00" + c]),
        ("bad crc then good", [bytes(bad_crc) + b]),
        ("truncated frame then a delimiter", [a[:20] + b"\x00" + b]),
        ("truncated frame glued to the next", [a[:20], b, c]),
        ("truncated at the end stays pending", [b + c[:4]]),
        (
            "runt frames",
            [b"\x01\x00" + b"\x02\x09\x00" + ref_cobs(b"\x01\x02\x03\x04") + b"\x00" + b],
        ),
        ("oversize by length", [b"\x41" * 600 + b"\x00" + b]),
        ("oversize in many chunks", [b"\x41" * 300, b"\x42" * 300, b"\x43" * 10 + b"\x00" + c]),
        ("oversize decoded", [oversize_zeros + b]),
        ("max frame back to back", [big + big]),
        ("cobs block past the end", [b"\x05\x01\x02\x00" + b]),
        (
            "everything",
            [b"\xff\xfe\x00", a, bytes(bad_crc), b"\x33" * 700, b"\x00", b, c[:3], b"\x00", c],
        ),
    ]


def _bodies() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cmd = _cbor({"c": "cfg", "set": {"sample_hz": 2.0}})
    bodies: list[dict[str, Any]] = [
        {"kind": "up", "fields": [5, 1, 14], "payload": b"\xa0", "body": _up(5, 1, 14, b"\xa0")},
        {
            "kind": "up",
            "fields": [0xFFFE, 0xFFFF, 255],
            "payload": b"",
            "body": _up(0xFFFE, 0xFFFF, 255, b""),
        },
        {"kind": "down", "fields": [7, 0xBEEF], "payload": cmd, "body": _down(7, 0xBEEF, cmd)},
        {"kind": "down", "fields": [0, 0], "payload": b"", "body": _down(0, 0, b"")},
        {"kind": "downack", "fields": [0xBEEF, 1], "payload": b"", "body": b"\xbe\xef\x01"},
        {"kind": "downack", "fields": [0, 3], "payload": b"", "body": b"\x00\x00\x03"},
    ]
    errors: list[dict[str, Any]] = [
        {"kind": "up", "body": b""},
        {"kind": "up", "body": b"\x00\x05\x00\x01"},
        {"kind": "down", "body": b"\x00\x05\x00"},
        {"kind": "downack", "body": b"\x00\x05"},
        {"kind": "downack", "body": b"\x00\x05\x00\x00"},
    ]
    return bodies, errors


def build() -> dict[str, Any]:
    _self_check()
    frames = _frames()
    encoded = {name: ref_encode(typ, body) for name, typ, body in frames}
    for name, typ, body in frames:
        # every vector frame must be a good frame for the reference decoder
        assert ref_stream([encoded[name]]) == ([[typ, body.hex()]], _counts(frames=1)), name
    streams = []
    for name, chunks in _streams(encoded):
        got, counters = ref_stream(chunks)
        streams.append(
            {"name": name, "chunks": [c.hex() for c in chunks], "frames": got, "counters": counters}
        )
    bodies, body_errors = _bodies()
    return {
        "about": "UART framing vectors; see hil_tests/vectors/make_uart_vectors.py",
        "max_frame": MAX_FRAME,
        "frames": [
            {"name": name, "type": typ, "body": body.hex(), "encoded": encoded[name].hex()}
            for name, typ, body in frames
        ],
        "encode_errors": [
            {"name": "body one byte too long", "type": T_UP, "body_len": MAX_FRAME - 4},
            {"name": "body far too long", "type": T_LOG, "body_len": 2000},
            {"name": "type 256", "type": 256, "body_len": 0},
            {"name": "type -1", "type": -1, "body_len": 0},
        ],
        "streams": streams,
        "bodies": [{**b, "payload": b["payload"].hex(), "body": b["body"].hex()} for b in bodies],
        "body_errors": [{**e, "body": e["body"].hex()} for e in body_errors],
    }


def _counts(**kw: int) -> dict[str, int]:
    return {"frames": 0, "bad_crc": 0, "bad_cobs": 0, "oversize": 0, **kw}


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=True) + "\n"


def main() -> None:
    OUT.write_text(render(), encoding="ascii")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
