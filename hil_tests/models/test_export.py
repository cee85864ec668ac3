"""models.export: the blob's layout, its round trip, and every corruption `load` must refuse."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from hil_tests.models.conftest import PER_CHANNEL
from models.errors import BlobError
from models.export import (
    HEADER,
    MAGIC,
    VERSION,
    Blob,
    activation_range,
    export,
    layer_multipliers,
    load,
)
from models.parity import oracle_outputs
from models.tflite_reader import read_dense_model
from models.tflm_math import multiply_by_quantized_multiplier


def _recrc(blob: bytes) -> bytes:
    body = blob[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_round_trip(tflite_path: Path) -> None:
    tflite = tflite_path.read_bytes()
    model = read_dense_model(tflite)
    blob = load(export(tflite))
    assert blob.version == VERSION
    assert blob.input_zp == model.input_quant.zero_points[0]
    assert blob.output_scale == pytest.approx(model.output_quant.scales[0], rel=1e-7)
    assert len(blob.layers) == len(model.layers)
    for got, want in zip(blob.layers, model.layers, strict=True):
        assert (got.n_in, got.n_out) == (want.n_in, want.n_out)
        assert got.weights == want.weights
        assert got.bias == want.bias
        assert got.per_channel == (len(want.weight_quant.scales) > 1)
        mults, shifts = layer_multipliers(want)
        assert list(got.multipliers) == mults and list(got.shifts) == shifts
        assert got.input_zp == want.input_quant.zero_points[0]
        assert got.output_zp == want.output_quant.zero_points[0]
        assert all((1 << 30) <= m < (1 << 31) for m in got.multipliers)


def test_header_layout_is_as_documented() -> None:
    blob = export(PER_CHANNEL.read_bytes())
    assert blob[0:4] == MAGIC == b"FMQ8"
    assert struct.unpack_from("<HHI", blob, 4) == (1, 4, len(blob))
    assert struct.unpack_from("<HH", blob, 12) == (8, 8)
    assert HEADER.size == 32
    # first layer header right after the file header: n_in 8, n_out 16, per-channel, RELU
    assert struct.unpack_from("<HHBB", blob, 32) == (8, 16, 1, 1)
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == zlib.crc32(blob[:-4])


def test_export_is_deterministic() -> None:
    tflite = PER_CHANNEL.read_bytes()
    assert export(tflite) == export(tflite)


@pytest.mark.parametrize(
    ("activation", "expected"),
    [("NONE", (-128, 127)), ("RELU", (5, 127)), ("RELU6", (5, 65)), ("RELU_N1_TO_1", (-5, 15))],
)
def test_activation_range(activation: str, expected: tuple[int, int]) -> None:
    assert activation_range(activation, 0.1, 5) == expected


def test_relu_floor_is_clamped_to_int8() -> None:
    assert activation_range("RELU", 0.1, -128) == (-128, 127)
    assert activation_range("RELU6", 0.01, -100) == (-100, 127)


@pytest.fixture
def blob() -> bytes:
    return export(PER_CHANNEL.read_bytes())


def test_wrong_magic(blob: bytes) -> None:
    with pytest.raises(BlobError, match="magic"):
        load(_recrc(b"XXXX" + blob[4:]))


def test_wrong_version(blob: bytes) -> None:
    bad = blob[:4] + struct.pack("<H", VERSION + 1) + blob[6:]
    with pytest.raises(BlobError, match="version 2"):
        load(_recrc(bad))


@pytest.mark.parametrize("offset", [8, 40, 200, -5])
def test_flipped_byte_fails_the_crc(blob: bytes, offset: int) -> None:
    bad = bytearray(blob)
    bad[offset] ^= 0x01
    with pytest.raises(BlobError, match=r"CRC32|length"):
        load(bytes(bad))


@pytest.mark.parametrize("keep", [0, 10, 35, -1])
def test_truncation(blob: bytes, keep: int) -> None:
    with pytest.raises(BlobError, match=r"truncated|length"):
        load(blob[:keep])


def test_extra_bytes(blob: bytes) -> None:
    with pytest.raises(BlobError, match="length"):
        load(blob + b"\0")


def test_layer_overrun_with_a_valid_crc(blob: bytes) -> None:
    # A header that claims more layers than the body holds, CRC recomputed to match.
    bad = blob[:6] + struct.pack("<H", 5) + blob[8:]
    with pytest.raises(BlobError, match="layer 4"):
        load(_recrc(bad))


def _host_engine(blob: Blob, x: np.ndarray, single_rounding: bool = False) -> np.ndarray:
    for layer in blob.layers:
        w = np.frombuffer(layer.weights, np.int8).reshape(layer.n_out, layer.n_in).astype(int)
        acc = (w - layer.weight_zp) @ (x.astype(int) - layer.input_zp)
        y = []
        for c in range(layer.n_out):
            a, m, s = int(acc[c]) + layer.bias[c], layer.multipliers[c], layer.shifts[c]
            if single_rounding:  # TFLITE_SINGLE_ROUNDING / LiteRT's kernels
                v = (a * m + (1 << (30 - s))) >> (31 - s)
            else:
                v = multiply_by_quantized_multiplier(a, m, s)
            y.append(min(max(v + layer.output_zp, layer.act_min), layer.act_max))
        x = np.array(y)
    return x.astype(np.int8)


def test_blob_constants_reproduce_tflm_on_the_host(tflite_path: Path) -> None:
    tflite = tflite_path.read_bytes()
    blob = load(export(tflite))
    rng = np.random.default_rng(1)
    inputs = rng.integers(-128, 128, size=(300, 8)).astype(np.int8)
    expected = oracle_outputs(tflite, inputs)
    double = np.stack([_host_engine(blob, row) for row in inputs])
    single = np.stack([_host_engine(blob, row, single_rounding=True) for row in inputs])
    assert np.array_equal(double, expected)
    # The inputs are sharp enough to tell TFLM's double rounding from single rounding.
    assert np.count_nonzero(single != expected) > 0
