"""`gpt2-onnx serve`: the OpenAI-compatible server, driven by real clients (the `openai` package
and raw HTTP with httpx) against a server started here on 127.0.0.1 and always stopped here.

The in-process servers (uvicorn in a thread, on the real engine over the tiny shared-cache
model) let a test look at the engine behind them; the SIGTERM test runs `python -m gpt2onnx
serve` as a subprocess, as a user would. Every completion is checked against the same request
run alone on the engine, so a server that mixes up choices, seeds or settings fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import run_flags

fastapi = pytest.importorskip(
    "fastapi", reason="the server needs the [serve] extra: pip install -e '.[test]'"
)
uvicorn = pytest.importorskip(
    "uvicorn", reason="the server needs the [serve] extra: pip install -e '.[test]'"
)
httpx = pytest.importorskip("httpx", reason="raw-HTTP tests need httpx: pip install -e '.[test]'")
openai = pytest.importorskip(
    "openai", reason="client tests need the openai package: pip install -e '.[test]'"
)

from gpt2onnx import Engine  # noqa: E402
from gpt2onnx.serve import cli as serve_cli  # noqa: E402
from gpt2onnx.serve import openai_api as api  # noqa: E402
from gpt2onnx.serve import server  # noqa: E402

MODEL = "tiny-test"
T = 30  # seconds any one wait may take before the test fails
NO_EOS = {"50256": -100}  # exact token counts: the random tiny model may otherwise end early


def load(folder, max_batch=4, max_queue=64, step_s=0.0) -> Engine:
    """The real engine; step_s > 0 slows each decode step (the scheduler's on_step hook) so that
    a request is still running when the test acts on it."""
    engine = Engine.load(folder, provider="cpu", max_batch=max_batch, max_queue=max_queue)
    if step_s:
        engine.scheduler.on_step = lambda: time.sleep(step_s)
    return engine


# -- servers started and stopped by the tests ----------------------------------------------------
@contextlib.contextmanager
def running(engine, drain_timeout: float = 5.0, app_out: list | None = None, limits=None,
            log_level: str = "warning"):  # fmt: skip
    """The app on 127.0.0.1 (a free port) in a thread, with the settings `gpt2-onnx serve` gives
    uvicorn; yields its base URL (and appends the app to app_out); stopped on exit, which closes
    the engine."""
    app = server.create_app(engine, MODEL, drain_timeout)
    if app_out is not None:
        app_out.append(app)
    sock = serve_cli.bind("127.0.0.1", 0)
    uv = uvicorn.Server(server.config(app, engine, drain_timeout, log_level, limits or server.Limits()))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: uv.started, "the server to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(T)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"  # not in finally: a failure says its own


@contextlib.contextmanager
def reopened(gate: threading.Event):
    """Sets `gate` on the way out, so that a failing test does not leave the loop waiting on it."""
    try:
        yield gate
    finally:
        gate.set()


def wait_for(condition, what: str, timeout: float = T):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


@pytest.fixture(scope="module")
def engine(tiny_shared):
    return load(tiny_shared, max_batch=8)


@pytest.fixture(scope="module")
def base_url(engine):
    with running(engine) as url:
        yield url


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=T) as c:
        yield c


def alone(engine, prompt, max_tokens: int, temperature: float = 1.0, **sampling):
    """The engine's Completion for the request run on its own, by the API's defaults (sampled
    at temperature 1 unless told otherwise, as OpenAI's)."""
    return engine.submit(prompt, max_tokens, temperature=temperature, **sampling).result(T)


def bias(openai_bias: dict[str, float]) -> dict[int, float]:
    return {int(k): v for k, v in openai_bias.items()}


# -- completions through the openai client -------------------------------------------------------
def test_completion_matches_the_engine_alone(client, engine):
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0,
                                    logit_bias=NO_EOS)  # fmt: skip
    solo = alone(engine, "Hello there", 7, temperature=0.0, logit_bias=bias(NO_EOS))
    (c,) = out.choices
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert c.text == solo.text and c.finish_reason == "length" and c.index == 0 and c.logprobs is None
    assert out.usage.prompt_tokens == len(solo.prompt_token_ids)  # the BOS included
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == len(solo.prompt_token_ids) + 7


def test_prompt_forms_n_and_seeds(client, engine):
    ids = engine.to_tokens("Hi there", prepend_bos=False)
    out = client.completions.create(model=MODEL, prompt=[ids, [464, 3290]], max_tokens=5, n=2, seed=5,
                                    logit_bias=NO_EOS)  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c, (prompt, seed) in zip(out.choices, [(ids, 5), (ids, 6), ([464, 3290], 5), ([464, 3290], 6)]):
        assert c.text == alone(engine, prompt, 5, seed=seed, logit_bias=bias(NO_EOS)).text
    assert out.choices[0].text != out.choices[1].text  # n choices are not copies
    assert out.usage.prompt_tokens == len(ids) + 2 and out.usage.completion_tokens == 20
    flat = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, seed=5, logit_bias=NO_EOS)
    texts = client.completions.create(model=MODEL, prompt=["Hi there", "Hi there"], max_tokens=5, seed=5)
    assert flat.choices[0].text == out.choices[0].text
    assert [c.text for c in texts.choices] == [alone(engine, "Hi there", 5, seed=5).text] * 2


def test_sampling_settings_reach_the_engine(client, engine):
    settings = dict(temperature=0.7, top_p=0.8, presence_penalty=1.5, frequency_penalty=0.5, seed=11)
    out = client.completions.create(model=MODEL, prompt="The", max_tokens=12, stop=[" the"], **settings)
    solo = alone(engine, "The", 12, stop=(" the",), **settings)
    assert out.choices[0].text == solo.text
    assert out.choices[0].finish_reason == {"eos": "stop"}.get(solo.finish_reason, solo.finish_reason)
    extension = client.completions.create(model=MODEL, prompt="The", max_tokens=6, seed=2,
                                          extra_body={"top_k": 3, "min_p": 0.1})  # fmt: skip
    assert extension.choices[0].text == alone(engine, "The", 6, seed=2, top_k=3, min_p=0.1).text
    no_eos = client.completions.create(model=MODEL, prompt="The", max_tokens=30, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert no_eos.usage.completion_tokens == 30 and no_eos.choices[0].finish_reason == "length"
    assert no_eos.choices[0].text == alone(engine, "The", 30, temperature=0, ignore_eos=True).text


def test_echo_and_logprobs(client, engine):
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, seed=1, echo=True)
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, seed=1)
    assert echoed.choices[0].text == "Hello" + plain.choices[0].text
    ids = engine.to_tokens("Hi", prepend_bos=False)
    assert (
        client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True)
        .choices[0]
        .text.startswith("Hi")
    )
    greedy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                       logit_bias=NO_EOS).choices[0]  # fmt: skip
    lp = greedy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and logprob <= 0 and logprob == pytest.approx(max(top.values()), abs=1e-5)
        assert token in top  # greedy: the chosen token is the most likely one
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(4)]
    none = (
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, logprobs=0).choices[0].logprobs
    )
    assert len(none.token_logprobs) == 2 and none.top_logprobs == [{}, {}]


def test_echo_with_logprobs_scores_the_prompt(client, engine, base_url):
    """echo + logprobs: the prompt's tokens with their logprobs (the first null), then the
    completion's, as OpenAI's legacy completions give them: what evaluation harnesses read."""
    text = "The quick brown fox"
    got = client.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0, echo=True,
                                    logprobs=3, logit_bias=NO_EOS).choices[0]  # fmt: skip
    ids = engine.to_tokens(text)  # the BOS the engine puts first is not in the text: not listed
    lp, n = got.logprobs, len(ids) - 1
    assert got.text.startswith(text) and lp.tokens[:n] == engine.to_str_tokens(text)[1:]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 2
    assert "".join(lp.tokens) == got.text and lp.text_offset == [
        sum(map(len, lp.tokens[:i])) for i in range(n + 2)
    ]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = engine.logits(ids)[0].astype(np.float64)
    want = [
        float(row[t] - row.max() - np.log(np.exp(row - row.max()).sum())) for row, t in zip(logits, ids[1:])
    ]
    assert lp.token_logprobs[1:n] == pytest.approx(want[1:], abs=1e-4)
    assert all(len(top) == 3 for top in lp.top_logprobs[1:])
    body = {"model": MODEL, "prompt": text, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 3,
            "logit_bias": NO_EOS, "stream": True}  # fmt: skip
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=T) as r:
        chunks = [json.loads(e.removeprefix("data: ")) for e in r.read().decode().split("\n\n")[:-2]]
    first = chunks[0]["choices"][0]
    assert first["text"] == text and first["logprobs"]["tokens"] == lp.tokens[:n]
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:n], abs=1e-6)
    assert "".join(c["choices"][0]["text"] for c in chunks) == got.text


def test_streaming_gives_the_same_text(client):
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, seed=3, n=2)
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, seed=3, n=2, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def one_stream(client, prompt: str, max_tokens: int, settings: dict) -> str:
    text = ""
    async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                       stream=True, **settings):  # fmt: skip
        text += chunk.choices[0].text
    return text


def test_concurrent_streams_each_give_what_they_give_alone(base_url, engine):
    """32 clients at once, mixed prompt lengths, lengths and settings (greedy and seeded), and
    more requests than slots: each gets the text of its request run alone."""
    prompts = [("Hello " * (1 + i % 7)).strip() for i in range(32)]
    lengths = [4 + (i * 7) % 29 for i in range(32)]
    settings = [
        dict(temperature=0.0) if i % 2 else dict(seed=i, temperature=0.9, top_p=0.95) for i in range(32)
    ]

    async def together():
        async with openai.AsyncOpenAI(
            base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=T
        ) as c:
            return await asyncio.gather(*(one_stream(c, *job) for job in zip(prompts, lengths, settings)))

    busy = []  # requests in slots at each step
    engine.scheduler.on_step = lambda: busy.append(engine.stats()["active_slots"])
    try:
        texts = asyncio.run(together())
    finally:
        engine.scheduler.on_step = None
    assert max(busy) == 8, "the requests never filled the slots together"
    for i, text in enumerate(texts):
        assert text == alone(engine, prompts[i], lengths[i], **settings[i]).text, f"request {i}"


# -- raw HTTP: SSE framing, error shapes ---------------------------------------------------------
def test_sse_framing(base_url):
    body = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 4,
        "stream": True,
        "echo": True,
        "logit_bias": NO_EOS,
    }
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=T) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["text"] == "Hi"  # the echo comes first
    assert [len(c["choices"]) for c in chunks] == [1] * len(chunks) and len(chunks) == 1 + 4 + 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


BAD_BODIES = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"\xff\xfe", 400, None, "not valid JSON"),
    ({"model": 5, "prompt": "x"}, 400, "model", "model must be"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unknown parameter 'frobnicate'; /v1/completions takes"),
    ({"prompt": "x", "stream_options": 5}, 400, "stream_options", "include_usage"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of", "not supported"),
    ({"prompt": "x", "suffix": "end"}, 400, "suffix", "not supported"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature must be"),
    ({"prompt": "x", "temperature": 1e999}, 400, "temperature", "temperature must be"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p must be"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens 0 generates nothing"),
    ({"prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens", "max_tokens must be"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "max_tokens must be"),
    ({"prompt": "x", "max_tokens": 128}, 400, "max_tokens", "no room"),
    ({"prompt": "x", "n": 0}, 400, "n", "n must be"),
    ({"prompt": "x", "n": 200}, 400, "n", "n must be"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "logprobs must be"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": "x", "stop": 5}, 400, "stop", "str or a list"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed must be"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "not a token id"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ({"prompt": "x", "logit_bias": {"1": "up"}}, 400, "logit_bias", "logit_bias[1] must be"),
    ({"prompt": "x", "logit_bias": [1]}, 400, "logit_bias", "must be an object"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "in [-2, 2]"),
    ({"prompt": [], "max_tokens": 1}, 400, "prompt", "prompt is empty"),
    ({"prompt": 7}, 400, "prompt", "prompt must be"),
    ({"prompt": ["a", [1]]}, 400, "prompt", "mixes kinds"),
    ({"prompt": [1, True]}, 400, "prompt", "prompt[1]"),
    ({"prompt": [[1], [-5]]}, 400, "prompt", "prompt[1][0] = -5 is outside the vocabulary"),
    ({"prompt": [[]]}, 400, "prompt", "prompt[0] is empty"),
    ({"prompt": "word " * 200}, 400, "prompt", "tokens"),
    ({"prompt": "x", "truncate": "right"}, 400, "truncate", "truncate must be"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "stream must be"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options", "True"),
    ({"prompt": "x", "stream": True, "stream_options": []}, 400, "stream_options", "include_usage"),
    ({"prompt": "x", "length_penalty": 2.0}, 400, "length_penalty", "applies to beam search only"),
    ({"prompt": "x", "early_stopping": True}, 400, "early_stopping", "applies to beam search only"),
    ({"prompt": "x", "use_beam_search": True, "n": 2, "stream": True}, 400, "stream", "does not apply to beam search"),
    ({"prompt": "x", "use_beam_search": True, "n": 2, "logprobs": 1}, 400, "logprobs", "does not apply to beam"),
    ({"prompt": "x", "use_beam_search": True, "n": 2, "temperature": 0.7}, 400, "temperature", "drop temperature"),
    ({"prompt": "x", "use_beam_search": True, "n": 3, "best_of": 2}, 400, "best_of", "beam width, an integer at least n (3)"),
    ({"prompt": "x", "use_beam_search": True, "n": 2, "early_stopping": "soon"}, 400, "early_stopping", "true, false or"),
    ({"prompt": "x", "use_beam_search": True, "n": 2, "length_penalty": "long"}, 400, "length_penalty", "finite number"),
    ({"prompt": "x", "use_beam_search": True, "n": 9}, 400, "best_of", "num_beams must be an integer from 1 to 8"),
    ({"prompt": "x", "use_beam_search": "yes", "n": 2}, 400, "use_beam_search", "must be"),
]  # fmt: skip


def test_beam_search_choices_are_the_engines_best_beams(client, engine):
    """use_beam_search (vLLM's name): best_of beams, the n best as choices, as Engine.generate
    gives them (tests/engine/test_beam.py holds those to transformers')."""
    out = client.completions.create(model=MODEL, prompt=["Hello there", "The cat"], max_tokens=6, n=3, best_of=4,
                                    extra_body={"use_beam_search": True, "length_penalty": 0.5,
                                                "early_stopping": "never"})  # fmt: skip
    want = engine.generate(["Hello there", "The cat"], max_new_tokens=6, num_beams=4, length_penalty=0.5,
                           early_stopping="never", num_return_sequences=3).completions  # fmt: skip
    assert len(out.choices) == 6 and [c.index for c in out.choices] == list(range(6))
    beams = [b for completion in want for b in completion.beams]
    assert [c.text for c in out.choices] == [b.text for b in beams]
    assert [c.finish_reason for c in out.choices] == [api.finish_reason(b.finish_reason) for b in beams]
    assert out.usage.completion_tokens == sum(len(b.token_ids) for b in beams)
    width_n = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, n=2,
                                        extra_body={"use_beam_search": True})  # fmt: skip
    two = engine.generate("Hello there", max_new_tokens=6, num_beams=2, num_return_sequences=2).completions[0]
    assert [c.text for c in width_n.choices] == [b.text for b in two.beams]


@pytest.mark.parametrize("body, status, param, words", BAD_BODIES)
def test_bad_requests_are_openai_errors(base_url, body, status, param, words):
    if isinstance(body, dict) and "model" not in body and param != "model":
        body = {"model": MODEL, **body}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base_url + "/v1/completions", content=content, timeout=T,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"], error["message"]


def test_a_body_over_the_limit_is_413(base_url, monkeypatch):
    monkeypatch.setattr(server, "MAX_BODY_BYTES", 1000)  # read per request; the server runs in this process
    r = httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 2000}, timeout=T)
    assert r.status_code == 413 and "over 1000 bytes" in r.json()["error"]["message"]


def test_a_too_long_prompt_can_be_truncated(client, engine):
    long = "word " * 200
    out = client.completions.create(
        model=MODEL, prompt=long, max_tokens=3, seed=4, extra_body={"truncate": "left"}
    )
    assert out.choices[0].text == alone(engine, long, 3, seed=4, truncate="left").text
    assert out.usage.prompt_tokens == engine.n_positions - 3


def test_errors_reach_the_openai_client_as_its_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="x", best_of=3)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="davinci-002", prompt="x")
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_models_health_and_unknown_routes(client, base_url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    r = httpx.get(base_url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(base_url + "/v1/completions").status_code == 405


METRIC = re.compile(r'^(gpt2onnx_[a-z_]+)(\{[a-z]+="[^"]*"\})? (\S+)$')


def scrape(base_url) -> dict[str, float]:
    r = httpx.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            match = METRIC.match(line)
            assert match, f"not Prometheus text: {line!r}"
            values[match[1] + (match[2] or "")] = float(match[3])
    return values


def test_metrics_count_requests_and_tokens(client, base_url):
    before = scrape(base_url)
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, n=2, logit_bias=NO_EOS)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", n=0)
    after = scrape(base_url)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert (
        grew('gpt2onnx_requests_total{code="200"}') == 1 and grew('gpt2onnx_requests_total{code="400"}') == 1
    )
    assert grew("gpt2onnx_generation_tokens_total") == 10 and grew("gpt2onnx_prompt_tokens_total") == 2
    assert out.usage.prompt_tokens == 2  # the BOS and "Hi", counted once for both choices
    assert grew("gpt2onnx_time_to_first_token_seconds_count") == 2
    assert grew("gpt2onnx_inter_token_latency_seconds_count") == 8
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        buckets = [v for k, v in after.items() if k.startswith(f"gpt2onnx_{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[f"gpt2onnx_{name}_count"]
    assert after["gpt2onnx_active_slots"] == 0 and after["gpt2onnx_queue_depth"] == 0
    assert after["gpt2onnx_max_batch"] == 8 and after["gpt2onnx_max_queue"] == 64


def test_prompt_lookup_gives_the_same_text_and_counts_its_drafts(client, base_url, engine):
    """The request's prompt_lookup (an extension): greedy text as without it, and /metrics counts
    the drafted and kept tokens (the tiny model repeats one token: its drafts are kept)."""
    before = scrape(base_url)
    fast = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=20, temperature=0,
                                     extra_body={"prompt_lookup": 4, "ignore_eos": True})  # fmt: skip
    plain = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    after = scrape(base_url)
    assert fast.choices[0].text == plain.choices[0].text and fast.usage.completion_tokens == 20
    proposed = after["gpt2onnx_draft_tokens_proposed_total"] - before.get(
        "gpt2onnx_draft_tokens_proposed_total", 0
    )
    kept = after["gpt2onnx_draft_tokens_accepted_total"] - before.get(
        "gpt2onnx_draft_tokens_accepted_total", 0
    )
    assert proposed >= kept > 5
    r = httpx.post(
        base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "prompt_lookup": 65}, timeout=T
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_lookup"


# -- load: queue full, disconnects ---------------------------------------------------------------
def test_a_full_queue_is_429_and_submits_nothing(tiny_shared):
    engine, gate, stepping = load(tiny_shared, max_batch=1, max_queue=1), threading.Event(), threading.Event()

    def on_step():  # closed: the running request holds its slot, the loop waits here
        stepping.set()
        gate.wait(T)

    engine.scheduler.on_step = on_step
    gate.set()
    with running(engine) as url, reopened(gate):
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=T) as c:
            two = c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2)
            assert len(two.choices) == 2  # an idle server: 1 slot and 1 queue place
            # the answer can come before the loop's last on_step: close the gate once it rests
            wait_for(lambda: not engine.scheduler.holds_lock, "the scheduler to rest", 5)
            gate.clear()
            stepping.clear()
            holder = engine.submit("Hi", 20, ignore_eos=True)  # takes the slot, then waits at the gate
            wait_for(
                lambda: stepping.is_set() and engine.stats()["active_slots"] == 1, "the slot to be taken"
            )
            with pytest.raises(openai.RateLimitError, match="room for 1 more requests now") as caught:
                c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2)  # 1 queue place
            assert caught.value.body["code"] == "queue_full"
            assert engine.stats()["queue_depth"] == 0, "a refused request submitted choices"
            gate.set()
            assert len(holder.result(T).token_ids) == 20
            assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text
        assert 'gpt2onnx_requests_total{code="429"} 1' in httpx.get(url + "/metrics").text


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tiny_shared):
    engine = load(tiny_shared, max_batch=2, step_s=0.02)
    with running(engine) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 100, "stream": True, "logit_bias": NO_EOS}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=T) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            assert engine.stats()["active_slots"] == 1
        wait_for(lambda: engine.stats()["active_slots"] == 0, "the slot to be freed", 1)  # 100 steps take 2 s
        assert "gpt2onnx_client_disconnects_total 1" in httpx.get(url + "/metrics").text


def test_a_stream_held_open_outlives_the_read_and_keep_alive_timeouts(tiny_shared):
    """A client that holds its stream open while the loop stands still for several read
    timeouts, and other clients come and go meanwhile, gets all its tokens: the read deadline
    covers a request's arrival, not its answer, and a quiet client is not a gone one. The line
    iterator is kept: dropping an httpx iterator mid-stream closes the connection, and the
    server then rightly cancels the request."""
    engine, gate, apps = load(tiny_shared, max_batch=1), threading.Event(), []
    engine.scheduler.on_step = lambda: gate.wait(T)  # closed: the loop stops after the first step
    limits = server.Limits(read_timeout=0.2, keep_alive=0.1)
    with running(engine, limits=limits, app_out=apps) as url, reopened(gate):
        metrics = apps[0].state.metrics
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 20, "stream": True, "logit_bias": NO_EOS}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=T) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            stop = time.monotonic() + 5 * limits.read_timeout
            while time.monotonic() < stop:
                assert httpx.get(url + "/health").status_code == 200
                time.sleep(limits.keep_alive)
            assert engine.stats()["active_slots"] == 1 and metrics.disconnects == 0
            gate.set()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: "))["choices"][0] for line in rest[:-1]]
        assert chunks[-1]["finish_reason"] == "length" and len(chunks) == 20  # 19 more pieces, then the end
        assert metrics.read_timeouts == 0 and metrics.disconnects == 0


def test_a_waiting_client_that_disconnects_is_cancelled(tiny_shared):
    engine = load(tiny_shared, max_batch=1, step_s=0.02)
    with running(engine) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 100, "logit_bias": NO_EOS}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.3)
        wait_for(lambda: engine.stats()["active_slots"] == 0, "the slot to be freed", 1)
        assert "gpt2onnx_client_disconnects_total 1" in httpx.get(url + "/metrics").text


@pytest.mark.parametrize("drain_timeout, finish_reason", [(10.0, "length"), (0.2, "cancelled")])
def test_draining_finishes_or_cancels_running_requests_and_refuses_new_ones(tiny_shared, drain_timeout,
                                                                              finish_reason):  # fmt: skip
    """What SIGTERM starts (app.state.drain): new requests 503, /health 503, the running stream
    ends within the drain timeout, finished or cancelled, and either way with [DONE]."""
    engine, apps = load(tiny_shared, max_batch=2, step_s=0.01), []
    with running(engine, drain_timeout, apps) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 60, "stream": True, "logit_bias": NO_EOS}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=T) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            apps[0].state.drain.start()
            refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=T)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert httpx.get(url + "/health").status_code == 503
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == finish_reason


# -- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--port", "70000"], "--port must be a port number"),
    (["--max-queue", "0"], "--max-queue must be"),
    (["--drain-timeout", "nan"], "--drain-timeout must be"),
    (["--max-batch", "x"], "invalid int value"),
    (["--host", "no such host."], "--host 'no such host.' is not an address"),
])  # fmt: skip
def test_bad_flags_are_one_line(capsys, tmp_path, flags, words):
    code, err = run_flags(capsys, "serve", "--model", tmp_path, *flags)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_port_in_use_is_one_line(capsys, tmp_path):
    taken = serve_cli.bind("127.0.0.1", 0)
    taken.listen()
    with taken:
        code, err = run_flags(capsys, "serve", "--model", tmp_path, "--port", taken.getsockname()[1])
    assert code == 2 and "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1, err


def test_a_concat_cache_model_is_refused_with_the_fix(capsys, tiny_fp32):
    code, err = run_flags(capsys, "serve", "--model", tiny_fp32, "--port", 0)
    assert code == 2 and "--kv-cache shared" in err and len(err.strip().splitlines()) == 1, err


def test_without_the_serve_extra_the_error_says_what_to_install(capsys, tmp_path, monkeypatch):
    import gpt2onnx.serve

    monkeypatch.delattr(gpt2onnx.serve, "server")  # as if never imported, and fastapi not installed
    monkeypatch.delitem(sys.modules, "gpt2onnx.serve.server")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    code, err = run_flags(capsys, "serve", "--model", tmp_path)
    assert code == 2 and "needs fastapi" in err and "pip install 'gpt2-onnx[serve]'" in err, err


def start_subprocess_server(folder, *flags) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2onnx", "serve", "--model", str(folder), "--port", "0", *flags],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    line = proc.stderr.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
    if not match:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
    url = match[1]
    wait_for(lambda: healthy(url), "the server to answer /health")
    return proc, url


def healthy(url) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_lets_the_running_request_finish_and_exits_0(tiny_shared):
    proc, url = start_subprocess_server(tiny_shared, "--served-model-name", MODEL, "--drain-timeout", "20")
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 120, "stream": True, "logit_bias": NO_EOS}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=T) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert (
            rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        )
        assert proc.wait(T) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("ray", [[], ["--ray"]])
def test_a_bad_prompt_lookup_flag_is_one_line_before_anything_starts(capsys, tmp_path, ray):
    code, err = run_flags(capsys, "serve", "--model", tmp_path / "m", "--prompt-lookup", "65", *ray)
    assert code == 2 and "--prompt-lookup must be an integer from 0 (off) to 64" in err
    assert "Traceback" not in err
