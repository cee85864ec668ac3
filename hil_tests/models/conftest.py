"""The committed test models (made once by models/make_test_model.py; CI never needs tensorflow)."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parents[2] / "models" / "testdata"
PER_CHANNEL = TESTDATA / "tiny_ae_int8.tflite"
PER_TENSOR = TESTDATA / "tiny_ae_int8_pt.tflite"


@pytest.fixture(params=[PER_CHANNEL, PER_TENSOR], ids=["per_channel", "per_tensor"])
def tflite_path(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path
