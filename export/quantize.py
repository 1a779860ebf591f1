"""int8 weights for the CPU provider: weight-only, blockwise, through onnxruntime's MatMulNBits.

Why not `quantize_dynamic`: its MatMulInteger + DynamicQuantizeLinear graph was slower than
fp32 here (13.1 vs 10.5 ms/token). MatMulNBits keeps activations in float, stores each weight
matrix as int8 blocks with one scale per block, and with accuracy_level 4 multiplies in int8
with the CPU's VNNI instructions: a decode step reads a quarter of the fp32 weight bytes.

Every weight MatMul is quantized, the tied lm_head included; the token embedding keeps its
float32 table for the Gather (a decode step reads one row of it, so it costs no bandwidth).
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

from gpt2onnx.engine.extras import check_installed, require

log = logging.getLogger(__name__)

BLOCK_SIZE = (
    128  # weights per scale: 128 ran 4.7 ms/step against 5.6 for 32 on the 124M shape, within tolerance
)
ACCURACY_LEVEL = 4  # int8 activations x int8 weights inside the kernel (VNNI on x86)


class QuantizationError(RuntimeError):
    pass


def check_int8_available() -> None:
    """For the start of an int8 export: a missing onnx_ir then fails at once, not after tracing.
    Raises MissingExtraError."""
    check_installed("onnx_ir", "export", "--dtype int8")


def quantize_int8(proto: onnx.ModelProto, n_layer: int) -> onnx.ModelProto:
    """Replace every MatMul with a constant weight by MatMulNBits (8 bits); check that all were."""
    # onnxruntime's quantizer imports onnx_ir, which the [export] extra installs
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "export", "--dtype int8")
    log.info("quantizing weights to int8 (MatMulNBits, block %d)", BLOCK_SIZE)
    quantizer = nbits.MatMulNBitsQuantizer(
        proto,
        bits=8,
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    out = quantizer.model.model
    counts = Counter(node.op_type for node in out.graph.node)
    expected = 4 * n_layer + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per layer, and lm_head
    if counts["MatMulNBits"] != expected:
        raise QuantizationError(
            f"int8 quantization produced {counts['MatMulNBits']} MatMulNBits nodes, expected {expected}; the graph did not have the shape the quantizer expects"
        )
    return out
