"""int8 with activations quantized per row: the 8-bit kernel whose cost per row falls as the
batch grows (issue 25; chosen with benchmarks/matmul_kernels.py, timed with row_steps.py).

Each weight W (K, N) is stored as u8 = round(W / s) + 128 with one scale per output column
(s = max |W[:, n]| / 127). At run time each activation row x (one token of one request) becomes
u8 = round(x / r) + 128 with its own scale r = max |x| / 127, and onnxruntime's
MatMulIntegerToFloat multiplies u8 by u8 in integers and scales the sums by r * s. A row's
result depends on that row alone, so a request's tokens are the same alone and in any batch.

Why u8 x u8: without VNNI, MLAS adds pairs of u8 x s8 products in 16 bits, and full-range
int8 weights overflow them (a tenth of the output); s8 x s8 has no fast kernel; u8 x u8 is
exact. MatMulNBits (quantize.py, `--int8-kernel blocks`) charges nearly a full step per row.

The tied lm_head's bytes are the token table too: the embedding gathers the token's column of
the head's u8 weight and scales it (no second copy of the 50,257 x d table).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import Weights, array_of, placeholder

log = logging.getLogger(__name__)

SUFFIX = "_R8"  # a weight W becomes W_R8 (u8) and W_R8_scales (one per output column, over 127)
ZERO_POINT = "rows_zero_point"


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float -> (K, N) u8 with zero point 128, and N float32 scales (max |w| / 127)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.maximum(w.max(axis=0), -w.min(axis=0)) / np.float32(127)  # max |w|, no |w| copy
    scale[scale == 0] = 1.0  # an all-zero column: any scale gives zeros
    q = w / scale  # the one float copy (the head of gpt2-xl: 320 MB), then in place
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    q += 128
    return q.astype(np.uint8), scale.astype(np.float32)


def _row_quantizer(x: str) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes that quantize activation `x` per row (its last axis): u8 = round(127 x / m) + 128
    with m = max |x| over the row, and m, (..., 1), as the row's scale (its 1/127 is folded into
    the weights' column scales: five nodes a step, not eight)."""
    p = f"{x}_rows"
    make = helper.make_node
    nodes = [
        make("Abs", [x], [f"{p}_abs"], name=f"{p}/Abs"),
        make(
            "ReduceMax", [f"{p}_abs"], [f"{p}_max"], name=f"{p}/ReduceMax", axes=[-1], keepdims=1
        ),  # opset 17
        make("Max", [f"{p}_max", "rows_tiny"], [f"{p}_scale"], name=f"{p}/Max"),  # an all-zero row
        make("Div", [x, f"{p}_scale"], [f"{p}_unit"], name=f"{p}/Div"),  # in [-1, 1]
        # one tensor-wide scale and zero point: round half to even, + 128, saturate, to u8
        make("QuantizeLinear", [f"{p}_unit", "rows_inv127", ZERO_POINT], [f"{p}_u8"], name=f"{p}/Quantize"),
    ]
    return nodes, f"{p}_u8", f"{p}_scale"


def quantize_rows(proto: onnx.ModelProto, weights: Weights) -> None:
    """Replace every MatMul with a constant 2-D weight by MatMulIntegerToFloat over per-column
    u8 weights (into `weights`, placeholders in the graph) and per-row u8 activations; each
    activation is quantized once however many weights read it."""
    log.info("quantizing weights to int8 (u8 per output column; activations per row at run time)")
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    constants = {
        "rows_last_axis": np.array([-1], np.int64),
        "rows_tiny": np.array(1e-30, np.float32),
        "rows_inv127": np.array(1 / 127, np.float32),
        "rows_128": np.array(128, np.float32),
        "rows_127": np.array(127, np.float32),
        ZERO_POINT: np.array(128, np.uint8),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    nodes: list[onnx.NodeProto] = []
    quantized: dict[str, tuple[str, str]] = {}  # activation -> its u8, its row scale
    for node in graph.node:
        name = node.input[1] if node.op_type == "MatMul" else None
        if name not in inits or len(inits[name].dims) != 2:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized:
            made, x_u8, x_scale = _row_quantizer(x)
            nodes += made
            quantized[x] = (x_u8, x_scale)
        q, scale = quantize_columns(array_of(inits[name], weights))
        stored = {f"{name}{SUFFIX}": q, f"{name}{SUFFIX}_scales": scale / np.float32(127)}
        for stored_name, array in stored.items():
            weights[stored_name] = array
            graph.initializer.append(placeholder(stored_name, array))
        x_u8, x_scale = quantized[x]
        nodes.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [x_u8, f"{name}{SUFFIX}", x_scale, f"{name}{SUFFIX}_scales", ZERO_POINT, ZERO_POINT],
                list(node.output),
                name=f"{node.name}{SUFFIX}",
                domain="com.microsoft",
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for name in {
        n.input[1].removesuffix(SUFFIX) for n in nodes if n.op_type == "MatMulIntegerToFloat"
    } - used:
        graph.initializer.remove(inits[name])  # the float weight, now in u8
        weights.pop(name, None)


def embedding_from_head(graph: onnx.GraphProto, weights: Weights) -> None:
    """Replace the token embedding's Gather over its float table by a gather of the token's
    column of the tied lm_head's u8 weight (K, vocab), scaled by that column's scale: the same
    bytes serve both. The float table is dropped."""
    inits = {t.name: t for t in graph.initializer}
    gather = next(
        n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and n.input[1] == "input_ids"
    )
    table = gather.input[0]
    vocab = inits[table].dims[0]
    head = next(
        n for n in graph.node if n.op_type == "MatMulIntegerToFloat" and inits[n.input[1]].dims[1] == vocab
    )
    q, scales = head.input[1], head.input[3]
    p, make = "/embedding/rows", helper.make_node
    nodes = [
        make("Gather", [q, "input_ids"], [f"{p}_cols"], name=f"{p}/Gather", axis=1),  # (K, batch, seq)
        make("Transpose", [f"{p}_cols"], [f"{p}_u8"], name=f"{p}/Transpose", perm=[1, 2, 0]),
        make("Cast", [f"{p}_u8"], [f"{p}_f"], name=f"{p}/Cast", to=TensorProto.FLOAT),
        make("Sub", [f"{p}_f", "rows_128"], [f"{p}_centred"], name=f"{p}/Sub"),
        make("Gather", [scales, "input_ids"], [f"{p}_scale"], name=f"{p}/GatherScale", axis=0),
        make("Mul", [f"{p}_scale", "rows_127"], [f"{p}_scale127"], name=f"{p}/Mul127"),  # see SUFFIX
        make("Unsqueeze", [f"{p}_scale127", "rows_last_axis"], [f"{p}_scale1"], name=f"{p}/Unsqueeze"),
        make("Mul", [f"{p}_centred", f"{p}_scale1"], list(gather.output), name=f"{p}/Mul"),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for node in reversed(nodes):
        graph.node.insert(at, node)
    if not any(table in n.input for n in graph.node):
        graph.initializer.remove(inits[table])
        weights.pop(table, None)


def rows_weight(node: onnx.NodeProto, tensors) -> np.ndarray:
    """The float (K, N) weight a MatMulIntegerToFloat node multiplies by: (u8 - 128) * scale
    (the stored scale times 127: see SUFFIX)."""
    w = tensors[node.input[1]].astype(np.float32)
    w -= 128
    w *= tensors[node.input[3]].astype(np.float32) * np.float32(127)
    return w
