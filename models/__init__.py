"""Training, quantization, export and evaluation of the anomaly models, and the shipped model files.

- `features`: causal windowed per-channel features (value, rolling mean, rolling std) and the
  standardizer fitted on training rows.
- `train`: the tiny dense autoencoder (tensorflow, `train` extra), full-int8 conversion, the
  host integer engine (bit-exact with TFLM), the smoothed reconstruction-error score and the
  threshold calibration on normal data.
- `evaluate`: SKAB's protocol (fit on each run's first 400 rows, pooled F1 / FAR / MAR).
- `tflm_math`, `tflite_reader`, `export`: TFLM's integer arithmetic, the .tflite reader and the
  firmware blob (docs/model-format.md); `parity`: the firmware engine against the TFLM interpreter.

See docs/models.md.
"""
