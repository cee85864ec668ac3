# SimRadio on MicroPython: argument checks, the peer cap, and the protocol against a fake
# medium socket in this process (hello, delivery, ACK matching by txid, late answers, the
# 100 ms timeout). The real medium is exercised from hil_tests/tools/test_mesh_medium.py.

import asyncio
import socket
import struct
import time

import mptest
from fogmesh.hal.simradio import SimRadio

ME = b"\x02\x00\x00\x00\x00\x05"
PEER = b"\x02\x00\x00\x00\x00\x01"
BCAST = b"\xff" * 6


def _medium():
    # A UDP socket standing in for the medium; returns (socket, (host, port)).
    for port in range(47300, 47400):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        except OSError:
            s.close()
            continue
        s.settimeout(1.0)
        return s, ("127.0.0.1", port)
    raise OSError("no free port")


def test_bad_mac_rejected():
    mptest.raises(ValueError, SimRadio, b"\x02\x00", ("127.0.0.1", 47299))


def test_send_checks_length_and_peer():
    r = SimRadio(ME, ("127.0.0.1", 47299))
    try:
        r.add_peer(PEER)
        mptest.raises(ValueError, r.send, PEER, b"")
        mptest.raises(ValueError, r.send, PEER, b"x" * 251)
        mptest.raises(ValueError, r.send, b"\x01\x02", b"x")
        mptest.raises(ValueError, r.add_peer, b"\x01")
        e = mptest.raises(OSError, r.send, b"\x02\x00\x00\x00\x00\x09", b"x")
        assert "NOT_FOUND" in str(e)
        assert r.stats["tx"] == 0  # nothing left the radio
    finally:
        r.close()


def test_peer_cap_is_twenty_and_add_is_idempotent():
    r = SimRadio(ME, ("127.0.0.1", 47299))
    try:
        r.add_peer(BCAST)
        for i in range(1, 20):
            r.add_peer(b"\x02\x00\x00\x00\x00" + bytes([i]))
        r.add_peer(BCAST)  # again: no error, no second slot
        r.add_peer(b"\x02\x00\x00\x00\x00\x01")
        e = mptest.raises(OSError, r.add_peer, b"\x02\x00\x00\x00\x00\x63")
        assert "FULL" in str(e)
    finally:
        r.close()


def test_rssi_is_none():
    r = SimRadio(ME, ("127.0.0.1", 47299))
    assert r.rssi(PEER) is None
    r.close()


def test_hello_recv_ack_and_late_answers():
    m, addr = _medium()
    r = SimRadio(ME, addr)
    try:
        hello, rx_addr = m.recvfrom(64)
        assert hello == b"H" + ME
        m.sendto(b"h", rx_addr)
        m.sendto(b"R" + PEER + b"frame-1", rx_addr)
        mac, msg = asyncio.run(r.recv())
        assert r.registered
        assert (bytes(mac), bytes(msg)) == (PEER, b"frame-1")
        assert r.stats["rx"] == 1

        # Nobody answers: False after ~100 ms, not earlier, not much later.
        r.add_peer(PEER)
        t0 = time.ticks_ms()
        assert r.send(PEER, b"abc") is False
        dt = time.ticks_diff(time.ticks_ms(), t0)
        assert 95 <= dt < 400, dt
        s, tx_addr = m.recvfrom(300)
        assert s[0:1] == b"S" and s[3:9] == ME and s[9:15] == PEER and s[15:] == b"abc"
        txid = struct.unpack(">H", s[1:3])[0]

        # A late answer to that send, then the answer to the next one: the late one is
        # discarded, the matching one decides.
        m.sendto(b"A" + struct.pack(">H", txid) + b"\x01", tx_addr)
        m.sendto(b"A" + struct.pack(">H", txid + 1) + b"\x01", tx_addr)
        assert r.send(PEER, b"def") is True
        assert r.stats["late"] == 1
        m.sendto(b"A" + struct.pack(">H", txid + 2) + b"\x00", tx_addr)
        assert r.send(PEER, b"ghi") is False  # a NACK (ok=0) is a failed send
        assert r.stats["tx"] == 3 and r.stats["tx_fail"] == 2
    finally:
        r.close()
        m.close()


def test_broadcast_is_true_without_waiting():
    m, addr = _medium()
    r = SimRadio(ME, addr)
    try:
        r.add_peer(BCAST)
        t0 = time.ticks_ms()
        assert r.send(BCAST, b"beacon") is True
        assert time.ticks_diff(time.ticks_ms(), t0) < 50
        assert r.stats["bcast"] == 1
        m.recvfrom(64)  # hello
        s, _ = m.recvfrom(300)
        assert s[9:15] == BCAST and s[15:] == b"beacon"
    finally:
        r.close()
        m.close()


def test_hello_repeats_until_answered():
    m, addr = _medium()
    r = SimRadio(ME, addr)
    try:
        assert m.recvfrom(64)[0] == b"H" + ME

        async def main():
            try:
                await asyncio.wait_for_ms(r.recv(), 2300)
            except asyncio.TimeoutError:
                pass

        asyncio.run(main())  # no "h": recv() says hello again after 2 s
        assert m.recvfrom(64)[0] == b"H" + ME
        assert r.stats["hello"] == 2 and not r.registered
    finally:
        r.close()
        m.close()
