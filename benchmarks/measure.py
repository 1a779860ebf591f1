"""The measurement protocol every runner shares: warm-up excluded, then repeated timed runs.

A runner is a function (prompts (batch, len) int64, new_tokens) -> Run. Each run records the
time to first token, every later step's wall time, and the tokens, so the orchestrator can
check that every baseline produced the same greedy tokens from the same weights.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Run:
    ttft_s: float  # prefill and the first token
    step_s: list[float]  # each later token's step, token to token
    tokens: list[list[int]]  # (batch, new_tokens) generated ids
    python_overhead_ms: float | None = None  # per decode step outside onnxruntime (ours only)

    @property
    def total_s(self) -> float:
        return self.ttft_s + sum(self.step_s)


class StepClock:
    """tick() once per generated token: the first tick gives the time to first token, later ones the steps."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.ttft_s: float | None = None
        self.steps: list[float] = []

    def tick(self) -> None:
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - self.t0
        else:
            self.steps.append(now - self.last)
        self.last = now


@dataclass
class ConfigResult:
    batch: int
    prompt_len: int
    new_tokens: int
    runs: list[dict] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def median_s(fn, repeats: int):
    """(median seconds of `repeats` calls of fn after a warm-up call, the warm-up's result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def summarize(values: list[float]) -> dict[str, float]:
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def measure(
    runner: Callable[[np.ndarray, int], Run],
    prompts: np.ndarray,
    new_tokens: int,
    warmup: int,
    repeats: int,
    label: str,
) -> ConfigResult:
    B, L = prompts.shape
    result = ConfigResult(B, L, new_tokens)
    for i in range(warmup + repeats):
        run = runner(prompts, new_tokens)
        kind = "warm-up" if i < warmup else f"run {i - warmup + 1}/{repeats}"
        print(
            f"  {label}: batch {B}, prompt {L}, new {new_tokens}: {kind} {run.total_s:.2f} s",
            file=sys.stderr,
            flush=True,
        )
        if i < warmup:
            continue
        result.runs.append(
            {
                "ttft_ms": 1e3 * run.ttft_s,
                "decode_ms_per_token": 1e3 * float(np.mean(run.step_s)) if run.step_s else None,
                "tokens_per_s": B * new_tokens / run.total_s,
                "step_ms": [round(1e3 * s, 4) for s in run.step_s],
                "python_overhead_ms": run.python_overhead_ms,
            }
        )
        result.tokens = run.tokens
    return result


def to_json(results: list[ConfigResult]) -> list[dict]:
    return [asdict(r) for r in results]
