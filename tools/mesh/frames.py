"""The mesh radio frame v1 and its keys on the host (docs/mesh.md "Radio frame (v1)", "Keys").

The CPython twin of `firmware/fogmesh/frame.py` and `keys.py`, written independently of them:
the two agree through the shared vectors in `hil_tests/vectors/`. Used by the radio medium, the
provisioning tools and the tests that forge frames.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.errors import FogmeshError

Bytes = bytes | bytearray | memoryview

__all__ = [
    "BROADCAST",
    "F_FULL",
    "HDR",
    "HOPS_MAX",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "MIC_LEN",
    "MIN_FRAME",
    "RANK_INF",
    "SALT",
    "T_BEACON",
    "T_DAO",
    "T_DATA",
    "T_DIS",
    "T_DOWN",
    "T_JOIN",
    "T_JOINACK",
    "T_PROBE",
    "VERSION",
    "Bytes",
    "FrameError",
    "Header",
    "ctr_crypt",
    "hkdf",
    "mic",
    "net_key",
    "node_key",
    "pack",
    "unpack",
    "verify",
]

VERSION = 1
HDR = 16
MIC_LEN = 8
MAX_FRAME = 250
MAX_PAYLOAD = MAX_FRAME - HDR - MIC_LEN  # 226
MIN_FRAME = HDR + MIC_LEN  # 24
HOPS_MAX = 16
BROADCAST = 0xFFFF
RANK_INF = 0xFFFF

T_BEACON = 0
T_DATA = 1
T_DOWN = 2
T_JOIN = 3
T_JOINACK = 4
T_DAO = 5
T_DIS = 6
T_PROBE = 7

F_FULL = 1

SALT = b"fogmesh/v1"
_HEADER = struct.Struct(">BBHHHHHI")
_LIMITS = {
    "typ": 15,
    "flags": 3,
    "hops": 255,
    "src": 0xFFFF,
    "origin": 0xFFFF,
    "dest": 0xFFFF,
    "seq": 0xFFFF,
    "rank": 0xFFFF,
    "ctr": 0xFFFFFFFF,
}


class FrameError(FogmeshError, ValueError):
    """A frame or key input that cannot be packed, or bytes that are not a v1 frame."""


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header's fields; every one range-checked at construction."""

    typ: int
    flags: int
    hops: int
    src: int
    origin: int
    dest: int
    seq: int
    rank: int
    ctr: int

    def __post_init__(self) -> None:
        for name, hi in _LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= hi:
                raise FrameError(f"{name} must be an int in 0..{hi}, got {value!r}")


def mic(key: bytes, data: Bytes) -> bytes:
    """HMAC-SHA256(key, data) truncated to its first 8 bytes."""
    return hmac.digest(key, data, "sha256")[:MIC_LEN]


def pack(key: bytes, h: Header, payload: Bytes) -> bytes:
    """Header + payload + MIC under `key`; FrameError if the payload exceeds 226 bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes > {MAX_PAYLOAD}")
    vt = (VERSION << 6) | (h.typ << 2) | h.flags
    body = _HEADER.pack(vt, h.hops, h.src, h.origin, h.dest, h.seq, h.rank, h.ctr) + bytes(payload)
    return body + mic(key, body)


def unpack(frame: Bytes) -> tuple[Header, bytes]:
    """The header and payload of a frame (the MIC is not checked: see verify)."""
    n = len(frame)
    if not MIN_FRAME <= n <= MAX_FRAME:
        raise FrameError(f"frame of {n} bytes outside {MIN_FRAME}..{MAX_FRAME}")
    vt, hops, src, origin, dest, seq, rank, ctr = _HEADER.unpack_from(frame)
    if vt >> 6 != VERSION:
        raise FrameError(f"frame version {vt >> 6} != {VERSION}")
    h = Header((vt >> 2) & 15, vt & 3, hops, src, origin, dest, seq, rank, ctr)
    return h, bytes(frame[HDR : n - MIC_LEN])


def verify(key: bytes, frame: Bytes) -> bool:
    """True if the frame has a valid length and its MIC verifies under `key` (constant time)."""
    n = len(frame)
    if not MIN_FRAME <= n <= MAX_FRAME:
        return False
    return hmac.compare_digest(mic(key, bytes(frame[: n - MIC_LEN])), bytes(frame[n - MIC_LEN :]))


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with the salt (32 zero bytes if empty), then expand."""
    if not 0 <= length <= 255 * 32:
        raise FrameError(f"hkdf length must be 0..8160, got {length}")
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    out = b""
    block = b""
    i = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes((i,)), "sha256")
        out += block
        i += 1
    return out[:length]


def _site(site_key: bytes) -> bytes:
    if not 16 <= len(site_key) <= 64:
        raise FrameError(f"site key must be 16..64 bytes, got {len(site_key)}")
    return site_key


def node_key(site_key: bytes, node_id: int) -> bytes:
    """A node's 16-byte key: HKDF(site_key, b"fogmesh/v1", b"node" + id (2 B BE))."""
    if not 1 <= node_id <= 0xFFFE:
        raise FrameError(f"node id must be 1..0xFFFE, got {node_id}")
    return hkdf(_site(site_key), SALT, b"node" + node_id.to_bytes(2, "big"), 16)


def net_key(site_key: bytes, epoch: int) -> bytes:
    """The 16-byte network key of an epoch: HKDF(site_key, b"fogmesh/v1", b"net" + epoch (1 B))."""
    if not 0 <= epoch <= 255:
        raise FrameError(f"epoch must be 0..255, got {epoch}")
    return hkdf(_site(site_key), SALT, b"net" + bytes((epoch,)), 16)


def ctr_crypt(key16: bytes, nonce8: bytes, data: Bytes) -> bytes:
    """AES-128-CTR built from AES-ECB: block i = nonce || i (8 B BE), i from 0; its own inverse."""
    if len(key16) != 16:
        raise FrameError(f"ctr_crypt key must be 16 bytes, got {len(key16)}")
    if len(nonce8) != 8:
        raise FrameError(f"ctr_crypt nonce must be 8 bytes, got {len(nonce8)}")
    nblocks = (len(data) + 15) // 16
    blocks = b"".join(bytes(nonce8) + i.to_bytes(8, "big") for i in range(nblocks))
    encryptor = Cipher(algorithms.AES(bytes(key16)), modes.ECB()).encryptor()
    stream = encryptor.update(blocks) + encryptor.finalize()
    return bytes(a ^ b for a, b in zip(data, stream, strict=False))
