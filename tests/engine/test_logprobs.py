"""engine/logprobs.py against the plain definition: a float64 log-softmax and a full sort."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx.engine.logprobs import token_logprobs


def reference(logits: np.ndarray, targets, top: int):
    x = logits.astype(np.float64)
    logp = x - x.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    tops = [{int(t): float(row[t]) for t in np.argsort(-row, kind="stable")[:top]} for row in logp]
    return logp[np.arange(len(x)), targets], tops


@pytest.mark.parametrize("top", [0, 1, 2, 5])
def test_logprobs_and_top_tokens_match_a_full_log_softmax_and_sort(top):
    gen = np.random.default_rng(top)
    logits = (gen.standard_normal((7, 50257)) * 4).astype(np.float32)
    targets = gen.integers(0, 50257, 7)
    got, got_top = token_logprobs(logits, targets, top)
    want, want_top = reference(logits, targets, top)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_top, want_top):
        assert list(g) == list(w)  # the same tokens, most likely first
        np.testing.assert_allclose(list(g.values()), list(w.values()), atol=1e-5)


def test_a_row_sure_of_its_token_gives_zero_and_one_row_works():
    logits = np.full((1, 10), -50.0, np.float32)
    logits[0, 3] = 50.0
    (lp,), (top,) = token_logprobs(logits, [3], 3)
    assert lp == pytest.approx(0.0, abs=1e-12)
    assert list(top)[0] == 3 and len(top) == 3


def test_scoring_a_prompt_alone_is_one_pass_and_takes_no_slot(tiny_shared):
    """submit(prompt, 0, prompt_logprobs=k): what `echo` with `max_tokens: 0` asks for (scoring
    harnesses): one pass over the prompt, no prefill, no slot, no new token; the logprobs are
    Engine.score's."""
    from gpt2onnx.engine.engine import Engine

    engine = Engine.load(tiny_shared, provider="cpu", max_batch=2)
    session, runs = engine.session, []
    for name in ("full_logits", "prefill", "prefill_slot", "decode"):
        real = getattr(session, name)
        setattr(session, name, lambda *a, _n=name, _r=real, **k: (runs.append(_n), _r(*a, **k))[1])
    handle = engine.submit("The quick brown fox", 0, prompt_logprobs=1)
    done = handle.result(30)
    assert done.token_ids == [] and done.finish_reason == "length" and runs == ["full_logits"]
    want = engine.score("The quick brown fox").logprobs
    np.testing.assert_allclose(handle.prompt_logprobs[1:], want, atol=1e-5)
    assert all(len(top) == 1 for top in handle.prompt_top_logprobs[1:])
    with pytest.raises(Exception, match="max_new_tokens"):
        engine.submit("x", 0)  # no new token and nothing scored: still refused
