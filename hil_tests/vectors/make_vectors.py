"""Writes the shared test vectors of the mesh wire formats: cbor.json, frames.json, keys.json.

Run as `python -m hil_tests.vectors.make_vectors`. Both the firmware (on MicroPython) and the
CPython codecs are checked against these files; `test_vectors.py` checks that the committed files
equal a fresh run. The output is deterministic (fixed inputs, seeded pseudo-random bytes).

Encoding of values in JSON (cbor.json "value" fields, decoded by both test suites):
- JSON null, true, false, strings and arrays stand for None, True, False, text and arrays;
- a JSON integer is a CBOR integer (any size: both json modules read big integers);
- {"$bytes": "<hex>"} is a byte string;
- {"$float": "<16 hex digits>"} is a float given by its IEEE 754 double bits, big-endian
  (exact for every value, inf and NaN included; no float ever appears as a JSON number);
- {"$map": [[key, value], ...]} is a map, with keys of any type (order is not significant).
Every other byte field in the three files is lowercase hex. Files are UTF-8 (non-ASCII text is
written as is, not as \\u escapes: MicroPython's json does not join surrogate pairs).

cbor.json: "valid" (value -> canonical hex, both ways), "decode_only" (non-canonical hex ->
value), "malformed" (hex that every decoder must reject).
frames.json: "frames" (key, fields, payload -> frame hex), "bad" (frames that must fail:
"bad_frame" = length/version rejected by the header parser, "bad_mic" = MIC does not verify),
"pack_errors" (fields or payloads that pack must refuse).
keys.json: "hmac" (RFC 4231), "hkdf" (RFC 5869 cases 1-3), "node_key", "net_key", "mac8"
(truncated HMAC over several pieces), "aes_ecb" (NIST SP 800-38A F.1.1), "ctr" (our CTR layout,
cross-checked with the `cryptography` CTR mode).
"""

from __future__ import annotations

import hmac
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tools.mesh import frames

HERE = Path(__file__).resolve().parent
_rng = random.Random(20240611)


def _rand(n: int) -> bytes:
    return _rng.randbytes(n)


# --- value encoding ----------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """A CBOR-able Python value in the JSON encoding described above."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return {"$float": struct.pack(">d", value).hex()}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {"$map": [[to_json(k), to_json(v)] for k, v in value.items()]}
    raise TypeError(f"no JSON encoding for {type(value).__name__}")


def from_json(value: Any) -> Any:
    """The Python value of a JSON-encoded one (maps become dicts)."""
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if "$bytes" in value:
            return bytes.fromhex(value["$bytes"])
        if "$float" in value:
            return float(struct.unpack(">d", bytes.fromhex(value["$float"]))[0])
        if "$map" in value:
            return {_key(from_json(k)): from_json(v) for k, v in value["$map"]}
        raise ValueError(f"unknown encoded value {value!r}")
    return value


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


# --- cbor.json -------------------------------------------------------------------------------


def _cbor_values() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for n in [
        0,
        1,
        10,
        23,
        24,
        25,
        100,
        255,
        256,
        1000,
        65535,
        65536,
        1000000,
        2**32 - 1,
        2**32,
        2**53,
        2**63,
        2**64 - 2,
        2**64 - 1,
    ]:
        out.append((f"uint {n}", n))
    for n in [
        1,
        10,
        24,
        25,
        100,
        256,
        257,
        65536,
        65537,
        2**32,
        2**32 + 1,
        2**63,
        2**64 - 1,
        2**64,
    ]:
        out.append((f"nint -{n}", -n))
    for n in [0, 1, 23, 24, 255, 256]:
        out.append((f"bytes len {n}", _rand(n)))
    for n in [0, 1, 23, 24, 255, 256]:
        out.append((f"text len {n}", "".join(_rng.choice("abcdefxyz_-") for _ in range(n))))
    out += [
        ("text 2-byte utf8", "\u00fc"),
        ("text 3-byte utf8", "\u6c34"),
        ("text 4-byte utf8", "\U0001f600"),
        ("text mixed utf8", "a\u00fcb\u6c34c\U0001f600"),
    ]
    floats = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.5,
        -4.0,
        0.333251953125,
        65504.0,
        65505.0,
        65536.0,
        100000.0,
        1e-7,
        3.4e38,
        3.4028234663852886e38,
        3.4028235677973366e38,
        1.1,
        0.1,
        -2.5,
        1e300,
        -1e-300,
        5.960464477539063e-08,
        6.103515625e-05,
        6.097555160522461e-05,
        2.0**-149,
        2.0**-126,
        2.0**-24 * 3,
        5e-324,
        math.inf,
        -math.inf,
        math.nan,
    ]
    for x in floats:
        out.append((f"float {x!r}", x))
    out += [
        ("false", False),
        ("true", True),
        ("null", None),
        ("array empty", []),
        ("array nested", [1, [2, 3], [4, [5, []]]]),
        ("array 23", list(range(23))),
        ("array 24", list(range(24))),
        ("array 256", [0] * 256),
        ("array mixed", [1, -1, "a", b"\x00", 1.5, None, True, {"a": 1}]),
        ("map empty", {}),
        ("map one", {"a": 1}),
        ("map int keys", {10: "x", 1: "y", -1: "z", 100: "w", 1000: "v", -1000: "u"}),
        ("map mixed keys", {"aa": 1, "b": 2, 1: 3, -1: 4, b"x": 5, 100: 6, 1.5: 7, False: 8}),
        ("map text keys by length", {"ccc": 1, "a": 2, "bb": 3, "ab": 4, "b": 5, "": 6}),
        ("map 24 entries", {f"k{i:02d}": i for i in range(24)}),
        ("map nested", {"a": {"b": {"c": [1, {"d": None}]}}, "z": {}}),
        (
            "summary payload",
            {
                "k": "sum",
                "u": 3600,
                "n": 36000,
                "ch": {"temp": [20.5, 24.25, 22.125], "vib": [0.01, 0.5, 0.1]},
                "score": 0.12,
                "alarm": False,
            },
        ),
        ("model chunk", {"c": "mdl", "off": 4096, "total": 20000, "data": _rand(180)}),
        ("depth 16", _nest(16)),
    ]
    return out


def _nest(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


_DECODE_ONLY = [
    ("uint 0 in 2 bytes", "1800", 0),
    ("uint 0 in 3 bytes", "190000", 0),
    ("uint 1 in 9 bytes", "1b0000000000000001", 1),
    ("nint -1 in 5 bytes", "3a00000000", -1),
    ("bytes length in 2 bytes", "58026162", b"ab"),
    ("indefinite bytes", "5f4161426263ff", b"abc"),
    ("indefinite bytes empty", "5fff", b""),
    ("indefinite bytes empty chunk", "5f40ff", b""),
    ("indefinite text", "7f61616262636163ff", "abcc"),
    ("indefinite text utf8 chunks", "7f62c3bc63e6b0b4ff", "\u00fc\u6c34"),
    ("indefinite array", "9f0102ff", [1, 2]),
    ("indefinite array empty", "9fff", []),
    ("indefinite nested", "9f9fff9f01ffff", [[], [1]]),
    ("indefinite map", "bf616101616202ff", {"a": 1, "b": 2}),
    ("indefinite map in definite array", "82bf6161f5ff01", [{"a": True}, 1]),
    ("map unsorted", "a2616201616102", {"b": 1, "a": 2}),
    ("single 1.5", "fa3fc00000", 1.5),
    ("double 1.5", "fb3ff8000000000000", 1.5),
    ("double -0.0", "fb8000000000000000", -0.0),
    ("single inf", "fa7f800000", math.inf),
    ("single nan", "fa7fc00000", math.nan),
    ("half nan payload", "f97e01", math.nan),
]

_MALFORMED = [
    ("empty", ""),
    ("truncated uint8", "18"),
    ("truncated uint16", "1901"),
    ("truncated uint32", "1a000000"),
    ("truncated uint64", "1b00000000"),
    ("trailing byte", "0000"),
    ("trailing after map", "a1616101ff"),
    ("reserved ai 28", "1c"),
    ("reserved ai 29", "3d"),
    ("reserved ai 30", "5e"),
    ("reserved ai 28 major 7", "fc"),
    ("indefinite uint", "1f"),
    ("indefinite nint", "3f"),
    ("bytes beyond buffer", "4501"),
    ("text beyond buffer", "6461"),
    ("bytes huge length", "5bffffffffffffffff"),
    ("array huge length", "9bffffffffffffffff00"),
    ("map huge length", "bbffffffffffffffff00"),
    ("array short", "830102"),
    ("map short", "a201"),
    ("map missing value", "a10102a1"),
    ("nested truncated", "a1616182"),
    ("invalid utf8", "62c328"),
    ("utf8 lone continuation", "6180"),
    ("utf8 surrogate", "63eda080"),
    ("utf8 overlong", "62c080"),
    ("utf8 beyond U+10FFFF", "64f4908080"),
    ("utf8 truncated sequence", "62e282"),
    ("utf8 split across chunks", "7f61c361bcff"),
    ("break alone", "ff"),
    ("break in definite array", "8201ff"),
    ("break as map value", "bf6161ff"),
    ("indefinite bytes text chunk", "5f6161ff"),
    ("indefinite bytes nested indefinite", "5f5fffff"),
    ("indefinite array unterminated", "9f01"),
    ("indefinite map odd", "bf01ff"),
    ("simple value two-byte < 32", "f810"),
    ("half truncated", "f900"),
    ("single truncated", "fa0000"),
    ("double truncated", "fb00"),
    ("indefinite tag", "df"),
]


def make_cbor() -> dict[str, Any]:
    valid = [
        {"name": name, "value": to_json(v), "hex": cbor2.dumps(v, canonical=True).hex()}
        for name, v in _cbor_values()
    ]
    decode_only = []
    for name, hx, v in _DECODE_ONLY:
        got = cbor2.loads(bytes.fromhex(hx))
        assert got == v or (isinstance(v, float) and math.isnan(v) and math.isnan(got)), name
        assert cbor2.dumps(v, canonical=True).hex() != hx, f"{name}: canonical, put it in valid"
        decode_only.append({"name": name, "hex": hx, "value": to_json(v)})
    malformed = [{"name": name, "hex": hx} for name, hx in _MALFORMED]
    return {"valid": valid, "decode_only": decode_only, "malformed": malformed}


# --- frames.json -----------------------------------------------------------------------------

_FIELDS = ("typ", "flags", "hops", "src", "origin", "dest", "seq", "rank", "ctr")


def _frame_cases() -> list[tuple[str, bytes, frames.Header, bytes]]:
    site = bytes(range(32))
    net = frames.net_key(site, 1)
    nk5 = frames.node_key(site, 5)
    join_inner = frames.pack(
        nk5,
        frames.Header(frames.T_JOIN, 0, 16, 5, 5, 1, 0, frames.RANK_INF, 7),
        cbor2.dumps([5, 7, bytes(range(8))], canonical=True),
    )
    H = frames.Header
    return [
        ("beacon root", net, H(frames.T_BEACON, 0, 16, 1, 1, 0xFFFF, 0, 0, 0), b""),
        (
            "beacon full",
            net,
            H(frames.T_BEACON, frames.F_FULL, 16, 7, 7, 0xFFFF, 0, 384, 1234),
            b"\x01",
        ),
        (
            "data",
            net,
            H(frames.T_DATA, 0, 16, 5, 5, 1, 42, 512, 99),
            cbor2.dumps(
                {"k": "st", "u": 10, "parent": 2, "rank": 512, "heap": 30000, "buf": 0},
                canonical=True,
            ),
        ),
        ("data relayed", net, H(frames.T_DATA, 0, 13, 2, 9, 1, 0xFFFF, 256, 0xFFFFFFFF), _rand(60)),
        ("data max payload", net, H(frames.T_DATA, 0, 16, 3, 3, 1, 1, 300, 5), _rand(226)),
        (
            "down",
            net,
            H(frames.T_DOWN, 0, 16, 1, 1, 9, 7, 0, 77),
            b"\x02\x00\x02\x00\x09" + cbor2.dumps({"c": "ping", "tok": 3}, canonical=True),
        ),
        (
            "join first hop (node key)",
            nk5,
            H(frames.T_JOIN, 0, 16, 5, 5, 1, 0, 0xFFFF, 7),
            cbor2.dumps([5, 7, bytes(range(8))], canonical=True),
        ),
        ("join forwarded", net, H(frames.T_JOIN, 0, 15, 2, 5, 1, 0, 256, 400), join_inner),
        (
            "joinack",
            net,
            H(frames.T_JOINACK, 0, 16, 2, 1, 5, 8, 256, 401),
            cbor2.dumps([5, 1, bytes(range(8)), _rand(16), _rand(8)], canonical=True),
        ),
        ("dao", net, H(frames.T_DAO, 0, 16, 5, 5, 1, 43, 512, 100), b"\x00\x02"),
        ("dis", net, H(frames.T_DIS, 0, 1, 0xFFFE, 0xFFFE, 0xFFFF, 0, 0xFFFF, 0), b""),
        ("probe", net, H(frames.T_PROBE, 0, 1, 4, 4, 2, 0, 640, 0x12345678), b""),
        (
            "other key",
            _rand(16),
            H(frames.T_DATA, 0, 16, 0x1234, 0x5678, 1, 0xABCD, 0x9ABC, 0x80000000),
            b"hello",
        ),
        ("long key", _rand(100), H(frames.T_DATA, 2, 0, 0, 0, 0, 0, 0, 0), b"x"),
    ]


def _flip(data: bytes, index: int, mask: int = 1) -> bytes:
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def make_frames() -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    cases = _frame_cases()
    for name, key, h, payload in cases:
        f = frames.pack(key, h, payload)
        out.append(
            {
                "name": name,
                "key": key.hex(),
                "fields": {n: getattr(h, n) for n in _FIELDS},
                "payload": payload.hex(),
                "hex": f.hex(),
            }
        )
    name, key, h, payload = cases[2]  # "data": the tampered and truncated variants
    f = frames.pack(key, h, payload)
    n = len(f)

    def add(what: str, data: bytes, expect: str) -> None:
        bad.append({"name": what, "key": key.hex(), "hex": data.hex(), "expect": expect})

    add("flipped vt type bit", _flip(f, 0, 0x04), "bad_mic")
    add("flipped hops", _flip(f, 1), "bad_mic")
    add("flipped src", _flip(f, 3), "bad_mic")
    add("flipped ctr", _flip(f, 15, 0x80), "bad_mic")
    add("flipped payload", _flip(f, 20), "bad_mic")
    add("flipped mic", _flip(f, n - 1), "bad_mic")
    add("mic zeroed", f[:-8] + bytes(8), "bad_mic")
    add("payload byte appended", f[:-8] + b"\x00" + f[-8:], "bad_mic")
    add("payload byte removed", f[:-9] + f[-8:], "bad_mic")
    bad.append({"name": "wrong key", "key": _rand(16).hex(), "hex": f.hex(), "expect": "bad_mic"})
    add("truncated to 23", f[:23], "bad_frame")
    add("truncated to 0", b"", "bad_frame")
    add("truncated to 16", f[:16], "bad_frame")
    add("oversize 251", f + bytes(251 - n), "bad_frame")
    add("version 2", _flip(f, 0, 0xC0), "bad_frame")  # 01 -> 10
    add("version 3", bytes([f[0] | 0xC0]) + f[1:], "bad_frame")
    add("version 0 bits", bytes([f[0] & 0x3F]) + f[1:], "bad_frame")
    pack_errors = [
        {"name": "payload 227", "fields": _fields(frames.T_DATA), "payload": "00" * 227},
        {"name": "payload 250", "fields": _fields(frames.T_DATA), "payload": "00" * 250},
        {"name": "typ 16", "fields": _fields(16), "payload": ""},
        {"name": "flags 4", "fields": _fields(1, flags=4), "payload": ""},
        {"name": "hops 256", "fields": _fields(1, hops=256), "payload": ""},
        {"name": "src 65536", "fields": _fields(1, src=65536), "payload": ""},
        {"name": "origin -1", "fields": _fields(1, origin=-1), "payload": ""},
        {"name": "dest 65536", "fields": _fields(1, dest=65536), "payload": ""},
        {"name": "seq 65536", "fields": _fields(1, seq=65536), "payload": ""},
        {"name": "rank 65536", "fields": _fields(1, rank=65536), "payload": ""},
        {"name": "ctr 2**32", "fields": _fields(1, ctr=2**32), "payload": ""},
        {"name": "ctr -1", "fields": _fields(1, ctr=-1), "payload": ""},
    ]
    return {"frames": out, "bad": bad, "pack_errors": pack_errors}


def _fields(typ: int, **kw: int) -> dict[str, int]:
    f = {
        "typ": typ,
        "flags": 0,
        "hops": 16,
        "src": 2,
        "origin": 2,
        "dest": 1,
        "seq": 0,
        "rank": 256,
        "ctr": 0,
    }
    f.update(kw)
    return f


# --- keys.json -------------------------------------------------------------------------------

_RFC4231 = [
    (
        "rfc4231 1",
        "0b" * 20,
        b"Hi There".hex(),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        32,
    ),
    (
        "rfc4231 2",
        b"Jefe".hex(),
        b"what do ya want for nothing?".hex(),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        32,
    ),
    (
        "rfc4231 3",
        "aa" * 20,
        "dd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        32,
    ),
    (
        "rfc4231 4",
        bytes(range(1, 26)).hex(),
        "cd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        32,
    ),
    (
        "rfc4231 5 (truncated to 128 bits)",
        "0c" * 20,
        b"Test With Truncation".hex(),
        "a3b6167473100ee06e0c796c2955552b",
        16,
    ),
    (
        "rfc4231 6",
        "aa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First".hex(),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        32,
    ),
    (
        "rfc4231 7",
        "aa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data. "
        b"The key needs to be hashed before being used by the HMAC algorithm.".hex(),
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        32,
    ),
]

_RFC5869 = [
    (
        "rfc5869 1",
        "0b" * 22,
        bytes(range(13)).hex(),
        bytes(range(0xF0, 0xFA)).hex(),
        42,
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        "rfc5869 2",
        bytes(range(0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (
        "rfc5869 3",
        "0b" * 22,
        "",
        "",
        42,
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]

_NIST_KEY = "2b7e151628aed2a6abf7158809cf4f3c"
_NIST_PLAIN = (
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
_NIST_ECB = (
    "3ad77bb40d7a3660a89ecaf32466ef97"
    "f5d3d58503b9699de785895a96fdbaaf"
    "43b1cd7f598ece23881b00e3ed030688"
    "7b0c785e27e8ad3f8223207104725dd4"
)
_NIST_CTR_IV = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
_NIST_CTR = (
    "874d6191b620e3261bef6864990db6ce"
    "9806f66b7970fdff8617187bb9fffdff"
    "5ae4df3edbd5d35e5b4f09020db03eab"
    "1e031dda2fbe03d1792170a0f3009cee"
)


def _aes_ctr(key: bytes, iv16: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv16)).encryptor()
    return enc.update(data) + enc.finalize()


def _hkdf_ref(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)


def make_keys() -> dict[str, Any]:
    hm = []
    for name, key_hex, data_hex, mac_hex, size in _RFC4231:
        got = hmac.digest(bytes.fromhex(key_hex), bytes.fromhex(data_hex), "sha256")
        assert got[:size].hex() == mac_hex, name
        hm.append({"name": name, "key": key_hex, "data": data_hex, "hmac": mac_hex})
    hk = []
    for name, ikm, salt, info, length, prk, okm in _RFC5869:
        args = (bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length)
        assert frames.hkdf(*args).hex() == okm == _hkdf_ref(*args).hex(), name
        assert hmac.digest(bytes.fromhex(salt) or bytes(32), args[0], "sha256").hex() == prk
        hk.append(
            {
                "name": name,
                "ikm": ikm,
                "salt": salt,
                "info": info,
                "length": length,
                "prk": prk,
                "okm": okm,
            }
        )
    sites = [bytes(range(16)), bytes(range(32)), _rand(64), b"\xff" * 17]
    nodes = []
    for site in sites:
        for node in (1, 2, 5, 0x1234, 0xFFFE):
            k = frames.node_key(site, node)
            ref = _hkdf_ref(site, frames.SALT, b"node" + node.to_bytes(2, "big"), 16)
            assert k == ref
            nodes.append({"site_key": site.hex(), "id": node, "key": k.hex()})
    nets = []
    for site in sites:
        for epoch in (0, 1, 255):
            k = frames.net_key(site, epoch)
            assert k == _hkdf_ref(site, frames.SALT, b"net" + bytes((epoch,)), 16)
            nets.append({"site_key": site.hex(), "epoch": epoch, "key": k.hex()})
    mac8 = []
    for key, parts in [
        (bytes(16), [b""]),
        (bytes(range(16)), [b"abc"]),
        (bytes(range(16)), [b"a", b"bc"]),
        (_rand(16), [_rand(16), _rand(226)]),
        (_rand(32), [b"joinack", b"\x00\x05", b"\x01", bytes(range(8)), _rand(16)]),
        (_rand(70), [_rand(100), b"", _rand(3)]),
    ]:
        tag = hmac.digest(key, b"".join(parts), "sha256")[:8]
        mac8.append({"key": key.hex(), "parts": [p.hex() for p in parts], "tag": tag.hex()})
    ecb = []
    cipher = Cipher(algorithms.AES(bytes.fromhex(_NIST_KEY)), modes.ECB()).encryptor()
    for i in range(4):
        plain_hex = _NIST_PLAIN[32 * i : 32 * i + 32]
        cipher_hex = cipher.update(bytes.fromhex(plain_hex)).hex()
        assert cipher_hex == _NIST_ECB[32 * i : 32 * i + 32]
        ecb.append({"key": _NIST_KEY, "plain": plain_hex, "cipher": cipher_hex})
    nist_key = bytes.fromhex(_NIST_KEY)
    nist_plain = bytes.fromhex(_NIST_PLAIN)
    # NIST F.5.1 counts in the low 64 bits from f8f9fafbfcfdfeff; ours counts from 0. Check
    # F.5.1 itself here, then keep its key, plaintext and the high 8 bytes of its counter block
    # as our nonce (the expected output comes from the `cryptography` CTR mode).
    assert _aes_ctr(nist_key, bytes.fromhex(_NIST_CTR_IV), nist_plain).hex() == _NIST_CTR
    ctr = []
    cases = [
        ("nist key+plaintext, nonce f0..f7", nist_key, bytes.fromhex(_NIST_CTR_IV)[:8], nist_plain)
    ]
    for n in (0, 1, 15, 16, 17, 33, 226):
        cases.append((f"length {n}", _rand(16), _rand(8), _rand(n)))
    cases.append(
        (
            "wrapped network key",
            frames.node_key(sites[1], 5),
            bytes(range(8)),
            frames.net_key(sites[1], 1),
        )
    )
    for name, key, nonce, plain in cases:
        c = frames.ctr_crypt(key, nonce, plain)
        assert c == _aes_ctr(key, nonce + bytes(8), plain), name
        ctr.append(
            {
                "name": name,
                "key": key.hex(),
                "nonce": nonce.hex(),
                "plain": plain.hex(),
                "cipher": c.hex(),
            }
        )
    return {
        "hmac": hm,
        "hkdf": hk,
        "node_key": nodes,
        "net_key": nets,
        "mac8": mac8,
        "aes_ecb": ecb,
        "ctr": ctr,
    }


def render() -> dict[str, str]:
    """File name -> file text of every vector file (deterministic)."""
    global _rng
    _rng = random.Random(20240611)
    docs = {"cbor.json": make_cbor(), "frames.json": make_frames(), "keys.json": make_keys()}
    return {name: _dump(d) for name, d in docs.items()}


def _dump(doc: dict[str, list[dict[str, Any]]]) -> str:
    # One case per line: readable diffs, and small enough for MicroPython's json under 100 KB.
    sections = []
    for name, cases in doc.items():
        lines = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in cases)
        sections.append(f" {json.dumps(name)}: [\n  {lines}\n ]")
    return "{\n" + ",\n".join(sections) + "\n}\n"


def main() -> None:
    for name, text in render().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
