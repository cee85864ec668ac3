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
    from models.export import load
    from models.pipeline import Pipeline

    blob = load((tmp_path / "m" / "pump.bin").read_bytes())
    pipe = Pipeline.load(tmp_path / "m" / "pump.pipeline.json")
    assert blob.pipeline is not None and blob.pipeline.channels == pipe.channels
    assert pipe.n_features == 3 * 8 and pipe.threshold > 0
    meta = json.loads((tmp_path / "m" / "pump.json").read_text())
    assert meta["rows"] == 400 and meta["rest_rows"] == 50 and 0 <= meta["rest_alarm_rate"] <= 1
    assert meta["channels"] == list(pipe.channels)

    # --detrend names a channel of the file; an unknown one is refused, naming the known ones.
    r = fogmesh(
        "model", "train", "--csv", str(train_csv), "--out", str(tmp_path / "m" / "x"),
        "--detrend", "Nope", timeout_s=120,
    )  # fmt: skip
    assert r.returncode != 0 and "--detrend: no channel 'Nope'" in r.stderr
    assert "Temperature" in r.stderr and not (tmp_path / "m" / "x.tflite").exists()


def test_model_eval_nab_on_generated_data(tmp_path: Path) -> None:
    """`--dataset nab` reads NAB's layout: realKnownCause/*.csv and labels/combined_windows.json."""
    (tmp_path / "realKnownCause").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(3)
    lines = ["timestamp,value"]
    for i in range(1200):
        v = 10 + np.sin(i / 20) + rng.normal(0, 0.05) + (8.0 if 1000 <= i < 1040 else 0.0)
        lines.append(f"2020-01-{1 + i // 1440:02d} {i % 1440 // 60:02d}:{i % 60:02d}:00,{v:.4f}")
    (tmp_path / "realKnownCause" / "gen.csv").write_text("\n".join(lines) + "\n")
    windows = {"realKnownCause/gen.csv": [["2020-01-01 16:30:00", "2020-01-01 17:30:00"]]}
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    r = fogmesh(
        "model", "eval", "--dataset", "nab", "--data-dir", str(tmp_path), "--epochs", "20",
        "--json", timeout_s=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["dataset"] == "nab" and out["files"] == 1 and out["recall"] == 1.0
    assert out["weights_bytes"] > 0 and out["macs_per_inference"] > 0


def test_model_export_folds_in_the_pipeline_next_to_the_model(tmp_path: Path) -> None:
    from models.export import export, load
    from models.pipeline import Pipeline, pipeline_path

    model = tmp_path / "ae.tflite"
    model.write_bytes(Path("models/testdata/tiny_ae_int8.tflite").read_bytes())
    n = load(export(model.read_bytes())).layers[0].n_in
    pipe = Pipeline(("a",), 4, (("value",) * n,), (0.0,) * n, (1.0,) * n, 8.0, 3, 0.5)
    pipe.save(pipeline_path(model))
    r = fogmesh("model", "export", str(model), "-o", str(tmp_path / "ae.bin"))
    assert r.returncode == 0, r.stderr
    assert "with the pipeline of" in r.stdout
    got = load((tmp_path / "ae.bin").read_bytes()).pipeline
    assert got is not None and got.window == 4 and got.threshold == 0.5
    pipeline_path(model).write_text("{not json")
    r = fogmesh("model", "export", str(model), "-o", str(tmp_path / "bad.bin"))
    assert r.returncode == 1 and "not JSON" in r.stderr and not (tmp_path / "bad.bin").exists()
