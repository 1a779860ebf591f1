"""Continuous batching: requests submitted from many threads (and from asyncio) join and leave a
running batch, and each gets exactly the tokens it gets alone."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from gpt2onnx.engine.contract import InputError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.requests import EngineClosedError, QueueFullError

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "a",
    "Once upon a time, in a land far away, there lived a king who had three daughters and",
    "x y z",
    "What is the answer",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "It was",
]
LENGTHS = [3, 9, 14, 5, 12, 7, 10, 16]  # mixed: requests end at different steps
SETTINGS = [
    {},
    {"top_k": 20, "seed": 1},
    {"temperature": 0.7, "seed": 2},
    {"top_k": 40, "top_p": 0.8, "temperature": 1.3, "seed": 3},
    {"min_p": 0.2, "seed": 4},
    {"repetition_penalty": 1.3, "presence_penalty": 0.5, "seed": 5},
    {"logit_bias": {13: 3.0}, "top_k": 30, "seed": 6},
    {"frequency_penalty": 0.8},
]


@pytest.fixture(scope="module", params=["shared", "cuda-graphs"])
def engine(request, tiny_shared):
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=3, cuda_graphs=request.param == "cuda-graphs")
    engine.scheduler.chunk = 8  # long prompts go in several chunks
    return engine


def alone(engine: Engine, prompt: str, n: int, **settings) -> list[int]:
    return engine.generate(prompt, max_new_tokens=n, ignore_eos=True, **settings).completions[0].token_ids


def submit_from_threads(engine: Engine, jobs: list[tuple[str, int, dict]]) -> list:
    handles: list = [None] * len(jobs)

    def send(i: int) -> None:
        prompt, n, settings = jobs[i]
        handles[i] = engine.submit(prompt, max_new_tokens=n, ignore_eos=True, **settings)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return handles


def test_each_request_gets_the_tokens_it_gets_alone(engine):
    """Greedy and seeded sampling, penalties and logit bias mixed in one running batch of 3 slots
    with 8 requests of mixed lengths: every request's tokens equal its tokens run alone."""
    jobs = [(p, n, s) for p, n, s in zip(PROMPTS, LENGTHS, SETTINGS)]
    want = [alone(engine, p, n, **s) for p, n, s in jobs]
    handles = submit_from_threads(engine, jobs)
    got = [h.result(timeout=60) for h in handles]
    for (prompt, n, settings), completion, tokens in zip(jobs, got, want):
        assert completion.token_ids == tokens, f"{prompt!r} {settings}"
        assert completion.finish_reason == "length" and len(tokens) == n
    assert engine.stats()["active_slots"] == 0 and engine.stats()["queue_depth"] == 0


def test_pieces_stream_the_text_as_generate_makes_it(engine):
    h = engine.submit(PROMPTS[1], max_new_tokens=10, stop=[" the"])
    pieces = list(h)
    want = engine.generate(PROMPTS[1], max_new_tokens=10, stop=[" the"]).completions[0]
    assert "".join(p.text for p in pieces) == want.text == h.result().text
    assert [t for p in pieces for t in p.token_ids] == want.token_ids
    assert h.finish_reason == want.finish_reason and len(h.token_times) == len(want.token_ids)


def test_asyncio_iterates_and_awaits(engine):
    async def main():
        handles = [engine.submit(p, max_new_tokens=6, ignore_eos=True) for p in PROMPTS[:5]]
        streamed = [[t async for piece in handles[0] for t in piece.token_ids]]
        rest = await asyncio.gather(*handles[1:])
        return streamed + [c.token_ids for c in rest]

    got = asyncio.run(main())
    assert got == [alone(engine, p, 6) for p in PROMPTS[:5]]


def test_a_cancelled_request_frees_its_slot_and_the_others_go_on(engine):
    want = [alone(engine, p, 12) for p in PROMPTS[:3]]
    handles = [engine.submit(p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS[:3]]
    long = engine.submit(PROMPTS[0], max_new_tokens=100, ignore_eos=True)
    next(iter(long))  # it is running
    long.cancel()
    assert long.result(timeout=30).finish_reason == "cancelled"
    assert len(long.result().token_ids) < 100
    assert [h.result(timeout=30).token_ids for h in handles] == want
    waiting = engine.submit(PROMPTS[0], max_new_tokens=5)
    waiting.cancel()  # perhaps before it got a slot
    assert waiting.result(timeout=30).finish_reason in ("cancelled", "length", "eos")
    time.sleep(0.05)
    assert engine.stats()["active_slots"] == 0


def test_a_full_queue_refuses_at_once(tiny_shared):
    """Waiting requests take the free slots first: only those beyond them count against max_queue,
    however far the loop has got in moving them in."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=1, max_queue=2)
    with engine._lock:  # the scheduler cannot start: submissions stay queued
        held = [engine.submit("Hello", max_new_tokens=2) for _ in range(3)]  # 1 slot + 2 places
        assert engine.stats()["room"] == 0
        with pytest.raises(QueueFullError, match="max_queue 2"):
            engine.submit("Hello", max_new_tokens=2)
        assert engine.stats()["queue_depth"] == 3
    assert all(h.result(timeout=30).token_ids for h in held)
    engine.submit("Hello", max_new_tokens=2).result(timeout=30)  # room again


def test_close_finishes_running_requests_and_refuses_new_ones(tiny_shared):
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=2)
    handles = [engine.submit(p, max_new_tokens=8, ignore_eos=True) for p in PROMPTS[:3]]
    engine.close(timeout=30)
    assert [len(h.result(timeout=0).token_ids) for h in handles] == [8, 8, 8]
    with pytest.raises(EngineClosedError):
        engine.submit("Hello")


def test_close_cancels_what_does_not_finish_in_time(tiny_shared):
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=1)
    handles = [engine.submit("Hello", max_new_tokens=100, ignore_eos=True) for _ in range(3)]
    next(iter(handles[0]))
    engine.close(timeout=0.01)
    reasons = [h.result(timeout=0).finish_reason for h in handles]
    assert "cancelled" in reasons and all(h.done for h in handles)


def test_bad_requests_are_refused_at_submission(engine):
    with pytest.raises(InputError, match="context"):
        engine.submit("word " * 200, max_new_tokens=10)
    with pytest.raises(InputError, match="temperature"):
        engine.submit("Hello", temperature=-1)
    with pytest.raises(InputError, match="logprobs"):
        engine.submit("Hello", logprobs=6)


def test_the_concat_cache_runs_requests_in_static_batches(tiny_fp32, engine):
    """No slots in the concat cache: submitted requests start together when the batch is empty
    and the batch runs to its last row; each still gets the tokens it gets alone (and greedy,
    those of the shared cache's model, the same weights)."""
    concat = Engine.load(tiny_fp32, provider="cpu", max_batch=3)
    runs = []
    prefill = concat.session.prefill
    concat.session.prefill = lambda prompts, first=0: (runs.append(len(prompts)), prefill(prompts, first))[1]
    jobs = [(p, n, s) for p, n, s in zip(PROMPTS, LENGTHS, SETTINGS)]
    want = [alone(concat, p, n, **s) for p, n, s in jobs]
    runs.clear()
    with concat._lock:  # all queued before the first batch starts
        handles = [concat.submit(p, max_new_tokens=n, ignore_eos=True, **s) for p, n, s in jobs]
    assert [h.result(timeout=60).token_ids for h in handles] == want
    assert runs == [3, 3, 2], "8 requests in batches of max_batch 3, each prefilled in one run"
    assert want[0] == alone(engine, *jobs[0][:2]), "greedy: not the tokens of the same weights"


def test_logprobs_come_with_each_token(engine):
    h = engine.submit("Hello there", max_new_tokens=4, logprobs=3, ignore_eos=True)
    pieces = list(h)
    logits = engine.logits(h.prompt_token_ids + h.result().token_ids)[0]
    for i, piece in enumerate(pieces):
        (token,), (logprob,), (top,) = piece.token_ids, piece.token_logprobs, piece.top_logprobs
        row = logits[len(h.prompt_token_ids) - 1 + i].astype("float64")
        want = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert abs(logprob - want[token]) < 1e-4
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy: the chosen one is the best


def test_a_long_prompt_goes_in_chunks_between_decode_steps(tiny_shared):
    """Running rows are never stalled for more than one chunk: between two decode steps at most
    one chunk of a prompt is prefilled, and the long prompt's tokens are still its own."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=2)
    engine.scheduler.chunk = 4
    long_prompt = PROMPTS[3]
    want = [alone(engine, PROMPTS[1], 30), alone(engine, long_prompt, 5)]
    session, events = engine.session, []
    prefill_slot, decode = session.prefill_slot, session.decode
    session.prefill_slot = lambda *a, **k: (events.append("prefill"), prefill_slot(*a, **k))[1]
    session.decode = lambda *a, **k: (events.append("decode"), decode(*a, **k))[1]
    engine.scheduler.on_step = lambda: time.sleep(
        0.002
    )  # still decoding when the long prompt comes, on any CPU
    running = engine.submit(PROMPTS[1], max_new_tokens=30, ignore_eos=True)
    next(iter(running))  # decoding now
    joining = engine.submit(long_prompt, max_new_tokens=5, ignore_eos=True)
    assert [running.result(30).token_ids, joining.result(30).token_ids] == want
    chunks = -(-len(joining.prompt_token_ids) // 4)
    first = events.index("prefill", events.index("decode"))  # the joining prompt's first chunk
    assert events[first : first + 2 * chunks] == ["prefill", "decode"] * chunks, events


def test_generate_joins_the_running_batch(tiny_shared):
    """generate() while submitted requests run takes free slots in their batch (no waiting for
    them) and gets the tokens it gets alone."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=3)
    want = alone(engine, PROMPTS[0], 5)
    engine.scheduler.on_step = lambda: time.sleep(0.002)  # long enough to be caught running
    handles = [engine.submit(p, max_new_tokens=60, ignore_eos=True) for p in PROMPTS[1:3]]
    next(iter(handles[0]))
    assert engine.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True).completions[0].token_ids == want
    assert not all(h.done for h in handles), "generate waited for the running requests"
    assert all(len(h.result(timeout=60).token_ids) == 60 for h in handles)


def test_prompts_that_come_together_are_prefilled_together(tiny_shared):
    """generate() with several prompts: one prefill run for the batch (as a static batch would),
    the same tokens as each prompt alone, and the call's figures."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=4)
    prompts = ["The cat sat on", "A dog ran to", "One two three", "It was the"]  # about as long
    want = [alone(engine, p, 6) for p in prompts]
    session, runs = engine.session, []
    prefill, prefill_slot = session.prefill, session.prefill_slot
    session.prefill = lambda prompts, first=0: (runs.append((first, len(prompts))), prefill(prompts, first))[
        1
    ]
    session.prefill_slot = lambda *a, **k: (runs.append("slot"), prefill_slot(*a, **k))[1]
    out = engine.generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert runs == [(0, 4)]
    assert [c.token_ids for c in out.completions] == want
    t = out.timing
    assert t.new_tokens == 24 and len(t.step_s) == 5 and t.prefill_s > 0 and t.decode_run_s > 0
    assert 0 < t.as_dict()["decode_ms_per_token"] and t.python_overhead_ms() >= 0


def test_a_request_that_needs_a_bigger_cache_waits_for_the_running_ones(tiny_shared, monkeypatch):
    """The cache grows only while no slot is in use: a long request behind short running ones
    waits until they end (and those behind it too), then runs with the room it needs."""
    from gpt2onnx.engine import kv_cache

    monkeypatch.setattr(kv_cache, "SEQ_GRANULE", 16)
    solo = Engine.load(tiny_shared, provider="cpu", max_batch=1)
    want = [alone(solo, PROMPTS[0], 8), alone(solo, PROMPTS[3], 40), alone(solo, PROMPTS[2], 4)]
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=3)
    engine.scheduler.on_step = lambda: time.sleep(0.002)  # long enough to be caught running
    short = engine.submit(PROMPTS[0], max_new_tokens=8, ignore_eos=True)
    next(iter(short))  # running in a cache sized for it
    long = engine.submit(PROMPTS[3], max_new_tokens=40, ignore_eos=True)
    behind = engine.submit(PROMPTS[2], max_new_tokens=4, ignore_eos=True)
    got = [h.result(timeout=60).token_ids for h in (short, long, behind)]
    assert got == want
    assert long.token_times[0] > short.token_times[-1], "the long request started before the cache grew"
    assert behind.token_times[0] > short.token_times[-1], "a request passed the one waiting for room"


def test_a_loop_that_does_not_turn_while_it_has_work_is_stuck(tiny_shared):
    """Health checks (/health, Ray's check_health) ask Engine.stuck: true only while requests
    wait or run and no step has ended for that long; an idle engine is never stuck."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=2)
    assert not engine.stuck(0.0)
    time.sleep(0.3)
    held = threading.Event()
    engine.scheduler.on_step = lambda: held.wait(30)  # the loop hangs after its first step
    handle = engine.submit("Hello", max_new_tokens=5, ignore_eos=True)
    assert not engine.stuck(0.2), "work that just came in is not a stuck loop"
    next(iter(handle))
    time.sleep(0.3)
    assert engine.stuck(0.2) and not engine.stuck(60)
    held.set()
    handle.result(timeout=30)
    time.sleep(0.1)
    assert not engine.stuck(0.0)


def test_close_returns_even_when_a_step_hangs(tiny_shared, monkeypatch, caplog):
    """close(timeout) cancels what is left after `timeout`; a loop that still does not stop (a
    step hung inside onnxruntime) is waited for CANCEL_S more, then left with a warning."""
    from gpt2onnx.engine import scheduler

    monkeypatch.setattr(scheduler, "CANCEL_S", 0.5)
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=2)
    held = threading.Event()
    engine.scheduler.on_step = lambda: held.wait(30)  # the loop hangs after its first step
    handle = engine.submit("Hello", max_new_tokens=5, ignore_eos=True)
    next(iter(handle))
    t0 = time.monotonic()
    engine.close(timeout=0.2)
    assert time.monotonic() - t0 < 5 and "did not stop" in caplog.text
    assert handle.cancelled
    held.set()  # the step ends: the loop sees the cancel and stops
    assert handle.result(timeout=30).finish_reason == "cancelled"
