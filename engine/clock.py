"""`Clock`: the wall-clock figures of one call, marked by the decode loop and the session.

The loop marks each step's tokens (`tokens`); the session times its runs inside onnxruntime
(`ran`), which makes the Python-overhead figure. A decode step spans token to token:
picking, bookkeeping and the graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Clock:
    prefill_s: float = 0.0  # inside onnxruntime during prefill (the graph, and the sampling graph)
    first_token_s: float = 0.0  # prefill + the first token's pick: time to first token
    step_s: list[float] = field(default_factory=list)
    decode_run_s: float = 0.0  # inside onnxruntime during decode steps
    new_tokens: int = 0
    run_s: float = 0.0  # inside onnxruntime, all of it
    _start: float = field(default=0.0, init=False, repr=False)
    _last: float | None = field(default=None, init=False, repr=False)  # the last tokens; None: none yet
    _run_s: float = field(default=0.0, init=False, repr=False)  # inside onnxruntime since the last tokens

    def begin(self) -> None:
        """A batch starts: the next `tokens` is its first."""
        self._start, self._last, self._run_s = time.perf_counter(), None, 0.0

    def ran(self, seconds: float) -> None:
        """Time spent inside onnxruntime (the session's runs)."""
        self._run_s += seconds
        self.run_s += seconds

    def prefill_run(self, seconds: float) -> None:
        """A prompt's run that is not followed by the call's first tokens (a chunk before them,
        or a later row's prompt): prefill time inside onnxruntime."""
        self.prefill_s += seconds
        self.run_s += seconds

    @property
    def has_tokens(self) -> bool:
        """Whether the first tokens are in."""
        return self._last is not None

    def tokens(self, positions: int = 1) -> None:
        """A step's tokens are in: one per row, or `positions` a row (a speculative step's kept
        tokens, counted as that many steps of equal length)."""
        now = time.perf_counter()
        if self._last is None:
            self.prefill_s += self._run_s
            self.first_token_s += now - self._start
        else:
            self.step_s += [(now - self._last) / positions] * positions
            self.decode_run_s += self._run_s
        self._last, self._run_s = now, 0.0

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    def as_dict(self) -> dict[str, float]:
        total = self.first_token_s + self.decode_s
        steps = len(self.step_s)
        return {
            "prefill_ms": 1e3 * self.prefill_s,
            "decode_ms_per_token": 1e3 * self.decode_s / steps if steps else 0.0,
            "tokens_per_s": self.new_tokens / total if total else 0.0,
        }

    def python_overhead_ms(self) -> float:
        """Per decode step, everything outside onnxruntime's run."""
        return 1e3 * (self.decode_s - self.decode_run_s) / len(self.step_s) if self.step_s else 0.0


def charge(clocks: list[Clock | None], run_s: float, run: str, positions: int = 1) -> None:
    """A run's time inside onnxruntime, to the calls (Engine.generate's clocks) whose rows it was
    for, once per call; `clocks` has one entry per row (None: no call's). `run` is a "decode"
    step, a "prefill" (first tokens) or a "chunk" of a prompt (no tokens yet). positions: the
    tokens each row made (a speculative step's, more than one)."""
    rows: dict[int, list] = {}  # id(clock) -> [clock, its rows]
    for clock in clocks:
        if clock is not None:
            rows.setdefault(id(clock), [clock, 0])[1] += 1
    for clock, n in rows.values():
        if run == "chunk" or run == "prefill" and clock.has_tokens:
            clock.prefill_run(run_s)  # a prompt's chunk, or a later row's prompt: not a step
        else:
            clock.ran(run_s)
            clock.tokens(positions)
        if run != "chunk":
            clock.new_tokens += n * positions
