# fogmesh.keys on MicroPython: HMAC/HKDF/key derivation/AES against the shared vectors
# (hil_tests/vectors/keys.json), the replay window, and the persistent frame counter.

import gc
import os
from binascii import unhexlify

import mptest
from fogmesh import keys
from fogmesh.keys import Counter, Mac, ReplayWindow


def _h(s):
    return unhexlify(s)


def test_hmac_rfc4231():
    cases = mptest.vectors("keys")["hmac"]
    assert len(cases) == 7
    for c in cases:
        want = _h(c["hmac"])
        got = keys.hmac_sha256(_h(c["key"]), _h(c["data"]))
        assert got[: len(want)] == want, c["name"]


def test_hkdf_rfc5869():
    cases = mptest.vectors("keys")["hkdf"]
    assert len(cases) == 3
    for c in cases:
        okm = keys.hkdf(_h(c["ikm"]), _h(c["salt"]), _h(c["info"]), c["length"])
        assert okm == _h(c["okm"]), c["name"]
        salt = _h(c["salt"]) or bytes(32)
        assert keys.hmac_sha256(salt, _h(c["ikm"])) == _h(c["prk"]), c["name"]


def test_node_and_net_keys():
    v = mptest.vectors("keys")
    assert v["node_key"] and v["net_key"]
    for c in v["node_key"]:
        assert keys.node_key(_h(c["site_key"]), c["id"]) == _h(c["key"]), c
    for c in v["net_key"]:
        assert keys.net_key(_h(c["site_key"]), c["epoch"]) == _h(c["key"]), c


def test_key_derivation_rejects_bad_input():
    site = bytes(16)
    e = mptest.raises(ValueError, keys.node_key, site, 0)
    assert "node id" in str(e)
    mptest.raises(ValueError, keys.node_key, site, 0xFFFF)
    mptest.raises(ValueError, keys.net_key, site, 256)
    mptest.raises(ValueError, keys.net_key, site, -1)
    e = mptest.raises(ValueError, keys.node_key, bytes(15), 1)
    assert "site key" in str(e)
    mptest.raises(ValueError, keys.net_key, bytes(65), 1)
    mptest.raises(ValueError, keys.hkdf, b"k", b"", b"", 255 * 32 + 1)
    assert keys.hkdf(b"k", b"", b"", 0) == b""


def test_mac8_several_pieces():
    cases = mptest.vectors("keys")["mac8"]
    assert cases
    for c in cases:
        m = Mac(_h(c["key"]))
        parts = [_h(p) for p in c["parts"]]
        tag = _h(c["tag"])
        assert m.tag(*parts) == tag
        whole = b"".join(parts)
        assert m.tag(whole) == tag
        assert m.verify(whole, tag)
        assert m.verify(memoryview(whole), memoryview(tag))


def test_verify_rejects_any_change():
    m = Mac(b"k" * 16)
    data = b"some frame bytes"
    tag = m.tag(data)
    assert len(tag) == 8
    for i in range(8):
        bad = bytearray(tag)
        bad[i] ^= 1
        assert not m.verify(data, bad)
    assert not m.verify(data + b"x", tag)
    assert not m.verify(data, tag[:7])
    assert not m.verify(data, tag + b"\x00")
    assert not m.verify(data, b"")
    assert not Mac(b"K" * 16).verify(data, tag)


def test_aes_ecb_nist():
    # cryptolib itself, on the NIST SP 800-38A F.1.1 vectors: ctr_crypt is built on it.
    from cryptolib import aes

    cases = mptest.vectors("keys")["aes_ecb"]
    assert len(cases) == 4
    for c in cases:
        assert aes(_h(c["key"]), 1).encrypt(_h(c["plain"])) == _h(c["cipher"])


def test_ctr_crypt_vectors_both_ways():
    cases = mptest.vectors("keys")["ctr"]
    assert len(cases) >= 5
    for c in cases:
        key, nonce = _h(c["key"]), _h(c["nonce"])
        plain, cipher = _h(c["plain"]), _h(c["cipher"])
        assert keys.ctr_crypt(key, nonce, plain) == cipher, c["name"]
        assert keys.ctr_crypt(key, nonce, cipher) == plain, c["name"]
        assert keys.ctr_crypt(key, nonce, memoryview(bytearray(cipher))) == plain


def test_ctr_crypt_rejects_bad_sizes():
    e = mptest.raises(ValueError, keys.ctr_crypt, bytes(15), bytes(8), b"x")
    assert "key" in str(e)
    e = mptest.raises(ValueError, keys.ctr_crypt, bytes(16), bytes(7), b"x")
    assert "nonce" in str(e)
    mptest.raises(ValueError, keys.ctr_crypt, bytes(32), bytes(8), b"x")


def test_replay_window_basics():
    w = ReplayWindow()
    assert w.check(0) and w.accept(0)
    assert not w.check(0) and not w.accept(0)
    assert w.accept(5)
    assert w.accept(3)  # out of order, inside the window
    assert not w.accept(3)
    assert not w.accept(5)
    assert w.accept(1) and w.accept(2) and w.accept(4)
    assert w.highest == 5


def test_replay_window_edges():
    w = ReplayWindow()
    assert w.accept(1000)
    assert w.check(1000 - 64)  # 64 behind: still in the window
    assert not w.check(1000 - 65)  # older than 64 behind
    assert w.accept(936)
    assert not w.accept(936)
    assert w.accept(1064)  # moves the window by 64
    assert not w.check(999)  # 65 behind now
    assert w.check(1000 + 1) and not w.check(1000) and not w.check(1064)
    assert w.accept(1200)  # a jump past the ring clears everything
    assert w.check(1136) and not w.check(1135) and not w.check(1200)


def test_replay_window_check_does_not_update():
    w = ReplayWindow()
    assert w.check(7) and w.check(7)
    assert w.highest == -1
    assert w.accept(7) and not w.check(7)


def test_replay_window_counter_range():
    w = ReplayWindow()
    assert not w.check(-1) and not w.accept(-1)
    assert not w.check(2**32) and not w.accept(2**32)
    assert w.accept(2**32 - 1)
    assert not w.accept(2**32 - 1)
    assert w.accept(2**32 - 2)


def test_replay_window_against_a_model():
    # Pseudo-random sequences of counters against a plain set-based model of the rule.
    seed = 12345
    w = ReplayWindow()
    seen = set()
    hi = -1
    for _ in range(3000):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        r = seed % 100
        if r < 60:
            c = hi + 1 + seed % 3 if hi >= 0 else 0
        elif r < 65:
            c = hi + 60 + seed % 100
        else:
            c = hi - (seed >> 8) % 80
        fresh = 0 <= c and (c > hi or (hi - c <= 64 and c not in seen))
        assert w.check(c) == fresh, (c, hi)
        assert w.accept(c) == fresh, (c, hi)
        if fresh:
            seen.add(c)
            hi = max(hi, c)
        if len(seen) > 200:
            seen = set(x for x in seen if x >= hi - 70)
    assert hi > 3000


def test_counter_missing_file_starts_at_zero():
    d = mptest.tmpdir()
    c = Counter(d + "/ctr")
    assert c.value == -1
    assert c.next() == 0
    assert c.next() == 1
    assert c.value == 1
    assert open(d + "/ctr").read().strip() == "64"
    assert "ctr.tmp" not in os.listdir(d)


def test_counter_reserves_in_blocks():
    d = mptest.tmpdir()
    c = Counter(d + "/ctr", block=4)
    got = [c.next() for _ in range(10)]
    assert got == list(range(10))
    assert open(d + "/ctr").read().strip() == "12"


def test_counter_kill_safety():
    # A second Counter on the same file, the first never closed (as after kill -9 and a reboot):
    # every counter it hands out is greater than anything handed out before.
    d = mptest.tmpdir()
    path = d + "/ctr"
    a = Counter(path)
    for _ in range(70):
        a.next()
    b = Counter(path)
    first = b.next()
    assert first > a.value, (first, a.value)
    assert first == 128
    c = Counter(path, block=16)
    assert c.next() > b.value


def test_counter_resumes_from_complete_tmp():
    # On a filesystem without atomic replace the old file is removed before the rename: a crash
    # between the two leaves only the complete .tmp file.
    d = mptest.tmpdir()
    with open(d + "/ctr.tmp", "w") as f:
        f.write("640\n")
    assert Counter(d + "/ctr").next() == 640
    # A cut first write (only a corrupt .tmp): nothing was handed out yet.
    d = mptest.tmpdir()
    with open(d + "/ctr.tmp", "w") as f:
        f.write("6x")
    assert Counter(d + "/ctr").next() == 0


def test_counter_corrupt_file_is_an_error():
    d = mptest.tmpdir()
    for text in ("", "abc", "12x", "-5", "1.5", "\n"):
        with open(d + "/ctr", "w") as f:
            f.write(text)
        e = mptest.raises(ValueError, Counter, d + "/ctr")
        assert "corrupt" in str(e) and "ctr" in str(e), str(e)
    # The corrupt file is left as it was for the application to decide.
    assert open(d + "/ctr").read() == "\n"


def test_counter_unreadable_path_is_an_error():
    # Only a missing file means "start at 0"; anything else unreadable must not reset counters.
    d = mptest.tmpdir()
    os.mkdir(d + "/ctr")
    e = mptest.raises(OSError, Counter, d + "/ctr")
    assert e.errno != 2
    with open(d + "/big", "w") as f:
        f.write("1" * 40)
    mptest.raises(ValueError, Counter, d + "/big")


def test_counter_exhausted():
    d = mptest.tmpdir()
    with open(d + "/ctr", "w") as f:
        f.write("%d\n" % (2**32 - 2))
    c = Counter(d + "/ctr")
    assert c.next() == 2**32 - 2
    assert c.next() == 2**32 - 1
    e = mptest.raises(ValueError, c.next)
    assert "exhausted" in str(e)
    assert c.value == 2**32 - 1


def test_counter_bad_block():
    d = mptest.tmpdir()
    mptest.raises(ValueError, Counter, d + "/ctr", 0)


def test_mac_allocates_little():
    m = Mac(bytes(16))
    data = bytes(200)
    m.tag(data)
    gc.collect()
    gc.disable()
    try:
        a0 = gc.mem_alloc()
        for _ in range(10):
            assert m.verify(data, m.tag(data))
        used = gc.mem_alloc() - a0
    finally:
        gc.enable()
    assert used < 20 * 700, used  # 20 HMACs: a few small objects each, no copy of the data
