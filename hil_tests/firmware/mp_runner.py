# Runs firmware unit tests ON MicroPython, pytest style.
#
#   micropython -X heapsize=100k hil_tests/firmware/mp_runner.py FILE.py [FILE.py ...] [-k SUBSTR]
#
# <repo>/firmware, each test file's directory and hil_tests/firmware/mp/ (for mptest) go first on
# sys.path. Every top-level `def test_*` of a file runs in definition order (module dicts are
# unordered here, so the order comes from scanning the file's text), with gc.collect() between
# tests. One line per test, `path::name PASSED|FAILED`, a traceback under each failure, then
# `N passed, M failed in X.XXs`. Exit code: 0 all passed, 1 a test failed or a file did not
# import, 5 no test collected.

import gc
import os
import sys
import time


def _abspath(path):
    if not path.startswith("/"):
        path = os.getcwd() + "/" + path
    parts = []
    for p in path.split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p and p != ".":
            parts.append(p)
    return "/" + "/".join(parts)


def _dirname(path):
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def _test_names(path):
    # Names of the top-level `def test_...(` lines, in file order.
    names = []
    with open(path) as f:
        for line in f:
            if line.startswith("def test_"):
                name = line[4:].split("(")[0].strip()
                if name not in names:
                    names.append(name)
    return names


def _import(path):
    d = _dirname(path)
    name = path[len(d) + 1 :]
    if name.endswith(".py"):
        name = name[:-3]
    if d not in sys.path:
        sys.path.insert(0, d)
    if name in sys.modules:
        del sys.modules[name]
    return __import__(name)


def _run_file(arg, keyword, counts):
    path = _abspath(arg)
    try:
        names = _test_names(path)
        mod = _import(path)
    except Exception as e:
        print("%s ERROR (import)" % arg)
        sys.print_exception(e)
        counts[1] += 1
        counts[2] += 1
        return
    # Also anything named test_* that the text scan missed (e.g. assigned, not def'd).
    extra = [n for n in dir(mod) if n.startswith("test_") and n not in names]
    extra.sort()
    for name in names + extra:
        fn = getattr(mod, name, None)
        if not callable(fn) or (keyword and keyword not in name):
            continue
        counts[2] += 1
        gc.collect()
        try:
            fn()
        except Exception as e:
            print("%s::%s FAILED" % (arg, name))
            sys.print_exception(e)
            counts[1] += 1
        else:
            print("%s::%s PASSED" % (arg, name))
            counts[0] += 1


def main(argv):
    files = []
    keyword = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-k":
            if i + 1 >= len(argv):
                print("usage: mp_runner.py FILE.py [FILE.py ...] [-k SUBSTRING]")
                return 4
            keyword = argv[i + 1]
            i += 2
            continue
        files.append(a)
        i += 1
    if not files:
        print("usage: mp_runner.py FILE.py [FILE.py ...] [-k SUBSTRING]")
        return 4
    here = _dirname(_abspath(__file__))
    repo = _dirname(_dirname(here))
    for p in (here + "/mp", repo + "/firmware"):
        if p not in sys.path:
            sys.path.insert(0, p)
    counts = [0, 0, 0]  # passed, failed (tests and files that did not import), collected
    t0 = time.ticks_ms()
    for f in files:
        _run_file(f, keyword, counts)
    secs = time.ticks_diff(time.ticks_ms(), t0) / 1000
    print("%d passed, %d failed in %.2fs" % (counts[0], counts[1], secs))
    if counts[1]:
        return 1
    if counts[2] == 0:
        return 5
    return 0


sys.exit(main(sys.argv[1:]))
