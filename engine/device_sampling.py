"""Sampling on the device: a small ONNX graph that turns a step's logits into token ids.

The model's logits stay where the model wrote them (GPU memory on the CUDA provider); this graph
reads them there, and only B token ids (8 bytes a row) cross to the host, plus one uniform draw
per row (8 bytes) going the other way. It picks exactly what `sampling.next_tokens` would pick
for the same draw: temperature, then top-k, top-p and min-p cut-offs, then the inverse CDF over
the vocabulary in token order. A row with temperature 0 is greedy (argmax).

The cut-offs become one threshold per row on the scaled logits, so the graph needs only a TopK
of TOP_K_MAX: top-k is the k-th best value, top-p the last of the best values whose preceding
mass is below p, min-p the best value plus log(min_p). Settings the graph cannot reproduce
exactly stay on the host (see `matches_host`): penalties and logit bias (they need the token
history), top_k > TOP_K_MAX, and top-p without a top-k (its cut-off may lie past TOP_K_MAX).

    logits   float32 (batch, vocab)
    params   float32 (batch, 4)     per row: temperature (0 = greedy), top_k (0 = off), top_p, min_p
    uniform  float64 (batch,)       one U[0, 1) draw per row
  ->
    token    int64   (batch,)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .sampling import SamplingConfig

TOP_K_MAX = 128  # the graph's TopK width: the largest top_k it serves
OPSET = 17
IR_VERSION = 8  # opset 17's IR version: readable by every onnxruntime we support


def matches_host(cfg: SamplingConfig) -> bool:
    """Whether the sampling graph picks exactly what `next_tokens` would for these settings."""
    if cfg.uses_history or cfg.logit_bias or cfg.top_k > TOP_K_MAX:
        return False
    return cfg.greedy or cfg.top_p == 1.0 or cfg.top_k > 0


def row_params(cfg: SamplingConfig, batch: int) -> np.ndarray:
    """(batch, 4) float32: the graph's `params` for one call's settings."""
    temperature = 0.0 if cfg.greedy else (1.0 if cfg.temperature is None else cfg.temperature)
    return np.tile(np.array([temperature, cfg.top_k, cfg.top_p, cfg.min_p], dtype=np.float32), (batch, 1))


CUMSUM_BLOCK = 256


def blocked_cumsum(op, const, x: str, n: int) -> str:
    """Inclusive cumulative sum of float32 (B, n) along axis 1, in float64 (as sampling.sample_from:
    a float32 sum over 50257 tokens drifts enough to move draws), in blocks of CUMSUM_BLOCK:
    onnxruntime's CUDA CumSum makes each element add up everything before it (quadratic in the
    row length, milliseconds over the vocabulary), so sum within blocks, then across block totals.
    The result is padded with zeros to whole blocks (its extra entries equal the total)."""
    blocks = -(-n // CUMSUM_BLOCK)
    padded = op(
        "Pad", [x, const("cumsum_pads", [0, 0, 0, blocks * CUMSUM_BLOCK - n], np.int64)], "cumsum_padded"
    )
    padded = op("Cast", [padded], "cumsum_f64", to=TensorProto.DOUBLE)
    tiles = op(
        "Reshape", [padded, const("cumsum_tiles", [-1, blocks, CUMSUM_BLOCK], np.int64)], "cumsum_tiles_of"
    )  # (B, blocks, block)
    within = op("CumSum", [tiles, const("cumsum_ax2", 2, np.int64)], "cumsum_within")
    sums = op(
        "ReduceSum", [tiles, const("cumsum_axes2", [2], np.int64)], "cumsum_block_sums", keepdims=1
    )  # (B, blocks, 1)
    before = op("CumSum", [sums, const("cumsum_ax1", 1, np.int64)], "cumsum_before", exclusive=1)
    return op(
        "Reshape",
        [op("Add", [within, before], "cumsum_tiled"), const("cumsum_flat", [0, -1], np.int64)],
        "cdf",
    )


def build_sampling_graph(vocab_size: int) -> onnx.ModelProto:
    """The sampling graph for a vocabulary of `vocab_size` (see the module docstring)."""
    k = min(TOP_K_MAX, vocab_size)
    nodes, inits = [], []

    def const(name: str, value, dtype=np.float32) -> str:
        inits.append(onnx.numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def op(kind: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [output], **attrs))
        return output

    # Counts and ranks are float32 (exact below 2**24) and become int64 only as indices: float
    # kernels exist on every provider, so no node of this graph falls back to the CPU.
    def index(x: str) -> str:
        return op("Cast", [x], f"{x}_index", to=TensorProto.INT64)

    neg_inf, one, zero = const("neg_inf", -np.inf), const("one", 1.0), const("zero", 0.0)
    last_rank = const("last_rank", k - 1.0)
    axis1 = const("axis1", [1], np.int64)
    nodes.append(
        helper.make_node("Split", ["params"], ["temperature", "top_k", "top_p", "min_p"], axis=1)
    )  # each (B, 1)
    sampling = op("Greater", ["temperature", zero], "sampling")  # (B, 1): False = greedy row
    scaled = op("Div", ["logits", op("Where", [sampling, "temperature", one], "safe_t")], "scaled")  # (B, V)
    nodes.append(
        helper.make_node("TopK", [scaled, const("k", [k], np.int64)], ["best", "best_idx"], axis=-1)
    )  # (B, k) descending

    # top-k: keep values >= the k-th best (ties included, as in sampling.mask_top_k)
    k_at = index(op("Clip", [op("Sub", ["top_k", one], "k_m1"), zero, last_rank], "k_at"))
    floor_k = op(
        "Where",
        [
            op("Greater", ["top_k", zero], "has_k"),
            op("GatherElements", ["best", k_at], "kth", axis=1),
            neg_inf,
        ],
        "floor_k",
    )
    # top-p among the top-k survivors: the last best value whose higher-ranked mass is below p
    probs_k = op(
        "Softmax",
        [op("Where", [op("GreaterOrEqual", ["best", floor_k], "in_k"), "best", neg_inf], "best_k")],
        "probs_k",
        axis=-1,
    )
    before = op("Sub", [op("CumSum", [probs_k, const("ax1", 1, np.int64)], "cum_k"), probs_k], "before")
    count = op(
        "ReduceSum",
        [op("Cast", [op("Less", [before, "top_p"], "in_p")], "in_p_count", to=TensorProto.FLOAT), axis1],
        "n_p",
        keepdims=1,
    )
    p_at = index(op("Clip", [op("Sub", [count, one], "n_p_m1"), zero, last_rank], "p_at"))
    floor_p = op(
        "Where",
        [op("Less", ["top_p", one], "has_p"), op("GatherElements", ["best", p_at], "pth", axis=1), neg_inf],
        "floor_p",
    )
    # min-p: p >= min_p * p_max  <=>  logit >= best + log(min_p)  (log 0 = -inf: off)
    top = op(
        "Slice", ["best", const("first", [0], np.int64), const("second", [1], np.int64), axis1], "top"
    )  # (B, 1): the best scaled logit
    floor_m = op("Add", [top, op("Log", ["min_p"], "log_min_p")], "floor_m")
    floor = op("Max", [floor_k, floor_p, floor_m], "floor")  # (B, 1)

    # inverse CDF over the vocabulary in token order, as sampling.sample_from
    probs = op(
        "Softmax",
        [op("Where", [op("GreaterOrEqual", [scaled, floor], "kept"), scaled, neg_inf], "masked")],
        "probs",
        axis=-1,
    )
    cdf = blocked_cumsum(op, const, probs, vocab_size)  # (B, padded vocab); padding adds 0
    total = op(
        "Slice", [cdf, const("last", [-1], np.int64), const("end", [1 << 30], np.int64), axis1], "total"
    )
    target = op(
        "Mul", [op("Unsqueeze", ["uniform", axis1], "u"), total], "target"
    )  # float64, as the host's draw
    drawn = op(
        "ReduceSum",
        [op("Cast", [op("Less", [cdf, target], "below")], "below_count", to=TensorProto.FLOAT), axis1],
        "n_below",
        keepdims=0,
    )
    drawn = index(op("Min", [drawn, const("last_token", vocab_size - 1.0)], "drawn"))
    greedy = op("ArgMax", [scaled], "greedy", axis=-1, keepdims=0)
    op("Where", [op("Squeeze", [sampling, axis1], "sampling_row"), drawn, greedy], "token")

    graph = helper.make_graph(
        nodes, "sampling",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab_size]),
         helper.make_tensor_value_info("params", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("uniform", TensorProto.DOUBLE, ["batch"])],
        [helper.make_tensor_value_info("token", TensorProto.INT64, ["batch"])],
        inits,
    )  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="gpt2-onnx",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model
