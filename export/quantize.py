"""int8 and int4 weights for the CPU provider: weight-only, blockwise, through onnxruntime's
MatMulNBits (layouts chosen by measurement: LAYOUTS).

Why not `quantize_dynamic`: its MatMulInteger + DynamicQuantizeLinear graph was slower than
fp32 here (13.1 vs 10.5 ms/token). MatMulNBits keeps activations in float, stores each weight
matrix as 8- or 4-bit blocks with one scale (and for int4 a zero point) per block, and with
accuracy_level 4 multiplies in int8: a decode step reads a quarter (an eighth) of the fp32
weight bytes.

Every weight MatMul is quantized, the tied lm_head included; the token embedding keeps its
float32 table for the Gather (a decode step reads one row of it, so it costs no bandwidth).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx

from gpt2onnx.engine.extras import check_installed, require

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
    proto: onnx.ModelProto, n_layer: int, dtype: str, layout: Layout | None = None
) -> onnx.ModelProto:
    """Replace every MatMul with a constant weight, the tied lm_head included, by MatMulNBits in
    `layout` (LAYOUTS[dtype]); check that all were."""
    proto = _quantize(proto, layout or LAYOUTS[dtype], dtype)
    counts = Counter(node.op_type for node in proto.graph.node)
    expected = 4 * n_layer + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per layer, and lm_head
    if counts["MatMulNBits"] != expected:
        raise QuantizationError(
            f"{dtype} quantization produced {counts['MatMulNBits']} MatMulNBits nodes, expected {expected}; "
            "the graph did not have the shape the quantizer expects"
        )
    return proto


def _quantize(proto: onnx.ModelProto, layout: Layout, dtype: str) -> onnx.ModelProto:
    # onnxruntime's quantizer imports onnx_ir, which the [export] extra installs
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "export", f"--dtype {dtype}")
    log.info("quantizing weights to %s (%d-bit MatMulNBits, block %d, %s)", dtype, layout.bits, layout.block,
             "symmetric" if layout.symmetric else "with zero points")  # fmt: skip
    quantizer = nbits.MatMulNBitsQuantizer(
        proto,
        bits=layout.bits,
        block_size=layout.block,
        is_symmetric=layout.symmetric,
        accuracy_level=ACCURACY_LEVEL,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model
