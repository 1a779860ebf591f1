"""int8 with activations quantized per row (export/int8_rows.py, the default int8 kernel): the
graph it writes, the weights it stores, and the one property it exists for: a request's tokens
and log-probabilities are the same alone and in any batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.export.int8_rows import quantize_columns

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "a b",
    "Once upon a time, in a land far away, there lived a king who had",
    "1 2 3 4 5 6 7 8 9",
    "What is",
]


def test_columns_round_trip_within_half_a_step():
    w = np.random.default_rng(0).normal(0, 0.1, (64, 5)).astype(np.float32)
    w[:, 3] = 0  # an all-zero column
    q, scale = quantize_columns(w)
    assert q.dtype == np.uint8 and scale.shape == (5,) and q[:, 3].tolist() == [128] * 64
    assert q.min() >= 1 and q.max() <= 255  # symmetric: -127..127 around 128
    back = (q.astype(np.float32) - 128) * scale
    assert np.abs(back - w).max() <= scale.max() / 2 + 1e-7


def test_every_weight_matmul_is_per_row_and_the_head_is_the_token_table(tiny_int8):
    manifest = read_manifest(tiny_int8)
    c = manifest.config
    proto = onnx.load(str(tiny_int8 / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert manifest.int8_kernel == "rows" and "MatMulNBits" not in ops and "MatMul" not in ops
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(matmuls) == 4 * c.n_layer + 1
    made = {out: n for n in proto.graph.node for out in n.output}
    for node in matmuls:
        weight, scales = inits[node.input[1]], inits[node.input[3]]
        assert weight.data_type == onnx.TensorProto.UINT8 and list(scales.dims) == [weight.dims[1]]
        guard = made[node.input[2]]  # the activation's scale: max |x| over each row, kept above 0
        reduce = made[guard.input[0]]
        assert guard.op_type == "Max" and reduce.op_type == "ReduceMax"
        assert [a.ints for a in reduce.attribute if a.name == "axes"] == [[-1]], "per row, not per tensor"
    head = next(n for n in matmuls if inits[n.input[1]].dims[1] == c.vocab_size)
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and "input_ids" in n.input]
    assert sorted(g.input[0] for g in gathers) == sorted([head.input[1], head.input[3]])
    table = c.vocab_size * c.n_embd
    assert [t.name for t in inits.values() if np.prod(t.dims) == table] == [head.input[1]], "one table"


@pytest.fixture(scope="module")
def engines(varied_int8_shared):
    return (
        Engine.load(varied_int8_shared, provider="cpu", max_batch=1),
        Engine.load(varied_int8_shared, provider="cpu", max_batch=len(PROMPTS)),
    )


def tokens_and_logprobs(engine: Engine, prompts: list[str]) -> list[tuple[list[int], list[float]]]:
    handles = [engine.submit(p, max_new_tokens=10, ignore_eos=True, logprobs=0) for p in prompts]
    return [([t for piece in h for t in piece.token_ids], [x for piece in h for x in piece.token_logprobs])
            for h in [list(h) for h in handles]]  # fmt: skip


def test_a_request_gets_the_same_tokens_and_logprobs_alone_and_in_a_batch(engines):
    """Bit for bit: each row's activations have their own scale, so the other rows change nothing."""
    one, many = engines
    together = tokens_and_logprobs(many, PROMPTS)
    assert len({tuple(tokens) for tokens, _ in together}) > 1, "the model must say different things"
    for prompt, got in zip(PROMPTS, together):
        assert got == tokens_and_logprobs(one, [prompt])[0], prompt


def test_int8_kernel_is_refused_for_other_dtypes():
    from gpt2onnx.export.exporter import ExportConfig

    with pytest.raises(ValueError, match="--int8-kernel 'cols' is not supported; choose one of rows, blocks"):
        ExportConfig(output="x", random_init="gpt2", dtype="int8", int8_kernel="cols")
