"""Weights kept out of the graph's protobuf (export/weights.py): the traced graph holds no weight
bytes, the data file is written a tensor at a time and read back, a damaged file is caught, and
the export lets its copies go before the check loads the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import export_folder
from gpt2onnx.engine.contract import GPT2Config
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.export import exporter
from gpt2onnx.export.checkpoint import random_state_dict
from gpt2onnx.export.graph import build_module, trace
from gpt2onnx.export.model import GPT2
from gpt2onnx.export.weights import ALIGN, WeightsWriteError, check_written, is_placeholder, write

SMALL = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=32)


def traced(dtype: str = "fp32", kv_cache: str = "concat"):
    return trace(build_module(SMALL, random_state_dict(SMALL, 0), dtype), dtype, True, kv_cache)


@pytest.mark.parametrize("dtype, kv_cache", [("fp32", "concat"), ("fp16", "shared"), ("int4", "concat")])
def test_the_traced_graph_holds_no_weight_bytes(dtype, kv_cache):
    proto, weights = traced(dtype, kv_cache)
    matrices = [t for t in proto.graph.initializer if len(t.dims) >= 2]  # weights, blocks, scales
    assert matrices and all(is_placeholder(t) and not t.raw_data for t in matrices)
    assert {t.name for t in matrices} == set(weights)
    assert proto.ByteSize() < 200_000  # the graph and the vectors (biases, gains) alone


def test_external_data_is_written_aligned_and_read_back_equal(tmp_path):
    proto, weights = traced()
    write(proto, weights, tmp_path / "model.onnx", "model.onnx.data")
    check_written(proto, weights, tmp_path)
    loaded = onnx.load(str(tmp_path / "model.onnx"))  # onnx's own reader finds the same values
    for tensor in loaded.graph.initializer:
        if tensor.name in weights:
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(weights) and all(o % ALIGN == 0 for o in offsets)


def test_a_damaged_data_file_is_refused(tmp_path):
    proto, weights = traced()
    write(proto, weights, tmp_path / "model.onnx", "model.onnx.data")
    data = tmp_path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF
    data.write_bytes(raw)
    with pytest.raises(WeightsWriteError, match="does not hold the bytes written"):
        check_written(proto, weights, tmp_path)
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsWriteError, match="cut short|does not hold"):
        check_written(proto, weights, tmp_path)


def test_inline_write_leaves_placeholders_behind(tmp_path):
    proto, weights = traced()
    write(proto, weights, tmp_path / "model.onnx", None)
    assert all(is_placeholder(t) for t in proto.graph.initializer if t.name in weights)
    loaded = onnx.load(str(tmp_path / "model.onnx"))
    name = next(iter(weights))
    got = next(numpy_helper.to_array(t) for t in loaded.graph.initializer if t.name == name)
    np.testing.assert_array_equal(got, weights[name])


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_the_check_runs_after_the_export_let_its_weights_go(hf_folder, tmp_path, monkeypatch, dtype):
    """The check's onnxruntime session is the only copy of the weights when it loads: no PyTorch
    module of ours nor the checkpoint's state dict is alive then (the reference's outputs are
    computed beforehand)."""
    alive = []
    real = exporter._check

    def check(folder, manifest, expected):
        import gc

        gc.collect()
        alive.extend(
            o for o in gc.get_objects() if isinstance(o, GPT2) or (isinstance(o, dict) and "wte_t" in o)
        )
        return real(folder, manifest, expected)

    monkeypatch.setattr(exporter, "_check", check)
    out = export_folder(hf_folder, tmp_path / dtype, dtype=dtype, external_data_threshold=1000)
    assert read_manifest(out).external_data == "model.onnx.data"
    assert alive == []
