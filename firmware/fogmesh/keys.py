# Mesh security primitives (docs/mesh.md "Keys", "Frame counters and replay").
#
#   mac = Mac(net_key)            # ipad/opad blocks computed once per key
#   t = mac.tag(header, payload)  # HMAC-SHA256 over header + payload, first 8 bytes
#   mac.verify(data, t)           # constant-time compare
#   node_key(site_key, 5); net_key(site_key, epoch)      # HKDF-SHA256 (RFC 5869; fogmesh.kdf)
#   ctr_crypt(node_key16, nonce8, data)                  # AES-128-CTR from ECB; its own inverse
#   w = ReplayWindow(); w.accept(ctr)                    # per-neighbour replay window
#   c = Counter("ctr"); c.next()                         # persistent 32-bit frame counter
#
# MicroPython has no hmac module and sha256 objects cannot be copied, so a Mac hashes its
# padded key blocks into a fresh sha256 for every tag (two extra 64-byte blocks per frame).

import os
import struct
from errno import ENOENT
from hashlib import sha256

from micropython import const

_BLOCK = const(64)
_TAG = const(8)
_U32 = const(0xFFFFFFFF)
_WINDOW = const(64)  # counters up to 64 behind the highest are still accepted once


class Mac:
    def __init__(self, key):
        if len(key) > _BLOCK:
            key = sha256(key).digest()
        ipad = bytearray(_BLOCK)
        opad = bytearray(_BLOCK)
        for i in range(_BLOCK):
            k = key[i] if i < len(key) else 0
            ipad[i] = k ^ 0x36
            opad[i] = k ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)

    # The full 32-byte HMAC over the concatenation of parts (not built: each part is hashed).
    def digest(self, *parts):
        h = sha256(self._ipad)
        for p in parts:
            h.update(p)
        o = sha256(self._opad)
        o.update(h.digest())
        return o.digest()

    def tag(self, *parts):
        return self.digest(*parts)[:_TAG]

    def verify(self, data, tag):
        if len(tag) != _TAG:
            return False
        t = self.digest(data)
        diff = 0
        for i in range(_TAG):
            diff |= t[i] ^ tag[i]
        return diff == 0


def __getattr__(name):
    # hmac_sha256, hkdf, node_key, net_key: provisioning and tests only (a node is given its
    # keys), so they live in fogmesh.kdf, loaded on first use: ~1 KB less on every node.
    if name in ("hmac_sha256", "hkdf", "node_key", "net_key"):
        from fogmesh import kdf

        return getattr(kdf, name)
    raise AttributeError(name)


def ctr_crypt(key16, nonce8, data):
    # Counter block i = nonce (8 B) || i (8 B big-endian), i from 0; all blocks are encrypted in
    # one ECB call, then XORed into the data. Encryption and decryption are the same operation.
    if len(key16) != 16:
        raise ValueError("ctr_crypt key must be 16 bytes, got %d" % len(key16))
    if len(nonce8) != 8:
        raise ValueError("ctr_crypt nonce must be 8 bytes, got %d" % len(nonce8))
    from cryptolib import aes

    n = len(data)
    nblocks = (n + 15) >> 4
    ks = bytearray(nblocks << 4)
    for i in range(nblocks):
        o = i << 4
        ks[o : o + 8] = nonce8
        struct.pack_into(">II", ks, o + 8, 0, i)
    if nblocks:
        aes(key16, 1).encrypt(ks, ks)
    for i in range(n):
        ks[i] ^= data[i]
    return bytes(ks[:n])


class ReplayWindow:
    # Per-neighbour window: the highest counter seen and which of the 64 counters below it were
    # seen. A ring of 128 bits indexed by ctr & 127 (a bytearray: no big ints, no allocation).
    # Fresh: ctr > highest, or highest - 64 <= ctr < highest and not seen yet.

    def __init__(self):
        self.highest = -1
        self._bits = bytearray(16)

    def check(self, ctr):
        if not 0 <= ctr <= _U32:
            return False
        h = self.highest
        if ctr > h:
            return True
        if h - ctr > _WINDOW:
            return False
        return not self._bits[(ctr & 127) >> 3] & (1 << (ctr & 7))

    def accept(self, ctr):
        if not self.check(ctr):
            return False
        bits = self._bits
        h = self.highest
        if ctr > h:
            if h < 0 or ctr - h >= 128:
                for i in range(16):
                    bits[i] = 0
            else:
                for c in range(h + 1, ctr + 1):
                    bits[(c & 127) >> 3] &= ~(1 << (c & 7))
            self.highest = ctr
        bits[(ctr & 127) >> 3] |= 1 << (ctr & 7)
        return True


class Counter:
    # The node's 32-bit frame counter, kept across reboots and kill -9. Before handing out a
    # counter at or beyond the stored reservation it writes reserved = ctr + block to `path`
    # (via path + ".tmp" and os.rename), so a restart starts at a value never handed out.
    # value: the last counter handed out (reservation - 1 right after opening; -1 when new).

    def __init__(self, path, block=64):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.path = path
        self.block = block
        self._reserved = self._load()
        self.value = self._reserved - 1

    def _read(self, path):
        # The stored reservation; None if the file does not exist (any other OSError propagates:
        # starting again at 0 would reuse counters).
        try:
            with open(path) as f:
                text = f.read(32)  # a valid file holds at most 11 characters
        except OSError as e:
            if e.errno == ENOENT:
                return None
            raise
        s = text.strip()
        if not s or not s.isdigit() or len(text) == 32:
            raise ValueError(
                "corrupt counter file %s: %r is not a decimal integer" % (path, s[:20])
            )
        return int(s)

    def _load(self):
        r = self._read(self.path)
        if r is None:
            # A rename that had to remove the old file first (no atomic replace on FAT) may have
            # been cut between the two steps: the complete .tmp file then holds the reservation.
            # An unreadable .tmp without `path` is a cut first write: nothing was handed out.
            try:
                r = self._read(self.path + ".tmp")
            except ValueError:
                r = None
        return 0 if r is None else r

    def _store(self, reserved):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % reserved)
        try:
            os.rename(tmp, self.path)
        except OSError:
            os.remove(self.path)
            os.rename(tmp, self.path)

    def next(self):
        c = self.value + 1
        if c > _U32:
            raise ValueError("frame counter exhausted (2**32 values)")
        if c >= self._reserved:
            r = c + self.block
            self._store(r)
            self._reserved = r
        self.value = c
        return c
