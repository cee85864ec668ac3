"""The `fogmesh` command line as a user meets it: exit codes, one clear line per error, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hil_tests.tools.cli_runner import fogmesh
from tools.cli import build_parser

GOOD = """
[gateway]
id = "gw1"
site = "plant-a"

[[devices]]
id = "pump1"
type = "simulated"
period_ms = 100
"""

BAD = """
[gateway]
id = "gw1"
site = "plant-a"

[[devices]]
id = "pump1"
type = "simulated"
period_ms = -5

[[rules]]
name = "r1"
device = "pump1"
tag = "vibration_mm_s"
"""


def test_check_good_config_exits_0(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(GOOD)
    r = fogmesh("gateway", "check", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "ok (1 devices, 0 rules" in r.stdout


def test_check_bad_config_prints_every_problem_with_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BAD)
    r = fogmesh("gateway", "check", str(cfg))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert f"{cfg}: devices[0].period_ms: must be greater than 0" in lines
    assert f"{cfg}: rules[0]: give `above`, `below`, or both" in lines
    assert lines[-1] == f"{cfg}: 2 problem(s)"
    assert "Traceback" not in r.stderr


def test_check_json(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BAD)
    r = fogmesh("gateway", "check", "--json", str(cfg))
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert {"path": "devices[0].period_ms", "message": "must be greater than 0"} in out["problems"]


def test_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    r = fogmesh("gateway", "run", str(tmp_path / "nope.toml"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("fogmesh: error:")
    assert "nope.toml" in r.stderr
    assert "Traceback" not in r.stderr


def test_schema_is_json_schema_of_the_config() -> None:
    r = fogmesh("gateway", "schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert {"gateway", "uplink", "devices", "rules"} <= set(schema["properties"])


def test_shipped_example_and_demo_configs_check_clean() -> None:
    for cfg in ("tools/configs/example.toml", "tools/configs/demo.toml"):
        r = fogmesh("gateway", "check", cfg)
        assert r.returncode == 0, (cfg, r.stderr)


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["no-such-command"])
    assert exc.value.code == 2


def test_model_export_writes_the_firmware_blob(tmp_path: Path) -> None:
    out = tmp_path / "ae.bin"
    r = fogmesh("model", "export", "models/testdata/tiny_ae_int8.tflite", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"FMQ8"
    bad = tmp_path / "not.tflite"
    bad.write_bytes(b"garbage" * 10)
    r = fogmesh("model", "export", str(bad), "-o", str(tmp_path / "x.bin"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("fogmesh: error:")
    assert not (tmp_path / "x.bin").exists()


def test_model_parity_json_reports_zero_mismatches() -> None:
    r = fogmesh("model", "parity", "-n", "100", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mismatches"] == 0 and out["outputs_compared"] >= 100 * 8
    assert out["peak_heap_bytes"] > 0 and out["us_per_inference_unix_port"] > 0


def _skab_like(path: Path, rows: int, anomaly_from: int | None, seed: int) -> None:
    from models.evaluate import SKAB_CHANNELS

    rng = np.random.default_rng(seed)
    lines = [";".join(["datetime", *SKAB_CHANNELS, "anomaly", "changepoint"])]
    for i in range(rows):
        bad = anomaly_from is not None and i >= anomaly_from
        vals = rng.normal(0.0, 0.1, len(SKAB_CHANNELS)) + (5.0 if bad else 0.0)
        cells = ";".join(f"{v:.4f}" for v in vals)
        lines.append(f"2020-01-01 00:00:{i:05d};{cells};{int(bad)};0")
    path.write_text("\n".join(lines) + "\n")


def test_model_train_and_eval_on_generated_data(tmp_path: Path) -> None:
    data = tmp_path / "skab" / "valve1"
    data.mkdir(parents=True)
    _skab_like(data / "0.csv", 600, anomaly_from=500, seed=1)
    r = fogmesh(
        "model",
        "eval",
        "--dataset",
        "skab",
        "--data-dir",
        str(tmp_path / "skab"),
        "--epochs",
        "30",
        "--json",
        timeout_s=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["files"] == 1 and out["tp"] + out["fn"] == 100 and out["fp"] + out["tn"] == 100
    assert out["tp"] >= 90 and out["far"] <= 0.1  # a 50-sigma shift is found

    train_csv = tmp_path / "normal.csv"
    _skab_like(train_csv, 450, anomaly_from=None, seed=2)
    r = fogmesh(
        "model",
        "train",
        "--csv",
        str(train_csv),
        "--out",
        str(tmp_path / "m" / "pump"),
        "--epochs",
        "20",
        timeout_s=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "m" / "pump.bin").read_bytes()[:4] == b"FMQ8"
    meta = json.loads((tmp_path / "m" / "pump.json").read_text())
    assert (
        meta["threshold"] > 0 and meta["rows"] == 400 and len(meta["standardizer"]["mean"]) == 3 * 8
    )
