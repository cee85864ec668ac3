"""models.export: the blob's layout (v2, v1 still read), round trips, and every corruption refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from hil_tests.models.conftest import PER_CHANNEL
from models.errors import BlobError, ModelFormatError
from models.export import (
    FEATURE_CODES,
    HEADER,
    HEADER_V1,
    MAGIC,
    PIPELINE_HEADER,
    VERSION,
    Blob,
    activation_range,
    export,
    layer_multipliers,
    load,
)
from models.parity import oracle_outputs
from models.pipeline import Pipeline
from models.tflite_reader import read_dense_model
from models.tflm_math import multiply_by_quantized_multiplier


def _recrc(blob: bytes) -> bytes:
    body = blob[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def as_v1(blob: bytes) -> bytes:
    """The version 1 form of a version 2 blob without a pipeline section (the old writer)."""
    fields = list(HEADER.unpack_from(blob))
    assert fields[1] == 2 and fields[-1] == 0
    body = blob[HEADER.size : -4]
    fields[1] = 1
    fields[3] = HEADER_V1.size + len(body) + 4
    data = HEADER_V1.pack(*fields[:-1]) + body
    return data + struct.pack("<I", zlib.crc32(data))


def make_pipeline(**changes: object) -> Pipeline:
    """8 features (the test models' input width): every kind, in a non-canonical order."""
    fields: dict[str, object] = {
        "channels": ("pump.flow", "pump.temp", "motor.vibü"),
        "window": 12,
        "kinds": (("value", "mean", "std"), ("std", "dev"), ("mean", "value", "dev")),
        "mean": (0.1, -2.5, 0.3, 1e-3, 0.0, 12345.678, -7.25, 3.3),
        "std": (0.7, 1.3, 0.01, 2.0, 1.0, 99.9, 1e-6, 3.0),
        "clip": 6.5,
        "smooth": 4,
        "threshold": 0.4321,
    }
    fields.update(changes)
    return Pipeline(**fields)  # type: ignore[arg-type]


def test_round_trip(tflite_path: Path) -> None:
    tflite = tflite_path.read_bytes()
    model = read_dense_model(tflite)
    blob = load(export(tflite))
    assert blob.version == VERSION == 2
    assert blob.pipeline is None
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
    assert struct.unpack_from("<HHI", blob, 4) == (2, 4, len(blob))
    assert struct.unpack_from("<HH", blob, 12) == (8, 8)
    assert struct.unpack_from("<I", blob, 32) == (0,)  # no pipeline section
    assert (HEADER.size, HEADER_V1.size, PIPELINE_HEADER.size) == (36, 32, 16)
    # first layer header right after the file header: n_in 8, n_out 16, per-channel, RELU
    assert struct.unpack_from("<HHBB", blob, 36) == (8, 16, 1, 1)
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == zlib.crc32(blob[:-4])


def test_pipeline_section_layout_is_as_documented() -> None:
    p = make_pipeline()
    plain = export(PER_CHANNEL.read_bytes())
    blob = export(PER_CHANNEL.read_bytes(), p)
    (section_len,) = struct.unpack_from("<I", blob, 32)
    assert section_len % 4 == 0 and len(blob) == len(plain) + section_len
    at = len(plain) - 4  # the section sits between the last layer and the CRC
    assert blob[:8] == plain[:8] and blob[12:32] == plain[12:32]  # only the lengths differ
    assert blob[HEADER.size : at] == plain[HEADER.size : at]
    head = struct.unpack_from("<HHHHff", blob, at)
    assert head == (12, 4, 3, 8, 6.5, float(np.float32(0.4321)))
    means = struct.unpack_from("<8f", blob, at + 16)
    inv = struct.unpack_from("<8f", blob, at + 48)
    assert means == tuple(float(np.float32(m)) for m in p.mean)
    assert inv == tuple(float(np.float32(1.0 / s)) for s in p.std)
    records = blob[at + 80 : len(blob) - 4]
    name0 = b"pump.flow"
    assert records[:5] == bytes([3, 0, 1, 2, len(name0)])
    assert records[5 : 5 + len(name0)] == name0
    rest = records[5 + len(name0) :]
    assert rest[:3] == bytes([2, FEATURE_CODES["std"], FEATURE_CODES["dev"]])
    name2 = "motor.vibü".encode()
    tail = rest[3 + 1 + len("pump.temp") :]
    assert tail[: 5 + len(name2)] == bytes([3, 1, 0, 3, len(name2)]) + name2
    assert tail[5 + len(name2) :] == b"\0"  # padding to a multiple of 4


def test_pipeline_round_trip_to_float32_precision(tflite_path: Path) -> None:
    p = make_pipeline()
    got = load(export(tflite_path.read_bytes(), p)).pipeline
    assert got is not None
    assert (got.channels, got.kinds, got.window, got.smooth) == (
        p.channels,
        p.kinds,
        p.window,
        p.smooth,
    )
    assert got.mean == tuple(float(np.float32(m)) for m in p.mean)
    # std comes back as 1 / float32(1 / std), in double: equal to float32 precision.
    assert got.std == tuple(1.0 / float(np.float32(1.0 / s)) for s in p.std)
    np.testing.assert_allclose(got.std, p.std, rtol=2.0**-23)
    np.testing.assert_allclose(got.mean, p.mean, rtol=2.0**-24)
    assert got.clip == p.clip  # 6.5 is a float32
    assert got.threshold == float(np.float32(p.threshold)) == pytest.approx(p.threshold)
    # Exporting the loaded pipeline again gives the same blob: the float32 values are fixed.
    assert export(tflite_path.read_bytes(), got) == export(tflite_path.read_bytes(), p)


def test_a_pipeline_does_not_change_the_network() -> None:
    tflite = PER_CHANNEL.read_bytes()
    with_p, without = load(export(tflite, make_pipeline())), load(export(tflite))
    assert with_p.layers == without.layers
    assert with_p.input_scale == without.input_scale


def test_version_1_blobs_still_load() -> None:
    v2 = export(PER_CHANNEL.read_bytes())
    v1 = as_v1(v2)
    assert struct.unpack_from("<HHI", v1, 4) == (1, 4, len(v2) - 4)
    old, new = load(v1), load(v2)
    assert (old.version, old.pipeline) == (1, None)
    assert old.layers == new.layers
    assert (old.input_scale, old.input_zp, old.output_scale, old.output_zp) == (
        new.input_scale,
        new.input_zp,
        new.output_scale,
        new.output_zp,
    )
    bad = bytearray(v1)
    bad[40] ^= 0x01
    with pytest.raises(BlobError, match="CRC32"):
        load(bytes(bad))


def test_export_refuses_a_pipeline_of_the_wrong_width() -> None:
    p = make_pipeline(
        kinds=(("value", "mean", "std"), ("std", "dev"), ("mean", "value", "dev", "std")),
        mean=(0.0,) * 9,
        std=(1.0,) * 9,
    )
    with pytest.raises(ModelFormatError, match=r"9 features.*input width is 8"):
        export(PER_CHANNEL.read_bytes(), p)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mean": (1e39,) + (0.0,) * 7}, "mean"),
        ({"std": (1e-300,) + (1.0,) * 7}, "1/std"),
        ({"std": (1e300,) + (1.0,) * 7}, "underflows"),
        ({"channels": ("x" * 256, "b", "c")}, "255 bytes"),
        ({"window": 70000}, "65536"),
    ],
)
def test_export_refuses_values_the_section_cannot_hold(
    changes: dict[str, object], match: str
) -> None:
    with pytest.raises(ModelFormatError, match=match):
        export(PER_CHANNEL.read_bytes(), make_pipeline(**changes))


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


@pytest.mark.parametrize("version", [0, VERSION + 1])
def test_wrong_version(blob: bytes, version: int) -> None:
    bad = blob[:4] + struct.pack("<H", version) + blob[6:]
    with pytest.raises(BlobError, match=f"version {version} is not supported"):
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


def with_section(section: bytes) -> bytes:
    """The test model's v2 blob with `section` as its pipeline section, lengths and CRC fixed."""
    plain = export(PER_CHANNEL.read_bytes())
    data = bytearray(plain[:-4] + section)
    struct.pack_into("<I", data, 8, len(data) + 4)
    struct.pack_into("<I", data, 32, len(section))
    return bytes(data) + struct.pack("<I", zlib.crc32(data))


def exported_section() -> bytearray:
    blob = export(PER_CHANNEL.read_bytes(), make_pipeline())
    (n,) = struct.unpack_from("<I", blob, 32)
    return bytearray(blob[-4 - n : -4])


def test_section_helper_rebuilds_the_exported_blob() -> None:
    assert with_section(bytes(exported_section())) == export(
        PER_CHANNEL.read_bytes(), make_pipeline()
    )


def _patched(fmt: str, offset: int, *values: object) -> bytes:
    section = exported_section()
    struct.pack_into(fmt, section, offset, *values)
    return bytes(section)


_RECORDS = 16 + 8 * 8  # the channel records start after the header, mean and inv_std


@pytest.mark.parametrize(
    ("section", "match"),
    [
        (_patched("<H", 6, 9), "9 features, the network's input width is 8"),
        (_patched("<H", 6, 7), "7 features"),
        (_patched("<B", _RECORDS + 1, 4), "unknown feature code"),
        (_patched("<H", 4, 4), "channel 3 runs past"),
        (_patched("<H", 4, 2), "does not end with its last channel"),
        (_patched("<B", _RECORDS, 4), "channel 0"),  # kinds count eats into the name
        (_patched("<B", -1, 1), "does not end with its last channel"),  # padding not zero
        (_patched("<f", 16 + 32 + 4, 0.0), "inv_std"),
        (_patched("<f", 16 + 32, float("inf")), "inv_std"),
        (_patched("<H", 0, 0), "pipeline section inconsistent: .*window"),
        (_patched("<H", 2, 0), "pipeline section inconsistent: .*smooth"),
        (_patched("<f", 8, -1.0), "pipeline section inconsistent: .*clip"),
        (_patched("<f", 16, float("nan")), "pipeline section inconsistent: .*mean"),
        (_patched("<B", _RECORDS + 5, 0xFF), "not UTF-8"),
        (bytes(12), "shorter than its header"),
        (bytes(exported_section()[:60]), "runs past its end"),
        (bytes(exported_section()) + bytes(4), "does not end with its last channel"),
    ],
)
def test_inconsistent_pipeline_sections_are_refused(section: bytes, match: str) -> None:
    with pytest.raises(BlobError, match=match):
        load(with_section(section))


@pytest.mark.parametrize("section_len", [2, 1 << 20])
def test_impossible_section_length(section_len: int) -> None:
    bad = bytearray(export(PER_CHANNEL.read_bytes(), make_pipeline()))
    struct.pack_into("<I", bad, 32, section_len)
    with pytest.raises(BlobError, match="pipeline section length"):
        load(_recrc(bytes(bad)))


def test_a_section_that_eats_into_the_layers() -> None:
    bad = bytearray(export(PER_CHANNEL.read_bytes(), make_pipeline()))
    (n,) = struct.unpack_from("<I", bad, 32)
    struct.pack_into("<I", bad, 32, n + 4)
    with pytest.raises(BlobError, match="layer 3 runs past"):
        load(_recrc(bytes(bad)))


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
