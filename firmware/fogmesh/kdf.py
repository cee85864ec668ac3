# HKDF-SHA256 (RFC 5869) and the key derivations of docs/mesh.md "Keys": what provisioning and
# the tests need, never a running node (it is given its keys). Reached as fogmesh.keys.hkdf etc.
# (keys.py loads this module on first use).

import struct

from fogmesh.keys import Mac

_SALT = b"fogmesh/v1"


def hmac_sha256(key, msg):
    return Mac(key).digest(msg)


def hkdf(ikm, salt, info, length):
    if not 0 <= length <= 255 * 32:
        raise ValueError("hkdf length must be 0..8160")
    prk = Mac(salt if salt else bytes(32)).digest(ikm)
    m = Mac(prk)
    out = bytearray()
    t = b""
    i = 1
    while len(out) < length:
        t = m.digest(t, info, bytes((i,)))
        out.extend(t)
        i += 1
    return bytes(out[:length])


def _site(site_key):
    if not 16 <= len(site_key) <= 64:
        raise ValueError("site key must be 16..64 bytes, got %d" % len(site_key))
    return site_key


def node_key(site_key, node_id):
    if not 1 <= node_id <= 0xFFFE:
        raise ValueError("node id must be 1..0xFFFE, got %r" % (node_id,))
    return hkdf(_site(site_key), _SALT, b"node" + struct.pack(">H", node_id), 16)


def net_key(site_key, epoch):
    if not 0 <= epoch <= 255:
        raise ValueError("epoch must be 0..255, got %r" % (epoch,))
    return hkdf(_site(site_key), _SALT, b"net" + bytes((epoch,)), 16)
