"""int8 "rows" weights multiplied as signed bytes where that is exact and faster: CPUs with VNNI.

An int8 export stores each weight as u8 with zero point 128 (export/int8_rows.py), because
without VNNI, MLAS adds u8 x s8 products in pairs in 16 bits and full-range weights overflow
them. With VNNI (vpdpbusd) u8 x s8 sums in 32 bits, exactly, and runs faster than u8 x u8 (one
768 x 3072 weight, 1 thread, AVX-512 VNNI: 51 / 170 / 492 us at 1 / 16 / 64 rows against
68 / 309 / 962). The same integers as s8 are the u8 bytes minus 128 with zero point 0, so the
products and every output are the same, bit for bit.

So at load, where `signed_is_exact` finds u8 x s8 equal to u8 x u8 on this CPU (a probe of
full-range values that overflows the 16-bit path), the session runs `signed_graph`: each
MatMulIntegerToFloat reads an s8 twin of its weight (the bytes XOR 0x80, made here and handed to
onnxruntime as an in-memory file; the model folder is not touched) with zero point 0. The token
embedding keeps gathering the u8 bytes, so the tied head is held twice (u8 for the Gather, s8 for
the product: 27 MB more at the 124M shape).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .device_sampling import IR_VERSION

log = logging.getLogger(__name__)

S8_ZERO = "rows_s8_zero_point"
SIGNED_FILE = "signed-int8.in-memory"  # the name the graph's s8 weights point into (never on disk)
ALIGN = 64  # bytes between the twins' starts
PROBE_K = 512  # long enough for saturated 16-bit pair sums to show on a CPU without VNNI


def signed_graph(model: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """The graph of `model` (an int8 "rows" export) with every MatMulIntegerToFloat's u8 weight
    replaced by its s8 twin, and the files its external data is in: the twins' bytes, one buffer
    (SIGNED_FILE), and the model's own data file, mapped; the session copies them at creation.
    Of the u8 weights only the tied head's is still read (by the token embedding's Gather)."""
    proto = onnx.load(str(model), load_external_data=False)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), S8_ZERO))
    weights = list(dict.fromkeys(n.input[1] for n in graph.node if n.op_type == "MatMulIntegerToFloat"))
    offsets, total = {}, 0
    for weight in weights:
        offsets[weight] = total
        total += -(-int(np.prod(inits[weight].dims)) // ALIGN) * ALIGN
    signed = np.empty(total, np.uint8)  # the twins, one after another: the in-memory file
    for weight in weights:
        u8 = numpy_helper.to_array(inits[weight], base_dir=str(model.parent))
        at = offsets[weight]
        np.bitwise_xor(u8.reshape(-1), np.uint8(0x80), out=signed[at : at + u8.size])  # u8 - 128 as s8
        twin = onnx.TensorProto(name=f"{weight}_s8", data_type=TensorProto.INT8, dims=u8.shape)
        twin.data_location = TensorProto.EXTERNAL
        for key, value in (("location", SIGNED_FILE), ("offset", at), ("length", u8.size)):
            twin.external_data.add(key=key, value=str(value))
        graph.initializer.append(twin)
    for node in graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            node.input[1], node.input[5] = f"{node.input[1]}_s8", S8_ZERO
    used = {name for n in graph.node for name in n.input}
    for weight in weights:
        if weight not in used:  # read by no one now: onnxruntime need not load it
            graph.initializer.remove(inits[weight])
    files = {SIGNED_FILE: signed}
    # onnxruntime takes every external file from memory once one is: the model's own, mapped
    for t in graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            name = next(e.value for e in t.external_data if e.key == "location")
            if name not in files:
                files[name] = np.memmap(model.parent / name, dtype=np.uint8, mode="r")
    return proto.SerializeToString(), files


@functools.cache
def signed_is_exact() -> bool:
    """Whether onnxruntime's u8 x s8 MatMulIntegerToFloat gives u8 x u8's results, bit for bit,
    on this CPU: full-range activations against full-range weights, at 1 and 16 rows."""
    rng = np.random.default_rng(0)
    weight = rng.integers(1, 256, (PROBE_K, 64), dtype=np.uint8)
    scales = np.full(64, 0.01, np.float32)
    inits = [
        numpy_helper.from_array(weight, "w_u8"),
        numpy_helper.from_array((weight.astype(np.int16) - 128).astype(np.int8), "w_s8"),
        numpy_helper.from_array(scales, "w_scales"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp_u8"),
        numpy_helper.from_array(np.array(0, np.int8), "zp_s8"),
    ]
    make = helper.make_node
    nodes = [
        make("MatMulIntegerToFloat", ["a", "w_u8", "a_scale", "w_scales", "zp_u8", "zp_u8"], ["unsigned"],
             domain="com.microsoft"),
        make("MatMulIntegerToFloat", ["a", "w_s8", "a_scale", "w_scales", "zp_u8", "zp_s8"], ["signed"],
             domain="com.microsoft"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "signed_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["rows", PROBE_K]),
         helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", 64]) for n in ("unsigned", "signed")],
        inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for rows in (1, 16):
            a = rng.integers(0, 256, (rows, PROBE_K), dtype=np.uint8)
            unsigned, signed = session.run(None, {"a": a, "a_scale": np.array(0.02, np.float32)})
            if not np.array_equal(unsigned, signed):
                return False
    except Exception as e:  # onnxruntime raises its own untyped errors: keep the u8 path
        log.debug("the u8 x s8 probe failed (%s): int8 weights stay u8", e)
        return False
    return True
