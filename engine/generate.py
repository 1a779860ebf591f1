"""The decode loop: left-padded prefill of a batch of prompts, then one token per step.

Rows finish one by one (EOS, a stop string, max_new_tokens); a finished row keeps its slot
in the batch, so the cache never needs compacting, but nothing it produces is kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .device_sampling import row_params, runs_on_device
from .sampling import SamplingConfig, next_tokens
from .session import ModelSession
from .tokenizer import StreamDecoder


@dataclass
class Timing:
    """Wall-clock figures of one call. A decode step spans token to token: sampling, bookkeeping
    and the graph; `decode_run_s` is the part spent inside onnxruntime."""

    prefill_s: float = 0.0  # the prefill graph run
    first_token_s: float = 0.0  # prefill + the first token's sampling: time to first token
    step_s: list[float] = field(default_factory=list)
    decode_run_s: float = 0.0
    text_s: float = 0.0  # rows' text made after the loop (generate without stop strings)
    new_tokens: int = 0

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    def as_dict(self) -> dict[str, float]:
        total = self.first_token_s + self.decode_s + self.text_s
        steps = len(self.step_s)
        return {
            "prefill_ms": 1e3 * self.prefill_s,
            "decode_ms_per_token": 1e3 * self.decode_s / steps if steps else 0.0,
            "tokens_per_s": self.new_tokens / total if total else 0.0,
        }

    def python_overhead_ms(self) -> float:
        """Per decode step, everything outside onnxruntime's run."""
        return 1e3 * (self.decode_s - self.decode_run_s) / len(self.step_s) if self.step_s else 0.0


@dataclass
class Row:
    """One prompt's progress. `push` holds back text that might be the start of a stop string.
    A row without a decoder (nobody streams it, no stop strings) only collects token ids: its
    text is made in one call once they are all in (Tokenizer.completion_text)."""

    prompt_ids: list[int]
    decoder: StreamDecoder | None
    stop: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None

    def push(self, token: int, eos_id: int, max_new_tokens: int) -> str:
        """Add a token; return the text that is now final."""
        self.token_ids.append(token)
        if token == eos_id:
            self.finish_reason = "eos"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            for s in self.stop:
                if (at := self.text.find(s, max(0, self.emitted - len(s)))) >= 0:
                    self.text, self.finish_reason = self.text[:at], "stop"
        if self.finish_reason is None and len(self.token_ids) >= max_new_tokens:
            self.finish_reason = "length"
        if self.decoder is None:
            return ""
        final = len(self.text) if self.finish_reason or not self.stop else len(self.text) - self._held()
        piece, self.emitted = self.text[self.emitted : final], max(self.emitted, final)
        return piece

    def _held(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        return max(
            (
                n
                for s in self.stop
                for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                if s.startswith(self.text[-n:])
            ),
            default=0,
        )


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, positions), each (batch, longest); padding is on the left, positions count real tokens."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def decode_batch(
    session: ModelSession,
    rows: list[Row],
    max_new_tokens: int,
    sampling: SamplingConfig,
    rng: np.random.Generator,
    eos_id: int,
    timing: Timing,
) -> Iterator[tuple[int, str]]:
    """Yield (row index, text piece) as tokens are produced; closing the generator stops the work."""
    ids, mask, positions = left_pad([r.prompt_ids for r in rows])
    B, width = ids.shape
    # When the graph's argmax or the sampling graph can pick the tokens, only B ids reach the host.
    session.start(B, width + max_new_tokens, row_params(sampling, B) if runs_on_device(sampling) else None)
    on_device = session.picks_on_device
    draw = (
        (lambda: rng.random(B)) if on_device and not sampling.greedy else (lambda: None)
    )  # the host path's draws, in order
    seen = counts = None
    if sampling.uses_history:
        seen = np.zeros((B, session.vocab_size), dtype=bool)
        counts = np.zeros((B, session.vocab_size), dtype=np.int32)
        for r, row in enumerate(rows):
            seen[r, row.prompt_ids] = True

    t0 = time.perf_counter()
    out = session.prefill(ids, mask, positions, draw())  # logits (B, vocab), or ids (B,) when on_device
    timing.prefill_s += time.perf_counter() - t0
    last, run_before = t0, 0.0
    for step in range(max_new_tokens):
        tokens = out if on_device else next_tokens(out, sampling, rng, seen, counts)
        now = time.perf_counter()
        if step == 0:
            timing.first_token_s += now - t0
        else:
            timing.step_s.append(now - last)
            timing.decode_run_s += session.run_s - run_before
        last = now
        for r, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row.finish_reason is None:
                timing.new_tokens += 1
                if seen is not None:
                    seen[r, token], counts[r, token] = True, counts[r, token] + 1
                if piece := row.push(token, eos_id, max_new_tokens):
                    yield r, piece
        if all(row.finish_reason for row in rows):
            break
        run_before = session.run_s
        out = session.decode(tokens, draw())
