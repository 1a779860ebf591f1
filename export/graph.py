"""Tracing our GPT-2 module into an ONNX file with the graph contract's names and dynamic dims."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from gpt2onnx.engine.contract import GPT2Config, input_names, output_names, past_names, present_names

from .model import GPT2

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a single op from opset 17
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}  # int8: traced in fp32, then quantized
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GiB limit, less headroom for the graph itself


def build_module(config: GPT2Config, state_dict: dict[str, torch.Tensor], dtype: str = "fp32") -> GPT2:
    model = GPT2(config)
    model.load_state_dict(state_dict, assign=True)
    return model.to(TORCH_DTYPES[dtype]).eval()


def dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "logits": {0: "batch", 1: "kept"},
    }
    axes |= {name: {0: "batch", 2: "past_seq"} for name in past_names(n_layer)}
    axes |= {name: {0: "batch", 2: "total_seq"} for name in present_names(n_layer)}
    return axes


def example_inputs(config: GPT2Config, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Inputs used only to trace; batch 2, seq 3, past 4 so no dim is 0 or 1 (tracing specialises those)."""
    B, T, P = 2, 3, 4
    return (
        torch.zeros(B, T, dtype=torch.long),
        torch.arange(P, P + T).repeat(B, 1),
        torch.ones(B, P + T, dtype=torch.long),
        torch.tensor(T),
        *[torch.zeros(B, config.n_head, P, config.head_dim, dtype=dtype) for _ in range(2 * config.n_layer)],
    )


def export_graph(model: GPT2, dtype: str, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, optimize: bool = False) -> str | None:
    """Write `path` (and `path`.data when the weights pass the threshold). Returns the external data file name.
    optimize: fused attention (MultiHeadAttention) and onnxruntime's fusions, with their counts checked."""
    n_layer = model.config.n_layer
    scratch = path.parent / "trace"
    scratch.mkdir()
    model.fuse_attention(optimize)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices are not for our users
        torch.onnx.export(
            model,
            example_inputs(model.config, TORCH_DTYPES[dtype]),
            str(scratch / "model.onnx"),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names(n_layer),
            output_names=output_names(n_layer),
            dynamic_axes=dynamic_axes(n_layer),
            do_constant_folding=True,
            custom_opsets={"com.microsoft": 1},
        )
    model.fuse_attention(False)
    proto = onnx.load(str(scratch / "model.onnx"))  # also pulls in any external data the tracer wrote
    if optimize:
        from .fusion import fuse

        proto = fuse(proto, model.config)
    if dtype == "int8":
        from .quantize import quantize_int8

        proto = quantize_int8(proto, n_layer)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = f"{path.name}.data" if weight_bytes > external_data_threshold else None
    log.info("writing %s (%.1f MB of weights%s)", path.name, weight_bytes / 1e6, f", external data in {external}" if external else "")
    onnx.save_model(proto, str(path), save_as_external_data=bool(external), all_tensors_to_one_file=True, location=external, size_threshold=1024)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return external
