"""Fused graph for a fast runtime: attention comes out of tracing as one MultiHeadAttention op per
layer (GroupQueryAttention for the shared cache; export/model.py), then onnxruntime's transformer
optimizer fuses residual adds with LayerNorm (SkipLayerNormalization) and the GELU (FastGelu for
GPT-2's tanh GELU, Gelu for erf).

The counts are asserted: a fusion that silently fails would leave a slower graph that still
passes parity, so it must fail the export instead.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

from gpt2onnx.engine.contract import GPT2Config, UserError

log = logging.getLogger(__name__)


class FusionError(UserError, RuntimeError):
    pass


def expected_fusions(config: GPT2Config, kv_cache: str = "concat") -> dict[str, int]:
    gelu = "FastGelu" if config.activation == "gelu_tanh" else "Gelu"
    attention = "GroupQueryAttention" if kv_cache == "shared" else "MultiHeadAttention"
    # ln_1 of layer 0 fuses the embedding add; every other LayerNorm follows a residual add.
    return {attention: config.n_layer, "SkipLayerNormalization": 2 * config.n_layer + 1, gelu: config.n_layer}


def fuse(proto: onnx.ModelProto, config: GPT2Config, kv_cache: str = "concat") -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    log.info("fusing LayerNorm and GELU with onnxruntime's transformer optimizer")
    model = optimize_model(
        proto, model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd, opt_level=0
    )
    counts = Counter(node.op_type for node in model.model.graph.node)
    missing = {op: (n, counts[op]) for op, n in expected_fusions(config, kv_cache).items() if counts[op] != n}
    if missing:
        detail = ", ".join(f"{op} {got} (expected {n})" for op, (n, got) in missing.items())
        fix = (
            "export with --kv-cache concat --no-optimize"
            if kv_cache == "shared"
            else "export with --no-optimize"
        )
        raise FusionError(f"graph fusion came out wrong: {detail}; {fix} to get the unfused graph")
    return model.model
