"""Beam search for one request, as transformers' `generate(num_beams=k, do_sample=False)` runs it
(transformers 5.x, `GenerationMixin._beam_search`; its rules, restated):

- The k running beams start as one: beam 0 scores 0, the others -1e9, so the first step's
  candidates all continue beam 0.
- Each step, every beam's log-softmax (float32) plus its running score gives k x vocab
  candidates; the best 2k are kept (so k remain when some end with EOS).
- A candidate ends (hits a stopping criterion) when its token is EOS, or when it is the
  request's last new token (max_new_tokens). Only candidates among the best k that end become
  finished hypotheses, scored by their summed log-probabilities over the generated length (the
  EOS counted, the prompt not) to the power `length_penalty`. The k best finished hypotheses are
  kept.
- The next running beams are the best k of the 2k that did not end (ended ones count -1e9).
- The search stops when (a) no running beam can beat the worst kept hypothesis (early_stopping
  False: the best running score over the current length; "never": over the longest possible
  length when length_penalty > 0), (b) with early_stopping True, as soon as k hypotheses are
  kept, or (c) every candidate ended (the last token).

Ties: candidates of equal score are taken in index order (beam, then token id), lowest first; a
tie within float error can order two candidates differently from PyTorch's topk (the tests tell
such ties apart from real differences). Everything here is numpy on the host: the session gives
each beam's logits, and the scheduler copies cache rows as `step` says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG = np.float32(-1.0e9)  # transformers' "cannot be chosen" score
EARLY_STOPPING = (True, False, "never")


@dataclass(frozen=True)
class BeamConfig:
    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1


@dataclass
class Hypothesis:
    token_ids: list[int]  # new tokens (an EOS that ended it included)
    score: float  # summed log-probabilities / generated length ** length_penalty


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; equal scores in index order."""
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
        cut = scores[part].min()
        part = np.flatnonzero(scores >= cut)  # every index tied at the cut, so the order rule holds
    else:
        part = np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    return part[order][:k]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class BeamSearch:
    """One request's beams: `step` takes the k beams' logits and says which beam each row continues
    (its parent, whose cache the row takes) and with which token; `done`, then `results`."""

    def __init__(self, cfg: BeamConfig, max_new_tokens: int, eos_id: int):
        self.cfg, self.max_new_tokens, self.eos_id = cfg, max_new_tokens, eos_id
        k = cfg.num_beams
        self.running = [[] for _ in range(k)]  # each running beam's new tokens
        self.running_scores = np.full(k, NEG, np.float32)
        self.running_scores[0] = 0.0
        self.kept: list[Hypothesis | None] = [None] * k  # the best finished hypotheses, best first
        self.kept_scores = np.full(k, NEG, np.float32)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.generated = 0
        self.done = False

    def step(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """logits (k, vocab) of the running beams -> (parents (k,), tokens (k,)) of the next ones."""
        k, lp = self.cfg.num_beams, self.cfg.length_penalty
        vocab = logits.shape[-1]
        scores = (log_softmax(logits) + self.running_scores[:, None]).reshape(-1)
        candidates = top(scores, 2 * k)
        cand_scores = scores[candidates]
        beams, tokens = candidates // vocab, candidates % vocab
        last = self.generated + 1 >= self.max_new_tokens
        ends = (tokens == self.eos_id) | last
        sequences = [self.running[b] + [int(t)] for b, t in zip(beams, tokens)]

        # the finished: the best k candidates that end, against those kept so far
        finished = cand_scores / np.float32((self.generated + 1) ** lp)
        if self.cfg.early_stopping is True and all(h is not None for h in self.kept):
            finished = finished + NEG
        if not self.improvable:
            finished = finished + NEG
        ended_in_top = ends & (np.arange(2 * k) < k)
        finished = finished + (~ended_in_top).astype(np.float32) * NEG
        merged_scores = np.concatenate([self.kept_scores, finished.astype(np.float32)])
        merged = self.kept + [Hypothesis(s, float(f)) if e else None
                              for s, f, e in zip(sequences, finished, ended_in_top)]  # fmt: skip
        best = top(merged_scores, k)
        self.kept, self.kept_scores = [merged[i] for i in best], merged_scores[best]

        # the running: the best k of the candidates that did not end
        running = (cand_scores + ends.astype(np.float32) * NEG).astype(np.float32)
        chosen = top(running, k)
        self.running = [sequences[i] for i in chosen]
        self.running_scores = running[chosen]
        self.generated += 1

        length = self.max_new_tokens if self.cfg.early_stopping == "never" and lp > 0 else self.generated
        best_possible = self.running_scores[0] / np.float32(length**lp)
        worst_kept = self.kept_scores.min() if all(h is not None for h in self.kept) else NEG
        self.improvable = self.improvable and bool(best_possible > worst_kept)
        full = self.cfg.early_stopping is True and all(h is not None for h in self.kept)
        self.done = not self.improvable or full or bool(ends.all())
        return beams[chosen], tokens[chosen]

    def results(self) -> list[Hypothesis]:
        """The best num_return_sequences hypotheses, best first."""
        return [h for h in self.kept[: self.cfg.num_return_sequences] if h is not None]
