# The radio of a node in simulation: ESP-NOW's interface over two loopback UDP sockets and the
# radio medium (tools/mesh/medium.py; docs/mesh.md "Radio medium protocol").
#
#   r = SimRadio(b"\x02\x00\x00\x00\x00\x05", ("127.0.0.1", 40000))
#   r.add_peer(mac)                   # like espnow: required before send; at most 20 peers
#   ok = r.send(mac, frame)           # unicast: True iff the MAC ACK came (blocks <= 100 ms)
#   mac, frame = await r.recv()       # next frame heard: transmitter MAC and bytes
#
# rx socket: hello, then the frames the medium delivers (b"R" + src_mac6 + frame).
# tx socket: sends (b"S" + txid2 + src6 + dst6 + frame) and their answers (b"A" + txid2 + ok1).
# A sync send blocks the whole process, as espnow's does on an ESP32: it waits on the tx socket
# with select.poll and a timeout; answers to older txids (late ones) are discarded.
# recv() waits in asyncio's poller on the rx socket, as aioespnow waits on espnow: yield
# core._io_queue.queue_read(sock), then one recv() = one datagram. (asyncio.StreamReader over
# the socket would join datagrams: a socket's read() is a stream read. This also spares the
# ~2 KB that importing asyncio.stream costs the node's heap.)

import asyncio
import select
import socket
import struct
import time

from asyncio import core
from micropython import const

_MAX_MSG = const(250)  # ESP-NOW v1 payload
_MAX_PEERS = const(20)  # ESP-NOW's cap (ESP_NOW_MAX_TOTAL_PEER_NUM), broadcast peer included
_ACK_MS = const(100)  # no answer within this counts as no ACK
_HELLO_MS = const(2000)
_HDR_S = const(15)  # b"S" + txid(2) + src(6) + dst(6)
_RX_MAX = const(257)  # b"R" + src(6) + a 250-byte frame

_BCAST = b"\xff\xff\xff\xff\xff\xff"


def _udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(socket.getaddrinfo("127.0.0.1", 0)[0][-1])
    s.setblocking(False)
    return s


class SimRadio:
    def __init__(self, mac, medium=("127.0.0.1", 40000)):
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes, got %d" % len(mac))
        self.mac = bytes(mac)
        self._addr = socket.getaddrinfo(medium[0], medium[1])[0][-1]
        self._rx = _udp()
        self._tx = _udp()
        self._poll = select.poll()
        self._poll.register(self._tx, select.POLLIN)
        self._peers = []
        self._txid = 0
        self._sbuf = bytearray(_HDR_S + _MAX_MSG)
        self._smv = memoryview(self._sbuf)
        self._sbuf[0] = 0x53  # "S"
        self._sbuf[3:9] = self.mac
        self._hello = b"H" + self.mac
        self.registered = False
        self.stats = {"tx": 0, "tx_fail": 0, "bcast": 0, "rx": 0, "late": 0, "hello": 0}
        self._say_hello()

    def _say_hello(self):
        self.stats["hello"] += 1
        try:
            self._rx.sendto(self._hello, self._addr)
        except OSError:
            pass  # no medium yet: the next hello may find it

    def add_peer(self, mac):
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes, got %d" % len(mac))
        if mac in self._peers:
            return
        if len(self._peers) >= _MAX_PEERS:
            raise OSError("ESP_ERR_ESPNOW_FULL: %d peers already" % _MAX_PEERS)
        self._peers.append(bytes(mac))

    def send(self, mac, msg, sync=True):
        n = len(msg)
        if n == 0 or n > _MAX_MSG:
            raise ValueError("message of %d bytes: must be 1..%d" % (n, _MAX_MSG))
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes, got %d" % len(mac))
        if mac not in self._peers:
            raise OSError("ESP_ERR_ESPNOW_NOT_FOUND: add_peer() first")
        self._txid = (self._txid + 1) & 0xFFFF
        txid = self._txid
        b = self._sbuf
        struct.pack_into(">H", b, 1, txid)
        b[9:15] = mac
        b[_HDR_S : _HDR_S + n] = msg
        self.stats["tx"] += 1
        try:
            self._tx.sendto(self._smv[: _HDR_S + n], self._addr)
        except OSError:
            self.stats["tx_fail"] += 1
            return False
        if mac == _BCAST:
            self.stats["bcast"] += 1
            return True  # espnow: a broadcast is never ACKed and always "succeeds"
        if not sync:
            return True
        if self._wait_ack(txid):
            return True
        self.stats["tx_fail"] += 1
        return False

    def _wait_ack(self, txid):
        t0 = time.ticks_ms()
        left = _ACK_MS
        while left > 0:
            for _ in self._poll.ipoll(left):
                try:
                    a = self._tx.recv(8)
                except OSError:
                    a = b""
                if len(a) == 4 and a[0] == 0x41 and (a[1] << 8 | a[2]) == txid:
                    return a[3] == 1
                self.stats["late"] += 1  # an answer to an earlier txid, or garbage
            left = _ACK_MS - time.ticks_diff(time.ticks_ms(), t0)
        return False

    async def _read(self):
        while True:
            yield core._io_queue.queue_read(self._rx)  # wake when the socket is readable
            try:
                return self._rx.recv(_RX_MAX)
            except OSError:
                pass

    async def recv(self):
        while True:
            if self.registered:
                d = await self._read()
            else:
                try:
                    d = await asyncio.wait_for_ms(self._read(), _HELLO_MS)
                except asyncio.TimeoutError:
                    self._say_hello()
                    continue
            if len(d) > 7 and d[0] == 0x52:  # "R"
                self.stats["rx"] += 1
                return d[1:7], d[7:]
            if d == b"h":
                self.registered = True

    def rssi(self, mac):
        return None  # the medium has loss, not signal strength

    def close(self):
        try:
            self._poll.unregister(self._tx)
        except (OSError, KeyError, ValueError):
            pass
        self._rx.close()
        self._tx.close()
