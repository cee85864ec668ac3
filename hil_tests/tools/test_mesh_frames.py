"""tools/mesh/frames.py edge cases not covered by the shared vectors (hil_tests/vectors/)."""

from __future__ import annotations

import dataclasses
import hmac
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import FogmeshError
from tools.mesh import frames
from tools.mesh.frames import FrameError, Header

KEY = bytes(range(16))
H = Header(frames.T_DATA, 0, frames.HOPS_MAX, 5, 5, 1, 42, 512, 99)


def test_public_api() -> None:
    for name in frames.__all__:
        assert hasattr(frames, name), name
    assert (frames.HDR, frames.MIC_LEN, frames.MAX_FRAME, frames.MAX_PAYLOAD) == (16, 8, 250, 226)
    assert frames.MIN_FRAME == 24
    assert issubclass(FrameError, FogmeshError)
    assert issubclass(FrameError, ValueError)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("typ", 16),
        ("typ", -1),
        ("flags", 4),
        ("hops", 256),
        ("src", 0x10000),
        ("origin", -1),
        ("dest", 0x10000),
        ("seq", 0x10000),
        ("rank", 0x10000),
        ("ctr", 2**32),
        ("ctr", -1),
        ("seq", True),
        ("rank", 1.0),
    ],
)
def test_header_rejects_out_of_range(field: str, bad: Any) -> None:
    with pytest.raises(FrameError, match=field):
        dataclasses.replace(H, **{field: bad})


def test_header_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        H.hops = 3  # type: ignore[misc]


def test_payload_limits() -> None:
    f = frames.pack(KEY, H, bytes(226))
    assert len(f) == frames.MAX_FRAME
    with pytest.raises(FrameError, match="227"):
        frames.pack(KEY, H, bytes(227))
    assert len(frames.pack(KEY, H, b"")) == frames.MIN_FRAME


def test_buffer_types_accepted() -> None:
    f = frames.pack(KEY, H, bytearray(b"abc"))
    assert frames.pack(KEY, H, memoryview(b"abc")) == f
    assert frames.unpack(bytearray(f)) == (H, b"abc")
    assert frames.unpack(memoryview(f)) == (H, b"abc")
    assert frames.verify(KEY, bytearray(f)) and frames.verify(KEY, memoryview(f))


def test_layout_by_hand() -> None:
    h = Header(
        frames.T_BEACON, frames.F_FULL, 16, 0x0102, 0x0304, 0xFFFF, 0x0506, 0x0708, 0x090A0B0C
    )
    f = frames.pack(KEY, h, b"\xaa")
    assert f[:17] == bytes.fromhex("411001020304ffff05060708090a0b0caa")
    assert f[17:] == hmac.digest(KEY, f[:17], "sha256")[:8]


def test_unpack_errors() -> None:
    f = frames.pack(KEY, H, b"x")
    with pytest.raises(FrameError, match="23 bytes"):
        frames.unpack(f[:23])
    with pytest.raises(FrameError, match="251 bytes"):
        frames.unpack(f + bytes(251 - len(f)))
    for vt in (0x00 | (f[0] & 0x3F), 0x80 | (f[0] & 0x3F), 0xC0 | (f[0] & 0x3F)):
        with pytest.raises(FrameError, match="version"):
            frames.unpack(bytes([vt]) + f[1:])


def test_unknown_type_and_reserved_flag_parse() -> None:
    # The codec reports what is on the air; the receiver decides what a type 12 means.
    h = Header(12, 2, 0, 0, 0, 0, 0, 0, 0)
    f = frames.pack(KEY, h, b"")
    assert frames.unpack(f) == (h, b"")


def test_verify_never_raises() -> None:
    assert not frames.verify(KEY, b"")
    assert not frames.verify(KEY, bytes(23))
    assert not frames.verify(KEY, bytes(251))
    f = frames.pack(KEY, H, b"x")
    assert not frames.verify(bytes(16), f)
    assert frames.verify(KEY, f)


@settings(max_examples=200, deadline=None)
@given(
    typ=st.integers(0, 15),
    flags=st.integers(0, 3),
    hops=st.integers(0, 255),
    ids=st.tuples(*[st.integers(0, 0xFFFF)] * 5),
    ctr=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=226),
    key=st.binary(min_size=1, max_size=80),
    flip=st.integers(0, 249),
)
def test_round_trip_and_any_bit_flip(
    typ: int,
    flags: int,
    hops: int,
    ids: tuple[int, int, int, int, int],
    ctr: int,
    payload: bytes,
    key: bytes,
    flip: int,
) -> None:
    h = Header(typ, flags, hops, *ids, ctr)
    f = frames.pack(key, h, payload)
    assert frames.unpack(f) == (h, payload)
    assert frames.verify(key, f)
    bad = bytearray(f)
    bad[flip % len(f)] ^= 1 << (flip % 8)
    assert not frames.verify(key, bytes(bad))


def test_key_derivation_input_checks() -> None:
    site = bytes(32)
    with pytest.raises(FrameError, match="node id"):
        frames.node_key(site, 0)
    with pytest.raises(FrameError, match="node id"):
        frames.node_key(site, 0xFFFF)
    with pytest.raises(FrameError, match="epoch"):
        frames.net_key(site, 256)
    with pytest.raises(FrameError, match="site key"):
        frames.node_key(bytes(15), 1)
    with pytest.raises(FrameError, match="site key"):
        frames.net_key(bytes(65), 0)
    assert len(frames.node_key(bytes(16), 1)) == 16 and len(frames.net_key(bytes(64), 0)) == 16
    assert frames.node_key(site, 1) != frames.node_key(site, 2) != frames.net_key(site, 0)


def test_hkdf_lengths() -> None:
    assert frames.hkdf(b"k", b"s", b"i", 0) == b""
    long = frames.hkdf(b"k", b"s", b"i", 255 * 32)
    assert len(long) == 8160
    assert frames.hkdf(b"k", b"s", b"i", 33) == long[:33]
    with pytest.raises(FrameError, match="8160"):
        frames.hkdf(b"k", b"s", b"i", 8161)
    # An empty salt is HashLen zero bytes (RFC 5869 2.2).
    assert frames.hkdf(b"k", b"", b"", 16) == frames.hkdf(b"k", bytes(32), b"", 16)


def test_ctr_crypt_counter_layout_and_checks() -> None:
    key, nonce = bytes(range(16)), bytes(range(8))
    data = bytes(40)
    stream = frames.ctr_crypt(key, nonce, data)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = b"".join(nonce + i.to_bytes(8, "big") for i in range(3))
    assert stream == (ecb.update(blocks) + ecb.finalize())[:40]
    assert frames.ctr_crypt(key, nonce, b"") == b""
    with pytest.raises(FrameError, match="key"):
        frames.ctr_crypt(bytes(15), nonce, data)
    with pytest.raises(FrameError, match="key"):
        frames.ctr_crypt(bytes(32), nonce, data)
    with pytest.raises(FrameError, match="nonce"):
        frames.ctr_crypt(key, bytes(16), data)
