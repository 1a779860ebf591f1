"""`gpt2-onnx serve` at its edges: hostile input, requests as large as the server, scoring requests
as evaluation harnesses send them, the tokenizer routes, and clients that stall or leave.

Servers run in-process on 127.0.0.1 (a free port, stopped by each test) with the settings
`gpt2-onnx serve` gives uvicorn (tests/serve/test_server.py's `running`); every load is bounded in
count and time. The server's log is captured: no input may leave a traceback there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

from conftest import run_flags

pytest.importorskip("fastapi", reason="the server needs the [serve] extra: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="raw-HTTP tests need httpx: pip install -e '.[test]'")
openai = pytest.importorskip(
    "openai", reason="client tests need the openai package: pip install -e '.[test]'"
)

from test_server import MODEL, NO_EOS, T, load, running, wait_for  # noqa: E402

from gpt2onnx.serve import server  # noqa: E402


class Records(logging.Handler):
    """Every record the server logs (uvicorn's and ours), kept for the test to read."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info or "Traceback" in r.getMessage()]

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def logged():
    """The server's log records while the block runs (attach once the server runs: uvicorn's
    config sets its loggers up anew); ours at debug."""
    handler, ours = Records(), logging.getLogger("gpt2onnx")
    loggers = [logging.getLogger("uvicorn"), ours]
    level = ours.level
    ours.setLevel(logging.DEBUG)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        ours.setLevel(level)


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


def post(url: str, body: bytes | dict, path: str = "/v1/completions", **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=T)  # fmt: skip


def assert_openai_error(r: httpx.Response, status: int, param=None, words: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert words in error["message"], error["message"]
    return error


# -- no 500 for anything a client sends ----------------------------------------------------------
PARAMS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "presence_penalty",
          "frequency_penalty", "logit_bias", "echo", "logprobs", "stream", "stream_options", "user", "best_of",
          "suffix", "top_k", "min_p", "repetition_penalty", "truncate", "ignore_eos"]  # fmt: skip
# JSON texts, as sent (NaN and Infinity are what Python's json writes and reads)
VALUES = ["null", "true", "false", "0", "-1", "1", "9223372036854775808", "1e400", "-0.0", "1.5", "NaN",
          "Infinity", "-Infinity", '""', '"x"', '"\\ud800x"', '"\\udfff"', '"\\ud83d\\ude00"', "[]", "[[]]",
          "[1]", "[[1]]", "[[[1]]]", '["a"]', "[null]", "{}", '{"a": 1}', '{"1": 1}', '{"include_usage": true}',
          '[1, "a"]', '"' + "a" * 5000 + '"', "[" + ", ".join(["50256"] * 300) + "]",
          "[" + ", ".join(['"a"'] * 129) + "]"]  # fmt: skip
RAW_BODIES = [b"", b"null", b'"x"', b"{", b"\xff\xfe{}", b'{"prompt": "\xff"}', b'{"\\ud800x": 1}',
              b'{"model": "tiny-test", "prompt": "\\udc00"}', b"[" * 100000 + b"]" * 100000,
              b'{"n": 1' + b"0" * 5000 + b"}", '{"prompt": "e"}'.encode("utf-16"), b'{"prompt": "x"} trailing',
              b'{"logit_bias": {"\\ud800": 1}}', b'{"stop": ["\\udc00"]}']  # fmt: skip


def is_openai_shape(r: httpx.Response) -> bool:
    if r.status_code == 200:
        return True
    try:
        return set(r.json()["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return False


def test_no_input_gets_a_500_or_a_traceback(base_url):
    """Every parameter with every kind of wrong value (types, huge and non-finite numbers, nested
    arrays, empty strings, lone surrogates), raw bodies (invalid UTF-8, not JSON, deep nesting,
    other encodings) under several content types on every POST route, and every method on every
    route: each answer is below 500, an error is OpenAI's object, and the log has no traceback."""
    failures = []
    with logged() as log, httpx.Client(base_url=base_url, timeout=T) as c:
        for param in PARAMS:
            for value in VALUES:
                others = [f'"{k}": {v}' for k, v in [("model", '"tiny-test"'), ("prompt", '"Hi"'),
                                                    ("max_tokens", "2")] if k != param]  # fmt: skip
                body = "{" + ", ".join([*others, f'"{param}": {value}']) + "}"
                r = c.post(
                    "/v1/completions", content=body.encode(), headers={"content-type": "application/json"}
                )
                if r.status_code >= 500 or not is_openai_shape(r):
                    failures.append((param, value[:40], r.status_code, r.text[:200]))
        for body in RAW_BODIES:
            for content_type in ("application/json", "text/plain", "application/x-www-form-urlencoded", None):
                for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
                    headers = {"content-type": content_type} if content_type else {}
                    r = c.post(path, content=body, headers=headers)
                    if r.status_code >= 500 or not is_openai_shape(r):
                        failures.append((path, body[:40], r.status_code, r.text[:200]))
        for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
            for path in ("/v1/completions", "/v1/models", "/v1/models/%ff", "/v1/models/%ED%A0%80", "/health",
                         "/tokenizer_info", "/tokenize", "/x?a=%ff"):  # fmt: skip
                if (r := c.request(method, path)).status_code >= 500:
                    failures.append((method, path, r.status_code, r.text[:200]))
    assert not failures, failures
    assert not log.tracebacks(), log.tracebacks()[:3]


@pytest.mark.parametrize("body, param, words", [
    ('{"model": "tiny-test", "prompt": "\\ud800x"}', "prompt", "prompt holds a lone surrogate (\\ud800 at character 0)"),
    ('{"model": "tiny-test", "prompt": ["ok", "x\\udfff"]}', "prompt", "prompt[1] holds a lone surrogate"),
    ('{"model": "tiny-test", "\\ud800x": 1}', "\\ud800x", 'the parameter name "\\ud800x" holds a lone surrogate'),
    ('{"model": "tiny-test", "stop": ["\\udc00"]}', "stop", "stop[0] holds a lone surrogate"),
    ('{"model": "tiny-test", "logit_bias": {"\\ud800": 1}}', "logit_bias", 'logit_bias key "\\ud800"'),
    ('{"model": "\\ud800"}', "model", "model holds a lone surrogate"),
])  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_parameter(base_url, body, param, words):
    assert_openai_error(post(base_url, body.encode()), 400, param, words)


def test_a_surrogate_pair_is_one_character(base_url, engine):
    r = post(base_url, b'{"model": "tiny-test", "prompt": "\\ud83d\\ude00", "max_tokens": 1, "echo": true}')
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\U0001f600"), r.text
    tokens = post(base_url, b'{"prompt": "\\ud83d\\ude00"}', "/tokenize").json()["tokens"]
    assert tokens == engine.to_tokens("\U0001f600")


# -- a request's own size is not a full queue ----------------------------------------------------
def test_a_request_as_large_as_slots_and_queue_fits_an_idle_server(client, base_url):
    """65 choices on an idle server with 8 slots and 64 queue places: they fit (only those
    beyond the free slots wait); 73 never can: 400 naming the limit and the flag."""
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, n=65)
    assert len(out.choices) == 65
    ids = [[464, 3290]] * 72
    assert len(client.completions.create(model=MODEL, prompt=ids, max_tokens=1).choices) == 72
    error = assert_openai_error(post(base_url, {"model": MODEL, "prompt": "Hi", "n": 73}), 400, "n")
    assert (
        "73 choices" in error["message"]
        and "8 slots (--max-batch) and 64 queue places (--max-queue)" in (error["message"])
    )
    assert_openai_error(
        post(base_url, {"model": MODEL, "prompt": ["Hi"] * 100}), 400, "prompt", "--max-queue"
    )


async def burst(url: str, jobs: int) -> list[tuple[int, str]]:
    """`jobs` requests at once, every other one streamed: (status, body) of each."""

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str]:
        body = {"model": MODEL, "prompt": f"Hello {i}", "max_tokens": 3, "stream": i % 2 == 1}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            return r.status_code, (await r.aread()).decode()

    limits = httpx.Limits(max_connections=jobs)
    async with httpx.AsyncClient(base_url=url, timeout=T, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(jobs)))


def test_a_burst_gets_every_slot_and_queue_place(tiny_shared):
    """30 requests at once at an idle server with 8 slots and 4 queue places: 12 are taken,
    streamed or not, however far the scheduler has got in moving them into slots (here not at
    all: the test holds the engine); the 18 others get 429 saying why."""
    engine, apps, results = load(tiny_shared, max_batch=8, max_queue=4), [], []
    with running(engine, app_out=apps) as url:
        engine._lock.acquire()  # the scheduler cannot start a step: every accepted request waits
        try:
            thread = threading.Thread(target=lambda: results.extend(asyncio.run(burst(url, 30))))
            thread.start()
            wait_for(lambda: apps[0].state.metrics.requests.get(429, 0) == 18, "18 refusals")
            assert engine.stats()["queue_depth"] == 12 and engine.stats()["room"] == 0
        finally:
            engine._lock.release()
        thread.join(T)
    assert sorted(status for status, _ in results) == [200] * 12 + [429] * 18
    for status, text in results:
        if status == 429:
            error = json.loads(text)["error"]
            assert error["code"] == "queue_full" and "room for 0 more requests now" in error["message"], error


# -- scoring as harnesses send it ----------------------------------------------------------------
def test_max_tokens_0_with_echo_scores_the_prompt_as_engine_score(client, engine):
    """What lm-evaluation-harness sends for a log-likelihood: max_tokens 0, echo, logprobs; the
    prompt comes back with its tokens' logprobs (the first null), no new token, "length"."""
    text = "The quick brown fox jumps over the lazy dog"
    out = client.completions.create(
        model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    (c,) = out.choices
    assert c.text == text and c.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(engine.to_tokens(text))
    score = engine.score(text)  # logprobs[i]: token i + 1 (after the BOS) given those before
    assert c.logprobs.tokens == score.str_tokens[1:] and c.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(c.logprobs.token_logprobs[1:], score.logprobs[1:], atol=1e-5)
    assert c.logprobs.text_offset == [
        sum(map(len, c.logprobs.tokens[:i])) for i in range(len(c.logprobs.tokens))
    ]

    ids = engine.to_tokens(text, prepend_bos=False)  # a token prompt: every id listed
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[
        0
    ]
    alone = engine.score(text, prepend_bos=False)
    assert by_ids.text == text and by_ids.logprobs.tokens == alone.str_tokens
    np.testing.assert_allclose(by_ids.logprobs.token_logprobs[1:], alone.logprobs, atol=1e-5)


def test_scoring_streams_and_batches_the_same(client, base_url):
    prompts = ["Hello there", "A dog"]
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=2, n=2)
    assert [c.text for c in whole.choices] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert whole.choices[0].logprobs.token_logprobs == whole.choices[1].logprobs.token_logprobs
    body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 2, "n": 2, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=T) as r:
        events = r.read().decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: "))["choices"][0] for e in events[:-2]]
    for i, c in enumerate(whole.choices):
        mine = [chunk for chunk in chunks if chunk["index"] == i]
        assert "".join(chunk["text"] for chunk in mine) == c.text
        assert [chunk["finish_reason"] for chunk in mine] == [None, "length"]
        streamed = mine[0]["logprobs"]["token_logprobs"]
        assert streamed[0] is None and streamed[1:] == pytest.approx(c.logprobs.token_logprobs[1:])
    plain = client.completions.create(model=MODEL, prompt="Hi", max_tokens=0, echo=True)
    assert plain.choices[0].text == "Hi" and plain.choices[0].logprobs is None
    empty = client.completions.create(model=MODEL, prompt="", max_tokens=0, echo=True, logprobs=1).choices[0]
    assert empty.text == "" and empty.logprobs.tokens == empty.logprobs.token_logprobs == []
    assert empty.logprobs.top_logprobs == empty.logprobs.text_offset == []


def test_echo_with_truncate_left_echoes_what_was_scored(client, engine):
    long = " ".join(f"w{i}" for i in range(300))
    out = client.completions.create(model=MODEL, prompt=long, max_tokens=3, echo=True, logprobs=1,
                                    logit_bias=NO_EOS, extra_body={"truncate": "left"})  # fmt: skip
    kept = engine.submit(long, 3, truncate="left").result(T).prompt_token_ids  # the engine's own cut
    assert len(kept) == engine.n_positions - 3 and out.usage.prompt_tokens == len(kept)
    (c,) = out.choices
    echoed = engine.to_string(kept)
    assert c.text.startswith(echoed) and long.endswith(echoed) and echoed != long
    lp = c.logprobs
    assert lp.tokens[: len(kept)] == engine.to_str_tokens(kept) and len(lp.tokens) == len(kept) + 3
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    scored = client.completions.create(model=MODEL, prompt=long, max_tokens=0, echo=True, logprobs=0,
                                       extra_body={"truncate": "left"}).choices[0]  # fmt: skip
    whole = engine.submit(long, 0, prompt_logprobs=0, truncate="left").result(
        T
    )  # scored alone: the whole context
    assert (
        scored.text == engine.to_string(whole.prompt_token_ids)
        and len(whole.prompt_token_ids) == engine.n_positions
    )
    short = client.completions.create(model=MODEL, prompt="Hello", max_tokens=0, echo=True, logprobs=0,
                                      extra_body={"truncate": "left"}).choices[0]  # fmt: skip
    assert short.text == "Hello" and short.logprobs.tokens == ["Hello"]  # not cut: the BOS is not listed


def test_the_model_may_be_left_out_or_null(base_url):
    for body in ({"prompt": "Hi", "max_tokens": 1}, {"model": None, "prompt": "Hi", "max_tokens": 1}):
        r = post(base_url, body)
        assert r.status_code == 200 and r.json()["model"] == MODEL, r.text
    assert_openai_error(post(base_url, {"model": "gpt2-xl", "prompt": "Hi"}), 404, "model", "does not exist")


# -- the tokenizer routes ------------------------------------------------------------------------
def test_tokenize_and_detokenize_as_vllm_gives_them(base_url, engine):
    r = post(base_url, {"prompt": "Hello world"}, "/tokenize")
    want = engine.to_tokens("Hello world")  # the BOS first, as a text prompt is run
    assert r.json() == {"tokens": want, "count": len(want), "max_model_len": engine.n_positions}
    plain = post(base_url, {"model": MODEL, "prompt": "Hello world", "add_special_tokens": False,
                            "return_token_strs": True}, "/tokenize").json()  # fmt: skip
    assert plain["tokens"] == want[1:] and plain["token_strs"] == engine.to_str_tokens(want[1:])
    eos = post(base_url, {"prompt": "<|endoftext|>", "add_special_tokens": False}, "/tokenize").json()
    assert eos["tokens"] == [engine.manifest.config.eos_token_id]  # how lm-eval finds the EOS id
    assert post(base_url, {"prompt": "", "add_special_tokens": False}, "/tokenize").json()["count"] == 0
    assert post(base_url, {"tokens": want}, "/detokenize").json() == {"prompt": "<|endoftext|>Hello world"}
    assert post(base_url, {"tokens": []}, "/detokenize").json() == {"prompt": ""}


def test_tokenizer_info_says_what_harnesses_read(base_url, engine):
    info = httpx.get(base_url + "/tokenizer_info", timeout=T).json()
    c = engine.manifest.config
    assert info["tokenizer_class"] and info["name_or_path"] == MODEL
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert (info["eos_token_id"], info["bos_token_id"]) == (c.eos_token_id, c.bos_token_id)
    assert info["model_max_length"] == info["max_model_len"] == engine.n_positions
    assert info["vocab_size"] == engine.vocab_size


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/tokenize", {"prompt": 5}, 400, "prompt", "prompt must be a str"),
    ("/tokenize", {}, 400, "prompt", "prompt must be a str"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens", "True or False"),
    ("/tokenize", {"prompt": "x", "messages": []}, 400, "messages", "unknown parameter 'messages'; /tokenize takes"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model", "does not exist"),
    ("/tokenize", {"prompt": "x" * ((1 << 20) + 1)}, 400, "prompt", "more than 1048576"),
    ("/tokenize", [1], 400, None, "JSON object"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "tokens[0] = -1 is outside the vocabulary"),
    ("/detokenize", {"tokens": "x"}, 400, "tokens", "list of token ids"),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens", "tokens[0] is 1.5"),
    ("/detokenize", {}, 400, "tokens", "list of token ids"),
])  # fmt: skip
def test_bad_tokenizer_requests_are_openai_errors(base_url, path, body, status, param, words):
    assert_openai_error(post(base_url, body, path), status, param, words)


# -- clients that stall or leave -----------------------------------------------------------------
QUICK = server.Limits(read_timeout=1.0, keep_alive=0.5)
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=T)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit)
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - start


@pytest.fixture(scope="module")
def quick_server(tiny_shared):
    """A server whose clients get 1 s to send a request and stay 0.5 s idle at most; with its app."""
    apps = []
    with running(load(tiny_shared, max_batch=2), limits=QUICK, app_out=apps) as url:
        yield url, apps[0]


@pytest.mark.parametrize("sent", [
    b"",  # connects and says nothing
    b"POST /v1/comp",  # half a request line
    HEAD,  # headers without their end
    HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt": "Hi"',  # part of the body
], ids=["nothing", "request-line", "headers", "body"])  # fmt: skip
def test_a_client_that_stalls_is_disconnected_after_the_read_timeout(quick_server, sent):
    url, app = quick_server
    before = app.state.metrics.read_timeouts
    with logged() as log:
        sock = connect(url)
        sock.sendall(sent)
        data, took = read_until_closed(sock)
        assert 0.8 < took < 6, f"closed after {took:.2f} s"
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
        assert "--read-timeout" in error["message"] and error["type"] == "invalid_request_error"
        wait_for(lambda: app.state.metrics.read_timeouts == before + 1, "the timeout to be counted")
    assert not log.tracebacks(), log.tracebacks()
    assert httpx.get(url + "/health").status_code == 200


def test_a_trickling_client_is_cut_off_but_a_slow_whole_one_is_served(quick_server):
    url, _ = quick_server
    sock = connect(url)
    sock.sendall(HEAD)
    start = time.monotonic()
    with contextlib.suppress(OSError):  # a header line every 0.1 s: never whole
        while time.monotonic() - start < 6:
            sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.1)
    assert time.monotonic() - start < 6, "the trickling client was never cut off"
    sock.close()
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    sock = connect(url)
    sock.sendall(HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:5])
    time.sleep(0.3)  # well within the timeout
    sock.sendall(body[5:])
    data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]


def test_many_stalled_connections_are_all_closed(quick_server):
    """30 connections stalling at once, in headers or body: all closed by the deadline."""
    url, _ = quick_server
    socks = [connect(url) for _ in range(30)]
    for i, sock in enumerate(socks):
        sock.sendall(HEAD if i % 2 else HEAD + b"Content-Length: 50\r\n\r\n{")
    start = time.monotonic()
    for sock in socks:
        data, _ = read_until_closed(sock, limit=max(0.1, 10 - (time.monotonic() - start)))
        assert data.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start < 6


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(quick_server):
    url, _ = quick_server
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and 0.3 < took < 5, (data[:50], took)


def test_clients_leaving_mid_body_leave_one_debug_line_each(quick_server):
    """50 clients send half a body and close: no 'Exception in ASGI application', no traceback;
    a debug line each, and the disconnects counted."""
    url, app = quick_server
    before = app.state.metrics.disconnects
    with logged() as log:
        for _ in range(50):
            sock = connect(url)
            sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')
            time.sleep(0.01)  # the app is reading the body
            sock.close()
        wait_for(lambda: app.state.metrics.disconnects == before + 50, "50 disconnects")
    assert not log.tracebacks(), log.tracebacks()[:2]
    assert not [m for m in log.messages() if "Exception in ASGI" in m]
    assert sum("went away before its request was whole" in m for m in log.messages()) == 50


def test_past_max_connections_a_request_gets_503(tiny_shared):
    limits = server.Limits(read_timeout=T, max_connections=3)
    with running(load(tiny_shared, max_batch=2), limits=limits) as url:
        held = [connect(url) for _ in range(3)]  # open, saying nothing yet
        try:
            time.sleep(0.2)
            extra = connect(url)
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data, _ = read_until_closed(extra)
            assert data.startswith(b"HTTP/1.1 503 "), data[:100]
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, "room again", 5)


def test_headers_past_the_cap_are_refused(quick_server):
    """Headers are capped (httptools would keep any amount): 80 KiB of them get a 400 at once."""
    url, _ = quick_server
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + (b"X-Big: " + b"a" * 1000 + b"\r\n") * 80)
    data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 400 "), data[:100]  # at once, not the read timeout's 408
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("flags, words", [
    (["--read-timeout", "0"], "--read-timeout must be seconds above 0"),
    (["--timeout-keep-alive", "-1"], "--timeout-keep-alive must be"),
    (["--max-connections", "0"], "--max-connections must be"),
])  # fmt: skip
def test_bad_connection_flags_are_one_line(capsys, tmp_path, flags, words):
    code, err = run_flags(capsys, "serve", "--model", tmp_path, *flags)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
