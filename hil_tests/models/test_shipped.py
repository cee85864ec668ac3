"""The shipped models: each blob is exactly what `model export` derives from its two files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.export import export, load
from models.parity import run_detector_parity
from models.pipeline import Pipeline, pipeline_path

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shipped"
NAMES = ["pump", "generic"]


@pytest.mark.parametrize("name", NAMES)
def test_blob_is_derived_from_tflite_and_pipeline(name: str) -> None:
    tflite = (SHIPPED / f"{name}.tflite").read_bytes()
    pipe = Pipeline.load(pipeline_path(SHIPPED / f"{name}.tflite"))
    blob = (SHIPPED / f"{name}.bin").read_bytes()
    assert blob == export(tflite, pipe)
    info = load(blob)
    assert info.layers[0].n_in == pipe.n_features
    meta = json.loads((SHIPPED / f"{name}.json").read_text())
    assert meta["channels"] == list(pipe.channels)
    assert meta["sizes"]["weights_bytes"] <= 8192 and meta["sizes"]["activation_bytes"] <= 2048
    assert meta["sizes"]["macs_per_inference"] <= 5000


@pytest.mark.parametrize("name", NAMES)
def test_firmware_detector_agrees_with_the_host(name: str) -> None:
    pipe = Pipeline.load(pipeline_path(SHIPPED / f"{name}.tflite"))
    # Rows around the levels the model was fitted on, with a burst far outside them.
    rng = np.random.default_rng(0)
    mean = np.array(
        [pipe.mean[sum(len(k) for k in pipe.kinds[:c])] for c in range(len(pipe.channels))]
    )
    spread = np.array(
        [pipe.std[sum(len(k) for k in pipe.kinds[:c])] for c in range(len(pipe.channels))]
    )
    x = mean + rng.normal(size=(300, len(mean))) * spread
    x[200:230] += 20 * spread
    r = run_detector_parity(SHIPPED / f"{name}.tflite", pipe, x)
    assert r["samples"] == 300 and r["alarms"] > 0
    assert r["alarm_mismatches"] == 0 and r["int8_input_mismatches"] == 0
    assert r["score_max_abs_diff"] < 1e-9
