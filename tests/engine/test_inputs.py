"""The input gate: every public Engine method refuses a bad argument with an InputError that names
it, before any work; the values that are right (numpy integers included) still work; a prompt that
cannot fit is refused, or truncated, without tokenizing all of it."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx.engine.contract import InputError
from gpt2onnx.engine.engine import MAX_WHOLE_PROMPT_CHARS, Engine
from gpt2onnx.engine.sampling import SamplingConfig

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def engine(tiny_fp32):
    return Engine.load(tiny_fp32, provider="cpu", max_batch=4)


# (keyword arguments of generate, the argument the message must name). The first block is the
# issue's list of silent wrong answers and raw Python errors.
BAD_GENERATE = [
    (dict(prompts=[[1.7, 2.2]]), "prompts[0]"),
    (dict(prompts=[True, False]), "prompts"),
    (dict(presence_penalty=NAN), "presence_penalty"),
    (dict(frequency_penalty=INF), "frequency_penalty"),
    (dict(logit_bias={7: NAN}), "logit_bias"),
    (dict(logit_bias={1.5: 100}), "logit_bias"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(stop=""), "stop"),
    (dict(prompts=None), "prompts"),
    (dict(stop=None), "stop"),
    (dict(stop=[1]), "stop[0]"),
    (dict(top_k=2.5), "top_k"),
    (dict(temperature="1"), "temperature"),
    (dict(seed=1.5), "seed"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(seed=-1), "seed"),
    # prompts
    (dict(prompts=[1.7, 2.2]), "prompts"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=b"hello"), "prompts"),
    (dict(prompts=["a", [1, 2]]), "prompts[1]"),
    (dict(prompts=[[1, 2], "a"]), "prompts[1]"),
    (dict(prompts=[[1, 2], [3, True]]), "prompts[1]"),
    (dict(prompts=[[1, 2], [3, None]]), "prompts[1]"),
    (dict(prompts=[[-1, 2]]), "prompts[0]"),
    (dict(prompts=[[10**30]]), "prompts[0]"),
    (dict(prompts=np.array([1.0, 2.0])), "prompts"),
    (dict(prompts=np.array([True, False])), "prompts"),
    (dict(prompts={"a": 1}), "prompts"),
    (dict(prompts=42), "prompts"),
    # counts
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens="4"), "max_new_tokens"),
    (dict(max_new_tokens=None), "max_new_tokens"),
    (dict(max_new_tokens=np.float64(4)), "max_new_tokens"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2**40), "top_k"),
    (dict(seed="3"), "seed"),
    (dict(seed=True), "seed"),
    (dict(seed=2**64), "seed"),
    # numbers
    (dict(temperature=NAN), "temperature"),
    (dict(temperature=-INF), "temperature"),
    (dict(temperature=1e-300), "temperature"),
    (dict(temperature=1e6), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(top_p=NAN), "top_p"),
    (dict(top_p=0), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p="0.1"), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=INF), "repetition_penalty"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(presence_penalty=None), "presence_penalty"),
    # logit bias
    (dict(logit_bias={True: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(logit_bias={5: "1"}), "logit_bias[5]"),
    (dict(logit_bias={5: INF}), "logit_bias[5]"),
    (dict(logit_bias={5: 1e9}), "logit_bias[5]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={10**9: 1.0}), "logit_bias"),
    (dict(logit_bias=None), "logit_bias"),
    # stop strings, switches, keywords
    (dict(stop=[""]), "stop[0]"),
    (dict(stop=["ok", None]), "stop[1]"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(stop="x" * 300), "stop"),
    (dict(stop=5), "stop"),
    (dict(truncate="right"), "truncate"),
    (dict(truncate=True), "truncate"),
    (dict(truncate=np.array([1, 2])), "truncate"),
    (dict(prepend_bos=1), "prepend_bos"),
    (dict(prepend_bos="yes"), "prepend_bos"),
    (dict(ignore_eos=None), "ignore_eos"),
    (dict(temprature=0.5), "temprature"),
]


@pytest.mark.parametrize("kwargs,argument", BAD_GENERATE, ids=[repr(k)[:50] for k, _ in BAD_GENERATE])
def test_bad_generate_argument_is_an_input_error_naming_it(engine, kwargs, argument):
    call = {"prompts": "Hello", "max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError) as caught:
        engine.generate(**call)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert argument in message and "\n" not in message and len(message) < 400, message
    assert caught.value.param == argument.split("[")[0]  # the parameter itself, for the server's errors


def test_the_message_shows_the_value_and_what_it_must_be(engine):
    with pytest.raises(InputError, match=r"presence_penalty must be in \[-2, 2\].*got nan \(float\)"):
        engine.generate("Hello", presence_penalty=NAN)
    with pytest.raises(InputError) as caught:
        engine.generate("Hello", seed=-1)
    message = str(caught.value)
    assert message.startswith("seed must be a non-negative integer") and "got -1" in message


@pytest.mark.parametrize(
    "argument,huge",
    [
        ("prompts", [0.5] * 10**6),
        ("prompts", [[1, 2], "x" * 10**7]),
        ("stop", ["x" * 10**7]),
        ("logit_bias", {"k" * 10**6: 1}),
    ],
    ids=["float-ids", "long-text", "long-stop", "long-key"],
)
def test_a_huge_bad_value_is_shown_abbreviated(engine, argument, huge):
    with pytest.raises(InputError) as caught:
        engine.generate(**{"prompts": "Hello", argument: huge})
    assert argument in str(caught.value) and len(str(caught.value)) < 400, str(caught.value)[:500]


def test_stream_checks_its_arguments_before_the_first_piece(engine):
    with pytest.raises(InputError, match="prompt"):
        engine.stream(None)  # no iteration: the call itself refuses
    with pytest.raises(InputError, match="presence_penalty"):
        engine.stream("Hello", presence_penalty=NAN)
    with pytest.raises(InputError, match="prompt"):
        engine.stream([1.5])
    streamed = "".join(engine.stream("Hello", max_new_tokens=np.int64(3)))
    assert streamed == engine.generate("Hello", 3).completions[0].text


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda e: e.logits([[1.5, 2.0]]), "tokens[0]"),
        (lambda e: e.logits([True, False]), "tokens"),
        (lambda e: e.logits("hello"), "tokens"),
        (lambda e: e.logits(None), "tokens"),
        (lambda e: e.logits(np.ones((2, 3), dtype=np.float32)), "tokens"),
        (lambda e: e.logits([[1, 2]] * 5), "max_batch"),  # the engine's max_batch is 4
        (lambda e: e.logits([1] * 129), "context"),
        (lambda e: e.logits([[1, 2], [3]]), "tokens"),
        (lambda e: e.score(None), "text"),
        (lambda e: e.score(123), "text"),
        (lambda e: e.score("Hello there", prepend_bos="no"), "prepend_bos"),
        (lambda e: e.to_tokens(None), "text"),
        (lambda e: e.to_tokens(["Hello"]), "text"),
        (lambda e: e.to_tokens("Hello", prepend_bos=0), "prepend_bos"),
        (lambda e: e.to_str_tokens([1.5]), "text[0]"),
        (lambda e: e.to_str_tokens(None), "text"),
        (lambda e: e.to_string([True]), "ids[0]"),
        (lambda e: e.to_string("abc"), "ids"),
        (lambda e: e.to_string([10**9]), "ids[0]"),
        (lambda e: e.to_string(None), "ids"),
    ],
)
def test_other_methods_refuse_bad_arguments(engine, call, argument):
    with pytest.raises(InputError) as caught:
        call(engine)
    assert argument in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(max_batch="8"), "max_batch"),
        (dict(max_batch=0), "max_batch"),
        (dict(max_batch=True), "max_batch"),
        (dict(max_batch=10**6), "max_batch"),
        (dict(max_seq=1.5), "max_seq"),
        (dict(max_seq=0), "max_seq"),
        (dict(threads=-1), "threads"),
        (dict(threads="4"), "threads"),
        (dict(provider="gpu"), "provider"),
        (dict(provider=None), "provider"),
        (dict(device_sampling="yes"), "device_sampling"),
        (dict(cuda_graphs=1), "cuda_graphs"),
        (dict(path=None), "path"),
        (dict(path=123), "path"),
        (dict(path=""), "path"),
        (dict(path="a\x00b"), "path"),
    ],
)
def test_load_refuses_bad_settings_before_reading_the_folder(tmp_path, kwargs, argument):
    """The folder does not exist: an InputError (not a ModelFolderError) shows the settings were
    checked first."""
    with pytest.raises(InputError) as caught:
        Engine.load(**{"path": tmp_path / "no-such-folder", **kwargs})
    assert argument in str(caught.value) and caught.value.param == argument


@pytest.mark.parametrize(
    "call,param",
    [
        (lambda e: e.submit("Hello", max_new_tokens=128), "max_new_tokens"),  # no room left for a prompt
        (lambda e: e.submit("Hello " * 200, max_new_tokens=8), "prompt"),  # past the context
        (lambda e: e.submit([1] * 125, max_new_tokens=8), "prompt"),
        (lambda e: e.submit("", prepend_bos=False), "prompt"),  # empty
        (lambda e: e.score("Hi", stride=0), "stride"),
        (lambda e: e.logits([1] * 129), "tokens"),
    ],
)
def test_errors_found_after_the_gate_name_their_parameter_too(engine, call, param):
    with pytest.raises(InputError) as caught:
        call(engine)
    assert caught.value.param == param, str(caught.value)


def test_a_flag_label_in_the_message_and_the_parameter_name_in_param():
    from gpt2onnx.engine import inputs

    with pytest.raises(InputError, match="--top-p must be") as caught:
        inputs.check("top_p", 2.0, "--top-p")
    assert caught.value.param == "top_p"


def test_numpy_integers_and_floats_are_accepted(engine):
    ids = engine.to_tokens("The quick brown fox")
    want = engine.generate([ids], max_new_tokens=4).completions[0].token_ids
    assert len(want) == 4
    assert engine.generate([ids], max_new_tokens=np.int64(4)).completions[0].token_ids == want
    assert engine.generate(np.array(ids, dtype=np.int32), max_new_tokens=4).completions[0].token_ids == want
    assert engine.generate([[np.int64(i) for i in ids]], max_new_tokens=4).completions[0].token_ids == want
    two = engine.generate(np.array([ids, ids]), max_new_tokens=4).completions
    assert [c.token_ids for c in two] == [want, want]
    greedy = engine.generate([ids], 4, top_k=np.int64(1), temperature=np.float32(1.3)).completions[0]
    assert greedy.token_ids == want
    sampled = engine.generate([ids], 4, temperature=0.9, seed=7).completions[0].token_ids
    again = engine.generate([ids], 4, temperature=np.float64(0.9), seed=np.uint8(7)).completions[0]
    assert again.token_ids == sampled
    forced = engine.generate([ids], 2, logit_bias={np.int64(5): np.float32(100)}).completions[0].token_ids
    assert forced == [5, 5]
    assert engine.logits(np.array([ids], dtype=np.uint16)).shape == (1, len(ids), engine.vocab_size)
    assert engine.to_string(np.array(ids)) == engine.to_string(ids)


def test_right_values_keep_their_meaning(engine):
    """top_k=1 is greedy whatever the temperature; temperature None is greedy unless a sampling
    setting asks for sampling; a tuple of stop strings works like a list."""
    greedy = engine.generate("Hello", 6).completions[0].token_ids
    assert engine.generate("Hello", 6, top_k=1, temperature=5.0, seed=1).completions[0].token_ids == greedy
    assert SamplingConfig().greedy and SamplingConfig(temperature=0).greedy
    assert not SamplingConfig(top_p=0.9).greedy and not SamplingConfig(temperature=0.5).greedy
    text = engine.generate("Hello", 6).completions[0].text
    if len(text) > 2:
        assert engine.generate("Hello", 6, stop=(text[1:3],)).completions[0].finish_reason == "stop"


def test_sampling_config_keeps_plain_python_values():
    bias = {np.int32(2): np.int64(-7)}
    cfg = SamplingConfig(top_k=np.int64(3), top_p=np.float32(0.5), seed=np.uint32(4), logit_bias=bias)
    assert type(cfg.top_k) is int and type(cfg.top_p) is float and type(cfg.seed) is int
    assert cfg.logit_bias == {2: -7.0}
    assert [(type(k), type(v)) for k, v in cfg.logit_bias.items()] == [(int, float)]


# -- prompts too long for the context ---------------------------------------------------------


class RecordingTokenizer:
    """Wraps the `tokenizers` object: records the length of every text it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.encoded = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, *args, **kwargs):
        self.encoded.append(len(text))
        return self.tok.encode(text, *args, **kwargs)


@pytest.fixture
def recording(engine, monkeypatch) -> RecordingTokenizer:
    recorder = RecordingTokenizer(engine.tokenizer._tok)
    monkeypatch.setattr(engine.tokenizer, "_tok", recorder)
    return recorder


TEN_MB = "The quick brown fox jumps over the lazy dog. " * (10_000_000 // 45)


def test_a_10_mb_prompt_is_refused_without_tokenizing_it(engine, recording):
    assert engine.tokenizer.max_token_bytes, "the test tokenizer is a plain byte-level BPE"
    with pytest.raises(InputError, match="past the 128-token context"):
        engine.generate(TEN_MB, max_new_tokens=10)
    assert recording.encoded == []


def test_truncate_left_tokenizes_only_a_tail_of_a_10_mb_prompt(engine, recording):
    c = engine.generate(TEN_MB, max_new_tokens=10, truncate="left").completions[0]
    assert len(c.prompt_token_ids) == 118 and len(c.token_ids) == 10
    bound = 4 * 118 * engine.tokenizer.max_token_bytes
    assert recording.encoded and max(recording.encoded) <= bound, recording.encoded
    assert c.prompt_token_ids == engine.to_tokens(TEN_MB[-bound:])[-118:]  # a longer tail: same last tokens


def random_text(gen: np.random.Generator, n: int) -> str:
    """Text that stresses GPT-2's pre-tokenizer: words, runs of spaces, tabs and newlines,
    contractions, digits, punctuation, accents, CJK, emoji and the special token itself."""
    pieces = [
        "the", " quick", "brown", "  ", "   ", "\t", "\n", "\n\n", " \n ", "'s", "'ll", "n't", "2024", " 3.14",
        "!!", "...", " (x)", "é", "héllo", "日本語", "🙂", "<|endoftext|>", "<|", "endoftext", "|>", "Ġ",
        "\r\n", "\u00a0", "\u3000",
    ]  # fmt: skip
    return "".join(gen.choice(pieces, size=n))


@pytest.mark.parametrize("seed", range(12))
def test_the_last_tokens_of_a_tail_equal_those_of_the_whole_text(engine, recording, seed):
    """Tokenizer.last_tokens against encoding the whole text and keeping the last n: equal for
    every text and n, while only a tail is encoded once the text is long."""
    gen = np.random.default_rng(seed)
    tok = engine.tokenizer
    tails = 0
    for _ in range(8):
        text = random_text(gen, int(gen.integers(1, 8000)))
        n = int(gen.integers(1, 40))
        recording.encoded.clear()
        got = tok.last_tokens(text, n, MAX_WHOLE_PROMPT_CHARS)
        assert got == tok.to_tokens(text, prepend_bos=False)[-n:], (seed, n, text[-200:])
        if len(text) > 4 * n * tok.max_token_bytes:
            assert recording.encoded[0] <= 4 * n * tok.max_token_bytes, "a long text was encoded whole"
            tails += 1
    assert tails, "no text was long enough to be cut"


def test_truncate_left_through_generate_equals_whole_text_truncation(engine):
    gen = np.random.default_rng(5)
    for max_new_tokens in (1, 10, 100):
        text = random_text(gen, 20_000)
        c = engine.generate(text, max_new_tokens, truncate="left", ignore_eos=True).completions[0]
        room = 128 - max_new_tokens
        assert c.prompt_token_ids == engine.to_tokens(text)[-room:] and len(c.token_ids) == max_new_tokens


def test_one_giant_word_is_truncated_exactly_or_refused(engine, recording):
    """No space to cut at near the end: the cut furthest back is used, or with none the whole
    text up to MAX_WHOLE_PROMPT_CHARS is tokenized (both exact); beyond it truncate='left' is
    refused rather than tokenizing megabytes."""
    word = "ab" * 20_000 + "c"
    for text in (word, "hello world" + word, "hello" + "\n" * 500 + word, "x " + word + " "):
        c = engine.generate(text, max_new_tokens=10, truncate="left").completions[0]
        assert c.prompt_token_ids == engine.to_tokens(text)[-118:], text[:20]
    recording.encoded.clear()
    tail = engine.tokenizer.last_tokens("hello world" + word, 5, MAX_WHOLE_PROMPT_CHARS)
    assert recording.encoded == [len(" world" + word)]  # cut before " world", the only place
    assert tail == engine.to_tokens("hello world" + word)[-5:]
    recording.encoded.clear()
    with pytest.raises(InputError, match="truncate='left'"):
        engine.generate("a" * (MAX_WHOLE_PROMPT_CHARS + 1), max_new_tokens=10, truncate="left")
    assert recording.encoded == []


def test_min_tokens_is_a_lower_bound(engine):
    """The refusal without tokenizing rests on min_tokens never exceeding the real count: checked
    on mixed text and on runs that make the longest tokens."""
    tok, gen = engine.tokenizer, np.random.default_rng(3)
    texts = [random_text(gen, int(gen.integers(1, 3000))) for _ in range(30)]
    texts += [ch * n for ch in "-= a\n.日" for n in (1, 7, 64, 1000, 5000)]
    texts += [tok.to_string([i]) * 50 for i in range(0, engine.vocab_size, max(1, engine.vocab_size // 300))]
    for text in texts:
        assert tok.min_tokens(text) <= len(tok.to_tokens(text, prepend_bos=False)), text[:80]
