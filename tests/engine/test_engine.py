"""The engine against transformers' generate, its cache handling, and its API contract."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from gpt2onnx.engine.clock import Clock
from gpt2onnx.engine.contract import ModelFolderError
from gpt2onnx.engine.cuda_graphs import CudaGraphCache
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.pickers import ArgmaxPicker, DeviceSamplingPicker, HostPicker
from gpt2onnx.engine.runtime import ProviderError, cuda_device_count
from gpt2onnx.engine.sampling import SamplingConfig

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "a",
    "Once upon a time, in a land far away, there lived",
]


@pytest.fixture(scope="module", params=["concat", "shared", "cuda-graphs"])
def engine(request):
    """Every engine test runs on the concat cache, on the shared cache, and on the shared cache
    with fixed decode shapes (what CUDA graphs capture; no capture on the CPU)."""
    folder = request.getfixturevalue("tiny_fp32" if request.param == "concat" else "tiny_shared")
    return Engine.load(folder, provider="cpu", max_batch=4, cuda_graphs=request.param == "cuda-graphs")


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate on one unpadded prompt: the reference."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=hf_model.config.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_greedy_batch_matches_transformers_token_for_token(engine, hf_model, prepend_bos):
    result = engine.generate(PROMPTS, max_new_tokens=12, prepend_bos=prepend_bos)
    for prompt, c in zip(PROMPTS, result.completions):
        assert c.prompt_token_ids == engine.to_tokens(prompt, prepend_bos)
        want = hf_greedy(hf_model, c.prompt_token_ids, 12)
        assert c.token_ids == want[: len(c.token_ids)], f"{prompt!r}: {c.token_ids} vs transformers {want}"
        assert c.finish_reason == "length" and len(c.token_ids) == 12 or c.finish_reason == "eos"


def test_greedy_matches_transformers_on_the_unfused_graph(tiny_fp32_plain, hf_model):
    plain = Engine.load(tiny_fp32_plain, provider="cpu")
    for prompt, c in zip(PROMPTS, plain.generate(PROMPTS, max_new_tokens=10).completions):
        assert c.token_ids == hf_greedy(hf_model, c.prompt_token_ids, 10), prompt


def test_token_id_prompts(engine):
    ids = engine.to_tokens(PROMPTS[1])
    by_ids = engine.generate([ids], max_new_tokens=5).completions[0]
    assert (
        by_ids.prompt_token_ids == ids
        and by_ids.token_ids == engine.generate(PROMPTS[1], max_new_tokens=5).completions[0].token_ids
    )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[10**7]], max_new_tokens=2)


def test_every_row_gives_what_it_gives_alone(engine):
    batch = engine.generate(PROMPTS, max_new_tokens=8).completions
    for prompt, c in zip(PROMPTS, batch):
        alone = engine.generate(prompt, max_new_tokens=8).completions[0]
        assert c.token_ids == alone.token_ids and c.text == alone.text


def test_more_prompts_than_max_batch_run_in_turns(engine):
    small = Engine.load(engine.folder, provider="cpu", max_batch=2)
    assert [c.token_ids for c in small.generate(PROMPTS, max_new_tokens=5).completions] == [
        c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=5).completions
    ]


def test_streaming_equals_non_streaming(engine):
    for prompt in PROMPTS[:2]:
        pieces = list(engine.stream(prompt, max_new_tokens=15, top_k=20, seed=3))
        assert (
            "".join(pieces)
            == engine.generate(prompt, max_new_tokens=15, top_k=20, seed=3).completions[0].text
        )


def test_rows_stop_one_by_one(engine, vocab):
    base = engine.generate(PROMPTS[:2], max_new_tokens=10).completions
    stop = engine.to_string(base[0].token_ids[3:5])  # text that row 0 produces at its 4th-5th token
    stopped = engine.generate(PROMPTS[:2], max_new_tokens=10, stop=[stop]).completions
    assert stopped[0].finish_reason == "stop" and stop not in stopped[0].text
    assert base[0].text.startswith(stopped[0].text) and len(stopped[0].token_ids) <= 5
    if stop not in base[1].text:
        assert stopped[1].token_ids == base[1].token_ids and stopped[1].finish_reason == "length"
    eos = engine.manifest.config.eos_token_id
    forced = engine.generate(PROMPTS[:2], max_new_tokens=10, logit_bias={eos: 1e4}).completions
    assert all(c.token_ids == [eos] and c.text == "" and c.finish_reason == "eos" for c in forced)


def test_stop_string_is_not_streamed_before_it_completes(engine):
    base = engine.generate(PROMPTS[1], max_new_tokens=10).completions[0]
    stop = base.text[len(base.text) // 2 :][:6]
    if not stop:
        pytest.skip("completion too short")
    pieces = list(engine.stream(PROMPTS[1], max_new_tokens=10, stop=stop))
    assert (
        stop not in "".join(pieces)
        and "".join(pieces) == engine.generate(PROMPTS[1], max_new_tokens=10, stop=stop).completions[0].text
    )


class CountingBinding:
    """Wraps an IOBinding and counts the bind calls made through it."""

    def __init__(self, io):
        self.io, self.calls = io, []

    def __getattr__(self, name):
        attr = getattr(self.io, name)
        if name.startswith("bind"):
            return lambda *a, **k: (self.calls.append((name, a[0])), attr(*a, **k))[1]
        return attr


def test_kv_cache_lives_in_the_preallocated_buffers(engine):
    """No cache copies: every step's presents are written into the buffers allocated once
    (two alternating sets for the concat cache; the one set, in place, for the shared cache),
    and a second call of the same size allocates nothing."""
    engine.generate(PROMPTS, max_new_tokens=4)
    session, pointers = engine.session, engine.session.kv_pointers
    c = engine.manifest.config
    prompts = [[1, 2], [4]]
    session.start(2, 8, Clock())
    for row, prompt in enumerate(prompts):
        session.admit(row, prompt, SamplingConfig(), logits=True)
    session.prefill(prompts)
    session.binding.io = counting = CountingBinding(session.binding.io)
    for step in range(4):
        if step == 1:
            counting.calls.clear()  # the first decode step rebinds ids and positions: (B, 2) -> (B, 1)
        session.decode(np.array([5, 6]))
        outputs = session.binding.io.get_outputs()  # presents: the (batch, head, seq, dim) ones
        presents = [v for v in outputs if len(v.shape()) == 4]
        written = [v.data_ptr() for v in presents]
        if engine.manifest.kv_cache == "shared":
            assert written == pointers[0], f"step {step}: presents were not written in place"
            assert presents[-1].shape()[2] == session.cache.kv.cap_seq
        else:
            assert written == pointers[step % 2], (
                f"step {step}: presents were not written into the preallocated set"
            )
            assert presents[-1].shape() == [2, c.n_head, 3 + step, c.head_dim]
    cache_binds = [name for _, name in counting.calls if name.startswith(("past", "present"))]
    if engine.manifest.kv_cache == "shared":
        assert counting.calls == [], f"decode steps rebound {counting.calls[:4]}..."
    else:
        assert len(cache_binds) == 3 * 2 * 2 * c.n_layer  # pasts and presents, every step
    session.binding.io = counting.io
    engine.generate(PROMPTS, max_new_tokens=4)
    assert engine.session.kv_pointers == pointers, "buffers were reallocated for a call that fits"


def test_decode_matches_full_recompute(engine):
    """The cached decode gives the same next-token logits as recomputing the whole sequence."""
    c = engine.generate(PROMPTS[1], max_new_tokens=6).completions[0]
    full = engine.logits(c.prompt_token_ids + c.token_ids[:-1])[0]
    assert full[len(c.prompt_token_ids) - 1 :].argmax(-1).tolist() == c.token_ids


def test_score_matches_transformers(engine, hf_model):
    text = "The quick brown fox jumps over the lazy dog"
    s = engine.score(text)
    with torch.no_grad():
        logits = hf_model(torch.tensor([s.tokens])).logits[0]
    want = (
        torch.log_softmax(logits.double(), -1)[:-1]
        .gather(1, torch.tensor(s.tokens[1:])[:, None])[:, 0]
        .numpy()
    )
    np.testing.assert_allclose(s.logprobs, want, atol=1e-4)
    assert s.perplexity == pytest.approx(float(np.exp(-want.mean())), rel=1e-4)
    assert len(s.str_tokens) == len(s.tokens) and engine.logits(s.tokens).shape == (
        1,
        len(s.tokens),
        engine.manifest.config.vocab_size,
    )


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=11)
    b = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=11)
    c = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=12)
    assert [x.token_ids for x in a.completions] == [x.token_ids for x in b.completions]
    assert [x.token_ids for x in a.completions] != [x.token_ids for x in c.completions]


def test_empty_prompt_with_bos_generates(engine):
    c = engine.generate("", max_new_tokens=3).completions[0]
    assert c.prompt_token_ids == [engine.manifest.config.bos_token_id] and len(c.token_ids) == 3


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompts="", prepend_bos=False), "prompt is empty"),
        (dict(prompts="word " * 200, max_new_tokens=10), "past the 128-token context"),
        (dict(prompts="hi", max_new_tokens=0), "max_new_tokens must be a positive"),
        (dict(prompts="hi", max_new_tokens=-3), "max_new_tokens must be a positive"),
        (dict(prompts="hi", max_new_tokens=128), "no room for a prompt"),
        (dict(prompts="hi", temperature=-1.0), "temperature must be >= 0"),
        (dict(prompts="hi", top_p=0.0), "top_p must be in"),
        (dict(prompts="hi", top_p=1.5), "top_p must be in"),
        (dict(prompts="hi", top_k=-1), "top_k must be >= 0"),
        (dict(prompts="hi", logit_bias={10**9: 1.0}), "outside the vocabulary"),
    ],
)
def test_bad_generate_arguments(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_truncate_left_keeps_the_newest_tokens(engine):
    long = "word " * 200
    c = engine.generate(long, max_new_tokens=10, truncate="left").completions[0]
    assert len(c.prompt_token_ids) == 128 - 10 and c.prompt_token_ids == engine.to_tokens(long)[-118:]


@pytest.mark.parametrize("tokens", [[0, 10**6], [-1, 2], [[1, 2], [3]], []])
def test_logits_rejects_bad_ids(engine, tokens):
    with pytest.raises(ValueError):
        engine.logits(tokens)


def test_calls_from_many_threads_at_once_are_served(engine):
    """An open stream, generate() from another thread and logits() at once: each gets what it
    gets alone (they share the scheduler's batch; logits waits for it)."""
    want_stream = "".join(engine.stream("Hello", max_new_tokens=5))
    want_generate = engine.generate("x", max_new_tokens=6).completions[0].token_ids
    want_logits = engine.logits([1, 2])
    stream = engine.stream("Hello", max_new_tokens=5)
    first = next(stream)  # the stream is running
    got = {}
    threads = [
        threading.Thread(target=lambda: got.update(g=engine.generate("x", max_new_tokens=6))),
        threading.Thread(target=lambda: got.update(l=engine.logits([1, 2]))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert first + "".join(stream) == want_stream
    assert got["g"].completions[0].token_ids == want_generate
    np.testing.assert_array_equal(got["l"], want_logits)


def test_breaking_out_of_a_stream_cancels_it(engine):
    """Breaking out of a stream cancels its request: its slot is freed at the next step, and the
    steps stop long before max_new_tokens."""
    steps = []
    engine.scheduler.on_step = lambda: (steps.append(1), time.sleep(0.002))
    try:
        no_eos = {engine.manifest.config.eos_token_id: -100.0}
        for i, _ in enumerate(engine.stream("Hello", max_new_tokens=120, logit_bias=no_eos)):
            if i == 2:
                break
        deadline = time.monotonic() + 30
        while engine.scheduler.holds_lock and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.scheduler.on_step = None
    assert engine.stats()["active_slots"] == 0 and not engine.scheduler.holds_lock
    assert len(steps) < 60, f"{len(steps)} steps: the request ran on after the consumer stopped"


def test_repeated_calls_do_not_grow_memory(engine):
    import resource

    for _ in range(5):
        engine.generate(PROMPTS, max_new_tokens=8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(40):
        engine.generate(PROMPTS, max_new_tokens=8)
        engine.score("The quick brown fox")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000, (
        "peak RSS grew by > 20 MB over 40 calls"
    )


def test_missing_and_corrupt_model_folders(tiny_fp32, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Engine.load(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp32, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelFolderError, match="re-export"):
        Engine.load(broken, provider="cpu")
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        Engine.load(broken, provider="cpu")


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a GPU")
def test_explicit_cuda_without_a_gpu_is_a_clear_error(tiny_fp32):
    with pytest.raises(ProviderError, match="no NVIDIA GPU"):
        Engine.load(tiny_fp32, provider="cuda")


def test_auto_provider_is_quiet_on_a_cpu_machine(tiny_fp32, capfd):
    engine = Engine.load(tiny_fp32, provider="auto")
    assert engine.device == ("cuda" if cuda_device_count() else "cpu")
    assert "CUDAExecutionProvider" not in capfd.readouterr().err


def test_onnxruntime_warnings_only_in_debug(tiny_fp32, tmp_path, capfd):
    """onnxruntime prints its own warnings (here: an initializer no node uses) to stderr; an
    embedding app sees them only when gpt2onnx's logger is at DEBUG."""
    import logging

    import onnx

    folder = tmp_path / "m"
    shutil.copytree(tiny_fp32, folder)
    proto = onnx.load(str(folder / "model.onnx"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused_weight"))
    onnx.save(proto, str(folder / "model.onnx"))
    capfd.readouterr()
    Engine.load(folder, provider="cpu")
    assert "unused_weight" not in capfd.readouterr().err
    logger = logging.getLogger("gpt2onnx")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        Engine.load(folder, provider="cpu")
    finally:
        logger.setLevel(old)
    assert "unused_weight" in capfd.readouterr().err  # the same warning, shown: the check above can fail


def test_greedy_argmax_on_the_device_equals_the_host(tiny_shared, hf_model):
    """The shared graph returns next_token (its own argmax): greedy steps bring back B ids, not
    B x vocab logits, and give exactly the host's greedy tokens."""
    engine = Engine.load(tiny_shared, provider="cpu")
    on_device = engine.generate(PROMPTS, max_new_tokens=10)
    assert isinstance(engine.session.picker, ArgmaxPicker) and "logits" not in engine.session.binding.outputs
    on_host = engine.generate(
        PROMPTS, max_new_tokens=10, logit_bias={0: 0.0}
    )  # a bias needs the logits on the host
    assert isinstance(engine.session.picker, HostPicker)
    assert [c.token_ids for c in on_device.completions] == [c.token_ids for c in on_host.completions]
    for c in on_device.completions:
        assert c.token_ids == hf_greedy(hf_model, c.prompt_token_ids, 10)


def test_a_lower_max_seq_is_the_context(tiny_fp32):
    small = Engine.load(tiny_fp32, provider="cpu", max_seq=32)
    assert small.n_positions == 32
    with pytest.raises(ValueError, match="32-token context"):
        small.generate("word " * 40, max_new_tokens=4)
    c = small.generate("word " * 40, max_new_tokens=4, truncate="left").completions[0]
    assert len(c.prompt_token_ids) == 28 and len(c.token_ids) == 4


DEVICE_SETTINGS = [
    {},
    {"top_k": 20, "seed": 1},
    {"temperature": 0.7, "seed": 2},
    {"top_k": 40, "top_p": 0.8, "temperature": 1.3, "seed": 3},
    {"min_p": 0.2, "seed": 4},
]


@pytest.mark.parametrize("settings", DEVICE_SETTINGS, ids=lambda s: ",".join(s) or "greedy")
def test_sampling_graph_picks_what_the_host_picks(engine, settings):
    """The sampling graph (the GPU default, forced on here) reads the logits where the model
    wrote them and returns ids only; with the same seed it draws the host's tokens."""
    graphs = isinstance(engine.session.cache, CudaGraphCache)
    device = Engine.load(engine.folder, provider="cpu", max_batch=4, device_sampling=True, cuda_graphs=graphs)
    on_device = device.generate(PROMPTS, max_new_tokens=12, **settings)
    session = device.session
    want = ArgmaxPicker if not settings and session.has_argmax else DeviceSamplingPicker
    assert isinstance(session.picker, want)
    logits = session.binding.outputs.get("logits")  # none, or the device buffer the sampling graph reads
    assert logits is None or logits[1] == session.cache.outputs.dev["logits"].data_ptr()
    on_host = engine.generate(PROMPTS, max_new_tokens=12, **settings)
    assert not isinstance(engine.session.picker, DeviceSamplingPicker)
    assert [c.token_ids for c in on_device.completions] == [c.token_ids for c in on_host.completions]


def test_settings_the_sampling_graph_cannot_match_stay_on_the_host(tiny_fp32):
    device = Engine.load(tiny_fp32, provider="cpu", device_sampling=True)
    for settings in (
        {"top_p": 0.9},
        {"top_k": 500},
        {"repetition_penalty": 1.3},
        {"logit_bias": {5: 2.0}, "top_k": 5},
    ):
        device.generate(PROMPTS[0], max_new_tokens=2, **settings)
        assert isinstance(device.session.picker, HostPicker), settings


class RecordingSession:
    """Wraps an InferenceSession; records (gpu_graph_id, output addresses, bind calls so far) per run."""

    def __init__(self, session, binds: list):
        self.session, self.binds, self.runs = session, binds, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, io, options=None):
        self.session.run_with_iobinding(io, options)
        graph = options.get_run_config_entry("gpu_graph_id") if options else None
        self.runs.append((graph, [v.data_ptr() for v in io.get_outputs()], len(self.binds)))


def test_cuda_graph_decode_steps_keep_their_shapes_and_addresses(tiny_shared):
    """What a CUDA graph needs, checked on the CPU: the cache is allocated once at load; a batch
    runs in its bucket with that bucket's graph id (prefill without a graph); every decode step
    of every call in that bucket uses the same buffers, and only the first one binds anything."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=6, max_seq=64, cuda_graphs=True)
    session = engine.session
    kv = session.cache.kv
    assert session.cache.buckets == (1, 2, 4, 6) and (kv.cap_batch, kv.cap_seq) == (6, 64)
    pointers = session.kv_pointers
    session.binding.io = counting = CountingBinding(session.binding.io)
    session.ort_session = recorder = RecordingSession(session.ort_session, counting.calls)
    addresses = {}
    for prompts in (PROMPTS[:3], PROMPTS[1:4], PROMPTS[:1], PROMPTS + PROMPTS[:2]):
        recorder.runs.clear()
        engine.generate(prompts, max_new_tokens=5, ignore_eos=True)
        bucket = session.cache.rows
        assert bucket == {1: 1, 3: 4, 6: 6}[len(prompts)]
        graph_ids, outputs, binds = zip(*recorder.runs)
        assert graph_ids == ("-1",) + (str(session.cache.buckets.index(bucket) + 1),) * 4, graph_ids
        assert (
            all(out == outputs[1] for out in outputs[1:])
            and len(outputs[1]) == 2 + 2 * engine.manifest.config.n_layer
        )
        assert addresses.setdefault(bucket, outputs[1]) == outputs[1], (
            "a bucket's buffers moved between calls"
        )
        assert binds[1] > binds[0] and len(set(binds[1:])) == 1, (
            "a decode step after the first bound something"
        )
    assert session.kv_pointers == pointers
    session.ort_session, session.binding.io = recorder.session, counting.io


def test_cuda_graphs_need_the_shared_cache(tiny_fp32):
    with pytest.raises(ValueError, match="--kv-cache shared"):
        Engine.load(tiny_fp32, provider="cpu", cuda_graphs=True)


def test_a_cache_larger_than_free_memory_is_refused_before_allocating(tiny_fp32, monkeypatch):
    from gpt2onnx.engine import kv_cache as session_module
    from gpt2onnx.engine.contract import InputError

    engine = Engine.load(tiny_fp32, provider="cpu", max_batch=4)
    monkeypatch.setattr(session_module, "available_host_bytes", lambda: 1000)
    with pytest.raises(InputError, match=r"KV cache of 4 rows x \d+ positions needs .* GiB but only 0.0 GiB"):
        engine.generate(["a", "b", "c", "d"], max_new_tokens=2)
    monkeypatch.setattr(session_module, "available_host_bytes", lambda: None)  # unknown: no check
    assert len(engine.generate(["a", "b", "c", "d"], max_new_tokens=2).completions) == 4
