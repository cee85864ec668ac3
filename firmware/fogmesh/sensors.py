# Sample sources: a deterministic generator and a CSV file replay (the ADC source lives in
# hal/esp32.py, it needs `machine`). Every source has `channels` (names) and `read()` -> one
# value per channel, in a list reused by the next read().
#
#   s = make({"kind": "gen", "channels": ["temp", "vib"], "seed": 5}, flash)
#   row = s.read()
#
# gen: per channel c, sample n: base + 10·c + amp·sin(2πn/period) + noise·u, u uniform in
# [-1, 1] from a 16-bit xorshift seeded by `seed` (same seed, same series, on any port: its
# numbers stay small ints, so it allocates nothing even on a 32-bit ESP32); and, when
# `every` is set, `add` on the first `len` samples of every `every` (an excursion to alarm on).
# file: one row per line, one value per channel, comma separated; blank and `#` lines are
# skipped; a row with the wrong count or a non-number is skipped and counted in `bad`; at the
# end of the file it starts over. Lines are read one at a time: the file may be large.

import math

from micropython import const

_TWO_PI = 6.283185307179586
_MAX_LINE = const(512)


class SensorError(ValueError):
    pass


def make(scfg, flash):
    kind = scfg.get("kind")
    if kind == "gen":
        return Gen(scfg)
    if kind == "file":
        path = scfg["path"]
        if not path.startswith("/"):
            path = flash.rstrip("/") + "/" + path
        return CsvFile(path, scfg["channels"])
    raise SensorError("sensor kind %r is not available here" % (kind,))


class Gen:
    def __init__(self, scfg):
        self.channels = tuple(scfg["channels"])
        s = scfg.get("seed", 1) & 0xFFFF
        self._x = s or 0xACE1  # xorshift has no zero state
        base = float(scfg.get("base", 50.0))
        self._lvl = [base + 10.0 * c for c in range(len(self.channels))]
        self._amp = float(scfg.get("amp", 5.0))
        self._noise = float(scfg.get("noise", 1.0))
        self._period = float(scfg.get("period", 60.0)) or 1.0
        self._every = scfg.get("every", 0)
        self._len = scfg.get("len", 1)
        self._add = float(scfg.get("add", 40.0))
        self._row = [0.0] * len(self.channels)
        self.n = 0
        self.bad = 0

    def _rand(self):
        # xorshift16 (7, 9, 8): period 65535
        x = self._x
        x ^= (x << 7) & 0xFFFF
        x ^= x >> 9
        x ^= (x << 8) & 0xFFFF
        self._x = x
        return x

    def read(self):
        n = self.n
        wave = self._amp * math.sin(_TWO_PI * n / self._period)
        if self._every > 0 and n % self._every < self._len:
            wave += self._add
        row = self._row
        lvl = self._lvl
        k = self._noise / 32767.5
        for c in range(len(row)):
            row[c] = lvl[c] + wave + k * (self._rand() - 32767.5)
        self.n = n + 1
        return row


class CsvFile:
    def __init__(self, path, channels):
        self.channels = tuple(channels)
        self.path = path
        try:
            self._f = open(path)
        except OSError as e:
            raise SensorError("sensor file %s cannot be opened: %s" % (path, e))
        self._row = [0.0] * len(self.channels)
        self.n = 0
        self.bad = 0  # rows skipped: wrong number of values or not a number
        self._lines = 0
        self._rewound = False  # bad rows are counted on the first pass only

    def _parse(self, line):
        parts = line.split(",")
        if len(parts) != len(self._row):
            return False
        row = self._row
        for i in range(len(parts)):
            try:
                v = float(parts[i])
            except ValueError:
                return False
            if v - v != 0:  # inf, nan
                return False
            row[i] = v
        return True

    def read(self):
        while True:
            line = self._f.readline()
            if not line:
                if self._lines == 0:
                    raise SensorError("sensor file %s is empty" % self.path)
                if self.n == 0 and self._rewound:
                    raise SensorError("sensor file %s has no valid row" % self.path)
                self._f.seek(0)
                self._rewound = True
                continue
            self._lines += 1
            line = line.strip()
            if not line or line[0] == "#":
                continue
            if len(line) <= _MAX_LINE and self._parse(line):
                self.n += 1
                return self._row
            if not self._rewound:
                self.bad += 1

    def close(self):
        self._f.close()
