"""models.tflite_reader against LiteRT's own view of the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hil_tests.models.conftest import PER_CHANNEL, PER_TENSOR
from models.errors import ModelFormatError
from models.tflite_reader import read_dense_model


def _litert_constants(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from ai_edge_litert.interpreter import (  # type: ignore[import-untyped,unused-ignore]
        Interpreter,
    )

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    out = {}
    for detail in interp.get_tensor_details():
        q = detail["quantization_parameters"]
        try:
            value = interp.get_tensor(detail["index"])
        except ValueError:
            continue
        out[detail["name"]] = (value, q["scales"], q["zero_points"])
    return out


@pytest.mark.parametrize("path", [PER_CHANNEL, PER_TENSOR], ids=["per_channel", "per_tensor"])
def test_reader_matches_litert(path: Path) -> None:
    model = read_dense_model(path.read_bytes())
    assert [(la.n_in, la.n_out) for la in model.layers] == [(8, 16), (16, 4), (4, 16), (16, 8)]
    assert [la.activation for la in model.layers] == ["RELU", "RELU", "RELU", "NONE"]
    assert not model.float_input and not model.float_output
    consts = _litert_constants(path)
    weights = [v for v in consts.values() if v[0].dtype == np.int8 and v[0].ndim == 2]
    biases = [v for v in consts.values() if v[0].dtype == np.int32 and v[0].ndim == 1]
    for layer in model.layers:
        w = np.frombuffer(layer.weights, dtype=np.int8).reshape(layer.n_out, layer.n_in)
        match = [v for v in weights if v[0].shape == w.shape and np.array_equal(v[0], w)]
        assert len(match) == 1, "the weights LiteRT sees"
        scales = np.array(layer.weight_quant.scales, np.float32)
        # The file holds one scale for a per-tensor weight; LiteRT repeats it per channel.
        assert len(scales) == (layer.n_out if path == PER_CHANNEL else 1)
        np.testing.assert_array_equal(match[0][1], np.broadcast_to(scales, (layer.n_out,)))
        assert any(np.array_equal(v[0], np.array(layer.bias)) for v in biases)


def test_chained_quantization_is_consistent() -> None:
    model = read_dense_model(PER_CHANNEL.read_bytes())
    for prev, nxt in zip(model.layers, model.layers[1:], strict=False):
        assert prev.output_quant == nxt.input_quant
    assert model.input_quant == model.layers[0].input_quant


def test_rejects_a_file_that_is_not_tflite() -> None:
    with pytest.raises(ModelFormatError, match="TFL3"):
        read_dense_model(b"\x00" * 64)


def test_rejects_a_truncated_file() -> None:
    data = PER_CHANNEL.read_bytes()
    with pytest.raises(ModelFormatError):
        read_dense_model(data[: len(data) // 3])
