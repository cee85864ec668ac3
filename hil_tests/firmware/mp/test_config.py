# firmware/fogmesh/config.py on MicroPython: defaults, every kind of bad value with its key,
# load/save, the live-key update of a `cfg` command.

import json
import os

import mptest
from fogmesh import config
from fogmesh.config import ConfigError

KEY = "00112233445566778899aabbccddeeff"


def node(**kw):
    cfg = {
        "id": 5,
        "role": "node",
        "node_key": KEY,
        "sensor": {"kind": "gen", "channels": ["temp", "vib"], "seed": 5},
        "sim": {"medium": ["127.0.0.1", 40000]},
    }
    cfg.update(kw)
    return cfg


def root(**kw):
    cfg = {
        "id": 1,
        "role": "root",
        "node_key": KEY,
        "net_key": KEY,
        "epoch": 0,
        "allow": {"5": KEY},
        "uart": {"fd": 3},
    }
    cfg.update(kw)
    return cfg


def problems(cfg):
    return " | ".join(config.check(cfg))


def test_defaults_filled():
    cfg = config.validate(node())
    assert cfg["sample_hz"] == 1.0
    assert cfg["summary_s"] == 10
    assert cfg["status_s"] == 60
    assert cfg["model"] is None and cfg["rule"] is None
    assert cfg["ring_bytes"] == 32768
    assert cfg["channel"] == 1


def test_root_without_sensor_is_valid():
    assert config.check(root()) == []


def test_every_problem_reported_with_its_key():
    cfg = node(id=0, role="boss", node_key="zz", sample_hz="fast", channel=15)
    e = mptest.raises(ConfigError, config.validate, cfg)
    msg = str(e)
    for key in ("id:", "role:", "node_key:", "sample_hz:", "channel:"):
        assert key in msg, (key, msg)
    assert len(e.problems) == 5


def test_bad_values():
    cases = [
        (node(id=True), "id:"),
        (node(id=70000), "id:"),
        (node(node_key="0011"), "node_key: must be 32 hex"),
        (node(node_key="g" * 32), "is not hex"),
        (node(summary_s=0), "summary_s:"),
        (node(ring_bytes=100), "ring_bytes:"),
        (node(model="../x.bin"), "model:"),
        (node(sensor=None), "sensor:"),
        (node(sensor={"kind": "gen", "channels": []}), "sensor.channels:"),
        (node(sensor={"kind": "gen", "channels": ["a", "a"]}), "appears twice"),
        (node(sensor={"kind": "gen", "channels": ["x" * 33]}), "sensor.channels[0]"),
        (node(sensor={"kind": "gen", "channels": ["a"], "seed": 1.5}), "sensor.seed"),
        (node(sensor={"kind": "file", "channels": ["a"]}), "sensor.path"),
        (node(sensor={"kind": "adc", "channels": ["a", "b"], "pins": [34]}), "2 channels"),
        (node(sensor={"kind": "spi", "channels": ["a"]}), "sensor.kind"),
        (node(rule={"channel": "rpm", "above": 1}), "rule.channel"),
        (node(rule={"channel": "temp"}), "needs above"),
        (node(rule={"channel": "temp", "above": "hot"}), "rule.above"),
        (node(rule=[1]), "rule:"),
        (node(sim={"medium": ["127.0.0.1"]}), "sim.medium"),
        (node(sim={"medium": ["127.0.0.1", 0]}), "sim.medium"),
        (root(net_key=None), "net_key:"),
        (root(epoch=256), "epoch:"),
        (root(allow={"x": KEY}), "allow: key 'x'"),
        (root(allow={"5": "00"}), "allow.5:"),
        (root(allow=[1]), "allow:"),
        (root(uart={}), "uart:"),
        (root(uart={"fd": -1}), "uart.fd"),
        (root(uart={"id": 1, "baud": 0}), "uart.baud"),
        (root(uart={"id": 1, "tx": 17}), "uart.tx"),
        (root(uart={"fd": 3, "log": 1}), "uart.log"),
        ([1, 2], "JSON object"),
    ]
    for cfg, want in cases:
        got = problems(cfg)
        assert want in got, (want, got)


def test_nan_and_inf_are_no_numbers():
    assert "sample_hz" in problems(node(sample_hz=float("nan")))
    assert "rule.above" in problems(node(rule={"channel": "temp", "above": float("inf")}))


def test_unknown_keys_ignored():
    assert config.check(node(future_option=1)) == []


def test_load_missing_and_bad_json():
    d = mptest.tmpdir()
    e = mptest.raises(ConfigError, config.load, d + "/config.json")
    assert "cannot be read" in str(e)
    with open(d + "/config.json", "w") as f:
        f.write("{not json")
    e = mptest.raises(ConfigError, config.load, d + "/config.json")
    assert "not valid JSON" in str(e)


def test_save_load_round_trip_atomic():
    d = mptest.tmpdir()
    p = d + "/config.json"
    cfg = config.validate(node(sample_hz=2.5))
    config.save(p, cfg)
    assert "config.json.tmp" not in os.listdir(d)
    assert config.load(p)["sample_hz"] == 2.5
    # A save cut between removing config.json and the rename: the .tmp is used.
    os.rename(p, p + ".tmp")
    assert config.load(p)["id"] == 5


def test_update_live_keys_all_or_nothing():
    cfg = config.validate(node())
    e = mptest.raises(ConfigError, config.update, cfg, {"sample_hz": 2, "id": 9})
    assert "id: cannot be set remotely" in str(e)
    assert cfg["sample_hz"] == 1.0 and cfg["id"] == 5
    e = mptest.raises(ConfigError, config.update, cfg, {"sample_hz": -1, "summary_s": 5})
    assert "sample_hz" in str(e)
    assert cfg["summary_s"] == 10
    mptest.raises(ConfigError, config.update, cfg, {})
    mptest.raises(ConfigError, config.update, cfg, "sample_hz=2")
    assert config.update(cfg, {"sample_hz": 2, "rule": {"channel": "vib", "above": 3.0}})
    assert cfg["sample_hz"] == 2 and cfg["rule"]["channel"] == "vib"
    json.dumps(cfg)  # still JSON-able
