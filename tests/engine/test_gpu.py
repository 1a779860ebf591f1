"""The CUDA provider: fp16 parity, CUDA graphs and the sampling graph on the GPU.

Skipped without an NVIDIA GPU and onnxruntime-gpu's CUDA provider (.ci/gpu-run runs them on a
GPU machine). Every test first checks that the session really is on CUDA: a run that quietly
fell back to the CPU proves nothing.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import export_folder, hf_cache_arrays, make_hf_model, make_varied_model, save_hf_folder
from gpt2onnx.engine.clock import Clock
from gpt2onnx.engine.device_sampling import build_sampling_graph, row_params
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.runtime import cuda_device_count
from gpt2onnx.engine.sampling import SamplingConfig, next_tokens
from gpt2onnx.export.verify import TOLERANCES, top1_agreement

HAVE_CUDA = cuda_device_count() > 0 and "CUDAExecutionProvider" in ort.get_available_providers()
if os.environ.get("GPT2_ONNX_REQUIRE_GPU") and not HAVE_CUDA:  # .ci/gpu-run: a skip there would prove nothing
    raise RuntimeError(
        f"GPT2_ONNX_REQUIRE_GPU is set but no CUDA provider is usable (GPUs: {cuda_device_count()}, providers: {ort.get_available_providers()})"
    )
pytestmark = pytest.mark.skipif(
    not HAVE_CUDA, reason="needs an NVIDIA GPU and onnxruntime-gpu (see .ci/gpu-run)"
)

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "a",
    "Once upon a time, in a land far away, there lived",
]


def on_cuda(engine: Engine) -> Engine:
    assert (
        engine.device == "cuda" and engine.session.ort_session.get_providers()[0] == "CUDAExecutionProvider"
    )
    return engine


@pytest.fixture(scope="module")
def hf_model(vocab):
    """GPT-2's head size (64), so the GPU picks the attention kernels the real model gets."""
    return make_hf_model(vocab, n_embd=128, n_head=2)


@pytest.fixture(scope="module")
def tiny_fp16_shared(hf_model, tokenizer_dir, tmp_path_factory):
    folder = save_hf_folder(hf_model, tmp_path_factory.mktemp("hf") / "head64", tokenizer_dir)
    return export_folder(
        folder, tmp_path_factory.mktemp("export") / "head64-fp16-shared", dtype="fp16", kv_cache="shared"
    )


@pytest.fixture(scope="module")
def graphs(tiny_fp16_shared):
    """The GPU default: fp16, shared cache, CUDA graphs, device sampling."""
    engine = on_cuda(Engine.load(tiny_fp16_shared, provider="cuda", max_batch=8))
    assert engine.session.graphs.on["decode"], (
        "onnxruntime refused to capture the decode graph (a node fell back to the CPU?)"
    )
    assert engine.session.graphs.on["sampling"], "onnxruntime refused to capture the sampling graph"
    return engine


@pytest.fixture(scope="module")
def eager(tiny_fp16_shared):
    """The same model on CUDA without graphs or device sampling."""
    return on_cuda(
        Engine.load(tiny_fp16_shared, provider="cuda", max_batch=8, cuda_graphs=False, device_sampling=False)
    )


# -- the cache itself, on weights whose greedy tokens change with their inputs ---------------------


@pytest.fixture(scope="module")
def varied_hf(vocab):
    """Head size 64, weights scaled 8x (as much as fp16's export check allows at this size), so
    greedy tokens change from step to step and prompt to prompt: a stale input or a misplaced
    cache row changes them."""
    return make_varied_model(vocab, scale=8.0, n_embd=128, n_head=2)


@pytest.fixture(scope="module")
def varied_folders(varied_hf, tokenizer_dir, tmp_path_factory):
    hf = save_hf_folder(varied_hf, tmp_path_factory.mktemp("hf") / "varied", tokenizer_dir)
    out = tmp_path_factory.mktemp("export")
    return {
        kv: export_folder(hf, out / f"varied-fp16-{kv}", dtype="fp16", kv_cache=kv)
        for kv in ("shared", "concat")
    }


CACHE_PATHS = {  # id -> (layout, cuda_graphs)
    "shared-graphs": ("shared", True),
    "shared-eager": ("shared", False),
    "concat": ("concat", None),
}


@pytest.mark.parametrize("path", CACHE_PATHS)
def test_every_cached_token_is_the_argmax_of_a_recompute_without_cache(varied_folders, path):
    """Each greedy token made through the cache is the argmax of a pass over the prompt and the
    tokens before it with no cache at all (engine.logits), or within fp16's tolerance of it (a
    near-tie): for a ragged batch, one prompt alone, and back-to-back one-token calls."""
    layout, graphs = CACHE_PATHS[path]
    engine = on_cuda(Engine.load(varied_folders[layout], provider="cuda", max_batch=8, cuda_graphs=graphs))
    assert engine.session.cuda_graphs == bool(graphs), engine.session.graphs.fallback
    tol = TOLERANCES["fp16"]
    exact = total = 0
    calls = [(PROMPTS, 12), (PROMPTS[3:], 12), *[([p], 1) for p in ("one two", "six ten", "red fox")]]
    for prompts, n in calls:
        result = engine.generate(prompts, max_new_tokens=n, ignore_eos=True)
        for prompt, completion in zip(prompts, result.completions):
            ids, made = engine.to_tokens(prompt), completion.token_ids
            assert len(made) == n
            for t, token in enumerate(made):
                logits = engine.logits(ids + made[:t])[0, -1].astype(np.float64)
                best = int(logits.argmax())
                gap = logits[best] - logits[token]
                assert gap <= tol.atol + tol.rtol * np.abs(logits).max(), (
                    f"{path}: {prompt!r} token {t} is {token}, a recompute says {best} "
                    f"(logit gap {gap:.3g}); made {made}"
                )
                exact, total = exact + (token == best), total + 1
    assert exact >= 0.95 * total, f"{path}: only {exact} of {total} tokens are the recompute's argmax"


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_each_row_of_the_shared_cache_holds_its_own_keys_and_values(varied_hf, varied_folders, graphs):
    """Read back from the GPU after a ragged prefill and 5 decode steps: row r holds, at positions
    0 .. length - 1, the keys and values transformers computes for that row's tokens alone (so
    each step wrote its token at the row's own length, in the row's own slot)."""
    engine = on_cuda(Engine.load(varied_folders["shared"], provider="cuda", max_batch=4, cuda_graphs=graphs))
    session = engine.session
    prompts = [engine.to_tokens(p) for p in PROMPTS]
    session.start(len(prompts), 64, Clock())
    for row, prompt in enumerate(prompts):  # logits=True: the logits come to the host, for the checks
        session.admit(row, prompt, SamplingConfig(), logits=True)
    rows = [list(p) for p in prompts]
    tokens = session.prefill(prompts)
    for _ in range(5):
        for row, token in zip(rows, tokens):
            row.append(int(token))
        tokens = session.decode(np.asarray(tokens, dtype=np.int64))
    got = [value.numpy() for value in session.cache.kv.values[0]]  # key_0, value_0, ...: (B, H, S, D)
    for r, row in enumerate(rows):
        with torch.no_grad():
            want = hf_cache_arrays(varied_hf(torch.tensor([row]), use_cache=True).past_key_values)
        assert session.cache.row_lengths.lengths[r] == len(row)
        for i, w in enumerate(want):  # (1, H, len(row), D)
            g = got[i][r, :, : len(row)].astype(np.float32)
            err = np.abs(g - w[0]).max()
            assert err <= 1e-2 * np.abs(w).max() + 1e-2, (
                f"row {r} ({len(row)} tokens), cache tensor {i}: max |Δ| {err:.3g} against transformers; "
                f"worst position {np.unravel_index(np.abs(g - w[0]).argmax(), g.shape)[1]}"
            )


def test_fp16_on_cuda_matches_transformers_fp32(graphs, hf_model):
    ids = [graphs.to_tokens(p) for p in PROMPTS]
    for row in ids:
        got = graphs.logits(row)[0]
        with torch.no_grad():
            want = hf_model(torch.tensor([row])).logits[0].numpy()
        tol = TOLERANCES["fp16"]
        limit = tol.atol + tol.rtol * np.abs(want).max()
        assert np.abs(got - want).max() <= limit, (
            f"max |Δ logits| {np.abs(got - want).max():.3g} > {limit:.3g}"
        )
        agree, n = top1_agreement(got, want, limit)  # raises on a disagreement that is not a near-tie
        assert agree >= 0.9 * n


def test_cuda_graph_replays_give_the_eager_tokens(graphs, eager):
    """Buckets 4, 1, 4 again, 8, each called twice: a replay gives exactly the tokens of the call
    that captured the graph, and the eager session's tokens (fp16 kernels of other shapes may
    round near-ties differently, so 95% of them)."""
    for prompts in (PROMPTS, PROMPTS[:1], PROMPTS[1:4], PROMPTS + PROMPTS):
        got = [c.token_ids for c in graphs.generate(prompts, max_new_tokens=16).completions]
        assert type(graphs.session.picker).__name__ == "ArgmaxPicker"
        assert [c.token_ids for c in graphs.generate(prompts, max_new_tokens=16).completions] == got, (
            f"batch {len(prompts)}: a replay differs"
        )
        want = [c.token_ids for c in eager.generate(prompts, max_new_tokens=16).completions]
        pairs = [(a, b) for g, w in zip(got, want) for a, b in zip(g, w)]
        assert np.mean([a == b for a, b in pairs]) >= 0.95, (
            f"batch {len(prompts)} (bucket {graphs.session.cache.rows}): {got} vs {want}"
        )


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 20, "seed": 1},
        {"temperature": 0.8, "seed": 2},
        {"top_k": 50, "top_p": 0.9, "min_p": 0.05, "seed": 3},
    ],
)
def test_sampling_graph_on_cuda_agrees_with_the_host(varied_folders, settings):
    """Same seed, same draws; the logits differ only by kernel rounding, so nearly every token
    agrees. On the clear-margin weights: on the tiny model's near-uniform logits a top-p or min-p
    boundary among 50 near-equal tokens moves with any rounding (78% there on an H200), and a
    row that differs once differs from then on."""
    folder = varied_folders["shared"]
    graphs = on_cuda(Engine.load(folder, provider="cuda", max_batch=8))
    eager = on_cuda(
        Engine.load(folder, provider="cuda", max_batch=8, cuda_graphs=False, device_sampling=False)
    )
    got = graphs.generate(PROMPTS, max_new_tokens=16, **settings)
    assert type(graphs.session.picker).__name__ == "DeviceSamplingPicker"
    want = eager.generate(PROMPTS, max_new_tokens=16, **settings)
    pairs = [
        (a, b) for g, w in zip(got.completions, want.completions) for a, b in zip(g.token_ids, w.token_ids)
    ]
    assert np.mean([a == b for a, b in pairs]) >= 0.9, (
        [c.token_ids for c in got.completions],
        [c.token_ids for c in want.completions],
    )


def test_sampling_graph_alone_on_cuda():
    """The sampling graph on CUDA with the host's draws picks the host's tokens (a parallel
    cumulative sum may move a draw that sits on a boundary: allow 1 in 200)."""
    vocab = 50257
    session = ort.InferenceSession(
        build_sampling_graph(vocab).SerializeToString(), providers=["CUDAExecutionProvider"]
    )
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    gen, same, total = np.random.default_rng(0), 0, 0
    for cfg in (
        SamplingConfig(),
        SamplingConfig(top_k=40),
        SamplingConfig(temperature=0.7),
        SamplingConfig(top_k=100, top_p=0.8, min_p=0.02),
    ):
        for _ in range(20):
            logits = (gen.standard_normal((8, vocab)) * 3).astype(np.float32)
            seed = int(gen.integers(1 << 30))
            host = next_tokens(logits, cfg, np.random.default_rng(seed))
            (device,) = session.run(
                None,
                {
                    "logits": logits,
                    "params": row_params(cfg, 8),
                    "uniform": np.random.default_rng(seed).random(8),
                },
            )
            same, total = same + int((device == host).sum()), total + 8
    assert same >= total - total // 200, f"{total - same} of {total} draws differ"


def test_kv_cache_stays_on_the_gpu(graphs):
    graphs.generate(PROMPTS[:2], max_new_tokens=4)
    session = graphs.session
    assert all(v.device_name().lower() == "cuda" for kv_set in session.cache.kv.values for v in kv_set)
    assert all(v.device_name().lower() == "cuda" for v in session.cache.outputs.dev.values())


def test_graphs_were_captured_without_a_fallback(graphs):
    """A capture that failed at its first run falls back to eager steps (cuda_graphs.py): on
    the GPU it must not have happened, or the figures measured are not the graphs' figures."""
    graphs.generate(PROMPTS, max_new_tokens=4)
    on = graphs.session.graphs.on
    assert on["decode"] and on["sampling"], graphs.session.graphs.fallback
    assert graphs.session.graphs.fallback is None


def test_a_process_that_never_imports_torch_starts_the_cuda_provider(tiny_fp16_shared):
    """The CLI and the benchmark workers do not import torch, which would have loaded cuBLAS and
    cuDNN: the engine finds them itself (cuda_libs.py), and runs a cuDNN-using step."""
    import subprocess
    import sys

    code = (
        "import sys; from gpt2onnx.engine.engine import Engine; "
        f"e = Engine.load({str(tiny_fp16_shared)!r}, provider='cuda'); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert e.session.ort_session.get_providers()[0] == 'CUDAExecutionProvider'; "
        "print(e.generate(['Hello', 'a'], max_new_tokens=4).completions[0].token_ids, e.session.graphs.fallback)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("None"), run.stdout


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_run_with_cache_on_cuda_matches_the_cpu(varied_hf, tokenizer_dir, dtype, tmp_path):
    """The inspection graph on the CUDA provider: every canonical activation within the dtype's
    tolerance of the CPU's fp32 run (masked scores: the same fill)."""
    from gpt2onnx.engine.activations import canonical_names

    hf = save_hf_folder(varied_hf, tmp_path / "hf", tokenizer_dir)
    cuda = Engine.load(export_folder(hf, tmp_path / dtype, dtype=dtype, inspect=True), provider="cuda")
    assert cuda.inspector.session().get_providers()[0] == "CUDAExecutionProvider"
    reference = Engine.load(export_folder(hf, tmp_path / "cpu", inspect=True), provider="cpu")
    ids = np.random.default_rng(2).integers(0, cuda.vocab_size, (3, 21))
    _, got = cuda.run_with_cache(ids)
    _, want = reference.run_with_cache(ids)
    tol = TOLERANCES[dtype]
    for name in canonical_names(cuda.manifest.config.n_layer):
        g, w = got[name].astype(np.float64), want[name].astype(np.float64)
        if name.endswith("hook_attn_scores"):
            g, w = np.where(w > -1e30, g, 0), np.where(w > -1e30, w, 0)
        assert np.abs(g - w).max() <= tol.atol + tol.rtol * np.abs(w).max(), name
