"""The int8 network on the gateway with LiteRT (`ai-edge-litert`; `tflite-runtime` as a fallback).

`LiteRtModel.reconstruct` is what `models.pipeline.StreamingScorer` needs: standardized features
in, dequantized reconstruction out, quantized exactly as `models.train.TrainedModel.quantize`
does. `agreement` measures how far LiteRT's integer kernels are from the TFLM interpreter (what an
ESP32 runs): TFLM requantizes with double rounding, LiteRT's kernels may round once, so ±1 on a
small fraction of outputs is expected; docs/edge.md states the measured figures.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from models.errors import ModelError, ModelFormatError

__all__ = [
    "KERNELS",
    "Kernels",
    "LiteRtModel",
    "agreement",
    "load_interpreter_class",
    "quantize",
]

# The runtimes tried in order: LiteRT, then the old tflite-runtime wheel (which fails to import
# with numpy 2, hence only a fallback).
_RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")

Kernels = Literal["builtin", "reference", "xnnpack"]
# Kernel sets, as LiteRT's OpResolverType names them. "builtin" (the optimized built-in kernels
# without the default XNNPACK delegate) is the closest to TFLM: measured ≤ 1 apart on < 1 % of
# outputs; "reference" and "xnnpack" (the runtime's default) are up to 3 apart on 3–5 %, since a
# ±1 in a hidden layer grows through the next layers.
KERNELS: dict[str, str] = {
    "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "reference": "BUILTIN_REF",
    "xnnpack": "AUTO",
}


def _runtime_module() -> Any:
    missing: list[str] = []
    for name in _RUNTIMES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:  # tflite-runtime with numpy 2 raises ImportError too
            missing.append(f"{name.split('.')[0]}: {exc}")
    raise ModelError(
        "no TFLite runtime for gateway inference: install ai-edge-litert "
        "(pip install ai-edge-litert; tflite-runtime is accepted as a fallback) — "
        + "; ".join(missing)
    )


def load_interpreter_class() -> type[Any]:
    """The Interpreter class of ai_edge_litert, else of tflite_runtime; ModelError if neither."""
    cls: type[Any] = _runtime_module().Interpreter
    return cls


def quantize(z: Sequence[float] | np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float features → int8: round half away from zero, add the zero point, saturate.

    The same arithmetic as models.train.TrainedModel.quantize (float64 throughout).
    """
    t = np.asarray(z, dtype=np.float64) / scale
    if not np.all(np.isfinite(t)):
        raise ValueError("cannot quantize a non-finite feature")
    q = np.sign(t) * np.floor(np.abs(t) + 0.5) + zero_point
    out: np.ndarray = np.clip(q, -128, 127).astype(np.int8)
    return out


def _tensor(details: dict[str, Any], what: str) -> tuple[int, float, int]:
    if np.dtype(details["dtype"]) != np.int8:
        raise ModelFormatError(
            f"the {what} tensor is {np.dtype(details['dtype']).name}; a full-int8 model is needed"
        )
    shape = [int(d) for d in details["shape"]]
    if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
        raise ModelFormatError(f"the {what} tensor has shape {shape}; (1, F) is needed")
    params = details.get("quantization_parameters") or {}
    scales = list(params.get("scales", []))
    zps = list(params.get("zero_points", []))
    if len(scales) != 1 or len(zps) != 1:
        raise ModelFormatError(f"the {what} tensor must be quantized per tensor")
    scale = float(scales[0])
    if not (math.isfinite(scale) and scale > 0):
        raise ModelFormatError(f"the {what} tensor has scale {scale}")
    return shape[1], scale, int(zps[0])


class LiteRtModel:
    """A full-int8 dense model of one input (1, F) and one output (1, F') under LiteRT.

    Not thread-safe (one interpreter per instance): the edge stage calls it from one loop.
    """

    def __init__(self, tflite: bytes, *, kernels: Kernels = "builtin") -> None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}")
        module = _runtime_module()
        self.kernels = kernels
        self._make = self._factory(module, bytes(tflite), kernels)
        try:
            it = self._make()
            it.allocate_tensors()
            ins = it.get_input_details()
            outs = it.get_output_details()
        except (ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"LiteRT cannot load the model: {exc}") from exc
        if len(ins) != 1 or len(outs) != 1:
            raise ModelFormatError(
                f"the model has {len(ins)} inputs and {len(outs)} outputs; one of each is needed"
            )
        self._n_in, self.input_scale, self.input_zp = _tensor(ins[0], "input")
        self._n_out, self.output_scale, self.output_zp = _tensor(outs[0], "output")
        self._it = it
        self._in = int(ins[0]["index"])
        self._out = int(outs[0]["index"])
        self._batch: Any = None  # a second interpreter for run_int8, resized to the batch
        self._batch_rows = 0

    @staticmethod
    def _factory(module: Any, tflite: bytes, kernels: str) -> Any:
        resolver = getattr(module, "OpResolverType", None)
        if resolver is None:  # an old runtime without a choice of kernels
            return lambda: module.Interpreter(model_content=tflite)
        op = getattr(resolver, KERNELS[kernels])
        return lambda: module.Interpreter(model_content=tflite, experimental_op_resolver_type=op)

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

    def run_int8(self, xq: np.ndarray) -> np.ndarray:
        """(n, n_in) int8 rows → (n, n_out) int8 outputs, in one invoke of a resized batch."""
        x = np.asarray(xq)
        if x.dtype != np.int8 or x.ndim != 2 or x.shape[1] != self._n_in:
            raise ValueError(f"need an (n, {self._n_in}) int8 array, got {x.dtype} {x.shape}")
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self._n_out), dtype=np.int8)
        if self._batch is None or self._batch_rows != n:
            it = self._make()
            it.resize_tensor_input(self._in, [n, self._n_in])
            it.allocate_tensors()
            self._batch = it
            self._batch_rows = n
        it = self._batch
        it.set_tensor(self._in, np.ascontiguousarray(x))
        it.invoke()
        out: np.ndarray = np.array(it.get_tensor(self._out), dtype=np.int8).reshape(n, self._n_out)
        return out

    def reconstruct(self, z: Sequence[float]) -> list[float]:
        """Standardized features → quantize → the int8 network → dequantized floats."""
        if len(z) != self._n_in:
            raise ValueError(f"{len(z)} features for a model of {self._n_in} inputs")
        xq = quantize(z, self.input_scale, self.input_zp).reshape(1, self._n_in)
        it = self._it
        it.set_tensor(self._in, xq)
        it.invoke()
        yq = it.get_tensor(self._out).reshape(-1).astype(np.float64)
        out: list[float] = ((yq - self.output_zp) * self.output_scale).tolist()
        return out


def agreement(tflite: bytes, xq: np.ndarray, *, kernels: Kernels = "builtin") -> dict[str, Any]:
    """LiteRT's int8 outputs against the TFLM interpreter's (tflite-micro) for the same rows."""
    # models.parity runs TFLM on the host; imported here so that inference needs no tflite-micro.
    from models.parity import oracle_outputs

    x = np.asarray(xq, dtype=np.int8)
    got = LiteRtModel(tflite, kernels=kernels).run_int8(x)
    expected = oracle_outputs(tflite, x)
    diff = got.astype(np.int16) - expected.astype(np.int16).reshape(got.shape)
    mismatches = int(np.count_nonzero(diff))
    return {
        "kernels": kernels,
        "inputs": int(x.shape[0]),
        "outputs_compared": int(diff.size),
        "mismatches": mismatches,
        "max_abs_diff": int(np.abs(diff).max()) if diff.size else 0,
        "mismatch_fraction": mismatches / diff.size if diff.size else 0.0,
    }
