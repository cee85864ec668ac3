"""Make the tiny int8 dense autoencoders of `models/testdata/` (needs the `train` extra).

Run once by hand: `.venv/bin/python -m models.make_test_model`. The outputs are committed, so
CI never needs tensorflow. Two files: per-channel weights (the converter's default for Dense)
and per-tensor weights, so both firmware paths are checked against TFLM.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TESTDATA = Path(__file__).resolve().parent / "testdata"
WIDTHS = (8, 16, 4, 16, 8)


def _data(rng: np.random.Generator, n: int) -> np.ndarray:
    # 8 correlated channels driven by 3 latent factors: something an 8→4→8 AE can learn.
    latent = rng.normal(size=(n, 3))
    mix = rng.normal(size=(3, WIDTHS[0]))
    return (latent @ mix + 0.1 * rng.normal(size=(n, WIDTHS[0]))).astype(np.float32)


def make(seed: int = 0, per_channel: bool = True) -> bytes:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = _data(rng, 2000)
    layers: list[Any] = [tf.keras.Input(shape=(WIDTHS[0],))]
    for i, width in enumerate(WIDTHS[1:]):
        last = i == len(WIDTHS) - 2
        layers.append(tf.keras.layers.Dense(width, activation=None if last else "relu"))
    model = tf.keras.Sequential(layers)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, x, epochs=20, batch_size=64, verbose=0)

    def representative() -> Iterator[list[np.ndarray]]:
        for row in x[:300]:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    if not per_channel:
        converter._experimental_disable_per_channel = True
    tflite: bytes = converter.convert()
    return tflite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=TESTDATA)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, per_channel in (("tiny_ae_int8.tflite", True), ("tiny_ae_int8_pt.tflite", False)):
        data = make(args.seed, per_channel)
        (args.out_dir / name).write_bytes(data)
        print(f"{args.out_dir / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
