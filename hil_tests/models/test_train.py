"""Retrain a small model end to end on generated data (needs tensorflow: the `train` extra).

These tests FAIL, never skip, when tensorflow is missing: CI installs the train extra.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.export import export, load
from models.parity import oracle_outputs
from models.tflite_reader import read_dense_model
from models.train import (
    Detector,
    DetectorSettings,
    calibrate,
    causal_mean,
    fit_detector,
    int8_forward,
    train,
)

SETTINGS = DetectorSettings(window=5, epochs=60, seed=0)


def _require_tensorflow() -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pytest.fail(
            "tensorflow is not installed: install the train extra (pip install -e '.[train]')"
        )


def _normal(rng: np.random.Generator, n: int) -> np.ndarray:
    # 4 sensors driven by 2 slow latent signals plus noise: what a pump's normal running looks like.
    t = np.arange(n)[:, None]
    latent = np.hstack([np.sin(t / 15.0), np.cos(t / 23.0)]) + 0.05 * rng.normal(size=(n, 2))
    mix = np.array([[1.0, 0.5, -0.3, 0.8], [0.2, -1.0, 0.7, 0.4]])
    return latent @ mix + 0.05 * rng.normal(size=(n, 4)) + [5.0, 1.0, 230.0, 30.0]


@pytest.fixture(scope="module")
def detector() -> Detector:
    _require_tensorflow()
    return fit_detector(_normal(np.random.default_rng(0), 400), SETTINGS)


def test_reader_and_export_accept_the_model(detector: Detector) -> None:
    model = read_dense_model(detector.model.tflite)
    assert [(la.n_in, la.n_out) for la in model.layers] == [(12, 16), (16, 4), (4, 16), (16, 12)]
    assert [la.activation for la in model.layers] == ["RELU", "RELU", "RELU", "NONE"]
    assert not model.float_input and not model.float_output
    assert load(export(detector.model.tflite)) == detector.model.info
    sizes = detector.model.sizes()
    assert sizes["weights_bytes"] == sizes["macs_per_inference"] == 12 * 16 + 64 + 64 + 16 * 12
    assert sizes["model_bytes"] == len(detector.model.tflite)


def test_host_engine_is_bit_exact_with_tflm(detector: Detector) -> None:
    rng = np.random.default_rng(5)
    xq = rng.integers(-128, 128, size=(300, 12)).astype(np.int8)
    real = detector.model.quantize(
        detector.standardizer.transform(np.random.default_rng(6).normal(size=(100, 12)))
    )
    inputs = np.concatenate([xq, real])
    np.testing.assert_array_equal(
        int8_forward(detector.model.info, inputs), oracle_outputs(detector.model.tflite, inputs)
    )


def test_scores_separate_an_injected_anomaly(detector: Detector) -> None:
    series = _normal(np.random.default_rng(1), 600)
    series[400:450, 1] += 3.0  # a stuck offset on one sensor
    series[450:, 2] += 2.0 * np.random.default_rng(2).normal(size=150)  # a noisy sensor
    alarms = detector.alarms(series)
    scores = detector.scores(series)
    assert alarms[:400].mean() < 0.05, "false alarms on held-out normal data"
    assert alarms[405:450].mean() > 0.9 and alarms[455:].mean() > 0.9
    assert scores[405:].min() > scores[:400].max()


def test_threshold_bounds_false_alarms_on_held_out_normal(detector: Detector) -> None:
    held_out = _normal(np.random.default_rng(7), 2000)
    assert detector.alarms(held_out).mean() < 0.02
    # The rule itself: quantile × margin.
    assert calibrate(np.arange(101.0), 0.99, 1.5) == pytest.approx(99.0 * 1.5)


def test_training_is_reproducible_for_a_seed() -> None:
    _require_tensorflow()
    x = np.random.default_rng(3).normal(size=(200, 6)).astype(np.float32)
    a = train(x, hidden=(8, 2), epochs=3, seed=4)
    b = train(x, hidden=(8, 2), epochs=3, seed=4)
    assert a.tflite == b.tflite
    assert [(la.n_in, la.n_out) for la in a.info.layers] == [(6, 8), (8, 2), (2, 8), (8, 6)]


def test_causal_mean() -> None:
    np.testing.assert_allclose(causal_mean(np.array([2.0, 4.0, 6.0, 8.0]), 2), [2, 3, 5, 7])
    v = np.random.default_rng(0).normal(size=50)
    w = v.copy()
    w[30:] += 100
    np.testing.assert_array_equal(causal_mean(v, 5)[:30], causal_mean(w, 5)[:30])
