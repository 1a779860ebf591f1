"""`gpt2-onnx serve --ray`: two replicas of the tiny model on a real local Ray cluster (the server
process starts it and stops it), driven by the `openai` client and raw HTTP: every port of the
cluster on loopback, the same answers as the engine alone, requests spread over both replicas, a
replica killed under load with every failure in the API's shape, and SIGTERM draining to exit 0.
The endpoint's relaying (retries, a cut stream's end, the drain) is also checked without Ray,
over a stand-in for the replicas' handle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra: pip install -e '.[test]'")
openai = pytest.importorskip("openai", reason="client tests need the openai package")
httpx = pytest.importorskip("httpx", reason="raw-HTTP tests need httpx")

from conftest import run_flags  # noqa: E402
from gpt2onnx import Engine  # noqa: E402

MODEL = "tiny-test"
NO_EOS = {"50256": -100}
START_S = 240  # Ray, its Serve controller and two replicas, on 2 cores
READ_TIMEOUT_S = 3  # the front's --read-timeout
T = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_of(response) -> str:
    return response.headers["x-gpt2onnx-replica"]


@dataclass(frozen=True)
class Cluster:
    url: str
    engine: Engine  # the same model, alone in this process
    pid: int  # the server's process: Ray's daemons and replicas are its descendants
    log: Path


@pytest.fixture(scope="module")
def cluster(tiny_shared, tmp_path_factory):
    """The server on its own local Ray cluster; at the end SIGTERM, which must drain and exit 0."""
    port, log = free_port(), tmp_path_factory.mktemp("ray") / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2onnx", "serve", "--ray", "--replicas", "2", "--model", str(tiny_shared),
             "--port", str(port), "--max-batch", "8", "--served-model-name", MODEL, "--drain-timeout", "10",
             "--read-timeout", str(READ_TIMEOUT_S), "--prompt-lookup", "4"],
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
        yield Cluster(url, Engine.load(tiny_shared, provider="cpu"), proc.pid, log)
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


def listening_sockets(root: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP and UDP socket listening in `root`'s process tree,
    read from /proc (Linux), as `ss -ltnup` shows them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # a process that ended meanwhile
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    owner, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # a process that ended meanwhile
            continue
    found = []
    for table, listen in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == listen and fields[9] in owner:
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                found.append((str(ipaddress.ip_address(raw)), int(port, 16), owner[fields[9]]))
    return found


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or getattr(ip, "ipv4_mapped", None) is not None and ip.ipv4_mapped.is_loopback


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets through Linux's /proc")
def test_every_port_of_the_cluster_it_started_is_on_loopback(cluster):
    """The cluster `serve --ray` starts for itself (GCS, raylet and object manager, workers and
    replicas, the dashboard and runtime-env agents, metrics) and the endpoint listen on loopback
    only: Ray's ports run code for whoever reaches them (ShadowRay, CVE-2023-48022)."""
    found = listening_sockets(cluster.pid)
    names = {name for _, _, name in found}
    assert {"gcs_server", "raylet"} <= names, found  # Ray's daemons were looked at
    assert any(name.startswith("ray::ServeRepl") for name in names), found
    assert int(cluster.url.rsplit(":", 1)[1]) in {port for _, port, _ in found}
    exposed = [s for s in found if not loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_completions_streaming_and_errors_through_ray(cluster):
    url, engine = cluster.url, cluster.engine
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


def test_replicas_speculate_by_prompt_lookup_when_the_server_says(cluster):
    """serve --ray --prompt-lookup 4: each replica's engine proposes for the requests that allow
    it (greedy text as without it); a replica's /metrics counts its drafts."""
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0, timeout=T)
    for prompt in ("one two one two", "three four three", "a b a b a", "x y x y"):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                        logit_bias=NO_EOS)  # fmt: skip
        assert got.choices[0].text == alone(cluster.engine, prompt, 12)
    proposed = [
        float(line.split()[-1])
        for _ in range(6)
        for line in httpx.get(cluster.url + "/metrics", timeout=T).text.splitlines()
        if line.startswith("gpt2onnx_draft_tokens_proposed_total")
    ]
    assert max(proposed) > 0


def test_the_front_cuts_off_a_client_that_stalls_after_the_read_timeout(cluster):
    """--read-timeout and the connection limit hold on the Ray front too: half a request is
    answered 408 and closed once the read timeout passes; others are served meanwhile."""
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers without their end
        assert httpx.get(cluster.url + "/health").status_code == 200
        t0, data = time.monotonic(), b""
        while chunk := sock.recv(65536):
            data += chunk
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408 ") and READ_TIMEOUT_S * 0.5 < took < READ_TIMEOUT_S + 10, (
        data[:80],
        took,
    )


def test_requests_spread_over_both_replicas(cluster):
    url = cluster.url
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 16, "logit_bias": NO_EOS}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=T), range(16))
        )
    assert all(r.status_code == 200 for r in responses)
    replicas = {replica_of(r) for r in responses}
    assert len(replicas) == 2, replicas


def stream_events(url: str, body: dict, replica: list, first: threading.Event) -> list:
    """A streamed completion's events as parsed JSON (the last one the string "[DONE]"); its
    replica is put in `replica`, and `first` set when its first event has come."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=T) as response:
        assert response.status_code == 200
        replica.append(replica_of(response))
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                first.set()
    return events


def test_a_killed_replica_fails_requests_in_the_api_shape_and_comes_back(cluster):
    """16 requests, 8 of them streamed, and one replica's process killed once a stream from it has
    begun. No client retries: a request whose answer had not started is sent to the other replica
    by the endpoint, so every whole one comes back with its own text; a stream the kill cut ends
    with OpenAI's error object as an event, then `data: [DONE]`, after a prefix of its text; and
    Ray starts a new replica."""
    url, engine = cluster.url, cluster.engine
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=T)
    prompts = [f"Request number {i}" for i in range(16)]
    want = {p: alone(engine, p, 100) for p in prompts}
    body = {"model": MODEL, "max_tokens": 100, "temperature": 0, "logit_bias": NO_EOS}
    victim = replica_of(httpx.get(url + "/health", timeout=T))
    begun = {p: threading.Event() for p in prompts}
    replicas: dict[str, list] = {p: [] for p in prompts}

    def one(i: int, prompt: str):
        if i % 2:
            return client.completions.create(prompt=prompt, **body).choices[0].text
        return stream_events(url, {**body, "prompt": prompt}, replicas[prompt], begun[prompt])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i, p) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + T
        while not any(begun[p].is_set() and replicas[p] == [victim] for p in prompts[::2]):
            assert time.monotonic() < deadline, "no stream began on the victim"
            time.sleep(0.01)
        os.kill(int(victim.split()[1]), signal.SIGKILL)
        results = [f.result() for f in futures]
    cut = 0
    for prompt, result in zip(prompts, results):
        if isinstance(result, str):  # a whole completion: its own text, whichever replica ran it
            assert result == want[prompt], prompt
            continue
        assert result[-1] == "[DONE]", result[-3:]
        text = "".join(e["choices"][0]["text"] for e in result[:-2] if e.get("choices"))
        if "error" in result[-2]:
            cut += 1
            assert replicas[prompt] == [victim] and want[prompt].startswith(text), prompt
            error = result[-2]["error"]
            assert error["type"] == "server_error" and error["code"] == "replica_failed", error
        else:
            assert text + result[-2]["choices"][0]["text"] == want[prompt], prompt
    assert cut >= 1, "the kill cut no stream"
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
    from gpt2onnx.serve.ray_serve import Scaling

    assert Scaling(replicas=3).options() == {"num_replicas": 3}
    auto = Scaling(None, 1, 4, 8.0).options()["autoscaling_config"]
    assert auto == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}


# -- the endpoint's relaying, over a stand-in for the replicas' handle ---------------------------
JSON_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json")],
}
SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream")],
}


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Replicas:
    """A stand-in for the Replica deployment's handle: call i plays scripts[i], a list of message
    batches in which an exception is the replica's death at that point."""

    def __init__(self, *scripts: list):
        self.scripts, self.calls = list(scripts), 0

    def options(self, **_):
        return self

    @property
    def request(self):
        return self

    def remote(self, scope: dict, body: bytes):
        assert scope["method"] == "POST" and json.loads(body) == {"prompt": "Hi"}
        self.calls += 1
        return Response(self.scripts.pop(0))


class Response:
    def __init__(self, script: list):
        self.script = script

    def cancel(self) -> None:
        pass

    async def __aiter__(self):
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield item


def post(front, payload: dict | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            return await client.post("/v1/completions", json=payload or {"prompt": "Hi"})

    return asyncio.run(go())


def died():
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def test_a_request_whose_replica_died_before_answering_goes_to_another():
    from gpt2onnx.serve.ray_serve import Front

    replicas = Replicas([died()], [[SSE_START], died()], [[JSON_START], [body(b'{"ok": 1}')]])
    response = post(Front(replicas, drain_timeout=1))
    assert response.status_code == 200 and response.json() == {"ok": 1} and replicas.calls == 3


def test_when_every_try_died_the_answer_is_a_503_error_object_with_retry_after():
    from gpt2onnx.serve.ray_serve import RETRIES, Front

    replicas = Replicas(*[[died()] for _ in range(RETRIES + 1)])
    response = post(Front(replicas, drain_timeout=1))
    assert response.status_code == 503 and replicas.calls == RETRIES + 1
    assert response.headers["retry-after"].isdigit()
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "replica_unavailable", error


def test_a_stream_cut_by_its_replica_ends_with_an_error_event_and_done():
    from gpt2onnx.serve.ray_serve import Front

    replicas = Replicas([[SSE_START, body(b'data: {"choices": []}\n\n', True)], died()], [])
    response = post(Front(replicas, drain_timeout=1))
    events = [line for line in response.text.split("\n\n") if line]
    assert response.status_code == 200 and replicas.calls == 1  # begun: never sent again
    assert events[0] == 'data: {"choices": []}' and events[-1] == "data: [DONE]", events
    assert json.loads(events[-2][6:])["error"]["code"] == "replica_failed"


def test_a_bug_behind_the_endpoint_is_a_500_error_object_not_plain_text():
    from gpt2onnx.serve.ray_serve import Front

    response = post(Front(Replicas([RuntimeError("boom")]), drain_timeout=1))
    assert response.status_code == 500 and "boom" in response.json()["error"]["message"]


def test_the_endpoint_refuses_a_body_over_the_limit_and_new_requests_while_draining(monkeypatch):
    from gpt2onnx.serve import server
    from gpt2onnx.serve.ray_serve import Front

    monkeypatch.setattr(server, "MAX_BODY_BYTES", 10)
    front = Front(Replicas(), drain_timeout=1)
    assert post(front, {"prompt": "x" * 20}).status_code == 413
    front.start()
    response = post(front)
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"


def test_a_cancelled_replica_call_is_a_client_disconnect_to_the_app():
    """Run in the replica: leaving the messages early (the endpoint's client went away) makes the
    app's receive() say http.disconnect, as uvicorn's would, so the engine's work is cancelled."""
    from gpt2onnx.serve.ray_serve import run_app

    seen = []

    async def app(scope, receive, send):
        assert (await receive())["body"] == b"{}"
        await send(SSE_START)
        await send(body(b"data: 1\n\n", True))
        seen.append((await receive())["type"])

    async def go():
        messages = run_app(app, {"type": "http"}, b"{}")
        first = await messages.__anext__()
        await messages.aclose()
        for _ in range(10):
            await asyncio.sleep(0)
        return first

    assert asyncio.run(go())[0] == SSE_START and seen == ["http.disconnect"]


class Endless(Response):
    """A stream that goes on until its call is cancelled, as a replica's does."""

    def __init__(self):
        self.cancelled = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self):
        from ray.serve.exceptions import RequestCancelledError

        yield [SSE_START, body(b'data: {"choices": []}\n\n', True)]
        await self.cancelled.wait()
        raise RequestCancelledError("r")


def test_a_stream_still_running_at_the_drain_timeout_ends_with_an_error_event_and_done():
    from gpt2onnx.serve.ray_serve import Front

    replicas = Replicas()
    replicas.remote = lambda scope, body: Endless()
    front = Front(replicas, drain_timeout=0.2)

    async def go():
        front.loop = asyncio.get_running_loop()  # as the lifespan's startup sets it
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            running = asyncio.create_task(client.post("/v1/completions", json={"prompt": "Hi"}))
            await asyncio.sleep(0.1)
            front.start()
            return await asyncio.wait_for(running, 10)

    events = [line for line in asyncio.run(go()).text.split("\n\n") if line]
    assert events[0] == 'data: {"choices": []}' and events[-1] == "data: [DONE]", events
    assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
