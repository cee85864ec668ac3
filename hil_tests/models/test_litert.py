"""The int8 network under LiteRT on the gateway: agreement with TFLM, quantization, batching."""

from __future__ import annotations

import importlib
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hil_tests.models.conftest import PER_CHANNEL
from models.errors import ModelError, ModelFormatError
from models.litert import LiteRtModel, agreement, load_interpreter_class, quantize
from models.parity import oracle_outputs
from models.train import TrainedModel

N_RANDOM = 2000


def inputs(n_in: int, zero_point: int, n: int = N_RANDOM, seed: int = 0) -> np.ndarray:
    """n random int8 rows after the saturating extremes: all −128, all 127, all zero point."""
    rng = np.random.default_rng(seed)
    edges = np.array([[-128] * n_in, [127] * n_in, [zero_point] * n_in], dtype=np.int8)
    random = rng.integers(-128, 128, size=(n, n_in), dtype=np.int16).astype(np.int8)
    return np.concatenate([edges, random])


# --- agreement with TFLM -------------------------------------------------------------------


def test_litert_agrees_with_tflm_within_one(tflite_path: Path) -> None:
    tflite = tflite_path.read_bytes()
    model = LiteRtModel(tflite)
    x = inputs(model.n_in, model.input_zp)
    report = agreement(tflite, x)
    print(json.dumps({"model": tflite_path.name, **report}))  # the figures docs/edge.md states
    assert report["kernels"] == "builtin"
    assert report["inputs"] == N_RANDOM + 3
    assert report["outputs_compared"] == (N_RANDOM + 3) * model.n_out
    assert report["max_abs_diff"] <= 1, report
    # Double vs single rounding: a few outputs in a thousand, not a systematic offset.
    assert report["mismatch_fraction"] < 0.02, report
    assert report["mismatch_fraction"] == report["mismatches"] / report["outputs_compared"]
    # The same comparison by hand, so the report cannot be wrong in its own favour.
    diff = model.run_int8(x).astype(int) - oracle_outputs(tflite, x).astype(int)
    assert int(np.count_nonzero(diff)) == report["mismatches"]
    assert int(np.abs(diff).max()) == report["max_abs_diff"]


def test_saturating_extremes_agree(tflite_path: Path) -> None:
    tflite = tflite_path.read_bytes()
    model = LiteRtModel(tflite)
    x = inputs(model.n_in, model.input_zp, n=0)
    diff = model.run_int8(x).astype(int) - oracle_outputs(tflite, x).astype(int)
    assert np.abs(diff).max() <= 1


@pytest.mark.parametrize("kernels", ["reference", "xnnpack"])
def test_other_kernel_sets_are_measured_not_assumed(kernels: Any) -> None:
    # LiteRT's reference and XNNPACK kernels round once per layer; a ±1 in a hidden layer grows
    # through the next ones, so they are further from TFLM than the default "builtin" set.
    tflite = PER_CHANNEL.read_bytes()
    x = inputs(8, LiteRtModel(tflite).input_zp)
    report = agreement(tflite, x, kernels=kernels)
    builtin = agreement(tflite, x)
    print(json.dumps({"model": PER_CHANNEL.name, **report}))
    assert report["kernels"] == kernels
    assert report["mismatches"] >= builtin["mismatches"]
    assert report["max_abs_diff"] <= 4


def test_agreement_has_teeth(monkeypatch: pytest.MonkeyPatch) -> None:
    # An oracle that answers 3 higher in one output column must show up in the report.
    import models.parity

    real = models.parity.oracle_outputs

    def off(tflite: bytes, x: np.ndarray) -> np.ndarray:
        y = real(tflite, x).astype(int)
        y[:, 2] = np.clip(y[:, 2] + 3, -128, 127)
        return y.astype(np.int8)

    monkeypatch.setattr(models.parity, "oracle_outputs", off)
    report = agreement(PER_CHANNEL.read_bytes(), inputs(8, 12, n=200))
    assert report["max_abs_diff"] >= 2
    assert report["mismatches"] >= 150


# --- quantization and reconstruct ----------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "expected"),
    [
        # scale 0.5, zero point 0: t = z / 0.5 exactly
        (0.25, 1),  # t = 0.5: half away from zero
        (-0.25, -1),
        (1.25, 3),  # t = 2.5 (banker's rounding would give 2)
        (-1.25, -3),
        (0.2499, 0),
        (-0.2499, 0),
        (63.5, 127),  # t = 127
        (63.75, 127),  # t = 127.5 → 128 → saturates
        (-64.0, -128),
        (-64.25, -128),  # t = -128.5 → -129 → saturates
        (1e6, 127),
        (-1e6, -128),
    ],
)
def test_quantize_rounds_half_away_from_zero_and_saturates(z: float, expected: int) -> None:
    assert int(quantize([z], 0.5, 0)[0]) == expected


def test_quantize_adds_the_zero_point_after_rounding() -> None:
    # t = -0.5 rounds to -1 first, then + 12; saturation comes after the zero point.
    assert quantize([-0.25, 0.25, 57.5, 57.75, -70.0], 0.5, 12).tolist() == [11, 13, 127, 127, -128]


def test_quantize_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        quantize([math.nan], 0.5, 0)


def test_quantize_is_train_quantize(tflite_path: Path) -> None:
    tflite = tflite_path.read_bytes()
    model = LiteRtModel(tflite)
    host = TrainedModel.from_tflite(tflite)
    assert (model.input_scale, model.input_zp) == (host.info.input_scale, host.info.input_zp)
    rng = np.random.default_rng(1)
    s = model.input_scale
    # random values, exact half steps of the scale (as exact as floats get), and beyond the range
    z = np.concatenate(
        [
            rng.normal(scale=3.0, size=(500, 8)).reshape(-1),
            (np.arange(-140, 140) + 0.5) * s,
            (np.arange(-140, 140) - 0.5) * s,
            [-1e3, 1e3, -8.0, 8.0, 0.0, -0.0],
        ]
    )
    assert np.array_equal(quantize(z, s, model.input_zp), host.quantize(z))


def test_reconstruct_is_quantize_run_dequantize(tflite_path: Path) -> None:
    model = LiteRtModel(tflite_path.read_bytes())
    rng = np.random.default_rng(2)
    for z in [*rng.normal(scale=2.0, size=(50, 8)).tolist(), [8.0] * 8, [-8.0] * 8]:
        yq = model.run_int8(quantize(z, model.input_scale, model.input_zp).reshape(1, -1))
        expected = (
            (yq.reshape(-1).astype(np.float64) - model.output_zp) * model.output_scale
        ).tolist()
        got = model.reconstruct(z)
        assert isinstance(got, list) and all(type(v) is float for v in got)
        assert got == expected


def test_reconstruct_is_within_one_output_step_of_the_host_engine(tflite_path: Path) -> None:
    # The host integer engine is bit-exact with TFLM (test_train), so this is the ±1 again,
    # seen as floats: at most one output quantization step apart.
    tflite = tflite_path.read_bytes()
    model = LiteRtModel(tflite)
    host = TrainedModel.from_tflite(tflite)
    z = np.random.default_rng(3).normal(scale=2.0, size=(300, 8))
    got = np.array([model.reconstruct(row.tolist()) for row in z])
    diff = np.abs(got - host.reconstruct(z))
    assert diff.max() <= model.output_scale * (1 + 1e-9)


def test_reconstruct_checks_the_width() -> None:
    model = LiteRtModel(PER_CHANNEL.read_bytes())
    with pytest.raises(ValueError, match="7 features for a model of 8 inputs"):
        model.reconstruct([0.0] * 7)


# --- batches -------------------------------------------------------------------------------


def test_batch_equals_row_by_row(tflite_path: Path) -> None:
    model = LiteRtModel(tflite_path.read_bytes())
    x = inputs(8, model.input_zp, n=300, seed=5)
    batch = model.run_int8(x)
    rows = np.concatenate([model.run_int8(x[i : i + 1]) for i in range(len(x))])
    assert batch.shape == (len(x), 8) and batch.dtype == np.int8
    assert np.array_equal(batch, rows)
    # a batch of another size after that (the interpreter is resized again), and an empty one
    assert np.array_equal(model.run_int8(x[:7]), batch[:7])
    assert model.run_int8(x[:0]).shape == (0, 8)


def test_run_int8_checks_its_input() -> None:
    model = LiteRtModel(PER_CHANNEL.read_bytes())
    with pytest.raises(ValueError, match=r"need an \(n, 8\) int8 array"):
        model.run_int8(np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"need an \(n, 8\) int8 array"):
        model.run_int8(np.zeros((2, 7), dtype=np.int8))


def test_properties() -> None:
    model = LiteRtModel(PER_CHANNEL.read_bytes())
    assert (model.n_in, model.n_out) == (8, 8)
    assert model.output_scale > 0 and -128 <= model.output_zp <= 127


# --- loading -------------------------------------------------------------------------------


def test_not_a_model_is_a_format_error() -> None:
    with pytest.raises(ModelFormatError, match="LiteRT cannot load the model"):
        LiteRtModel(b"not a flatbuffer at all" * 10)


def test_unknown_kernel_set_is_refused() -> None:
    with pytest.raises(ValueError, match="kernels must be one of builtin, reference, xnnpack"):
        LiteRtModel(PER_CHANNEL.read_bytes(), kernels="fast")  # type: ignore[arg-type]


def test_interpreter_class_is_litert() -> None:
    from ai_edge_litert.interpreter import Interpreter

    assert load_interpreter_class() is Interpreter


def test_tflite_runtime_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module
    fake = types.ModuleType("tflite_runtime.interpreter")

    class Interpreter:
        pass

    fake.Interpreter = Interpreter  # type: ignore[attr-defined]

    def import_module(name: str, package: str | None = None) -> Any:
        if name == "ai_edge_litert.interpreter":
            raise ImportError("No module named 'ai_edge_litert'")
        if name == "tflite_runtime.interpreter":
            return fake
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    assert load_interpreter_class() is Interpreter


def test_no_runtime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> Any:
        if name.endswith(".interpreter"):
            raise ImportError(f"No module named {name.split('.')[0]!r}")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ModelError, match=r"install ai-edge-litert.*tflite-runtime"):
        load_interpreter_class()
    with pytest.raises(ModelError, match="no TFLite runtime"):
        LiteRtModel(PER_CHANNEL.read_bytes())
