"""The firmware blob: an int8 dense network with every requantization constant precomputed.

`export(tflite)` derives the blob from a .tflite file (the source of truth); `load(blob)` reads
one back and checks it. The byte layout is documented in docs/model-format.md; the firmware
reader is firmware/fogmesh/int8.py.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from models.errors import BlobError, ModelFormatError
from models.tflite_reader import DenseLayer, read_dense_model
from models.tflm_math import quantize_multiplier

__all__ = [
    "HEADER",
    "LAYER_HEADER",
    "MAGIC",
    "VERSION",
    "Blob",
    "BlobLayer",
    "activation_range",
    "export",
    "layer_multipliers",
    "load",
]

MAGIC = b"FMQ8"
VERSION = 1
# magic, version, layer count, total length, input width, output width,
# input scale, input zero point, output scale, output zero point
HEADER = struct.Struct("<4sHHIHHfifi")
# n_in, n_out, flags, activation, act_min, act_max, input zp, weight zp, output zp
LAYER_HEADER = struct.Struct("<HHBBbbiii")
FLAG_PER_CHANNEL = 0x01
_ACTIVATION_CODES = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class BlobLayer:
    n_in: int
    n_out: int
    per_channel: bool
    activation: int  # 0 NONE, 1 RELU, 2 RELU_N1_TO_1, 3 RELU6 (informative: act_min/max rule)
    act_min: int
    act_max: int
    input_zp: int
    weight_zp: int
    output_zp: int
    weights: bytes  # int8 [n_out][n_in]
    bias: tuple[int, ...]
    multipliers: tuple[int, ...]
    shifts: tuple[int, ...]


@dataclass(frozen=True)
class Blob:
    version: int
    input_scale: float
    input_zp: int
    output_scale: float
    output_zp: int
    layers: tuple[BlobLayer, ...]


def _round_half_away(x: float) -> int:
    r = math.floor(abs(x) + 0.5)
    return -r if x < 0 else r


def _quantize_f32(value: float, scale: float, zero_point: int) -> int:
    # tflite::Quantize in kernel_util.cc: float32 division, std::round, then + zero point.
    tmp = float(np.float32(value) / np.float32(scale))
    return zero_point + _round_half_away(tmp)


def activation_range(activation: str, scale: float, zero_point: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized for an int8 output."""
    lo, hi = -128, 127
    if activation == "RELU":
        return max(lo, _quantize_f32(0.0, scale, zero_point)), hi
    if activation == "RELU6":
        return (
            max(lo, _quantize_f32(0.0, scale, zero_point)),
            min(hi, _quantize_f32(6.0, scale, zero_point)),
        )
    if activation == "RELU_N1_TO_1":
        return (
            max(lo, _quantize_f32(-1.0, scale, zero_point)),
            min(hi, _quantize_f32(1.0, scale, zero_point)),
        )
    return lo, hi


def layer_multipliers(layer: DenseLayer) -> tuple[list[int], list[int]]:
    """Per-output-channel (multiplier, shift) exactly as TFLM's FULLY_CONNECTED Prepare."""
    s_in = layer.input_quant.scales[0]
    s_out = layer.output_quant.scales[0]
    w_scales = layer.weight_quant.scales
    if len(w_scales) == 1:
        # GetQuantizedConvolutionMultipler: the input·filter product is taken in float32.
        product = float(np.float32(s_in) * np.float32(w_scales[0]))
        pair = quantize_multiplier(product / s_out)
        return [pair[0]] * layer.n_out, [pair[1]] * layer.n_out
    mults, shifts = [], []
    for s_w in w_scales:
        # PopulateConvolutionQuantizationParams: double(s_in) · double(s_w) / double(s_out).
        m, s = quantize_multiplier(s_in * s_w / s_out)
        mults.append(m)
        shifts.append(s)
    return mults, shifts


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _layer_bytes(layer: DenseLayer) -> bytes:
    # The int8 spec fixes weight zero points at 0; the engine supports one per tensor only.
    if len(set(layer.weight_quant.zero_points)) != 1:
        raise ModelFormatError("per-channel weight zero points must all be equal")
    mults, shifts = layer_multipliers(layer)
    out_scale, out_zp = layer.output_quant.scales[0], layer.output_quant.zero_points[0]
    act_min, act_max = activation_range(layer.activation, out_scale, out_zp)
    head = LAYER_HEADER.pack(
        layer.n_in,
        layer.n_out,
        FLAG_PER_CHANNEL if len(layer.weight_quant.scales) > 1 else 0,
        _ACTIVATION_CODES[layer.activation],
        act_min,
        act_max,
        layer.input_quant.zero_points[0],
        layer.weight_quant.zero_points[0],
        out_zp,
    )
    n = layer.n_out
    return b"".join(
        (
            head,
            _pad4(layer.weights),
            struct.pack(f"<{n}i", *layer.bias),
            struct.pack(f"<{n}i", *mults),
            struct.pack(f"<{n}i", *shifts),
        )
    )


def export(tflite: bytes) -> bytes:
    """The firmware blob of an int8 dense .tflite model."""
    model = read_dense_model(tflite)
    body = b"".join(_layer_bytes(layer) for layer in model.layers)
    total = HEADER.size + len(body) + _CRC.size
    head = HEADER.pack(
        MAGIC,
        VERSION,
        len(model.layers),
        total,
        model.layers[0].n_in,
        model.layers[-1].n_out,
        model.input_quant.scales[0],
        model.input_quant.zero_points[0],
        model.output_quant.scales[0],
        model.output_quant.zero_points[0],
    )
    data = head + body
    return data + _CRC.pack(zlib.crc32(data))


def load(blob: bytes) -> Blob:
    """Read and check a blob: magic, version, length and CRC32 first, then every layer."""
    blob = bytes(blob)
    if len(blob) < HEADER.size + _CRC.size:
        raise BlobError(f"blob truncated: {len(blob)} bytes is shorter than its header")
    magic, version, n_layers, total, n_in, n_out, in_scale, in_zp, out_scale, out_zp = (
        HEADER.unpack_from(blob)
    )
    if magic != MAGIC:
        raise BlobError(f"not a fogmesh model blob (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise BlobError(f"blob version {version} is not supported (expected {VERSION})")
    if len(blob) != total:
        raise BlobError(f"blob length {len(blob)} does not match its header ({total} bytes)")
    (crc,) = _CRC.unpack_from(blob, total - _CRC.size)
    if zlib.crc32(blob[: total - _CRC.size]) != crc:
        raise BlobError("blob CRC32 mismatch: the blob is corrupt")
    layers = []
    at = HEADER.size
    end = total - _CRC.size
    for i in range(n_layers):
        if at + LAYER_HEADER.size > end:
            raise BlobError(f"layer {i} runs past the end of the blob")
        li, lo, flags, act, amin, amax, xzp, wzp, yzp = LAYER_HEADER.unpack_from(blob, at)
        at += LAYER_HEADER.size
        wlen = li * lo
        size = wlen + (-wlen % 4) + 12 * lo
        if at + size > end:
            raise BlobError(f"layer {i} runs past the end of the blob")
        weights = blob[at : at + wlen]
        at += wlen + (-wlen % 4)
        bias = struct.unpack_from(f"<{lo}i", blob, at)
        mults = struct.unpack_from(f"<{lo}i", blob, at + 4 * lo)
        shifts = struct.unpack_from(f"<{lo}i", blob, at + 8 * lo)
        at += 12 * lo
        layers.append(
            BlobLayer(
                li, lo, bool(flags & FLAG_PER_CHANNEL), act, amin, amax, xzp, wzp, yzp,
                weights, bias, mults, shifts,
            )
        )  # fmt: skip
    if at != end:
        raise BlobError(f"{end - at} unexpected bytes after the last layer")
    if not layers or layers[0].n_in != n_in or layers[-1].n_out != n_out:
        raise BlobError("the header's input/output widths do not match the layers")
    return Blob(version, in_scale, in_zp, out_scale, out_zp, tuple(layers))
