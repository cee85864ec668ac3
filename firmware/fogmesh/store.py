# A persistent ring buffer of application messages the mesh could not take yet: they wait in
# flash, oldest first, until the mesh accepts again.
#
#   r = Ring(flash, 32768)        # files ring.dat and ring.head in `flash`
#   r.append(seq, payload)        # durable when it returns
#   rec = r.peek()                # (seq, payload) of the oldest, or None
#   r.pop()                       # drop the oldest (after the mesh took it)
#   len(r); r.dropped             # records held; records dropped because the ring was full
#
# ring.dat is a circular file of at most `capacity` bytes holding records
#   len(2) seq(2) rn(4) crc32(4) payload      (little endian; crc over len, seq, rn, payload)
# where rn numbers the records consecutively for the life of the ring. ring.head holds
# "offset rn dropped" of the oldest record and is replaced atomically (write .tmp, rename).
# Opening scans from the head while each record is whole (length, CRC) and carries the next rn,
# so a record cut by a crash (only the newest can be) ends the scan and is overwritten later, and
# a stale record from an earlier lap never passes (its rn is older). A record that does not fit
# before the end of the file goes to offset 0; the scan looks there when the next rn is not at
# the current offset.
#
# Crash safety: append() writes the record and flushes before it returns; when the ring is full
# it first moves the head past the oldest records (ring.head rewritten) and only then overwrites
# them, so a crash never leaves the head on a half-written record. pop() rewrites ring.head; a
# crash between the two steps of a pop delivers that record again (a duplicate the root
# suppresses), never loses it.
#
# Flash wear: the mesh normally takes every message and the ring is not touched. While it
# refuses (no route, partition), each message costs one write of 12 + n bytes in ring.dat and
# each drained or dropped message one rewrite of ring.head (about 20 bytes; on littlefs an
# inline file in a metadata pair, which littlefs wear-levels). ring.dat is written in place, in
# order around the circle, so its blocks wear evenly. Writes scale with outage time, not uptime.

import os
import struct
from binascii import crc32

from micropython import const

_HDR = const(12)
_MAXREC = const(1024)  # the largest payload a record may hold


class StoreError(OSError):
    pass


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class Ring:
    def __init__(self, dirpath, capacity, log=None):
        if capacity < _HDR + 256:
            raise ValueError("ring capacity %d is too small" % capacity)
        d = dirpath.rstrip("/")
        self._dat = d + "/ring.dat"
        self._head = d + "/ring.head"
        self.capacity = capacity
        self._log = log
        self._hb = bytearray(_HDR)
        self._cache = None  # (seq, payload) of the head record once read
        self._len = 0
        self._p = None
        h = self._read_head()
        if h is None:
            if _exists(self._dat):
                raise StoreError("%s exists without %s: cannot tell where the data starts"
                                 % (self._dat, self._head))
            h = (0, 0, 0)
            self._write_head(0, 0, 0)
        self.h, self.hrn, self.dropped = h
        if not _exists(self._dat):
            open(self._dat, "wb").close()
        self._f = open(self._dat, "r+b")
        # Scan: the records from the head, consecutive rn.
        n = 0
        off = self.h
        rn = self.hrn
        first = None
        while True:
            at = self._find(off, rn)
            if at is None:
                break
            if first is None:
                first = at
            off = at + _HDR + self._len
            rn = (rn + 1) & 0xFFFFFFFF
            n += 1
            if n > capacity // _HDR:
                raise StoreError("%s: the scan does not end" % self._dat)
        if first is not None:
            self.h = first
        self.n = n
        self.t = off  # where the next record goes (or 0, if it does not fit there)
        self.trn = rn

    def __len__(self):
        return self.n

    # ---- files
    def _read_head(self):
        for p in (self._head, self._head + ".tmp"):
            try:
                with open(p) as f:
                    text = f.read(64)
            except OSError:
                continue
            parts = text.split()
            try:
                if len(parts) != 3:
                    raise ValueError
                h = (int(parts[0]), int(parts[1]), int(parts[2]))
            except ValueError:
                if p == self._head:
                    raise StoreError("%s is corrupt: %r" % (p, text[:40]))
                continue
            if not 0 <= h[0] < self.capacity:
                raise StoreError("%s: offset %d outside the ring" % (p, h[0]))
            return h
        return None

    def _write_head(self, off, rn, dropped):
        tmp = self._head + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d %d %d\n" % (off, rn, dropped))
        try:
            os.rename(tmp, self._head)
        except OSError:
            os.remove(self._head)
            os.rename(tmp, self._head)

    def _crc(self, payload):
        return crc32(payload, crc32(memoryview(self._hb)[:8])) & 0xFFFFFFFF

    def _at(self, off, rn):
        # The record at `off` if it is whole and numbered rn: its length in self._len.
        if off + _HDR > self.capacity:
            return False
        f = self._f
        f.seek(off)
        hb = self._hb
        if f.readinto(hb) != _HDR:
            return False
        n, _, r, c = struct.unpack("<HHII", hb)
        if r != rn or n > _MAXREC or off + _HDR + n > self.capacity:
            return False
        p = f.read(n)
        if len(p) != n or self._crc(p) != c:
            return False
        self._len = n
        self._p = p
        return True

    def _find(self, off, rn):
        if self._at(off, rn):
            return off
        if off and self._at(0, rn):
            return 0
        return None

    # ---- API
    def append(self, seq, payload):
        n = len(payload)
        size = _HDR + n
        if n > _MAXREC or size > self.capacity // 2:
            raise ValueError("record of %d B does not fit a ring of %d B" % (n, self.capacity))
        drop = 0
        while True:
            p = self.t if self.t + size <= self.capacity else 0
            if self.n == 0 or self._room(p, size):
                break
            self._advance()  # drop the oldest
            drop += 1
        if self.n == 0:
            self.h = p
        if drop:
            self.dropped += drop
            self._write_head(self.h, self.hrn, self.dropped)
            if self._log:
                self._log("drop", {"reason": "ring_full", "n": drop, "total": self.dropped})
        hb = self._hb
        struct.pack_into("<HHI", hb, 0, n, seq & 0xFFFF, self.trn)
        struct.pack_into("<I", hb, 8, self._crc(payload))
        f = self._f
        f.seek(p)
        f.write(hb)
        f.write(payload)
        f.flush()
        self.t = p + size
        self.trn = (self.trn + 1) & 0xFFFFFFFF
        self.n += 1

    def _room(self, p, size):
        # Is [p, p + size) clear of the records held (head h .. tail t, circular)?
        h, t = self.h, self.t
        if h < t:
            return p == t or p + size <= h  # after the tail, or wrapped in front of the head
        return p >= t and p + size <= h  # wrapped already: between tail and head

    def _advance(self):
        # The head moves to the next record (it must exist when n > 1).
        self._cache = None
        if self._at(self.h, self.hrn):
            nxt = self.h + _HDR + self._len
        else:
            raise StoreError("%s: head record unreadable" % self._dat)
        self.hrn = (self.hrn + 1) & 0xFFFFFFFF
        self.n -= 1
        if self.n == 0:
            self.h = self.t
        else:
            at = self._find(nxt, self.hrn)
            if at is None:
                raise StoreError("%s: record %d missing" % (self._dat, self.hrn))
            self.h = at

    def peek(self):
        if self.n == 0:
            return None
        if self._cache is None:
            if not self._at(self.h, self.hrn):
                raise StoreError("%s: head record unreadable" % self._dat)
            self._cache = (struct.unpack_from("<H", self._hb, 2)[0], self._p)
        return self._cache

    def pop(self):
        if self.n == 0:
            raise IndexError("pop from an empty ring")
        self._advance()
        self._write_head(self.h, self.hrn, self.dropped)

    def close(self):
        self._f.close()
