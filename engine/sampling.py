"""Sampling as pure numpy functions over (batch, vocab) logits with an explicit Generator.

Order, as in transformers and vLLM: logit bias -> repetition penalty (prompt + generated
tokens, divide positive logits / multiply negative ones) -> presence and frequency penalties
(generated tokens, OpenAI's definition) -> greedy argmax, or temperature -> top-k -> top-p ->
min-p -> sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from . import inputs


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float | None = None  # None: 1.0 when top_k/top_p/min_p ask for sampling, else greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        """Every setting through the input gate (InputError names it), kept as a plain Python
        value: numpy scalars become int/float, logit_bias becomes {int: float}."""
        for f in fields(self):
            value = getattr(self, f.name)
            checked = inputs.logit_bias(value) if f.name == "logit_bias" else inputs.check(f.name, value)
            object.__setattr__(self, f.name, checked)  # frozen: set once, here

    @property
    def greedy(self) -> bool:
        if self.top_k == 1 or self.temperature == 0:
            return True
        return self.temperature is None and self.top_k == 0 and self.top_p == 1.0 and self.min_p == 0.0

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    if bias:
        logits = logits.copy()
        ids = np.fromiter(bias.keys(), dtype=np.int64)
        logits[:, ids] += np.fromiter(bias.values(), dtype=np.float32)
    return logits


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """seen: (batch, vocab) bool of tokens in the prompt or generated so far."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """counts: (batch, vocab) of generated tokens."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0) - frequency * counts


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / temperature


def mask_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k, None]  # (batch, 1): the k-th largest
    return np.where(logits >= kth, logits, -np.inf)


def mask_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of top tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1)
    sorted_probs = softmax(np.take_along_axis(logits, order, axis=-1))
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly higher-ranked tokens
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def mask_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs >= min_p * probs.max(axis=-1, keepdims=True), logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sample_from(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row by inverting the CDF (summed in float64: a float32 running sum over 50257
    tokens drifts by about 1e-4, enough to move draws)."""
    cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1)


def next_tokens(
    logits: np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """(batch, vocab) float32 logits -> (batch,) int64 token ids."""
    logits = apply_logit_bias(logits, cfg.logit_bias)
    if cfg.uses_history:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        logits = apply_presence_frequency(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)
    if cfg.greedy:
        return logits.argmax(axis=-1)
    logits = apply_temperature(logits, 1.0 if cfg.temperature is None else cfg.temperature)
    logits = mask_min_p(mask_top_p(mask_top_k(logits, cfg.top_k), cfg.top_p), cfg.min_p)
    return sample_from(softmax(logits), rng)
