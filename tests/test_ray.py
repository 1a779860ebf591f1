"""`gpt2-onnx serve --ray`: two replicas of the tiny model on a real local Ray cluster (the server
process starts it on loopback and stops it), driven by the `openai` client and raw HTTP: the
same answers as the engine alone, requests spread over both replicas, a replica killed under
load with nothing lost silently, and SIGTERM draining to exit 0."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="client tests need the openai package")
httpx = pytest.importorskip("httpx", reason="raw-HTTP tests need httpx")

from conftest import run_flags  # noqa: E402
from gpt2onnx import Engine  # noqa: E402

MODEL = "tiny-test"
NO_EOS = {"50256": -100}
START_S = 240  # Ray, its Serve controller and proxy, and two replicas, on 2 cores
T = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_of(response) -> str:
    return response.headers["x-gpt2onnx-replica"]


@pytest.fixture(scope="module")
def cluster(tiny_shared, tmp_path_factory):
    """The server on its own local Ray cluster; at the end SIGTERM, which must drain and exit 0."""
    port, log = free_port(), tmp_path_factory.mktemp("ray") / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2onnx", "serve", "--ray", "--replicas", "2", "--model", str(tiny_shared),
             "--port", str(port), "--max-batch", "4", "--served-model-name", MODEL, "--drain-timeout", "10"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while "gpt2-onnx: serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the Ray server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url, Engine.load(tiny_shared, provider="cpu")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, log.read_text()[-3000:]


def alone(engine: Engine, prompt: str, n: int) -> str:
    return engine.generate(prompt, max_new_tokens=n, logit_bias={50256: -100.0}).completions[0].text


def test_completions_streaming_and_errors_through_ray(cluster):
    url, engine = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=T)
    got = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=0, logit_bias=NO_EOS
    )
    assert got.choices[0].text == alone(engine, "Hello", 8) and got.usage.completion_tokens == 8
    stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                       logit_bias=NO_EOS, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in stream) == got.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:  # the same input gate and error shape
        client.completions.create(model=MODEL, prompt="Hello", temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hello")
    assert [m.id for m in client.models.list()] == [MODEL]


def test_requests_spread_over_both_replicas(cluster):
    url, _ = cluster
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 16, "logit_bias": NO_EOS}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=T), range(16))
        )
    assert all(r.status_code == 200 for r in responses)
    replicas = {replica_of(r) for r in responses}
    assert len(replicas) == 2, replicas


def test_a_killed_replica_loses_nothing_silently_and_comes_back(cluster):
    """One replica's process killed while 16 requests run: each request completes with its own
    text (the openai client retries the 500s of the dead replica's requests on the other one) or
    fails with a retryable error, and Ray starts a new replica."""
    url, engine = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=3, timeout=T)
    prompts = [f"Request number {i}" for i in range(16)]
    want = {p: alone(engine, p, 40) for p in prompts}

    def one(prompt: str):
        try:
            c = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=40, temperature=0, logit_bias=NO_EOS
            )
            return c.choices[0].text
        except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError) as e:
            return e

    victim = replica_of(httpx.get(url + "/health", timeout=T))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        time.sleep(0.5)
        os.kill(int(victim.split()[1]), signal.SIGKILL)
        results = [f.result() for f in futures]
    for prompt, result in zip(prompts, results):
        if isinstance(result, str):
            assert result == want[prompt], prompt
        else:  # retryable: no answer from the dead replica, never a wrong one
            assert not isinstance(result, openai.APIStatusError) or result.status_code >= 500, result
    assert sum(isinstance(r, str) for r in results) >= len(prompts) // 2
    deadline, seen = time.monotonic() + 120, set()
    while time.monotonic() < deadline:
        seen = {replica_of(httpx.get(url + "/health", timeout=T)) for _ in range(8)}
        if len(seen) == 2 and victim not in seen:
            break
        time.sleep(1)
    assert len(seen) == 2 and victim not in seen, f"no new replica after the kill: {seen}"
    assert re.fullmatch(r"\S+ \d+", next(iter(seen)))


BAD_FLAGS = [
    (["--replicas", "2"], "--replicas is for replicas on Ray: add --ray"),
    (["--ray", "--replicas", "2", "--min-replicas", "1"], "--replicas is a fixed count"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --min-replicas 3"),
    (["--ray", "--replicas", "0"], "--replicas must be an integer from 1 to 1024"),
    (["--ray", "--replica-cpus", "0"], "--replica-cpus must be"),
]


@pytest.mark.parametrize("flags, words", BAD_FLAGS)
def test_bad_ray_flags_are_one_line_before_anything_starts(capsys, tiny_shared, flags, words):
    code, err = run_flags(capsys, "serve", "--model", tiny_shared, "--port", "0", *flags)
    assert code != 0 and words in err and "Traceback" not in err and not ray.is_initialized()


def test_autoscaling_flags_become_ray_serve_settings():
    from gpt2onnx.ray_serve import Scaling

    assert Scaling(replicas=3).options() == {"num_replicas": 3}
    auto = Scaling(None, 1, 4, 8.0).options()["autoscaling_config"]
    assert auto == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
