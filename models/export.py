"""The firmware blob: an int8 dense network with every requantization constant precomputed.

`export(tflite, pipeline)` derives the blob from a .tflite file (the source of truth) and,
optionally, the model's pipeline (features, folded scaling, smoothing, threshold); `load(blob)`
reads one back (versions 1 and 2) and checks it. The byte layout is documented in
docs/model-format.md; the firmware readers are firmware/fogmesh/int8.py and detector.py.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from models.errors import BlobError, ModelFormatError
from models.pipeline import Pipeline
from models.tflite_reader import DenseLayer, read_dense_model
from models.tflm_math import quantize_multiplier

__all__ = [
    "FEATURE_CODES",
    "HEADER",
    "HEADER_V1",
    "LAYER_HEADER",
    "MAGIC",
    "PIPELINE_HEADER",
    "VERSION",
    "Blob",
    "BlobLayer",
    "activation_range",
    "export",
    "layer_multipliers",
    "load",
]

MAGIC = b"FMQ8"
VERSION = 2  # what export writes; load also reads version 1 (no pipeline section)
# magic, version, layer count, total length, input width, output width,
# input scale, input zero point, output scale, output zero point
HEADER_V1 = struct.Struct("<4sHHIHHfifi")
# version 2: the same fields, then the pipeline section's length in bytes (0: no section)
HEADER = struct.Struct("<4sHHIHHfifiI")
# window, smooth, channel count, feature count, clip, threshold
PIPELINE_HEADER = struct.Struct("<HHHHff")
FEATURE_CODES = {"value": 0, "mean": 1, "std": 2, "dev": 3}
_KINDS = {code: kind for kind, code in FEATURE_CODES.items()}
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
    # Rebuilt from the blob's float32 values: mean, clip and threshold are the stored float32
    # values, std = 1 / inv_std in double precision; equal to the exported pipeline to float32
    # precision. None for a version 1 blob or a blob exported without a pipeline.
    pipeline: Pipeline | None = None


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


def _f32(value: float, what: str) -> float:
    # The value a node will see: float32, finite.
    with np.errstate(over="ignore"):
        v = float(np.float32(value))
    if not math.isfinite(v):
        raise ModelFormatError(f"pipeline {what} {value!r} is not a finite float32")
    return v


def _pipeline_bytes(pipeline: Pipeline, n_in: int) -> bytes:
    """The pipeline section: header, float32 mean and inv_std per feature, channel records."""
    p = pipeline
    if p.n_features != n_in:
        raise ModelFormatError(
            f"the pipeline has {p.n_features} features, the network's input width is {n_in}"
        )
    if p.window > 0xFFFF or p.smooth > 0xFFFF or len(p.channels) > 0xFFFF:
        raise ModelFormatError("pipeline window, smooth and channel count must be < 65536")
    means = [_f32(m, "mean") for m in p.mean]
    inv_std = [_f32(1.0 / s, "1/std") for s in p.std]
    if any(v <= 0.0 for v in inv_std):
        raise ModelFormatError("pipeline std too large: 1/std underflows float32")
    head = PIPELINE_HEADER.pack(
        p.window,
        p.smooth,
        len(p.channels),
        n_in,
        _f32(p.clip, "clip"),
        _f32(p.threshold, "threshold"),
    )
    records = bytearray()
    for name, kinds in zip(p.channels, p.kinds, strict=True):
        raw = name.encode("utf-8")
        if len(raw) > 255 or len(kinds) > 255:
            raise ModelFormatError(f"channel {name!r}: name over 255 bytes or over 255 features")
        records += bytes([len(kinds), *(FEATURE_CODES[k] for k in kinds), len(raw)]) + raw
    n = n_in
    return _pad4(
        head + struct.pack(f"<{n}f", *means) + struct.pack(f"<{n}f", *inv_std) + bytes(records)
    )


def export(tflite: bytes, pipeline: Pipeline | None = None) -> bytes:
    """The version 2 firmware blob of an int8 dense .tflite model, with its pipeline if given.

    Raises ModelFormatError for an unsupported network or a pipeline whose feature count is not
    the network's input width (or whose values do not fit the section's fields).
    """
    model = read_dense_model(tflite)
    n_in = model.layers[0].n_in
    body = b"".join(_layer_bytes(layer) for layer in model.layers)
    section = b"" if pipeline is None else _pipeline_bytes(pipeline, n_in)
    total = HEADER.size + len(body) + len(section) + _CRC.size
    head = HEADER.pack(
        MAGIC,
        VERSION,
        len(model.layers),
        total,
        n_in,
        model.layers[-1].n_out,
        model.input_quant.scales[0],
        model.input_quant.zero_points[0],
        model.output_quant.scales[0],
        model.output_quant.zero_points[0],
        len(section),
    )
    data = head + body + section
    return data + _CRC.pack(zlib.crc32(data))


def _load_pipeline(blob: bytes, at: int, end: int, n_in: int) -> Pipeline:
    """Read and check the pipeline section blob[at:end] (BlobError when inconsistent)."""
    if at + PIPELINE_HEADER.size > end:
        raise BlobError("pipeline section shorter than its header")
    window, smooth, n_ch, n_feat, clip, threshold = PIPELINE_HEADER.unpack_from(blob, at)
    if n_feat != n_in:
        raise BlobError(
            f"pipeline section has {n_feat} features, the network's input width is {n_in}"
        )
    at += PIPELINE_HEADER.size
    if at + 8 * n_feat > end:
        raise BlobError("pipeline section runs past its end")
    means = struct.unpack_from(f"<{n_feat}f", blob, at)
    inv_std = struct.unpack_from(f"<{n_feat}f", blob, at + 4 * n_feat)
    at += 8 * n_feat
    channels: list[str] = []
    kinds: list[tuple[str, ...]] = []
    for c in range(n_ch):
        if at >= end or at + 1 + blob[at] >= end:
            raise BlobError(f"pipeline channel {c} runs past the end of its section")
        codes = blob[at + 1 : at + 1 + blob[at]]
        at += 1 + len(codes)
        name_len = blob[at]
        if at + 1 + name_len > end:
            raise BlobError(f"pipeline channel {c} runs past the end of its section")
        try:
            channels.append(blob[at + 1 : at + 1 + name_len].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BlobError(f"pipeline channel {c}: name is not UTF-8") from exc
        at += 1 + name_len
        if any(code not in _KINDS for code in codes):
            raise BlobError(f"pipeline channel {c}: unknown feature code in {list(codes)}")
        kinds.append(tuple(_KINDS[code] for code in codes))
    if end - at >= 4 or any(blob[at:end]):
        raise BlobError("pipeline section does not end with its last channel (plus padding)")
    if any(not (math.isfinite(v) and v > 0.0) for v in inv_std):
        raise BlobError("pipeline section: every inv_std must be finite and > 0")
    try:
        return Pipeline(
            tuple(channels),
            window,
            tuple(kinds),
            means,
            tuple(1.0 / v for v in inv_std),
            clip,
            smooth,
            threshold,
        )
    except ModelFormatError as exc:
        raise BlobError(f"pipeline section inconsistent: {exc}") from exc


def load(blob: bytes) -> Blob:
    """Read and check a version 1 or 2 blob.

    Magic, version, length and CRC32 first, then every layer, then the pipeline section.
    """
    blob = bytes(blob)
    if len(blob) < HEADER_V1.size + _CRC.size:
        raise BlobError(f"blob truncated: {len(blob)} bytes is shorter than its header")
    magic, version = struct.unpack_from("<4sH", blob)
    if magic != MAGIC:
        raise BlobError(f"not a fogmesh model blob (magic {magic!r}, expected {MAGIC!r})")
    if version not in (1, VERSION):
        raise BlobError(f"blob version {version} is not supported (expected 1 or {VERSION})")
    if version == 1:
        header = HEADER_V1.unpack_from(blob)
        section_len = 0
    else:
        if len(blob) < HEADER.size + _CRC.size:
            raise BlobError(f"blob truncated: {len(blob)} bytes is shorter than its header")
        fields = HEADER.unpack_from(blob)
        header, section_len = fields[:-1], fields[-1]
    _, _, n_layers, total, n_in, n_out, in_scale, in_zp, out_scale, out_zp = header
    if len(blob) != total:
        raise BlobError(f"blob length {len(blob)} does not match its header ({total} bytes)")
    (crc,) = _CRC.unpack_from(blob, total - _CRC.size)
    if zlib.crc32(blob[: total - _CRC.size]) != crc:
        raise BlobError("blob CRC32 mismatch: the blob is corrupt")
    layers = []
    at = HEADER_V1.size if version == 1 else HEADER.size
    end = total - _CRC.size - section_len
    if section_len % 4 or end < at:
        raise BlobError(f"pipeline section length {section_len} is inconsistent with the blob")
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
    pipeline = None
    if section_len:
        pipeline = _load_pipeline(blob, end, end + section_len, n_in)
    return Blob(version, in_scale, in_zp, out_scale, out_zp, tuple(layers), pipeline)
