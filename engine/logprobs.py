"""Log-probabilities of given tokens, and of the most likely ones, over rows of logits.

One function for every place that reports them: a generated token's logprob (and its top
alternatives) at each step, a prompt's logprobs for `echo`, and `Engine.score`. Rows are
normalized once, in float64 where it matters (a float32 sum over 50,257 tokens drifts), and the
top tokens are found by a partial selection, not a sort of the whole vocabulary: with a 127-token
prompt and `logprobs: 1`, sorting every position's 50,257 logits was most of a scoring request.
"""

from __future__ import annotations

import numpy as np


def token_logprobs(logits: np.ndarray, targets, top: int = 0) -> tuple[np.ndarray, list[dict[int, float]]]:
    """log p(targets[r]) for each row r of logits (rows, vocab), in float64, and, for top > 0,
    each row's `top` most likely tokens with their logprobs, most likely first (else empty dicts)."""
    logits = np.asarray(logits)
    peak = logits.max(axis=-1, keepdims=True)
    norm = peak[:, 0].astype(np.float64) + np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64))
    picked = np.take_along_axis(logits, np.asarray(targets, dtype=np.int64)[:, None], axis=-1)[:, 0]
    return picked.astype(np.float64) - norm, top_tokens(logits, norm, top)


def top_tokens(logits: np.ndarray, norm: np.ndarray, top: int) -> list[dict[int, float]]:
    """Each row's `top` most likely tokens -> logprob (logit - the row's log normalizer)."""
    if top <= 0:
        return [{} for _ in range(len(logits))]
    if top == 1:  # what scoring harnesses ask for (is the target the greedy token?): one pass
        best = logits.argmax(axis=-1)[:, None]
    else:
        best = np.argpartition(logits, -top, axis=-1)[:, -top:]
        order = np.argsort(-np.take_along_axis(logits, best, axis=-1), axis=-1, kind="stable")
        best = np.take_along_axis(best, order, axis=-1)
    values = np.take_along_axis(logits, best, axis=-1).astype(np.float64) - norm[:, None]
    return [dict(zip(map(int, ids), map(float, vals))) for ids, vals in zip(best, values)]
