"""Train the tiny int8 dense autoencoder, score with the integer engine, calibrate a threshold.

Pipeline (what a node runs, in order):

1. `models.features.window_features` — value, causal rolling mean and std per channel
   (value − mean and std for `detrend` channels).
2. `models.features.Standardizer` — fitted on the training rows, clipped to ±clip.
3. Quantize to the model's int8 input (round half away from zero, saturate), run the int8
   network (`int8_forward`: TFLM's FULLY_CONNECTED arithmetic on the exported blob, the same
   integers the firmware engine and the TFLM interpreter produce), dequantize the output.
4. Score = mean |standardized feature − reconstruction| over the features (L1), then a causal
   rolling mean over the last `smooth` scores (fewer at the start).
5. Threshold = quantile(`quantile`) of the smoothed training scores × `margin`; alarm when
   score > threshold.

`train` needs tensorflow (the `train` extra); scoring a trained model needs numpy only.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.export import Blob, export, load
from models.features import Standardizer, channel_kinds, window_features
from models.pipeline import Pipeline

__all__ = [
    "Detector",
    "DetectorSettings",
    "TrainedModel",
    "causal_mean",
    "fit_detector",
    "int8_forward",
    "train",
]

_NUDGE = 1 << 30


def _mbqm(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLM MultiplyByQuantizedMultiplier (double rounding), vectorized over int64."""
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = acc << left
    ab = x * mult
    # SaturatingRoundingDoublingHighMul: nudge, then C's truncating division by 2^31
    # (multipliers are non-negative, so the INT32_MIN·INT32_MIN saturation never occurs).
    hi = np.where(ab >= 0, (ab + _NUDGE) >> 31, -((_NUDGE - 1 - ab) >> 31))
    # RoundingDivideByPOT: round half away from zero.
    mask = (np.int64(1) << right) - 1
    rem = hi & mask
    thr = (mask >> 1) + (hi < 0)
    out: np.ndarray = (hi >> right) + (rem > thr)
    return out


def int8_forward(blob: Blob, xq: np.ndarray) -> np.ndarray:
    """Run int8 rows (n, n_in) through the blob's layers exactly as TFLM does → (n, n_out) int8."""
    x = np.asarray(xq, dtype=np.int64)
    for layer in blob.layers:
        w = np.frombuffer(layer.weights, dtype=np.int8).astype(np.int64)
        w = w.reshape(layer.n_out, layer.n_in) - layer.weight_zp
        acc = (x - layer.input_zp) @ w.T + np.asarray(layer.bias, dtype=np.int64)
        y = _mbqm(
            acc,
            np.asarray(layer.multipliers, dtype=np.int64),
            np.asarray(layer.shifts, dtype=np.int64),
        )
        x = np.clip(y + layer.output_zp, layer.act_min, layer.act_max)
    return x.astype(np.int8)


def causal_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Rolling mean over the last `window` values (fewer at the start): past-only."""
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    out: np.ndarray = (c[idx] - c[lo]) / (idx - lo)
    return out


@dataclass(frozen=True)
class TrainedModel:
    """An int8 autoencoder: the .tflite (source of truth) and its firmware blob."""

    tflite: bytes
    blob: bytes
    info: Blob = field(repr=False)

    @classmethod
    def from_tflite(cls, tflite: bytes) -> TrainedModel:
        blob = export(tflite)
        return cls(tflite, blob, load(blob))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float features → int8 input: round half away from zero, saturate."""
        t = np.asarray(x, dtype=np.float64) / self.info.input_scale
        q = np.sign(t) * np.floor(np.abs(t) + 0.5) + self.info.input_zp
        out: np.ndarray = np.clip(q, -128, 127).astype(np.int8)
        return out

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Float features → dequantized int8 reconstruction (integer engine in between)."""
        yq = int8_forward(self.info, self.quantize(x)).astype(np.float64)
        out: np.ndarray = (yq - self.info.output_zp) * self.info.output_scale
        return out

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """Per-row L1 reconstruction error (mean over features), unsmoothed."""
        out: np.ndarray = np.abs(np.asarray(x, dtype=np.float64) - self.reconstruct(x)).mean(1)
        return out

    def sizes(self) -> dict[str, int]:
        """model_bytes (.tflite), weights_bytes (int8 weights), macs and activation bytes.

        activation_bytes is the peak of live int8 tensors in a chain (one layer's input and
        output at a time, as TFLM's arena planner lays them out) plus the int32 accumulator row
        the firmware engine uses.
        """
        layers = self.info.layers
        return {
            "model_bytes": len(self.tflite),
            "blob_bytes": len(self.blob),
            "weights_bytes": sum(la.n_in * la.n_out for la in layers),
            "bias_bytes": sum(4 * la.n_out for la in layers),
            "macs_per_inference": sum(la.n_in * la.n_out for la in layers),
            "activation_bytes": max(la.n_in + la.n_out + 4 * la.n_out for la in layers),
        }


def train(
    x_train: np.ndarray,
    *,
    hidden: Sequence[int] = (16, 4),
    epochs: int = 200,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
) -> TrainedModel:
    """Train F→h1→…→hk→…→h1→F (ReLU, linear output) on float rows; convert to full int8.

    Reproducible for a seed (tf.keras.utils.set_random_seed plus deterministic ops). The
    representative dataset is the training rows. Needs tensorflow.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("training needs tensorflow: pip install -e '.[train]'") from exc

    x = np.asarray(x_train, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x_train must be (n, features), got {x.shape}")
    # A fresh session and fixed names: the .tflite bytes then depend on the seed and data only.
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    widths = [*hidden, *reversed(tuple(hidden)[:-1])]
    layers: list[Any] = [tf.keras.Input(shape=(x.shape[1],), name="features")]
    layers += [
        tf.keras.layers.Dense(w, activation="relu", name=f"dense{i}") for i, w in enumerate(widths)
    ]
    layers.append(tf.keras.layers.Dense(x.shape[1], name="reconstruction"))
    model = tf.keras.Sequential(layers, name="fogmesh_ae")
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss="mse")
    model.fit(x, x, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)

    def representative() -> Iterator[list[np.ndarray]]:
        for row in x:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    # The converter prints its SavedModel summary on stdout: keep stdout for the caller's JSON.
    with contextlib.redirect_stdout(sys.stderr):
        tflite: bytes = converter.convert()
    return TrainedModel.from_tflite(tflite)


@dataclass(frozen=True)
class DetectorSettings:
    """Every knob of the pipeline; the same settings are used for every file."""

    window: int = 10
    clip: float = 8.0
    hidden: tuple[int, ...] = (16, 4)
    epochs: int = 200
    seed: int = 0
    smooth: int = 30
    quantile: float = 0.99
    margin: float = 1.25
    detrend: tuple[int, ...] = ()  # channels whose level drifts in normal operation
    # The last `holdout` share of the normal rows is not trained on; the threshold is
    # calibrated on it, so it sees scores of data the network has not memorised.
    holdout: float = 0.25


@dataclass(frozen=True)
class Detector:
    settings: DetectorSettings
    pipeline: Pipeline
    model: TrainedModel

    @property
    def threshold(self) -> float:
        return self.pipeline.threshold

    @property
    def standardizer(self) -> Standardizer:
        return self.pipeline.standardizer

    def scores(self, series: np.ndarray) -> np.ndarray:
        """Smoothed anomaly scores of a raw (n, C) series, one per row (causal throughout)."""
        z = self.pipeline.features(series)
        return causal_mean(self.model.raw_scores(z), self.settings.smooth)

    def alarms(self, series: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.scores(series) > self.threshold
        return out


def calibrate(scores: np.ndarray, quantile: float, margin: float) -> float:
    """Threshold = the `quantile` of normal scores × `margin`."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile) * margin)


def fit_detector(
    series: np.ndarray,
    settings: DetectorSettings | None = None,
    channels: Sequence[str] | None = None,
) -> Detector:
    """Features, standardizer, int8 model and threshold, all from normal rows `series`."""
    s = settings or DetectorSettings()
    data = np.asarray(series, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    names = list(channels) if channels is not None else [f"ch{i}" for i in range(data.shape[1])]
    if len(names) != data.shape[1]:
        raise ValueError(f"{len(names)} channel names for {data.shape[1]} channels")
    kinds = channel_kinds(data.shape[1], s.detrend)
    if not 0.0 <= s.holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {s.holdout}")
    feats = window_features(data, s.window, kinds)
    n_fit = len(feats) - round(len(feats) * s.holdout)
    if n_fit < 2 or (s.holdout > 0 and n_fit == len(feats)):
        raise ValueError(f"{len(feats)} normal rows are too few for holdout {s.holdout}")
    std = Standardizer.fit(feats[:n_fit], clip=s.clip)
    z = std.transform(feats)
    model = train(z[:n_fit], hidden=s.hidden, epochs=s.epochs, seed=s.seed)
    # Scores run causally over every normal row; the threshold comes from the held-out ones.
    scores = causal_mean(model.raw_scores(z), s.smooth)
    threshold = calibrate(scores[n_fit:] if s.holdout > 0 else scores, s.quantile, s.margin)
    if not math.isfinite(threshold):
        raise ValueError("the calibration scores are not finite")
    return Detector(s, Pipeline.fitted(names, s.window, kinds, std, s.smooth, threshold), model)
