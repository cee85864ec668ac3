"""Training, quantization, export and evaluation of the anomaly models, and the shipped model files.

So far: TFLM's integer arithmetic (`tflm_math`), a .tflite reader for int8 dense networks
(`tflite_reader`), the firmware blob (`export`, docs/model-format.md), and the parity check of the
firmware engine against the TFLM interpreter (`parity`).
"""
