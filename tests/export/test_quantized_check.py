"""The export check of quantized graphs (export/verify.py, QUANTIZED_BOUNDS): healthy int8 and int4
exports pass at any weight scale, a corrupted one is refused with a message that says why."""

from __future__ import annotations

import onnx
import pytest
import torch

from conftest import SHARED_TOKENIZER, export_folder, make_hf_model, save_hf_folder
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.export import graph as graph_module
from gpt2onnx.export.verify import ExportCheckError

FIXTURE = SHARED_TOKENIZER.parent / "fixtures" / "pydocs-gpt2-4l"
SMALL = dict(n_layer=4, n_head=4, n_embd=128, n_positions=128)
KERNELS = {"int8": {}, "int8-blocks": {"int8_kernel": "blocks"}, "int4": {}}  # export options beside dtype


def scaled_folder(vocab, tokenizer_dir, folder, scale: float, seed: int = 7, **dims):
    """transformers' own initialization (no extra biases), every 2-D weight multiplied by `scale`:
    larger weights, larger activations, as in a trained model."""
    model = make_hf_model(vocab, seed=seed, **dims)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return save_hf_folder(model, folder, tokenizer_dir)


HEALTHY = [(kind, scale) for kind in ("int8", "int4") for scale in (1.0, 3.0, 5.0)] + [("int8-blocks", 3.0)]


@pytest.mark.parametrize("kind, scale", HEALTHY)
def test_healthy_quantized_exports_pass_at_every_weight_scale(vocab, tokenizer_dir, tmp_path, kind, scale):
    src = scaled_folder(vocab, tokenizer_dir, tmp_path / "hf", scale, **SMALL)
    for kv in ("concat", "shared"):
        options = dict(dtype=kind[:4], kv_cache=kv, **KERNELS[kind])
        check = read_manifest(export_folder(src, tmp_path / kv, **options)).check
        assert check["rel_logits"] is not None, check  # top-1 may flip at near-ties (weights x1: most)
        assert check["weight_steps"] <= 1.0 and check["stored_rel_logits"] < 0.1, check


@pytest.mark.slow
def test_the_124m_shape_with_weights_x3_exports_in_int8(vocab, tokenizer_dir, tmp_path):
    """The case that failed with an absolute bound on the cache ('present 8 differ by 0.39')."""
    src = scaled_folder(vocab, tokenizer_dir, tmp_path / "hf", 3.0, n_layer=12, n_head=12, n_embd=768)
    check = read_manifest(export_folder(src, tmp_path / "int8", dtype="int8")).check
    assert check["rel_logits"] < 0.25 and check["rel_present"] < 0.2, check


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="needs ../shared/fixtures (the trained models)")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_the_trained_fixture_passes_with_room(tmp_path, dtype):
    check = read_manifest(export_folder(FIXTURE, tmp_path / dtype, dtype=dtype)).check
    assert check["rel_logits"] < {"int8": 0.1, "int4": 0.4}[dtype], check


def corrupting(monkeypatch, corrupt) -> None:
    """The exporter's quantize step, followed by `corrupt(proto, weights)`: a fault the check
    must catch (the weights' bytes are kept beside the graph until written: export/weights.py)."""
    real = graph_module.quantize

    def quantize(proto, weights, *args):
        proto = real(proto, weights, *args)
        corrupt(proto, weights)
        return proto

    monkeypatch.setattr(graph_module, "quantize", quantize)


# the quantized MatMuls: op -> (its weight's input, its scales' input)
QUANTIZED_OPS = {"MatMulNBits": (1, 2), "MatMulIntegerToFloat": (1, 3)}


def quantized_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type in QUANTIZED_OPS]


def scale_one_block(proto: onnx.ModelProto, weights: dict) -> None:
    """One block (one column, per-row int8) of the first layer's first quantized weight reads 20x
    too large: a bad scale."""
    node = quantized_nodes(proto)[0]
    name = node.input[QUANTIZED_OPS[node.op_type][1]]
    weights[name] = weights[name].copy()
    weights[name].flat[0] *= 20.0


def swap_two_layers(proto: onnx.ModelProto, weights: dict) -> None:
    """Layer 0's and layer 1's first quantized weights (with their scales) trade places."""
    nodes = quantized_nodes(proto)
    first, second = nodes[:: len(nodes) // 4][:2]
    for i in QUANTIZED_OPS[first.op_type]:
        a, b = first.input[i], second.input[i]
        weights[a], weights[b] = weights[b], weights[a]


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("corrupt", [scale_one_block, swap_two_layers], ids=["one-block", "layers-swapped"])
def test_a_corrupted_quantized_export_is_refused(vocab, tokenizer_dir, tmp_path, monkeypatch, kind, corrupt):
    src = scaled_folder(vocab, tokenizer_dir, tmp_path / "hf", 3.0, **SMALL)
    corrupting(monkeypatch, corrupt)
    with pytest.raises(
        ExportCheckError,
        match="quantized weights are corrupt|do not compute what the checkpoint does|top-1 token differs",
    ) as info:
        export_folder(src, tmp_path / "out", dtype=kind[:4], **KERNELS[kind])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing half-written is left
