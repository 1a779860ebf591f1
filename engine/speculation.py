"""Speculative decoding by prompt lookup: propose the tokens that followed an earlier occurrence
of the last n-gram in the prompt and the text so far (`lookup`), verify them all in one run of the
target, and keep the longest prefix the target agrees with plus its own next token.

Exactness. Greedy: a drafted token is kept when it is the target's argmax after the tokens
before it, so the output is plain greedy decoding's, token for token (each argmax is the
graph's own, from one run over the row's pending token and the drafts instead of one run per
token). Sampled: the standard rejection rule with the draft a point mass: draft d is kept with
probability p(d) under the row's sampling settings; on a rejection the token is drawn from p
with d removed and renormalised; when every draft is kept, one more token is drawn from the
target after them (the bonus). Each token so made has the target's distribution given the ones
before it (tests/engine/test_speculation.py checks the joint distribution of the first tokens).

Cost. A verification is one run over 1 + k positions of one row; it pays where the drafts are
often kept (text that repeats the prompt: code, edits, extraction). The number proposed adapts:
one more than the last verification kept (twice as many after all were kept, up to the asked
N), and after a verification that kept none, the slot skips the lookup for `backoff` steps
(1, 2, 4, ... up to MAX_BACKOFF), decoding plainly in the batch meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .inputs import Count
from .sampling import (
    SamplingConfig,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    distributions,
    sample_from,
)

MAX_NGRAM, MIN_NGRAM = 3, 2  # the n-grams looked up, longest first (single tokens repeat too often to pay)
MAX_BACKOFF = 16  # steps a slot skips the lookup after proposals that were all rejected, at most
MAX_PROMPT_LOOKUP = 64  # tokens one verification may propose
# prompt_lookup and draft_tokens (and --prompt-lookup) through the input gate
DRAFTS_A_STEP = Count(0, MAX_PROMPT_LOOKUP, f"an integer from 0 (off) to {MAX_PROMPT_LOOKUP}")


def lookup(history: np.ndarray, most: int) -> list[int]:
    """Up to `most` tokens that followed an earlier occurrence of the history's last n-gram (n from
    MAX_NGRAM down to MIN_NGRAM): the most recent occurrence with `most` tokens after it, else
    the one with the most (in a loop, the latest occurrences have only a few after them); []
    when none occurs."""
    n_tokens = len(history)
    for n in range(min(MAX_NGRAM, n_tokens - 1), MIN_NGRAM - 1, -1):
        tail = history[n_tokens - n :]
        best = None
        for start in np.flatnonzero(history[: n_tokens - n] == tail[0])[::-1]:  # most recent first
            if np.array_equal(history[start : start + n], tail):
                follow = min(most, n_tokens - start - n)
                if best is None or follow > best[1]:
                    best = (start, follow)
                if follow == most:
                    break
        if best is not None and best[1] > 0:
            start = best[0] + n
            return history[start : start + best[1]].tolist()
    return []


@dataclass
class Lookup:
    """A slot's prompt lookup: its settings, its back-off, and what it proposed and kept."""

    most: int  # drafts per verification, at most
    limit: int = 0  # drafts the next verification may propose (adapts; 0: `most`)
    skip: int = 0  # steps left without a lookup
    backoff: int = 1
    proposed: int = 0
    accepted: int = 0

    def budget(self, room: int) -> int:
        """How many tokens to propose this step (at most `room`); 0 to decode plainly."""
        if self.skip:
            self.skip -= 1
            return 0
        return max(0, min(self.limit or self.most, room))

    def propose(self, history: np.ndarray, room: int) -> list[int]:
        """Prompt lookup's drafts for the next step (at most `room`), or [] to decode plainly."""
        n = self.budget(room)
        return lookup(history, n) if n else []

    def kept(self, proposed: int, accepted: int) -> None:
        """After a verification: the next one proposes one more than this one kept (twice as many
        when all were kept, up to `most`), and a verification that kept none starts a back-off."""
        self.proposed, self.accepted = self.proposed + proposed, self.accepted + accepted
        limit = self.limit or self.most
        self.limit = min(self.most, 2 * limit if accepted == proposed else accepted + 1)
        if accepted:
            self.backoff = 1
        else:
            self.skip, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)


def accept_greedy(drafts: list[int], argmax: np.ndarray) -> list[int]:
    """argmax[i]: the target's token after the pending token and drafts[:i]. The new tokens: the
    drafts it agrees with, then its own next one."""
    out = []
    for i, d in enumerate(drafts):
        if int(argmax[i]) != d:
            break
        out.append(d)
    out.append(int(argmax[len(out)]))
    return out


def picker_logits(logits: np.ndarray, drafts: list[int], cfg: SamplingConfig, seen: np.ndarray | None,
                  counts: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """A verification's logits (1 + k, vocab), after the pending token and drafts[:i] at row i ->
    what the row's picker would see there (sampling.sample_rows' order): the logit bias, then the
    penalties over the row's history (seen, counts: (vocab,), as RowSampling keeps them) with
    drafts[:i] added as made tokens."""
    n = len(logits)
    logits = apply_logit_bias(logits, [cfg.logit_bias] * n)
    if not cfg.uses_history:
        return logits
    seen, counts = np.repeat(seen[None], n, axis=0), np.repeat(counts[None], n, axis=0)
    for i, d in enumerate(drafts):
        seen[i + 1 :, d] = True
        counts[i + 1 :, d] += 1
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    return apply_presence_frequency(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)


def target_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """(positions, vocab) logits -> the distribution a draft model draws its proposals from under
    the row's settings (logit bias, temperature, top-k/p, min-p; penalties left out: the rule
    needs only that each draft is drawn from the q it is judged by), float64."""
    n = len(logits)
    return distributions(apply_logit_bias(logits, [cfg.logit_bias] * n), [cfg] * n).astype(np.float64)


def accept_sampled(drafts: list[int], probs: np.ndarray, rng: np.random.Generator,
                   draft_probs: np.ndarray | None = None) -> list[int]:  # fmt: skip
    """probs[i]: the target's distribution after the pending token and drafts[:i]; draft_probs[i]:
    the draft model's, which drafts[i] was drawn from (None: prompt lookup, a point mass). Draft
    d is kept with probability min(1, p(d) / q(d)); on a rejection the token is drawn from
    max(0, p - q), renormalised; after every draft is kept, one more from p."""
    out = []
    for i, d in enumerate(drafts):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if rng.random() * q_d < probs[i, d]:
            out.append(d)
            continue
        if draft_probs is None:
            residual = probs[i].copy()
            residual[d] = 0.0
        else:
            residual = np.maximum(probs[i] - draft_probs[i], 0.0)
        out.append(int(sample_from(residual[None], [rng])[0]))
        return out
    out.append(int(sample_from(probs[None, len(drafts)], [rng])[0]))
    return out
