"""Read the int8 FULLY_CONNECTED chain of a small .tflite model (a struct-only flatbuffer reader).

Only what an int8 dense network needs is read (schema.fbs field ids noted beside each read);
anything else in the graph is refused with a `ModelFormatError`, never silently skipped.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from models.errors import ModelFormatError

__all__ = ["DenseLayer", "DenseModel", "TensorQuant", "read_dense_model"]

# schema.fbs enums
_FLOAT32 = 0
_INT32 = 2
_INT8 = 9
_DEQUANTIZE = 6
_FULLY_CONNECTED = 9
_QUANTIZE = 114
_FC_OPTIONS = 8  # BuiltinOptions.FullyConnectedOptions
ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


@dataclass(frozen=True)
class TensorQuant:
    """Affine quantization of one tensor: real = scale · (q − zero_point)."""

    scales: tuple[float, ...]  # float32 values, widened to double exactly
    zero_points: tuple[int, ...]
    quantized_dimension: int


@dataclass(frozen=True)
class DenseLayer:
    """One int8 FULLY_CONNECTED op: weights [n_out][n_in] row-major, int32 bias."""

    n_in: int
    n_out: int
    weights: bytes  # int8, row-major (output channel, input)
    bias: tuple[int, ...]
    input_quant: TensorQuant
    weight_quant: TensorQuant
    output_quant: TensorQuant
    activation: str  # NONE, RELU, RELU_N1_TO_1, RELU6


@dataclass(frozen=True)
class DenseModel:
    layers: tuple[DenseLayer, ...]
    input_quant: TensorQuant
    output_quant: TensorQuant
    float_input: bool  # a QUANTIZE op (float32 → int8) leads the graph
    float_output: bool  # a DEQUANTIZE op (int8 → float32) ends the graph


class _Table:
    """A flatbuffer table: field n lives at vtable slot 4 + 2n."""

    __slots__ = ("buf", "pos", "vsize", "vtable")

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.vtable = pos - _unpack("<i", buf, pos)
        self.vsize = _unpack("<H", buf, self.vtable)

    def _field(self, n: int) -> int:
        slot = 4 + 2 * n
        if slot >= self.vsize:
            return 0
        off: int = _unpack("<H", self.buf, self.vtable + slot)
        return self.pos + off if off else 0

    def scalar(self, n: int, fmt: str, default: int = 0) -> int:
        at = self._field(n)
        return _unpack(fmt, self.buf, at) if at else default

    def _target(self, n: int) -> int:
        at = self._field(n)
        return at + _unpack("<I", self.buf, at) if at else 0

    def table(self, n: int) -> _Table | None:
        at = self._target(n)
        return _Table(self.buf, at) if at else None

    def tables(self, n: int) -> list[_Table]:
        at = self._target(n)
        if not at:
            return []
        count = _unpack("<I", self.buf, at)
        items = []
        for i in range(count):
            elem = at + 4 + 4 * i
            items.append(_Table(self.buf, elem + _unpack("<I", self.buf, elem)))
        return items

    def vector(self, n: int, code: str) -> tuple[int | float, ...]:
        at = self._target(n)
        if not at:
            return ()
        count = _unpack("<I", self.buf, at)
        return struct.unpack_from(f"<{count}{code}", self.buf, at + 4)

    def raw(self, n: int) -> bytes:
        at = self._target(n)
        if not at:
            return b""
        count = _unpack("<I", self.buf, at)
        if at + 4 + count > len(self.buf):
            raise ModelFormatError("a flatbuffer vector runs past the end of the file")
        return self.buf[at + 4 : at + 4 + count]


def _unpack(fmt: str, buf: bytes, at: int) -> int:
    try:
        value: int = struct.unpack_from(fmt, buf, at)[0]
    except struct.error as exc:
        raise ModelFormatError(f"truncated or corrupt flatbuffer at byte {at}") from exc
    return value


def _ints(values: tuple[int | float, ...]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class _Graph:
    def __init__(self, buf: bytes) -> None:
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise ModelFormatError("not a .tflite flatbuffer (file identifier TFL3 missing)")
        self.buf = buf
        root = _Table(buf, _unpack("<I", buf, 0))
        self.opcodes = [
            max(t.scalar(0, "<b"), t.scalar(3, "<i")) for t in root.tables(1)
        ]  # OperatorCode: deprecated_builtin_code(0), builtin_code(3)
        subgraphs = root.tables(2)
        if len(subgraphs) != 1:
            raise ModelFormatError(f"expected 1 subgraph, found {len(subgraphs)}")
        self.buffers = root.tables(4)
        sub = subgraphs[0]
        self.tensors = sub.tables(0)
        self.inputs = _ints(sub.vector(1, "i"))
        self.outputs = _ints(sub.vector(2, "i"))
        self.operators = sub.tables(3)

    def tensor_type(self, index: int) -> int:
        return self.tensors[index].scalar(1, "<b")  # Tensor.type

    def shape(self, index: int) -> tuple[int, ...]:
        return _ints(self.tensors[index].vector(0, "i"))  # Tensor.shape

    def quant(self, index: int) -> TensorQuant:
        q = self.tensors[index].table(4)  # Tensor.quantization
        if q is None:
            raise ModelFormatError(f"tensor {index} is not quantized")
        scales = tuple(float(s) for s in q.vector(2, "f"))  # scale
        zps = _ints(q.vector(3, "q"))  # zero_point
        if not scales or len(scales) != len(zps):
            raise ModelFormatError(
                f"tensor {index} has {len(scales)} scales, {len(zps)} zero points"
            )
        return TensorQuant(scales, zps, q.scalar(6, "<i"))  # quantized_dimension

    def data(self, index: int) -> bytes:
        b = self.tensors[index].scalar(2, "<I")  # Tensor.buffer
        if not 0 < b < len(self.buffers):
            raise ModelFormatError(f"tensor {index} has no constant data")
        if self.buffers[b].scalar(1, "<Q") > 1:  # Buffer.offset: data outside the flatbuffer
            raise ModelFormatError("models with external buffers (> 2 GB layout) are not supported")
        return self.buffers[b].raw(0)  # Buffer.data


def _activation_tensor(g: _Graph, index: int, what: str) -> TensorQuant:
    if g.tensor_type(index) != _INT8:
        raise ModelFormatError(f"{what} tensor {index} is not int8")
    q = g.quant(index)
    if len(q.scales) != 1:
        raise ModelFormatError(f"{what} tensor {index} is not quantized per tensor")
    return q


def _dense_layer(g: _Graph, op: _Table, position: int) -> DenseLayer:
    ins = _ints(op.vector(1, "i"))  # Operator.inputs
    outs = _ints(op.vector(2, "i"))  # Operator.outputs
    if len(ins) not in (2, 3) or len(outs) != 1:
        raise ModelFormatError(f"op {position}: FULLY_CONNECTED needs 2-3 inputs and 1 output")
    x_i, w_i, y_i = ins[0], ins[1], outs[0]
    b_i = ins[2] if len(ins) == 3 else -1
    x_q = _activation_tensor(g, x_i, f"op {position} input")
    y_q = _activation_tensor(g, y_i, f"op {position} output")
    if g.tensor_type(w_i) != _INT8:
        raise ModelFormatError(f"op {position}: weights are not int8 (int4/hybrid unsupported)")
    shape = g.shape(w_i)
    if len(shape) != 2:
        raise ModelFormatError(f"op {position}: weights have shape {shape}, expected [out, in]")
    n_out, n_in = shape
    weights = g.data(w_i)
    if len(weights) != n_out * n_in:
        raise ModelFormatError(f"op {position}: {len(weights)} weight bytes for {n_out}x{n_in}")
    w_q = g.quant(w_i)
    if len(w_q.scales) not in (1, n_out) or (len(w_q.scales) > 1 and w_q.quantized_dimension):
        raise ModelFormatError(f"op {position}: weight quantization must be per tensor or per row")
    if b_i < 0:
        bias = (0,) * n_out
    else:
        if g.tensor_type(b_i) != _INT32:
            raise ModelFormatError(f"op {position}: bias is not int32")
        raw = g.data(b_i)
        if len(raw) != 4 * n_out:
            raise ModelFormatError(f"op {position}: {len(raw)} bias bytes for {n_out} channels")
        bias = struct.unpack(f"<{n_out}i", raw)
    opts = op.table(4) if op.scalar(3, "<B") == _FC_OPTIONS else None  # builtin_options(_type)
    act = opts.scalar(0, "<b") if opts else 0  # fused_activation_function
    if opts and opts.scalar(1, "<b"):  # weights_format
        raise ModelFormatError(f"op {position}: shuffled weights format is not supported")
    if act not in ACTIVATIONS:
        raise ModelFormatError(f"op {position}: unsupported fused activation {act}")
    return DenseLayer(n_in, n_out, weights, bias, x_q, w_q, y_q, ACTIVATIONS[act])


def read_dense_model(tflite: bytes) -> DenseModel:
    """The chain of int8 FULLY_CONNECTED layers of a .tflite model, with their quantization."""
    g = _Graph(bytes(tflite))
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise ModelFormatError("the model must have exactly one input and one output")
    ops = list(g.operators)
    codes = [g.opcodes[op.scalar(0, "<I")] for op in ops]  # Operator.opcode_index
    float_in = bool(codes) and codes[0] == _QUANTIZE
    float_out = bool(codes) and codes[-1] == _DEQUANTIZE
    current = g.inputs[0]
    if float_in:
        if g.tensor_type(current) != _FLOAT32:
            raise ModelFormatError("a leading QUANTIZE must take the float32 model input")
        current = _ints(ops[0].vector(2, "i"))[0]
        ops, codes = ops[1:], codes[1:]
    last = ops[-1] if float_out else None
    if float_out:
        ops, codes = ops[:-1], codes[:-1]
    layers = []
    for position, (op, code) in enumerate(zip(ops, codes, strict=True)):
        if code != _FULLY_CONNECTED:
            raise ModelFormatError(f"op {position}: builtin operator {code} is not FULLY_CONNECTED")
        if _ints(op.vector(1, "i"))[0] != current:
            raise ModelFormatError(f"op {position} does not consume the previous op's output")
        layers.append(_dense_layer(g, op, position))
        current = _ints(op.vector(2, "i"))[0]
    if not layers:
        raise ModelFormatError("the model has no FULLY_CONNECTED layer")
    if last is not None:
        if _ints(last.vector(1, "i"))[0] != current:
            raise ModelFormatError("the trailing DEQUANTIZE does not take the last layer's output")
        current = _ints(last.vector(2, "i"))[0]
    if current != g.outputs[0]:
        raise ModelFormatError("the layer chain does not end at the model output")
    for prev, nxt in itertools.pairwise(layers):
        if prev.n_out != nxt.n_in:
            raise ModelFormatError(f"layer widths do not chain: {prev.n_out} → {nxt.n_in}")
    return DenseModel(
        tuple(layers), layers[0].input_quant, layers[-1].output_quant, float_in, float_out
    )
