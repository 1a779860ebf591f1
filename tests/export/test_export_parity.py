"""The exported graph against transformers' GPT2LMHeadModel with the same random weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import export_folder, hf_cache_arrays, hf_forward, left_padded, make_hf_model, save_hf_folder
from gpt2onnx.engine.contract import input_names, past_names
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.export.quantize import quantize_rows_8bit
from gpt2onnx.export.verify import TOLERANCES, top1_agreement

VARIANTS = ["fp32", "fp32_plain", "fp16", "int8"]  # fixture tiny_<variant>; the dtype is the part before "_"


def session(folder):
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def run_graph(sess, config, ids, mask, positions, past=None, keep=None, dtype=np.float32):
    B = ids.shape[0]
    if past is None:
        past = [np.zeros((B, config.n_head, 0, config.head_dim), dtype) for _ in past_names(config.n_layer)]
    feeds = dict(
        zip(
            input_names(config.n_layer),
            [ids, positions, mask, np.array(keep or ids.shape[1], np.int64), *past],
        )
    )
    out = sess.run(None, feeds)
    return out[0], out[1:]


def assert_close(got, want, tol, what, valid=None):
    """Tolerance from the one table; on failure say the max difference, where, and whether top-1 agrees."""
    got = got.astype(np.float32)
    diff = np.abs(got - want)
    if valid is not None:
        diff = np.where(valid, diff, 0.0)
    limit = tol.atol + tol.rtol * float(np.abs(want).max())
    if diff.max() > limit:
        where = np.unravel_index(diff.argmax(), diff.shape)
        top1 = (
            ""
            if got.ndim < 3
            else f"; top-1 there {'agrees' if got[where[:-1]].argmax() == want[where[:-1]].argmax() else 'DIFFERS'}"
        )
        pytest.fail(f"{what}: max |Δ| {diff.max():.3g} > {limit:.3g} at {tuple(int(i) for i in where)}{top1}")


# (prompt lengths per row, past_len, new tokens): random-ish shapes with past 0, left padding, batch > 1.
SHAPES = [
    ([1], 0, 1),
    ([9], 0, 9),
    ([3, 7, 5], 0, 7),
    ([4], 6, 3),
    ([2, 6], 6, 1),
    ([5, 1, 3, 8], 8, 4),
    ([12, 12], 12, 5),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lengths,past_len,new", SHAPES)
def test_logits_and_presents_match_transformers(request, hf_model, variant, lengths, past_len, new):
    """Prefix through the cache, then `new` more tokens; every real position must match."""
    folder = request.getfixturevalue(f"tiny_{variant}")
    dtype = variant.split("_")[0]
    config, sess = read_manifest(folder).config, session(folder)
    tol, np_dtype = TOLERANCES[dtype], np.float16 if dtype == "fp16" else np.float32
    gen = np.random.default_rng(sum(lengths) * 31 + past_len + new)
    full = [n + new for n in lengths] if past_len else lengths
    ids, mask, positions = left_padded(full, gen, config.vocab_size)
    split = ids.shape[1] - (new if past_len else ids.shape[1])

    past, hf_cache = None, None
    if past_len:
        _, past = run_graph(
            sess, config, ids[:, :split], mask[:, :split], positions[:, :split], dtype=np_dtype
        )
        _, hf_cache = hf_forward(hf_model, ids[:, :split], mask[:, :split], positions[:, :split])
    logits, presents = run_graph(
        sess, config, ids[:, split:], mask, positions[:, split:], past, dtype=np_dtype
    )
    want_logits, hf_cache = hf_forward(hf_model, ids[:, split:], mask, positions[:, split:], hf_cache)

    real_query = mask[:, split:, None].astype(bool)  # padded query rows attend to nothing; ignore them
    assert_close(logits, want_logits, tol, f"logits {dtype}", real_query)
    real_slot = mask[:, None, :, None].astype(bool)
    for name, got, want in zip(past_names(config.n_layer), presents, hf_cache_arrays(hf_cache)):
        assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
        assert_close(got, want, tol, f"{name} {dtype}", real_slot)
    real = mask[:, split:].astype(bool)
    limit = tol.atol + tol.rtol * float(np.abs(want_logits).max())
    top1_agreement(logits[real].astype(np.float32), want_logits[real], limit)  # raises on a real disagreement


def test_last_position_logits_equal_full_logits_tail(tiny_fp32):
    config, sess = read_manifest(tiny_fp32).config, session(tiny_fp32)
    ids, mask, positions = left_padded([6, 3], np.random.default_rng(1), config.vocab_size)
    full, _ = run_graph(sess, config, ids, mask, positions)
    last, _ = run_graph(sess, config, ids, mask, positions, keep=1)
    two, _ = run_graph(sess, config, ids, mask, positions, keep=2)
    assert full.shape == (2, 6, config.vocab_size) and last.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
    np.testing.assert_allclose(two, full[:, -2:], atol=1e-5)


def test_cache_equivalence_one_pass_vs_token_by_token(tiny_fp32):
    config, sess = read_manifest(tiny_fp32).config, session(tiny_fp32)
    ids, mask, positions = left_padded([10, 7], np.random.default_rng(2), config.vocab_size)
    one_pass, _ = run_graph(sess, config, ids, mask, positions)
    past, steps = None, []
    for t in range(ids.shape[1]):
        logits, past = run_graph(
            sess, config, ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], past
        )
        steps.append(logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[real], one_pass[real], atol=1e-4, rtol=1e-4)


MIN_TOP1 = {"fp16": 0.98, "int8": 0.9, "int4": 0.7}  # on random weights, whose logits are nearly tied


@pytest.mark.parametrize("variant", ["fp16", "int8", "int4", "fp16_shared", "int8_shared", "int4_shared"])
def test_reduced_precision_parity_figures_against_fp32(request, variant, hf_model):
    """fp16, int8 and int4, on both cache layouts, through the engine: top-1 agreement and max |Δ logits|
    against transformers' fp32 over many positions (printed; run with -s to see them)."""
    from gpt2onnx.engine.engine import Engine

    dtype = variant.split("_")[0]
    engine = Engine.load(request.getfixturevalue(f"tiny_{variant}"), provider="cpu")
    ids = np.random.default_rng(9).integers(0, hf_model.config.vocab_size, (4, 40))
    logits = engine.logits(ids).astype(np.float32)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids)).logits.numpy()
    max_abs = float(np.abs(logits - want).max())
    agree = float((logits.argmax(-1) == want.argmax(-1)).mean())
    print(
        f"{variant} vs fp32: max |Δ logits| {max_abs:.4f}, top-1 agreement {agree:.2%} over {ids.size} positions"
    )
    tol = TOLERANCES[dtype]
    assert max_abs <= tol.atol + tol.rtol * float(np.abs(want).max())
    assert agree >= MIN_TOP1[dtype]
    assert max_abs > 0, "a reduced-precision graph that matches fp32 exactly did not reduce anything"


def test_optimized_graph_has_the_fused_ops(tiny_fp32, tiny_fp16, tiny_fp32_plain, tiny_int8, tiny_shared):
    from collections import Counter

    from gpt2onnx.export.fusion import expected_fusions

    config = read_manifest(tiny_fp32).config
    for folder in (tiny_fp32, tiny_fp16, tiny_int8, tiny_shared):
        counts = Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)
        assert all(
            counts[op] == n for op, n in expected_fusions(config, read_manifest(folder).kv_cache).items()
        ), (folder.name, counts)
        assert read_manifest(folder).optimized
    plain = Counter(n.op_type for n in onnx.load(str(tiny_fp32_plain / "model.onnx")).graph.node)
    assert (
        not any(op in plain for op in expected_fusions(config))
        and not read_manifest(tiny_fp32_plain).optimized
    )
    shared = Counter(n.op_type for n in onnx.load(str(tiny_shared / "model.onnx")).graph.node)
    assert shared["Split"] == 0, "GroupQueryAttention takes c_attn's packed output, no Split per layer"
    int8 = Counter(n.op_type for n in onnx.load(str(tiny_int8 / "model.onnx")).graph.node)
    assert int8["MatMulIntegerToFloat"] == 4 * config.n_layer + 1 and int8["MatMul"] == 0


def test_tied_embedding_stored_once(tiny_fp32):
    config = read_manifest(tiny_fp32).config
    proto = onnx.load(str(tiny_fp32 / "model.onnx"))
    big = [t.name for t in proto.graph.initializer if np.prod(t.dims) == config.vocab_size * config.n_embd]
    assert len(big) == 1, f"wte / lm_head stored {len(big)} times: {big}"


def embedding_nodes(folder) -> tuple[list, dict]:
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type in ("Gather", "GatherBlockQuantized", "Reshape")
            and "input_ids" in n.input or n.name == "/embedding/Reshape"], inits  # fmt: skip


def test_int4_gathers_tokens_from_an_8bit_table_and_keeps_no_float_one(tiny_int4):
    """An 8-bit copy of the token table in blocks of 32 (tiny: width 32); no float one is left."""
    folder = tiny_int4
    c = read_manifest(folder).config
    nodes, inits = embedding_nodes(folder)
    (gather,) = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    attrs = {a.name: a.i for a in gather.attribute}
    assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": 32, "bits": 8}
    table = inits[gather.input[0]]
    assert table.data_type == onnx.TensorProto.UINT8 and list(table.dims) == [c.vocab_size, c.n_embd]
    assert not [t.name for t in inits.values()
                if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) == c.vocab_size * c.n_embd]  # fmt: skip


def test_int8_blocks_with_a_head_in_whole_blocks_gathers_from_the_head_itself(vocab, tokenizer_dir, tmp_path):
    """--int8-kernel blocks, width 128 fills the head's blocks: the Gather reads the head's own
    bytes, reshaped."""
    model = make_hf_model(vocab, n_embd=128)
    out = export_folder(
        save_hf_folder(model, tmp_path / "hf", tokenizer_dir),
        tmp_path / "int8",
        dtype="int8",
        int8_kernel="blocks",
    )
    assert read_manifest(out).int8_kernel == "blocks"
    nodes, inits = embedding_nodes(out)
    reshape, gather = (
        next(n for n in nodes if n.op_type == op) for op in ("Reshape", "GatherBlockQuantized")
    )
    head = next(n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
                and any(a.name == "N" and a.i == vocab[0] for a in n.attribute))  # fmt: skip
    assert reshape.input[0] == head.input[1] and gather.input[0] == reshape.output[0]
    assert gather.input[2] == head.input[2], "the head's scales too"
    assert not [t for t in inits.values() if t.data_type == onnx.TensorProto.UINT8
                and list(t.dims) == [vocab[0], 128]], "no second 8-bit table"  # fmt: skip


def test_8bit_rows_round_trip_within_half_a_step():
    gen = np.random.default_rng(0)
    table = gen.normal(0, 0.1, (5, 64)).astype(np.float32)
    table[2, :32] = 0  # an all-zero block
    q, scale = quantize_rows_8bit(table, 32)
    assert q.dtype == np.uint8 and scale.shape == (5, 2) and q[2, :32].tolist() == [128] * 32
    back = (q.astype(np.float32).reshape(5, 2, 32) - 128) * scale[..., None]
    assert np.abs(back.reshape(5, 64) - table).max() <= scale.max() / 2 + 1e-7


def test_fp16_stays_finite_at_real_activation_scales(vocab, tokenizer_dir, tmp_path):
    """Real GPT-2 has residual channels in the thousands and sharp attention; fp16 must survive both."""
    model = make_hf_model(vocab, seed=3)
    with torch.no_grad():
        model.transformer.wpe.weight[:, 5] = (
            3000.0  # a massive-activation channel, as in GPT-2's residual stream
        )
        model.transformer.h[0].attn.c_attn.weight.mul_(20.0)  # attention logits in the hundreds
    folder = save_hf_folder(model, tmp_path / "loud", tokenizer_dir)
    out = export_folder(
        folder, tmp_path / "loud-fp16", dtype="fp16"
    )  # the export check itself compares with fp32
    config, sess = read_manifest(out).config, session(out)
    ids, mask, positions = left_padded([9, 4], np.random.default_rng(4), config.vocab_size)
    logits, presents = run_graph(sess, config, ids, mask, positions, dtype=np.float16)
    want, _ = hf_forward(model, ids, mask, positions)
    assert np.isfinite(logits).all() and all(np.isfinite(p).all() for p in presents)
    assert_close(
        logits, want, TOLERANCES["fp16"], "fp16 logits at large activations", mask[:, :, None].astype(bool)
    )


def test_pytorch_model_bin_and_external_data(hf_model, tokenizer_dir, tmp_path):
    """The .bin checkpoint format, and external data (forced by a tiny threshold) load and agree."""
    folder = save_hf_folder(hf_model, tmp_path / "bin", tokenizer_dir, bin_format=True)
    out = export_folder(folder, tmp_path / "ext", external_data_threshold=1000)
    manifest = read_manifest(out)
    assert manifest.external_data == "model.onnx.data" and (out / "model.onnx.data").is_file()
    assert (out / "model.onnx").stat().st_size < 200_000, "weights should live in the external data file"
    ids, mask, positions = left_padded([5], np.random.default_rng(5), manifest.config.vocab_size)
    logits, _ = run_graph(session(out), manifest.config, ids, mask, positions)
    want, _ = hf_forward(hf_model, ids, mask, positions)
    assert_close(logits, want, TOLERANCES["fp32"], "logits via external data")
    assert manifest.source.weights_sha256 and len(manifest.source.weights_sha256) == 64


@pytest.mark.slow
def test_export_124m_shape_random_init(tokenizer_dir, vocab, tmp_path):
    if vocab[0] != 50257:
        pytest.skip(
            "the 124M shape needs the real GPT-2 tokenizer (../shared/gpt2-tokenizer) for its 50257 vocabulary"
        )
    out = export_folder(None, tmp_path / "gpt2-random", random_init="124m", seed=7, tokenizer=tokenizer_dir)
    manifest = read_manifest(out)
    c = manifest.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions) == (12, 12, 768, 50257, 1024)
    assert manifest.source.random_init and manifest.source.seed == 7
    assert manifest.check["top1_agreement"] == 1.0 and manifest.check["max_abs_logits"] < 1e-3
    assert manifest.external_data == "model.onnx.data"  # every GPT-2 size: export/graph.py
    graph, data = ((out / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))
    assert graph < 1e6 and 0.95 * c.n_params * 4 < data < 1.05 * c.n_params * 4, (graph, data, c.n_params)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_shared_cache_exports_in_every_dtype(hf_folder, tmp_path, dtype):
    """The export check itself runs the shared cache (ragged batch, decode steps) against PyTorch."""
    out = export_folder(hf_folder, tmp_path / f"shared-{dtype}", dtype=dtype, kv_cache="shared")
    manifest = read_manifest(out)
    assert manifest.kv_cache == "shared" and manifest.dtype == dtype and manifest.check["positions"] > 0
    assert list(manifest.io["inputs"])[:5] == [
        "input_ids",
        "position_ids",
        "seqlens_k",
        "total_sequence_length",
        "logits_index",
    ]


def test_shared_cache_needs_the_fused_graph(hf_folder, tmp_path):
    with pytest.raises(ValueError, match="drop --no-optimize"):
        export_folder(hf_folder, tmp_path / "x", kv_cache="shared", optimize=False)
