"""Engine.run_with_cache and the inspection graph (export --inspect): every activation under
TransformerLens's names, against transformers' modules always, and against TransformerLens itself
where .venv-transformer-lens exists (.ci/setup-transformer-lens)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import FIXTURES_DIR, REPO, export_folder, make_varied_model, run_flags
from gpt2onnx.benchmarks.inspect_bench import differences, run_transformer_lens, transformer_lens_python
from gpt2onnx.engine.activations import canonical_names, graph_outputs, sources
from gpt2onnx.engine.contract import InputError, ModelFolderError
from gpt2onnx.engine.engine import Engine


@pytest.fixture(scope="module")
def engine(varied_inspect) -> Engine:
    return Engine.load(varied_inspect, provider="cpu")


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def hf_activations(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """TransformerLens's canonical activations, read off transformers' GPT2LMHeadModel with hooks."""
    acts, hooks = {}, []
    h = model.transformer.h
    C, H = model.config.n_embd, model.config.n_head

    def keep(name, use_input=False):
        def hook(module, args, output=None):
            acts[name] = (args[0] if use_input else output).detach().numpy().copy()

        return hook

    for i, block in enumerate(h):
        p = f"blocks.{i}."
        hooks += [block.ln_1.register_forward_pre_hook(keep(p + "hook_resid_pre", True)),
                  block.ln_1.register_forward_hook(keep(p + "ln1.hook_out")),
                  block.attn.c_attn.register_forward_hook(keep(p + "qkv")),
                  block.attn.c_proj.register_forward_pre_hook(keep(p + "z", True)),
                  block.attn.c_proj.register_forward_hook(keep(p + "hook_attn_out")),
                  block.ln_2.register_forward_pre_hook(keep(p + "hook_resid_mid", True)),
                  block.mlp.c_fc.register_forward_hook(keep(p + "mlp.hook_pre")),
                  block.mlp.act.register_forward_hook(keep(p + "mlp.hook_post")),
                  block.mlp.register_forward_hook(keep(p + "hook_mlp_out"))]  # fmt: skip
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(keep("final_resid", True)))
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_attentions=True)
    for hook in hooks:
        hook.remove()
    B, T = ids.shape
    for i in range(len(h)):
        p = f"blocks.{i}."
        q, k, v = np.split(acts.pop(p + "qkv"), 3, axis=-1)
        acts[p + "attn.hook_q"], acts[p + "attn.hook_k"], acts[p + "attn.hook_v"] = (
            t.reshape(B, T, H, C // H) for t in (q, k, v)
        )
        acts[p + "attn.hook_z"] = acts.pop(p + "z").reshape(B, T, H, C // H)
        acts[p + "attn.hook_pattern"] = out.attentions[i].numpy()
        nxt = f"blocks.{i + 1}.hook_resid_pre"
        acts[p + "hook_resid_post"] = acts[nxt] if i + 1 < len(h) else acts.pop("final_resid")
    acts["logits"] = out.logits.numpy()
    return acts


def test_every_activation_matches_transformers_modules(engine, vocab):
    """Against hooks on transformers' own modules (the varied tiny model: weights x20, so every
    activation is far from zero), at a batch and length no other test uses."""
    model = make_varied_model(vocab)
    ids = np.random.default_rng(11).integers(0, vocab[0], (3, 19))
    want = hf_activations(model, ids)
    logits, cache = engine.run_with_cache(ids)
    assert rel(logits, want.pop("logits")) < 1e-4
    for name, w in want.items():
        assert cache[name].shape == w.shape, name
        assert rel(cache[name], w) < 1e-4, name
    # what transformers does not expose, from what it does: LayerNorm's steps, the masked scores
    for i in range(model.config.n_layer):
        x = want[f"blocks.{i}.hook_resid_pre"]
        centered = x - x.mean(-1, keepdims=True)
        scale = np.sqrt((centered**2).mean(-1, keepdims=True) + model.config.layer_norm_epsilon)
        assert rel(cache[f"blocks.{i}.ln1.hook_scale"], scale) < 1e-4
        assert rel(cache[f"blocks.{i}.ln1.hook_normalized"], centered / scale) < 1e-4
        scores = cache[f"blocks.{i}.attn.hook_attn_scores"]
        q, k = want[f"blocks.{i}.attn.hook_q"], want[f"blocks.{i}.attn.hook_k"]
        expected = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        causal = np.tril(np.ones((19, 19), bool))
        assert rel(np.where(causal, scores, 0), np.where(causal, expected, 0)) < 1e-4
        assert (scores[..., ~causal] == np.finfo(np.float32).min).all()


def test_aliases_are_their_tensors_and_every_name_is_there(engine):
    n_layer = engine.manifest.config.n_layer
    logits, cache = engine.run_with_cache([5, 6, 7, 8])
    assert list(cache) == list(sources(n_layer)) and len(cache) == 13 + 40 * n_layer
    assert set(canonical_names(n_layer)) <= set(cache)
    assert cache["blocks.0.hook_in"] is cache["blocks.0.hook_resid_pre"]
    assert cache["blocks.1.hook_resid_pre"] is cache["blocks.0.hook_resid_post"]
    assert cache["ln_final.hook_in"] is cache[f"blocks.{n_layer - 1}.hook_resid_post"]
    assert cache["blocks.0.attn.o.hook_out"] is cache["blocks.0.hook_attn_out"]
    assert np.array_equal(cache["hook_unembed"], logits)
    np.testing.assert_array_equal(cache["embed.hook_in"], [[5, 6, 7, 8]])
    np.testing.assert_array_equal(cache["pos_embed.hook_in"], [[0, 1, 2, 3]])
    ln = cache["blocks.0.ln1.hook_out"]  # after the gain and bias: what attention reads
    assert ln is cache["blocks.0.attn.q.hook_in"] and not np.allclose(
        ln, cache["blocks.0.ln1.hook_normalized"]
    )
    # TransformerLens's short keys
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["resid_post", -1] is cache[f"blocks.{n_layer - 1}.hook_resid_post"]
    assert cache["scale"] is cache["ln_final.hook_scale"] and cache["embed"] is cache["hook_embed"]
    with pytest.raises(KeyError, match="layer 9"):
        cache["pattern", 9]


def test_logits_equal_the_decode_graphs(engine):
    ids = np.random.default_rng(3).integers(0, engine.vocab_size, (2, 9))
    logits, _ = engine.run_with_cache(ids, names_filter=[])
    assert rel(logits, engine.logits(ids)) < 1e-4


def test_names_filter_takes_transformer_lens_forms(engine):
    ids = [[1, 2, 3], [4, 5, 6]]
    every = engine.run_with_cache(ids)[1]
    one = engine.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")[1]
    assert list(one) == ["blocks.1.attn.hook_pattern"]
    np.testing.assert_array_equal(one["blocks.1.attn.hook_pattern"], every["blocks.1.attn.hook_pattern"])
    two = engine.run_with_cache(ids, names_filter=["hook_embed", "blocks.0.mlp.hook_post"])[1]
    assert list(two) == ["hook_embed", "blocks.0.mlp.hook_post"]
    picked = engine.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))[1]
    assert list(picked) == [f"blocks.{i}.attn.hook_z" for i in range(engine.manifest.config.n_layer)]
    assert len(engine.run_with_cache(ids, names_filter=lambda n: False)[1]) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"names_filter": "blocks.0.attn.hook_patern"}, "did you mean 'blocks.0.attn.hook_pattern'"),
        ({"names_filter": "blocks.7.hook_resid_pre"}, "not an activation of this 2-layer model"),
        ({"names_filter": 3}, "names_filter is int"),
        ({"names_filter": ["hook_embed", 3]}, "names_filter is list"),
        ({"remove_batch_dim": "yes"}, "remove_batch_dim must be a bool"),
    ],
)
def test_bad_arguments_are_named(engine, kwargs, message):
    with pytest.raises(InputError, match=message):
        engine.run_with_cache([1, 2, 3], **kwargs)


@pytest.mark.parametrize(
    "tokens, message",
    [([], "empty"), ([[1, 2], [3]], "different lengths"), ([1, 10**9], "vocabulary"),
     (list(range(129)), "past the model's 128 positions")],
)  # fmt: skip
def test_bad_tokens_are_named(engine, tokens, message):
    with pytest.raises(InputError, match=message):
        engine.run_with_cache(tokens)


def test_tokens_in_every_form(engine):
    text = "Hello there, general"
    ids = engine.to_tokens(text)
    base_logits, base = engine.run_with_cache([ids], names_filter="blocks.0.hook_resid_post")
    for form in (text, ids, np.array(ids), np.array([ids]), torch.tensor([ids])):
        logits, cache = engine.run_with_cache(form, names_filter="blocks.0.hook_resid_post")
        np.testing.assert_array_equal(logits, base_logits)
    squeezed = engine.run_with_cache(ids, names_filter="blocks.0.hook_resid_post", remove_batch_dim=True)[1]
    np.testing.assert_array_equal(squeezed["blocks.0.hook_resid_post"], base["blocks.0.hook_resid_post"][0])
    with pytest.raises(InputError, match="batch of one"):
        engine.run_with_cache([ids, ids], remove_batch_dim=True)
    # a list of texts: right-padded with <|endoftext|>, as TransformerLens's to_tokens pads
    _, padded = engine.run_with_cache([text, "Hi"], names_filter="embed.hook_in")
    short = engine.to_tokens("Hi")
    eos = engine.manifest.config.eos_token_id
    np.testing.assert_array_equal(padded["embed.hook_in"], [ids, short + [eos] * (len(ids) - len(short))])


def test_a_folder_without_inspect_names_the_export_command(tiny_fp32):
    engine = Engine.load(tiny_fp32, provider="cpu")
    with pytest.raises(ModelFolderError, match=r"without --inspect.*gpt2-onnx export --model .* --inspect"):
        engine.run_with_cache([1, 2, 3])


def test_quantized_exports_cannot_inspect(hf_folder, tmp_path):
    with pytest.raises(ValueError, match="--inspect needs float weights"):
        export_folder(hf_folder, tmp_path / "q", dtype="int8", inspect=True)


def test_the_inspection_graph_reads_the_main_graphs_weights(varied_inspect):
    """No second copy on disk: every matrix of inspect.onnx points into model.onnx.data."""
    proto = onnx.load(str(varied_inspect / "inspect.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in t.external_data}["location"] == "model.onnx.data" for t in external
    )
    assert [o.name for o in proto.graph.output] == graph_outputs(2)
    assert sorted(p.name for p in varied_inspect.iterdir() if "data" in p.name) == ["model.onnx.data"]
    assert (varied_inspect / "inspect.onnx").stat().st_size < (
        varied_inspect / "model.onnx.data"
    ).stat().st_size / 4


def test_the_export_check_refuses_a_wrong_activation(varied_inspect, varied_hf_folder):
    from gpt2onnx.engine.runtime import create_session
    from gpt2onnx.export.checkpoint import load_checkpoint
    from gpt2onnx.export.graph import build_module
    from gpt2onnx.export.inspect import check_inspect, expected_activations
    from gpt2onnx.export.verify import ExportCheckError

    ckpt = load_checkpoint(str(varied_hf_folder))
    cases = expected_activations(build_module(ckpt.config, ckpt.state_dict))
    session = create_session(varied_inspect / "inspect.onnx", "cpu", None)[0]
    assert check_inspect(session, cases, "fp32") < 1e-4
    cases[1][1]["blocks.1.mlp.hook_post"][0, 2, 5] += 1.0
    with pytest.raises(ExportCheckError, match="blocks.1.mlp.hook_post differs from PyTorch"):
        check_inspect(session, cases, "fp32")


def test_fp16_inspects_within_fp16s_tolerance(engine, varied_fp16_inspect):
    half = Engine.load(varied_fp16_inspect, provider="cpu")
    ids = np.random.default_rng(5).integers(0, engine.vocab_size, (2, 12))
    _, want = engine.run_with_cache(ids)
    _, got = half.run_with_cache(ids)
    assert got["blocks.0.hook_resid_post"].dtype == np.float16
    for name in canonical_names(2):
        w, g = want[name], got[name]
        if name.endswith("hook_attn_scores"):
            w, g = np.where(w > -1e30, w, 0), np.where(w > -1e30, g, 0)
        assert np.abs(g.astype(np.float64) - w).max() <= 1e-2 + 1e-2 * np.abs(w).max(), name


def test_inspect_command_writes_npz_and_safetensors(engine, varied_inspect, tmp_path, capsys):
    from safetensors.numpy import load_file

    text = "The cat sat"
    _, cache = engine.run_with_cache(text)
    code, err = run_flags(capsys, "inspect", "--model", varied_inspect, "--prompt", text,
                          "--output", tmp_path / "all.npz")  # fmt: skip
    assert code == 0, err
    saved = np.load(tmp_path / "all.npz")
    assert sorted(saved.files) == sorted(cache)
    np.testing.assert_array_equal(saved["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"])
    code, err = run_flags(capsys, "inspect", "--model", varied_inspect, "--prompt", text, "--names",
                          "blocks.*.attn.hook_pattern", "hook_embed", "--output", tmp_path / "p.safetensors")  # fmt: skip
    assert code == 0, err
    loaded = load_file(str(tmp_path / "p.safetensors"))
    assert sorted(loaded) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern", "hook_embed"]
    np.testing.assert_array_equal(loaded["hook_embed"], cache["hook_embed"])


@pytest.mark.parametrize(
    "extra, message",
    [(["--names", "blocks.5.*"], "matches no activation"), (["--output", "x.pt"], "must end in .npz"),
     (["--tokens", "1,x"], "not a comma-separated list")],
)  # fmt: skip
def test_inspect_command_refuses_bad_flags(varied_inspect, tmp_path, capsys, extra, message):
    argv = ["inspect", "--model", varied_inspect, "--output", tmp_path / "c.npz"]
    argv += extra if extra[0] == "--tokens" else ["--prompt", "hi", *extra]
    if extra[0] == "--output":
        argv = ["inspect", "--model", varied_inspect, "--prompt", "hi", "--output", tmp_path / extra[1]]
    code, err = run_flags(capsys, *argv)
    assert code != 0 and message in err
    assert not any(tmp_path.iterdir())  # nothing written, not even a partial file


def test_walkthrough_runs_every_step(varied_inspect, tmp_path):
    picture = tmp_path / "pattern.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "walkthrough.py"), "--model", str(varied_inspect),
         "--picture", str(picture)],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout
    assert "tokens shape: (1, 35)" in out and "logits shape: (1, 35, 50257)" in out
    assert "blocks.0.attn.hook_pattern       (1, 4, 35, 35)" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TL = transformer_lens_python()
needs_tl = pytest.mark.skipif(
    TL is None, reason="TransformerLens is not installed: .ci/setup-transformer-lens"
)


@needs_tl
def test_every_name_matches_transformer_lens(engine, varied_hf_folder, tmp_path):
    ids = np.random.default_rng(21).integers(0, engine.vocab_size, (2, 23))
    run_transformer_lens(TL, varied_hf_folder, ids, tmp_path, out=tmp_path / "tl.npz")
    reference = np.load(tmp_path / "tl.npz")
    logits, cache = engine.run_with_cache(ids)
    assert sorted(reference.files) == sorted([*cache, "logits"])
    worst = differences(logits, cache, reference)
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: kv[1])[-3:]


@needs_tl
@pytest.mark.skipif(not (FIXTURES_DIR / "pydocs-gpt2-4l").is_dir(), reason="../shared/fixtures is absent")
def test_trained_model_matches_transformer_lens_on_real_text(tmp_path):
    """Real weights (the trained fixture: peaked logits, large residual channels) on held-out text."""
    src = FIXTURES_DIR / "pydocs-gpt2-4l"
    engine = Engine.load(export_folder(src, tmp_path / "m", inspect=True), provider="cpu")
    text = (src / "heldout.txt").read_text(encoding="utf-8")[:2000]
    ids = np.array([engine.to_tokens(text)[:100], engine.to_tokens(text[1000:])[:100]])
    run_transformer_lens(TL, src, ids, tmp_path, names=canonical_names(4), out=tmp_path / "tl.npz")
    logits, cache = engine.run_with_cache(ids, names_filter=canonical_names(4))
    worst = differences(logits, cache, np.load(tmp_path / "tl.npz"), only=[*canonical_names(4), "logits"])
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: kv[1])[-3:]
