"""The composed session's slots: one row of a running batch prefilled, freed and reused while the
others keep their cache (what continuous batching builds on), against full recomputes."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx.engine.clock import Clock
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.pickers import ArgmaxPicker
from gpt2onnx.engine.sampling import SamplingConfig

TEXTS = ["Hello there", "The quick brown fox jumps over the lazy", "a"]
NEW = "Once upon a time, in a land far away"  # longer than the rows it joins


@pytest.fixture(scope="module", params=["shared", "cuda-graphs"])
def engine(request, tiny_shared):
    return Engine.load(tiny_shared, provider="cpu", max_batch=4, cuda_graphs=request.param == "cuda-graphs")


def start(engine: Engine, prompts: list[list[int]], seq: int = 64) -> None:
    engine.session.start(len(prompts), seq, Clock())
    for row, prompt in enumerate(prompts):  # logits=True: the logits come to the host, for the checks
        engine.session.admit(row, prompt, SamplingConfig(), logits=True)


def recomputed(engine: Engine, ids: list[int]) -> np.ndarray:
    """The next-token logits of ids, from a pass over the whole sequence with no cache."""
    return engine.logits(ids)[0, -1]


def check_rows(engine: Engine, seqs: dict[int, list[int]], rows: int, when: str) -> None:
    logits = engine.session.last_logits(rows)
    for r, ids in seqs.items():
        want = recomputed(engine, ids)
        assert np.abs(logits[r] - want).max() < 1e-4, f"{when}: row {r} differs from a full recompute"


def test_a_prompt_prefilled_into_a_slot_joins_a_running_batch(engine):
    """Rows 0 and 2 decode on while row 1 is freed and refilled with a longer prompt: every row's
    logits equal a full recompute of its own sequence at every step, before and after."""
    session = engine.session
    prompts = [engine.to_tokens(t) for t in TEXTS]
    start(engine, prompts)
    seqs = {r: list(p) for r, p in enumerate(prompts)}
    tokens = session.prefill(prompts)
    check_rows(engine, seqs, 3, "prefill")
    for step in range(3):
        for r in seqs:
            seqs[r].append(int(tokens[r]))
        tokens = session.decode(tokens)
        check_rows(engine, seqs, 3, f"decode step {step}")

    session.free(1)  # row 1's request ended; its slot decodes a dummy token until refilled
    del seqs[1]
    for step in range(2):
        for r in seqs:
            seqs[r].append(int(tokens[r]))
        tokens = session.decode(tokens)
        check_rows(engine, seqs, 3, f"decode step {step} with slot 1 free")
    assert session.cache.row_lengths.lengths[1] == 0, "a free slot grew"

    new = engine.to_tokens(NEW)
    first = session.prefill_slot(1, new)
    fresh = recomputed(engine, new)
    assert np.abs(session.last_logits(1)[0] - fresh).max() < 1e-4, "slot prefill differs from a fresh batch"
    assert first == int(np.argmax(fresh))
    seqs[1], tokens[1] = new, first
    for step in range(4):
        for r in seqs:
            seqs[r].append(int(tokens[r]))
        tokens = session.decode(tokens)
        check_rows(engine, dict(sorted(seqs.items())), 3, f"decode step {step} after the slot was refilled")


def test_a_slot_prefill_matches_the_same_prompt_in_a_fresh_batch(engine):
    """The same prompt through prefill_slot in a running batch and through prefill in a new batch
    gives the same logits and, greedy, the same tokens after."""
    session = engine.session
    prompts = [engine.to_tokens(t) for t in TEXTS]
    new = engine.to_tokens(NEW)

    start(engine, [prompts[0], new, prompts[2]])
    tokens = session.prefill([prompts[0], new, prompts[2]])
    fresh = [session.last_logits(3)[1].copy()]
    for _ in range(5):
        tokens = session.decode(tokens)
        fresh.append(session.last_logits(3)[1].copy())

    start(engine, prompts)
    tokens = session.prefill(prompts)
    tokens = session.decode(tokens)
    tokens[1] = session.prefill_slot(1, new)
    got = [session.last_logits(1)[0].copy()]
    for _ in range(5):
        tokens = session.decode(tokens)
        got.append(session.last_logits(3)[1].copy())
    for step, (a, b) in enumerate(zip(got, fresh)):
        assert np.abs(a - b).max() < 1e-4, f"step {step}: the slot row differs from the fresh batch's row"


def test_slots_work_with_the_graphs_own_argmax(engine):
    """A greedy picker that reads only the ids (no logits come back) fills a slot too."""
    session = engine.session
    prompts = [engine.to_tokens(t) for t in TEXTS]
    session.start(3, 64, Clock())  # every row greedy: the graph's argmax picks
    tokens = session.prefill(prompts)
    assert isinstance(session.picker, ArgmaxPicker)
    tokens = session.decode(tokens)
    new = engine.to_tokens(NEW)
    assert session.prefill_slot(0, new) == int(np.argmax(recomputed(engine, new)))


def test_slots_need_the_shared_cache_and_a_static_batch_keeps_its_rows(tiny_fp32):
    """The concat cache has no slots: a prompt cannot join its batch, and a freed row stays in
    it (decoding a dummy token) until the batch ends, the other rows unchanged."""
    engine = Engine.load(tiny_fp32, provider="cpu")
    start(engine, [[1, 2, 3], [4, 5]])
    first = engine.session.prefill([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="--kv-cache shared"):
        engine.session.prefill_slot(0, [4, 5])
    engine.session.free(1)
    (token,) = engine.session.decode(first[:1])  # row 1 ended: the step still runs both rows
    assert token == int(np.argmax(recomputed(engine, [1, 2, 3, int(first[0])])))
