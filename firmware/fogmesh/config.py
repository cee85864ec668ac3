# The node's config.json (docs/mesh.md "Node configuration"): load, check, fill defaults, save;
# and the downlink `cfg` command that changes it.
#
#   cfg = load(flash + "/config.json")   # ConfigError naming every problem, each with its key
#   changed = update(cfg, {"sample_hz": 2})   # the live keys a downlink `cfg` command may set
#   save(flash + "/config.json", cfg)    # atomically: config.json.tmp, then rename
#   command(app, changes)                # the `cfg` command, for App.on_down
#   rare(app, what, arg)                 # App's rare paths: `cfg`, `mdl`, the model at boot
#
# Every problem is collected with its dotted key and reported together, so one look at the log
# fixes a provisioning mistake. Unknown keys are ignored (newer tools may add some).
# A node needs this module at boot and for a rare command only: main.py and App drop it
# (app.unload) once done, which gives its bytecode back to the heap.

import json
from binascii import unhexlify

from micropython import const

_MAX_CH = const(16)
_MAX_NAME = const(32)
_MAX_ID = const(0xFFFE)

LIVE = ("sample_hz", "summary_s", "rule")  # keys a downlink `cfg` command may change

_DEFAULTS = (
    ("role", "node"),
    ("channel", 1),
    ("sample_hz", 1.0),
    ("summary_s", 10),
    ("status_s", 60),
    ("model", None),
    ("rule", None),
    ("ring_bytes", 32768),
    ("watchdog_s", 30),
)


class ConfigError(ValueError):
    def __init__(self, problems):
        self.problems = problems
        super().__init__("config: " + "; ".join(problems))


def _num(v):
    return type(v) is not bool and isinstance(v, (int, float)) and v - v == 0


def _int(v):
    return type(v) is not bool and isinstance(v, int)


def _hexkey(out, key, v):
    if not isinstance(v, str) or len(v) != 32:
        out.append("%s: must be 32 hex digits" % key)
        return
    try:
        unhexlify(v)
    except ValueError:
        out.append("%s: %r is not hex" % (key, v))


def _range(out, cfg, key, lo, hi, integer=False):
    v = cfg.get(key)
    if not (_int(v) if integer else _num(v)) or not lo <= v <= hi:
        out.append("%s: must be a%s number in %s..%s, got %r" % (
            key, "n integer" if integer else "", lo, hi, v))


def _names(out, key, v):
    if not isinstance(v, list) or not 1 <= len(v) <= _MAX_CH:
        out.append("%s: must be a list of 1..%d channel names" % (key, _MAX_CH))
        return
    for i, n in enumerate(v):
        if not isinstance(n, str) or not 1 <= len(n) <= _MAX_NAME:
            out.append("%s[%d]: must be a name of 1..%d characters" % (key, i, _MAX_NAME))
        elif v.index(n) != i:
            out.append("%s[%d]: %r appears twice" % (key, i, n))


def _sensor(out, s):
    if not isinstance(s, dict):
        out.append("sensor: must be a map with kind and channels")
        return
    kind = s.get("kind")
    _names(out, "sensor.channels", s.get("channels"))
    if kind == "gen":
        for k in ("seed", "every", "len"):
            if k in s and not _int(s[k]):
                out.append("sensor.%s: must be an integer, got %r" % (k, s[k]))
        for k in ("base", "amp", "noise", "period", "add"):
            if k in s and not _num(s[k]):
                out.append("sensor.%s: must be a number, got %r" % (k, s[k]))
    elif kind == "file":
        if not isinstance(s.get("path"), str) or not s.get("path"):
            out.append("sensor.path: a file sensor needs the path of its CSV file")
    elif kind == "adc":
        pins = s.get("pins")
        ch = s.get("channels")
        if not isinstance(pins, list) or not all(_int(p) for p in pins):
            out.append("sensor.pins: an adc sensor needs a list of pin numbers")
        elif isinstance(ch, list) and len(pins) != len(ch):
            out.append("sensor.pins: %d pins for %d channels" % (len(pins), len(ch)))
        if "scale" in s and not _num(s["scale"]):
            out.append("sensor.scale: must be a number, got %r" % (s["scale"],))
    else:
        out.append("sensor.kind: must be gen, file or adc, got %r" % (kind,))


def _rule(out, r, channels):
    if r is None:
        return
    if not isinstance(r, dict):
        out.append('rule: must be a map like {"channel": "temp", "above": 80.0}')
        return
    ch = r.get("channel")
    if not isinstance(ch, str):
        out.append("rule.channel: must name a sensor channel")
    elif channels is not None and ch not in channels:
        out.append("rule.channel: %r is not one of the sensor channels %r" % (ch, channels))
    if "above" not in r and "below" not in r:
        out.append("rule: needs above and/or below")
    for k in ("above", "below"):
        if k in r and not _num(r[k]):
            out.append("rule.%s: must be a number, got %r" % (k, r[k]))


def _channels(cfg):
    s = cfg.get("sensor")
    if isinstance(s, dict) and isinstance(s.get("channels"), list):
        return s["channels"]
    return None


def _root(out, cfg):
    _hexkey(out, "net_key", cfg.get("net_key"))
    _range(out, cfg, "epoch", 0, 255, True)
    allow = cfg.get("allow", {})
    if not isinstance(allow, dict):
        out.append("allow: must be a map of node id -> node key")
    else:
        for k, v in allow.items():
            try:
                ok = 1 <= int(k) <= _MAX_ID
            except ValueError:
                ok = False
            if not ok:
                out.append("allow: key %r is not a node id" % (k,))
            _hexkey(out, "allow.%s" % k, v)
    u = cfg.get("uart")
    if not isinstance(u, dict) or ("fd" not in u and "id" not in u):
        out.append('uart: the root needs {"fd": N} (simulation) or {"id": N, "baud": B}')
        return
    if "fd" in u and (not _int(u["fd"]) or u["fd"] < 0):
        out.append("uart.fd: must be a file descriptor number, got %r" % (u["fd"],))
    if "id" in u and not _int(u["id"]):
        out.append("uart.id: must be a UART number, got %r" % (u["id"],))
    if "baud" in u and (not _int(u["baud"]) or u["baud"] <= 0):
        out.append("uart.baud: must be a positive integer, got %r" % (u["baud"],))
    if ("tx" in u) != ("rx" in u) or not all(_int(u[k]) for k in ("tx", "rx") if k in u):
        out.append("uart.tx, uart.rx: give both pin numbers or neither")
    if "log" in u and type(u["log"]) is not bool:
        out.append("uart.log: must be true or false")


def check(cfg):
    # -> list of problems (empty: good). Fills defaults into cfg for the keys it checks.
    if not isinstance(cfg, dict):
        return ["the file must hold a JSON object"]
    out = []
    for k, v in _DEFAULTS:
        if k not in cfg:
            cfg[k] = v
    _range(out, cfg, "id", 1, _MAX_ID, True)
    role = cfg["role"]
    if role not in ("node", "root"):
        out.append("role: must be node or root, got %r" % (role,))
    _range(out, cfg, "channel", 1, 14, True)
    if role != "root" or "node_key" in cfg:
        _hexkey(out, "node_key", cfg.get("node_key"))
    _range(out, cfg, "sample_hz", 0.001, 100)
    _range(out, cfg, "summary_s", 0.1, 86400)
    _range(out, cfg, "status_s", 1, 86400)
    _range(out, cfg, "ring_bytes", 1024, 1 << 20, True)
    _range(out, cfg, "watchdog_s", 0, 3600)
    m = cfg["model"]
    if m is not None and (not isinstance(m, str) or not m or "/" in m):
        out.append("model: must be a file name in the flash directory, got %r" % (m,))
    if "sensor" in cfg or role != "root":
        _sensor(out, cfg.get("sensor"))
    _rule(out, cfg["rule"], _channels(cfg))
    sim = cfg.get("sim")
    if sim is not None:
        med = sim.get("medium") if isinstance(sim, dict) else None
        if (not isinstance(med, list) or len(med) != 2 or not isinstance(med[0], str)
                or not _int(med[1]) or not 0 < med[1] < 65536):
            out.append('sim.medium: must be ["host", port], got %r' % (med,))
    if role == "root":
        _root(out, cfg)
    return out


def validate(cfg):
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path):
    # A rename that had to remove config.json first (no atomic replace) may have been cut
    # between the two steps: the complete .tmp then holds the config.
    text = None
    for p in (path, path + ".tmp"):
        try:
            with open(p) as f:
                text = f.read()
            break
        except OSError:
            pass
    if text is None:
        raise ConfigError(["%s: cannot be read (missing?)" % path])
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise ConfigError(["%s: not valid JSON (%s)" % (path, e)])
    return validate(cfg)


def save(path, cfg):
    from fogmesh.hal import save_json

    save_json(path, cfg)


def update(cfg, changes):
    # Applies the live keys of a `cfg` command, all or nothing -> the dict of applied values.
    if not isinstance(changes, dict) or not changes:
        raise ConfigError(["set: must be a non-empty map of key -> value"])
    out = []
    for k in changes:
        if k not in LIVE:
            out.append("%s: cannot be set remotely (only %s)" % (k, ", ".join(LIVE)))
    if out:
        raise ConfigError(out)
    trial = dict(cfg)
    trial.update(changes)
    out = check(trial)
    if out:
        raise ConfigError(out)
    cfg.update(changes)
    return changes


# ---- downlink commands (App.on_down)
def _path(app, name):
    return app.flash.rstrip("/") + "/" + name


def command(app, changes):
    # The `cfg` command: -> a dict for the `cmd` log line; raises on bad input, having changed
    # nothing (neither the running config nor config.json).
    trial = dict(app.cfg)
    if trial.get("role") == "root" and "allow" not in trial:
        # main.py drops a root's allow list once the mesh holds its keys: the file has it
        trial["allow"] = load(_path(app, "config.json")).get("allow", {})
    update(trial, changes)  # ConfigError (rule.channel too): nothing applied
    save(_path(app, "config.json"), trial)
    app.cfg.update(changes)
    if "sample_hz" in changes or "summary_s" in changes:
        app.reschedule()
    return {"set": changes}


# ---- the model (App: a model at boot, the `mdl` command)
_MAX_MODEL = const(16384)


def rare(app, what, arg):
    # App._rare(): "cfg" / "mdl" commands -> a dict for the `cmd` log line; "model": loads
    # cfg["model"] at boot (a failure is logged, the threshold rule stays).
    if what == "cfg":
        return command(app, arg.get("set"))
    if what == "mdl":
        return mdl(app, arg)
    m = app.cfg.get("model")
    p = _path(app, m)
    try:
        import os

        os.stat(p)
    except OSError:
        return None
    try:
        use(app, detector(app, p))
        app._log("model", {"file": m, "channels": list(app._det.channels)})
    except (OSError, ValueError, MemoryError) as e:
        app._det = None
        app._log("error", {"what": "model", "file": m, "err": str(e)})


def detector(app, path):
    # -> (detector, row map) for the blob at path; ValueError (ModelError) if unusable.
    import gc

    gc.collect()  # the detector's buffers want room in one piece, not holes
    from fogmesh.detector import Detector

    with open(path, "rb") as f:
        det = Detector(f.read())
    idx = []
    for name in det.channels:
        if name not in app.channels:
            raise ValueError("model channel %r is not a sensor channel %r" % (name, app.channels))
        idx.append(app.channels.index(name))
    return det, idx


def use(app, d):
    # d: (detector, row map) from detector(); it replaces the rule or the model in use.
    app._det = d[0]
    app._dmap = (d[1], [0.0] * len(d[1]))  # row map, row buffer


def mdl(app, cmd):
    # One chunk of a model blob, in order (a chunk sent again is skipped; off 0 starts over).
    # Complete, the blob must load and fit the sensor's channels before it replaces the model.
    import os

    off = cmd.get("off")
    total = cmd.get("total")
    data = cmd.get("data")
    if type(off) is not int or type(total) is not int or not isinstance(data, bytes):
        raise ValueError("mdl needs integer off and total and bytes data")
    if not 0 < total <= _MAX_MODEL or off < 0 or off + len(data) > total:
        raise ValueError("mdl chunk %d+%d outside a model of %d B (max %d)"
                         % (off, len(data), total, _MAX_MODEL))
    tmp = _path(app, "model.tmp")
    st = app._mdl_st
    if off == 0:
        st = app._mdl_st = [total, 0]
        mode = "wb"
    elif st is None or st[0] != total:
        raise ValueError("mdl chunk at %d without its start" % off)
    elif off + len(data) <= st[1]:
        return {"off": off, "dup": True}
    elif off != st[1]:
        raise ValueError("mdl chunk at %d, expected %d" % (off, st[1]))
    else:
        mode = "ab"
    with open(tmp, mode) as f:
        f.write(data)
    st[1] = off + len(data)
    if st[1] < total:
        return {"off": off}
    app._mdl_st = None
    try:
        det = detector(app, tmp)
    except Exception:
        os.remove(tmp)
        raise
    name = app.cfg.get("model") or "model.bin"
    dst = _path(app, name)
    try:
        os.rename(tmp, dst)
    except OSError:
        os.remove(dst)
        os.rename(tmp, dst)
    if app.cfg.get("model") != name:
        app.cfg["model"] = name
        save(_path(app, "config.json"), app.cfg)
    use(app, det)
    return {"model": name, "bytes": total}
