"""Tracing our GPT-2 module into an ONNX file with the graph contract's names and dynamic dims."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from gpt2onnx.engine.contract import (
    CACHE_DIMS,
    STEP_INPUTS,
    GPT2Config,
    input_names,
    output_names,
    past_names,
    present_names,
)

from .fusion import fuse
from .model import GPT2, SharedCacheGraph
from .quantize import QUANTIZED, quantize
from .weights import Weights, check_written, parameters_to_placeholders, weight_bytes, write

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a single op from opset 17
TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.float32,
    "int4": torch.float32,
}  # int8: traced in fp32, then quantized
# Weights past this many bytes go to an external data file, written a tensor at a time; under it
# (test models) they are inline, in one model file. Every GPT-2 size is past it: a model file
# with its weights inline costs copies of them to write and to load, and protobuf stops at 2 GiB.
EXTERNAL_DATA_THRESHOLD = 2**26


def build_module(config: GPT2Config, state_dict: dict[str, torch.Tensor], dtype: str = "fp32") -> GPT2:
    model = GPT2(config)
    model.load_state_dict(state_dict, assign=True)
    return model.to(TORCH_DTYPES[dtype]).eval()


def dynamic_axes(n_layer: int, kv_cache: str) -> dict[str, dict[int, str]]:
    """Symbolic dims of every input and output, from the contract's table."""
    axes = {
        name: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
        for name, (_, dims) in STEP_INPUTS[kv_cache].items()
    }
    axes["logits"] = {0: "batch", 1: "kept"}
    if kv_cache == "shared":
        axes["next_token"] = {0: "batch", 1: "kept"}
    past_dim, present_dim = CACHE_DIMS[kv_cache]
    axes |= {name: {0: "batch", 2: past_dim} for name in past_names(n_layer)}
    axes |= {name: {0: "batch", 2: present_dim} for name in present_names(n_layer)}
    return axes


def example_inputs(config: GPT2Config, dtype: torch.dtype, kv_cache: str) -> tuple[torch.Tensor, ...]:
    """Inputs used only to trace; no dim is 0 or 1 (tracing specialises those)."""
    B, T, P = 2, 3, 4
    if kv_cache == "shared":
        M = 8  # buffer capacity
        step = (
            torch.zeros(B, T, dtype=torch.long),
            torch.arange(T).repeat(B, 1),
            torch.full((B,), T - 1, dtype=torch.int32),
            torch.tensor(T, dtype=torch.int32),
            torch.tensor([[0, T - 1]] * B),
        )
    else:
        M = P
        step = (
            torch.zeros(B, T, dtype=torch.long),
            torch.arange(P, P + T).repeat(B, 1),
            torch.ones(B, P + T, dtype=torch.long),
            torch.tensor(T),
        )
    return (
        *step,
        *[torch.zeros(B, config.n_head, M, config.head_dim, dtype=dtype) for _ in range(2 * config.n_layer)],
    )


def trace(
    model: GPT2, dtype: str, optimize: bool = False, kv_cache: str = "concat", int8_kernel: str = "rows"
) -> tuple[onnx.ModelProto, Weights]:
    """The graph of `model` with placeholder weights (export/weights.py): traced without its
    parameters, fused when `optimize` (the shared cache needs it: ExportConfig refuses
    kv_cache="shared" without it), quantized for int8/int4. Returns the graph and the weights'
    arrays (views of `model`'s parameters where they are written as they are)."""
    n_layer = model.config.n_layer
    model.use_attention("gqa" if kv_cache == "shared" else "mha" if optimize else "plain")
    if dtype in QUANTIZED:
        model.untie_embedding()  # the lm_head quantized, the Gather's table 8-bit (quantize.embedding_from_8bit)
    traced = SharedCacheGraph(model) if kv_cache == "shared" else model
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter's deprecation notices are not for our users
        torch.onnx.export(
            traced,
            example_inputs(model.config, TORCH_DTYPES[dtype], kv_cache),
            buffer,
            dynamo=False,
            export_params=False,  # the parameters become inputs: no copy of the weights in the protobuf
            opset_version=OPSET,
            input_names=input_names(n_layer, kv_cache),
            output_names=output_names(n_layer, kv_cache),
            dynamic_axes=dynamic_axes(n_layer, kv_cache),
            do_constant_folding=True,
            custom_opsets={"com.microsoft": 1},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    weights = parameters_to_placeholders(proto, traced)
    model.use_attention("plain")
    model.wte = None  # tied again: the module is left as it came (`weights` keeps the untied table)
    if optimize:
        proto = fuse(proto, model.config, kv_cache)
    if dtype in QUANTIZED:
        proto = quantize(proto, weights, n_layer, dtype, int8_kernel)
    return proto, weights


def export_graph(
    model: GPT2,
    dtype: str,
    path: Path,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    optimize: bool = False,
    kv_cache: str = "concat",
    int8_kernel: str = "rows",
) -> tuple[str | None, onnx.ModelProto, Weights]:
    """Write `path` (and `path`.data when the weights pass the threshold). Returns the external
    data file's name (None: one file), and the written graph with its weights' arrays (the
    external ones read back and found equal: weights.check_written)."""
    proto, weights = trace(model, dtype, optimize, kv_cache, int8_kernel)
    size = weight_bytes(proto, weights)
    external = f"{path.name}.data" if size > external_data_threshold else None
    log.info("writing %s (%.1f MB of weights%s)", path.name, size / 1e6,
             f", external data in {external}" if external else "")  # fmt: skip
    write(proto, weights, path, external)
    if external:
        check_written(proto, weights, path.parent)
    return external, proto, weights
