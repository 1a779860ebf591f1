"""A quantized graph's weights back in float, read from its own initializers.

The export check of a quantized graph (export/verify.py) compares these with the checkpoint's
weights (each within a quantization step: a wrong block, scale or layer stands out however large
the weights are), and runs the PyTorch reference with them, which leaves only the kernels' own
rounding between it and the graph.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from .int8_rows import SUFFIX, rows_weight
from .weights import Weights, array_of

QUANTIZED_SUFFIXES = ("_Q4", "_Q8")  # onnxruntime's quantizer renames a weight W to W_Q4 / W_Q8


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> one value per 4 or 8 bits along the last axis, low nibble first."""
    if bits == 8:
        return packed  # uint8: read as it is
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int16)


def matmul_nbits_weight(node: onnx.NodeProto, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The float (K, N) weight a MatMulNBits node multiplies by: (q - zero point) * scale per block."""
    a = _attrs(node)
    K, N, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    blocks = -(-K // block)
    q = _unpack(tensors[node.input[1]], bits).reshape(N, blocks * block)
    scales = (
        tensors[node.input[2]].astype(np.float32).reshape(N, blocks)
    )  # as the kernel: exact small ints x scale
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack(tensors[node.input[3]], bits).reshape(N, -1)[:, :blocks]
    else:
        zero = np.full((N, blocks), 1 << (bits - 1), np.int16)
    w = q.reshape(N, blocks, block).astype(np.float32)  # in place from here: one float copy
    del q
    w -= zero[..., None]
    w *= scales[..., None]
    return w.reshape(N, blocks * block)[:, :K].T


def gather_table(node: onnx.NodeProto, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The float (vocab, width) table a GatherBlockQuantized node (8-bit, zero point 128) reads
    from an initializer of its own (quantize.embedding_from_8bit)."""
    data, scales = tensors[node.input[0]], tensors[node.input[2]].astype(np.float32)
    rows = data.shape[0]  # vocab
    block = data.size // rows // scales.reshape(rows, -1).shape[1]
    w = data.reshape(rows, -1, block).astype(np.float32)
    w -= 128
    w *= scales.reshape(rows, -1, 1)
    return w.reshape(rows, -1)


def dequantized_weights(proto: onnx.ModelProto, weights: Weights) -> Iterator[tuple[str, np.ndarray, int]]:
    """(parameter name as traced, the float weight the graph really uses, its bits) for every
    MatMulNBits weight and the token table (`wte`) of a GatherBlockQuantized lookup that has
    one of its own (an 8-bit head's blocks are the table: checked as the head), one at a time (a caller that uses each and lets it go holds one weight in float, not the model).
    `weights`: the arrays of the graph's placeholders (export/weights.py)."""
    tensors = {t.name: t for t in proto.graph.initializer}
    arrays = _Arrays(tensors, weights)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            name = node.input[1]
            for suffix in QUANTIZED_SUFFIXES:
                name = name.removesuffix(suffix)
            yield name.removeprefix("model."), matmul_nbits_weight(node, arrays), _attrs(node)["bits"]
        elif node.op_type == "MatMulIntegerToFloat":
            name = node.input[1].removesuffix(SUFFIX)
            yield name.removeprefix("model."), rows_weight(node, arrays), 8
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in tensors:
            yield "wte", gather_table(node, arrays), 8
        # else the lm_head's own 8-bit blocks (tied, as in the checkpoint): checked as the head


class _Arrays(dict):
    """Initializers as numpy arrays, converted when first asked for."""

    def __init__(self, tensors: dict[str, onnx.TensorProto], weights: Weights):
        super().__init__()
        self.tensors, self.weights = tensors, weights

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __missing__(self, name: str) -> np.ndarray:
        return array_of(self.tensors[name], self.weights)
