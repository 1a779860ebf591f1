"""int8 and int4 weights for the CPU provider: weight-only, blockwise, through onnxruntime's
MatMulNBits (layouts chosen by measurement: LAYOUTS).

Why not `quantize_dynamic`: its MatMulInteger + DynamicQuantizeLinear graph was slower than
fp32 here (13.1 vs 10.5 ms/token). MatMulNBits keeps activations in float, stores each weight
matrix as 8- or 4-bit blocks with one scale (and for int4 a zero point) per block, and with
accuracy_level 4 multiplies in int8: a decode step reads a quarter (an eighth) of the fp32
weight bytes.

Every weight MatMul is quantized, the tied lm_head included. The token embedding is gathered
from an 8-bit table (GatherBlockQuantized, embedding_from_8bit): the lm_head's own blocks when
the head is 8-bit, else an 8-bit copy. A float32 table would hold 154 MB of the 124M model for a
lookup that reads one row a step.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gpt2onnx.engine.extras import check_installed, require

from .int8_rows import embedding_from_head, quantize_rows
from .weights import Weights, array_of, placeholder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How one weight matrix is stored: bits per weight, weights per scale, symmetric or with a
    zero point per block."""

    bits: int
    block: int
    symmetric: bool


# int8: block 128 ran 4.7 ms/step against 5.6 for 32 on the 124M shape, within tolerance.
# int4, measured on the trained fixture (pydocs-gpt2-4l, perplexity of heldout.txt, window 128,
# stride 64; fp32 39.547): with an 8-bit head, blocks of 32 symmetric +0.22%, 32 / 64 / 128
# asymmetric +0.15 / +0.02 / +0.31%; with the head in 4 bits too, 32 / 64 asymmetric +0.39 /
# +0.30%. The head stays 4-bit: on the 124M shape an 8-bit head made int4 no faster than int8
# (7.53 vs 7.35 ms/token, 3 alternating rounds), a 4-bit one 5.82 ms. Blocks of 64 with zero
# points: the best margin of the 4-bit heads.
LAYOUTS = {"int8": Layout(8, 128, True), "int4": Layout(4, 64, False)}
ACCURACY_LEVEL = 4  # int8 activations x low-bit weights inside the kernel
QUANTIZED = tuple(LAYOUTS)  # the weight-only dtypes: activations and the cache stay fp32


class QuantizationError(RuntimeError):
    pass


def check_quantizer_available(dtype: str) -> None:
    """For the start of a quantized export: a missing onnx_ir then fails at once, not after
    tracing. Raises MissingExtraError."""
    check_installed("onnx_ir", "export", f"--dtype {dtype}")


def quantize(
    proto: onnx.ModelProto,
    weights: Weights,
    n_layer: int,
    dtype: str,
    int8_kernel: str = "rows",
    layout: Layout | None = None,
) -> onnx.ModelProto:
    """Replace every MatMul with a constant weight, the tied lm_head included, one weight at a
    time: its quantized form goes into `weights` (placeholders, export/weights.py) and the float
    weight leaves them. int8 with `int8_kernel` "rows": per-row activations (export/int8_rows.py);
    else MatMulNBits in `layout` (LAYOUTS[dtype]). Checks that all were replaced."""
    if dtype == "int8" and int8_kernel == "rows":
        quantize_rows(proto, weights)
        embedding_from_head(proto.graph, weights)
        op = "MatMulIntegerToFloat"
    else:
        _quantize(proto, weights, layout or LAYOUTS[dtype], dtype)
        embedding_from_8bit(proto.graph, weights)
        op = "MatMulNBits"
    counts = Counter(node.op_type for node in proto.graph.node)
    expected = 4 * n_layer + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per layer, and lm_head
    if counts[op] != expected:
        raise QuantizationError(
            f"{dtype} quantization produced {counts[op]} {op} nodes, expected {expected}; "
            "the graph did not have the shape the quantizer expects"
        )
    return proto


def _quantize(proto: onnx.ModelProto, weights: Weights, layout: Layout, dtype: str) -> None:
    """onnxruntime's blockwise quantizer (its C++ kernel, as MatMulNBitsQuantizer calls it) on
    each weight, with the node and initializers laid out as that class writes them (W -> W_Q8,
    W_scales, W_zero_points). Its own graph pass is not used: it reads every weight from the
    protobuf, which here holds none."""
    # onnxruntime's quantizer imports onnx_ir, which the [export] extra installs
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "export", f"--dtype {dtype}")
    log.info("quantizing weights to %s (%d-bit MatMulNBits, block %d, %s)", dtype, layout.bits, layout.block,
             "symmetric" if layout.symmetric else "with zero points")  # fmt: skip
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=layout.block,
        is_symmetric=layout.symmetric,
        accuracy_level=ACCURACY_LEVEL,
        bits=layout.bits,
    )
    blocks = nbits.DefaultWeightOnlyQuantizer(config)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    for at, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            continue
        name = node.input[1]
        w = np.ascontiguousarray(array_of(inits[name], weights), dtype=np.float32)  # (K, N)
        packed, scales, zero_points = blocks.qbits_block_quant(w)
        made = {f"{name}_Q{layout.bits}": packed, f"{name}_scales": scales}
        if not layout.symmetric:
            made[f"{name}_zero_points"] = zero_points
        for made_name, array in made.items():
            weights[made_name] = array
            graph.initializer.append(placeholder(made_name, array))
        graph.node[at].CopyFrom(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *made],
                list(node.output),
                name=f"{node.name}_Q{layout.bits}",
                domain="com.microsoft",
                K=w.shape[0],
                N=w.shape[1],
                bits=layout.bits,
                block_size=layout.block,
                accuracy_level=ACCURACY_LEVEL,
            )  # fmt: skip
        )
        if not any(name in n.input for n in graph.node):
            graph.initializer.remove(inits.pop(name))
            weights.pop(name, None)


# The token table in 8 bits, measured on the trained fixture (perplexity of heldout.txt, stride 64,
# against fp32; top-1 agreement over 2,560 positions; greedy continuations equal for N of 64):
# int4 gathering from its 4-bit head +0.73%, 94.41%, 30.9; from an 8-bit copy +0.31%, 96.13%, 38.8
# (float32 table: +0.30%, 96.05%, 38.8). int8 gathering from its head -0.01%, 99.45%, 59.2 (float32
# table: +0.02%, 99.45%, 60.8). So an 8-bit table, never a 4-bit one.
EMBEDDING_BLOCKS = (128, 64, 32, 16)  # GatherBlockQuantized takes powers of two from 16


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def embedding_from_8bit(graph: onnx.GraphProto, weights: Weights) -> None:
    """Replace the token embedding's Gather over its float table (the `input_ids` one) by
    GatherBlockQuantized over 8-bit blocks: the tied lm_head's MatMulNBits weight when it is 8-bit
    and unpadded (its blocks are the table's rows, MatMulNBits' zero point 128 included), else an
    8-bit symmetric copy. The float table is dropped. A width no block divides keeps the float
    table (logged)."""
    inits = {t.name: t for t in graph.initializer}
    gather = next(
        n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and n.input[1] == "input_ids"
    )
    table = gather.input[0]
    vocab, width = inits[table].dims
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and _attr(n, "N") == vocab)
    if _attr(head, "bits") == 8 and width % _attr(head, "block_size") == 0 and len(head.input) < 4:
        block, scales = _attr(head, "block_size"), head.input[2]
        shape = numpy_helper.from_array(np.array([vocab, width], np.int64), f"{table}_rows_shape")
        data = f"{head.input[1]}_rows"
        nodes = [helper.make_node("Reshape", [head.input[1], shape.name], [data], name="/embedding/Reshape")]
        added = [shape]  # (vocab, blocks, block) -> (vocab, width): the same bytes
    else:
        block = next((b for b in EMBEDDING_BLOCKS if width % b == 0), None)
        if block is None:
            log.info(
                "the token embedding stays float32: no block of %s divides its width %d",
                EMBEDDING_BLOCKS,
                width,
            )
            return
        q, scale = quantize_rows_8bit(array_of(inits[table], weights), block)
        data, scales, nodes = f"{table}_q8", f"{table}_q8_scales", []
        weights |= {data: q, scales: scale}
        added = [placeholder(data, q), placeholder(scales, scale)]
    nodes.append(helper.make_node("GatherBlockQuantized", [data, "input_ids", scales], list(gather.output),
                                  name="/embedding/GatherBlockQuantized", domain="com.microsoft", gather_axis=0,
                                  quantize_axis=1, block_size=block, bits=8))  # fmt: skip
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for node in reversed(nodes):
        graph.node.insert(at, node)
    graph.initializer.extend(added)
    if not any(table in n.input for n in graph.node):
        graph.initializer.remove(inits[table])
        weights.pop(table, None)


def quantize_rows_8bit(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(vocab, width) float -> uint8 blocks along each row with MatMulNBits' zero point 128, and
    one float32 scale per block (max |w| / 127, symmetric)."""
    vocab, width = table.shape
    blocks = np.ascontiguousarray(table, dtype=np.float32).reshape(vocab, width // block, block)
    scale = np.abs(blocks).max(-1) / 127
    scale[scale == 0] = 1.0  # an all-zero block: any scale gives zeros
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8).reshape(vocab, width), scale.astype(np.float32)
