"""The committed shared vectors equal a fresh run of make_vectors.py, and the CPython codecs
(cbor2 canonical, tools.mesh.frames) agree with every one of them."""

from __future__ import annotations

import hmac
import json
import math
import struct
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.wire import WireError, loads_one
from hil_tests.vectors import make_vectors
from hil_tests.vectors.make_vectors import from_json, to_json
from tools.mesh import frames

HERE = Path(__file__).resolve().parent
_FIELDS = ("typ", "flags", "hops", "src", "origin", "dest", "seq", "rank", "ctr")


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((HERE / f"{name}.json").read_text(encoding="utf-8"))
    return data


def _strict_loads(data: bytes) -> Any:
    # cbor2.loads ignores trailing bytes; the mesh's decoders must not.
    return loads_one(data)


def _same(a: Any, b: Any) -> bool:
    # Tells -0.0 from 0.0 and True from 1; NaN equals NaN; cbor2's tuple map keys are lists.
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and _same(v, b[k]) for k, v in a.items())
    return bool(a == b)


@pytest.mark.parametrize("name", ["cbor.json", "frames.json", "keys.json"])
def test_committed_vectors_equal_a_fresh_run(name: str) -> None:
    fresh = make_vectors.render()[name]
    committed = (HERE / name).read_text(encoding="utf-8")
    assert committed == fresh, f"{name} is stale: run python -m hil_tests.vectors.make_vectors"


def test_render_is_deterministic() -> None:
    assert make_vectors.render() == make_vectors.render()


def test_value_encoding_round_trips() -> None:
    v = {1: [b"\x00", -0.0, math.inf, "\u00fc", None, True], "a": {2.5: 2**64 - 1}}
    back = from_json(json.loads(json.dumps(to_json(v))))
    assert _same(back, v)
    with pytest.raises(TypeError):
        to_json({1, 2})
    with pytest.raises(ValueError, match="unknown encoded value"):
        from_json({"$what": 1})


# --- cbor ------------------------------------------------------------------------------------


def test_cbor_vector_counts() -> None:
    v = _load("cbor")
    assert len(v["valid"]) >= 60
    assert len(v["malformed"]) >= 15
    names = {c["name"] for c in v["valid"]}
    for needed in (
        "uint 18446744073709551615",
        "nint -18446744073709551616",
        "float nan",
        "float -0.0",
        "float inf",
        "float -inf",
        "bytes len 256",
        "text len 256",
    ):
        assert needed in names


def test_cbor_valid_vectors_match_cbor2() -> None:
    for c in _load("cbor")["valid"]:
        value = from_json(c["value"])
        assert cbor2.dumps(value, canonical=True).hex() == c["hex"], c["name"]
        assert _same(_strict_loads(bytes.fromhex(c["hex"])), value), c["name"]


def test_cbor_decode_only_vectors_match_cbor2() -> None:
    for c in _load("cbor")["decode_only"]:
        data = bytes.fromhex(c["hex"])
        value = from_json(c["value"])
        assert _same(_strict_loads(data), value), c["name"]
        assert cbor2.dumps(value, canonical=True) != data, f"{c['name']} is canonical"


def test_cbor_malformed_vectors_rejected_by_cbor2() -> None:
    for c in _load("cbor")["malformed"]:
        with pytest.raises(WireError):
            _strict_loads(bytes.fromhex(c["hex"]))


# --- frames ----------------------------------------------------------------------------------


def test_frame_vectors() -> None:
    cases = _load("frames")["frames"]
    assert len(cases) >= 10
    assert {c["fields"]["typ"] for c in cases} == set(range(8))
    for c in cases:
        key = bytes.fromhex(c["key"])
        h = frames.Header(*(c["fields"][n] for n in _FIELDS))
        payload = bytes.fromhex(c["payload"])
        f = bytes.fromhex(c["hex"])
        assert frames.pack(key, h, payload) == f, c["name"]
        assert frames.unpack(f) == (h, payload), c["name"]
        assert frames.verify(key, f), c["name"]
        # Independently of tools.mesh.frames: the MIC is HMAC-SHA256 over the rest, first 8 B.
        assert f[-8:] == hmac.digest(key, f[:-8], "sha256")[:8]


def test_bad_frame_vectors() -> None:
    cases = _load("frames")["bad"]
    assert {c["expect"] for c in cases} == {"bad_frame", "bad_mic"}
    for c in cases:
        key, f = bytes.fromhex(c["key"]), bytes.fromhex(c["hex"])
        if c["expect"] == "bad_frame":
            with pytest.raises(frames.FrameError):
                frames.unpack(f)
        else:
            frames.unpack(f)
            assert not frames.verify(key, f), c["name"]


def test_pack_error_vectors() -> None:
    for c in _load("frames")["pack_errors"]:
        with pytest.raises(frames.FrameError):
            h = frames.Header(*(c["fields"][n] for n in _FIELDS))
            frames.pack(bytes(16), h, bytes.fromhex(c["payload"]))


# --- keys ------------------------------------------------------------------------------------


def test_hmac_vectors() -> None:
    cases = _load("keys")["hmac"]
    assert len(cases) == 7
    for c in cases:
        want = bytes.fromhex(c["hmac"])
        got = hmac.digest(bytes.fromhex(c["key"]), bytes.fromhex(c["data"]), "sha256")
        assert got[: len(want)] == want, c["name"]


def test_hkdf_vectors() -> None:
    cases = _load("keys")["hkdf"]
    assert len(cases) == 3
    for c in cases:
        args = (bytes.fromhex(c["ikm"]), bytes.fromhex(c["salt"]), bytes.fromhex(c["info"]))
        assert frames.hkdf(*args, c["length"]).hex() == c["okm"], c["name"]


def test_derived_key_vectors() -> None:
    v = _load("keys")
    for c in v["node_key"]:
        assert frames.node_key(bytes.fromhex(c["site_key"]), c["id"]).hex() == c["key"]
    for c in v["net_key"]:
        assert frames.net_key(bytes.fromhex(c["site_key"]), c["epoch"]).hex() == c["key"]
    assert len({c["key"] for c in v["node_key"]}) == len(v["node_key"])


def test_mac8_vectors() -> None:
    for c in _load("keys")["mac8"]:
        data = b"".join(bytes.fromhex(p) for p in c["parts"])
        assert frames.mic(bytes.fromhex(c["key"]), data).hex() == c["tag"]


def test_aes_vectors() -> None:
    v = _load("keys")
    for c in v["aes_ecb"]:
        enc = Cipher(algorithms.AES(bytes.fromhex(c["key"])), modes.ECB()).encryptor()
        assert enc.update(bytes.fromhex(c["plain"])).hex() == c["cipher"]
    for c in v["ctr"]:
        key, nonce = bytes.fromhex(c["key"]), bytes.fromhex(c["nonce"])
        plain, cipher = bytes.fromhex(c["plain"]), bytes.fromhex(c["cipher"])
        assert frames.ctr_crypt(key, nonce, plain) == cipher, c["name"]
        assert frames.ctr_crypt(key, nonce, cipher) == plain, c["name"]
