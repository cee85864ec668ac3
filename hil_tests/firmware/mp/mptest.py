# Helpers for firmware tests run on MicroPython by hil_tests/firmware/mp_runner.py.
#
#   e = raises(ValueError, int, "x")   # the exception; AssertionError if none or another one
#   d = tmpdir()                       # a fresh empty directory /tmp/mptest-<pid>-<n>
#   assert approx(0.1 + 0.2, 0.3)
#   v = vectors("cbor")                # hil_tests/vectors/cbor.json, parsed

import os

_n = 0
_pid = None


def raises(exc_type, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except exc_type as e:
        return e
    except Exception as e:
        raise AssertionError("expected %s, got %s: %s" % (exc_type.__name__, type(e).__name__, e))
    raise AssertionError("DID NOT RAISE %s" % exc_type.__name__)


def _getpid():
    global _pid
    if _pid is None:
        try:
            with open("/proc/self/stat") as f:
                _pid = int(f.read().split()[0])
        except (OSError, ValueError):
            import time

            _pid = time.ticks_ms()
    return _pid


def tmpdir():
    global _n
    for _ in range(1000):
        _n += 1
        path = "/tmp/mptest-%d-%d" % (_getpid(), _n)
        try:
            os.mkdir(path)
            return path
        except OSError as e:
            err = e  # left over from an earlier process with the same pid: take the next n
    raise OSError("tmpdir: cannot create a directory under /tmp: %s" % err)


def approx(a, b, rel=1e-9, abs_tol=1e-12):
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_tol)


def _here():
    f = __file__
    if not f.startswith("/"):
        f = os.getcwd() + "/" + f
    return f[: f.rfind("/")]


def vectors(name):
    # The shared vectors hil_tests/vectors/<name>.json (json.load streams from the file).
    import json

    with open(_here() + "/../../vectors/" + name + ".json") as f:
        return json.load(f)
