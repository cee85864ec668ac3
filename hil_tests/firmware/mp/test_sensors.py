# firmware/fogmesh/sensors.py on MicroPython: the generator is deterministic per seed, the CSV
# replay skips and counts bad rows, wraps at the end, and refuses files without data.

import mptest
from fogmesh import sensors
from fogmesh.sensors import SensorError


def series(scfg, n):
    s = sensors.make(scfg, "/tmp")
    return [list(s.read()) for _ in range(n)]


def test_gen_same_seed_same_series():
    cfg = {"kind": "gen", "channels": ["temp", "vib"], "seed": 5}
    a = series(cfg, 50)
    b = series(cfg, 50)
    assert a == b
    assert len(a[0]) == 2


def test_gen_other_seed_other_series():
    a = series({"kind": "gen", "channels": ["t"], "seed": 5}, 20)
    b = series({"kind": "gen", "channels": ["t"], "seed": 6}, 20)
    assert a != b


def test_gen_levels_and_noise_bounds():
    cfg = {"kind": "gen", "channels": ["a", "b"], "seed": 1, "base": 20.0, "amp": 0.0, "noise": 0.5}
    s = sensors.make(cfg, "/tmp")
    for _ in range(200):  # checked as they come: 200 kept rows would fragment a 100 KB heap
        a, b = s.read()
        assert 19.5 <= a <= 20.5, a
        assert 29.5 <= b <= 30.5, b  # channel c sits 10·c above the base


def test_gen_excursions():
    cfg = {
        "kind": "gen",
        "channels": ["t"],
        "seed": 3,
        "base": 50.0,
        "amp": 0.0,
        "noise": 0.0,
        "every": 10,
        "len": 2,
        "add": 40.0,
    }
    vals = [r[0] for r in series(cfg, 30)]
    high = [i for i, v in enumerate(vals) if v > 80]
    assert high == [0, 1, 10, 11, 20, 21], high


def test_gen_seed_zero_is_not_stuck():
    vals = [r[0] for r in series({"kind": "gen", "channels": ["t"], "seed": 0, "amp": 0.0}, 10)]
    assert len(set(vals)) > 1


def write(text):
    d = mptest.tmpdir()
    with open(d + "/data.csv", "w") as f:
        f.write(text)
    return d


def test_file_rows_bad_rows_counted_and_wrap():
    d = write("# temp,vib\n1.0,2.0\n\nbad,row\n3.5,4\n7\n5,6,7\nnan,1\n8,9\n")
    s = sensors.make({"kind": "file", "channels": ["temp", "vib"], "path": "data.csv"}, d)
    got = [list(s.read()) for _ in range(5)]
    assert got == [[1.0, 2.0], [3.5, 4.0], [8.0, 9.0], [1.0, 2.0], [3.5, 4.0]], got
    assert s.bad == 4, s.bad  # "bad,row", "7", "5,6,7", "nan,1"; counted once, not per lap
    assert s.n == 5


def test_file_absolute_path():
    d = write("1,2\n")
    s = sensors.make({"kind": "file", "channels": ["a", "b"], "path": d + "/data.csv"}, "/x")
    assert list(s.read()) == [1.0, 2.0]


def test_file_missing_empty_or_all_bad():
    d = mptest.tmpdir()
    e = mptest.raises(
        SensorError, sensors.make, {"kind": "file", "channels": ["a"], "path": "nope.csv"}, d
    )
    assert "nope.csv" in str(e)
    s = sensors.make(
        {"kind": "file", "channels": ["a"], "path": write("").rstrip("/") + "/data.csv"}, "/"
    )
    assert "empty" in str(mptest.raises(SensorError, s.read))
    s = sensors.make({"kind": "file", "channels": ["a"], "path": "data.csv"}, write("x\ny\n"))
    assert "no valid row" in str(mptest.raises(SensorError, s.read))
    assert s.bad == 2


def test_unknown_kind():
    mptest.raises(SensorError, sensors.make, {"kind": "adc", "channels": ["a"], "pins": [1]}, "/")
