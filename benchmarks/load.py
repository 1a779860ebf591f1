"""Open-loop load: many requests arriving at random times, against an OpenAI-compatible server
(ours with continuous batching, ours with max-batch 1, llama.cpp's) and as static batches through
`Engine.generate`, on the same seeded workload.

Open loop: a request is sent at its arrival time whether or not the earlier ones have finished
(Poisson arrivals at `rate` requests/s), so a server that falls behind builds a queue and its
latencies show it. Each request has a prompt of random token ids (16-256) and asks for
max_tokens (16-256) tokens with EOS ignored, so every runner produces the same number of tokens.

Per request: time to first token (from its arrival: queue time included), inter-token latency
(between consecutive streamed tokens), and queue time where the server reports it. Per run:
throughput (all new tokens / the time from the first arrival to the last token) and p50/p99.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Job:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int


@dataclass
class Done:
    arrival: float
    first: float | None  # seconds after the start: first token
    times: list[float]  # every token's
    tokens: int
    error: str | None = None


def workload(n: int, rate: float, vocab: int, seed: int = 0, prompt=(16, 256), new=(16, 256)) -> list[Job]:
    """n requests with Poisson arrivals at `rate` per second, seeded: every runner gets the same."""
    gen = np.random.default_rng(seed)
    arrivals = np.cumsum(gen.exponential(1.0 / rate, n)) - 0.0
    return [
        Job(
            float(t),
            gen.integers(0, vocab - 1, int(gen.integers(prompt[0], prompt[1] + 1))).tolist(),
            int(gen.integers(new[0], new[1] + 1)),
        )  # fmt: skip
        for t in arrivals
    ]


async def stream_one(client, model: str, job: Job, sent: float, clock) -> Done:
    """One streamed completion; times are clock() - its origin, like `sent` (the arrival)."""
    import httpx  # in the [test] and [bench] extras; here so that the module loads without it

    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    done, finished = Done(sent, None, [], 0), None
    for attempt in (1, 2):
        responded = False
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                responded = True
                if response.status_code != 200:
                    done.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return done
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                    if choice and (choice.get("finish_reason") is None or choice.get("text")):
                        done.times.append(clock())  # a chunk per token (the last may carry the finish)
                    finished = finished or choice.get("finish_reason")
        except httpx.RemoteProtocolError as e:
            if attempt == 1 and not responded:
                # a kept-alive connection the server had closed as the request went out (llama.cpp's
                # llama-server, a few times in 48): sent again on a fresh one, its time still counted
                continue
            done.error = f"{type(e).__name__}: {e}"
        except httpx.HTTPError as e:
            done.error = f"{type(e).__name__}: {e}"
        break
    # A server may hold back a token that ends inside a UTF-8 character and send it with the next
    # (llama.cpp): chunks can be fewer than tokens. EOS is ignored, so "length" means all of them.
    done.tokens = job.max_tokens if finished == "length" else len(done.times)
    done.first = done.times[0] if done.times else None
    return done


def client_for(url: str, connections: int, timeout: float):
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)


async def run_server(
    url: str, model: str, jobs: list[Job], timeout: float = 600.0
) -> tuple[list[Done], float]:
    """Open loop: every job sent at its arrival time. Returns what came back and the wall time."""
    loop = asyncio.get_running_loop()
    async with client_for(url, len(jobs) + 8, timeout) as client:
        start = loop.time()

        def clock() -> float:
            return loop.time() - start

        async def one(job: Job) -> Done:
            await asyncio.sleep(max(0.0, job.arrival - clock()))
            return await stream_one(client, model, job, job.arrival, clock)

        results = await asyncio.gather(*(one(job) for job in jobs))
        return list(results), clock()


async def run_server_closed(url: str, model: str, jobs: list[Job], clients: int,
                            timeout: float = 600.0) -> tuple[list[Done], float]:  # fmt: skip
    """Closed loop: `clients` clients, each sending its next job as soon as its last one ended
    (its arrival is when it is sent)."""
    pending, results = list(reversed(jobs)), []
    loop = asyncio.get_running_loop()
    async with client_for(url, clients + 8, timeout) as client:
        start = loop.time()

        def clock() -> float:
            return loop.time() - start

        async def worker() -> None:
            while pending:
                results.append(await stream_one(client, model, pending.pop(), clock(), clock))

        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, clock()


def run_static(engine, jobs: list[Job], batch: int) -> tuple[list[Done], float]:
    """Static batching through Engine.generate: whenever the engine is free, the requests that have
    arrived (up to `batch`) run together until the longest is done; the next batch waits."""
    start, results, i = time.perf_counter(), [], 0
    while i < len(jobs):
        now = time.perf_counter() - start
        if jobs[i].arrival > now:
            time.sleep(jobs[i].arrival - now)
            now = jobs[i].arrival
        group = [j for j in jobs[i : i + batch] if j.arrival <= now]
        i += len(group)
        began = time.perf_counter() - start
        out = engine.generate([j.prompt for j in group], max_new_tokens=max(j.max_tokens for j in group),
                              ignore_eos=True, temperature=0)  # fmt: skip
        clock = out.timing
        steps = began + clock.first_token_s + np.concatenate([[0.0], np.cumsum(clock.step_s)])
        for job in group:
            times = steps[: job.max_tokens].tolist()
            results.append(Done(job.arrival, times[0], times, len(times)))
    return results, time.perf_counter() - start


def summary(results: list[Done], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = np.array([r.first - r.arrival for r in ok if r.first is not None])
    itl = np.concatenate([np.diff(r.times) for r in ok if len(r.times) > 1] or [np.zeros(0)])
    tokens = sum(r.tokens for r in ok)
    span = max((r.times[-1] for r in ok if r.times), default=wall) - min(r.arrival for r in results)

    def pct(x: np.ndarray, q: float) -> float | None:
        return float(np.percentile(x, q) * 1e3) if len(x) else None

    return {
        "requests": len(results), "errors": len(results) - len(ok), "new_tokens": tokens,
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
        "first_error": next((r.error for r in results if r.error), None),
    }  # fmt: skip


def to_json(jobs: list[Job]) -> list[dict]:
    return [asdict(j) | {"prompt_len": len(j.prompt)} for j in jobs]
