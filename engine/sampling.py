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


def apply_logit_bias(logits: np.ndarray, biases: list[dict[int, float]]) -> np.ndarray:
    """Each row's logit bias (a copy, when any row has one)."""
    if not any(biases):
        return logits
    logits = logits.copy()
    for r, bias in enumerate(biases):
        if bias:
            ids = np.fromiter(bias.keys(), dtype=np.int64)
            logits[r, ids] += np.fromiter(bias.values(), dtype=np.float32)
    return logits


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty) -> np.ndarray:
    """seen: (batch, vocab) bool of tokens in the prompt or generated so far; penalty: a number,
    or (batch, 1) for one per row."""
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen & (np.asarray(penalty) != 1.0), penalised, logits)


def apply_presence_frequency(logits: np.ndarray, counts: np.ndarray, presence, frequency) -> np.ndarray:
    """counts: (batch, vocab) of generated tokens; presence, frequency: numbers or (batch, 1)."""
    return logits - presence * (counts > 0) - frequency * counts


def apply_temperature(logits: np.ndarray, temperature) -> np.ndarray:
    return logits / temperature


def mask_top_k(logits: np.ndarray, k) -> np.ndarray:
    """Keep the k most likely tokens of each row (ties included); k: a number or one per row
    (batch,); k <= 0 or >= vocab keeps all."""
    k = np.broadcast_to(np.asarray(k), (len(logits),))
    on = (k > 0) & (k < logits.shape[-1])
    if not on.any():
        return logits
    k_max = int(k[on].max())
    best = np.sort(np.partition(logits, -k_max, axis=-1)[:, -k_max:], axis=-1)  # ascending
    kth = best[np.arange(len(k)), np.clip(k_max - k, 0, k_max - 1)][:, None]  # the k-th largest
    return np.where(~on[:, None] | (logits >= kth), logits, -np.inf)


def mask_top_p(logits: np.ndarray, p) -> np.ndarray:
    """Keep the smallest set of top tokens whose probability reaches p (always at least one);
    p: a number or one per row (batch, 1); 1.0 keeps all."""
    p = np.broadcast_to(np.asarray(p, dtype=np.float64).reshape(-1, 1), (len(logits), 1))
    on = p[:, 0] < 1.0
    if not on.any():
        return logits
    x = logits[on]
    order = np.argsort(-x, axis=-1)
    sorted_probs = softmax(np.take_along_axis(x, order, axis=-1))
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly higher-ranked tokens
    keep_sorted = before < p[on]
    keep_sorted[:, 0] = True
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    out = logits.copy()
    out[on] = np.where(keep, x, -np.inf)
    return out


def mask_min_p(logits: np.ndarray, min_p) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's; min_p: a number or
    one per row (batch, 1); 0 keeps all."""
    min_p = np.asarray(min_p, dtype=np.float64).reshape(-1, 1)
    if not (min_p > 0).any():
        return logits
    probs = softmax(logits)
    return np.where((min_p <= 0) | (probs >= min_p * probs.max(axis=-1, keepdims=True)), logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sample_from(probs: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One draw per row, row r's from rngs[r], by inverting the CDF (summed in float64: a float32
    running sum over 50257 tokens drifts by about 1e-4, enough to move draws)."""
    cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
    u = np.array([[rng.random()] for rng in rngs]) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1)


def next_tokens(
    logits: np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """(batch, vocab) float32 logits -> (batch,) int64 token ids, every row with `cfg`, drawing
    from `rng` row after row."""
    return sample_rows(logits, [cfg] * len(logits), [rng] * len(logits), seen, counts)


def sample_rows(
    logits: np.ndarray,
    cfgs: list[SamplingConfig],
    rngs: list[np.random.Generator | None],
    seen: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """(batch, vocab) float32 logits -> (batch,) int64 token ids, row r with its own settings
    cfgs[r] and one draw from rngs[r] (unused for a greedy row). Vectorized over rows: the same
    tokens as picking each row alone. seen/counts: (batch, vocab) token history, needed when a
    row has penalties."""
    logits = apply_logit_bias(logits, [cfg.logit_bias for cfg in cfgs])
    if any(cfg.uses_history for cfg in cfgs):

        def column(name: str) -> np.ndarray:
            return np.array([[getattr(c, name)] for c in cfgs], np.float32)  # (batch, 1)

        logits = apply_repetition_penalty(logits, seen, column("repetition_penalty"))
        logits = apply_presence_frequency(
            logits, counts, column("presence_penalty"), column("frequency_penalty")
        )
    greedy = np.array([cfg.greedy for cfg in cfgs])
    if greedy.all():
        return logits.argmax(axis=-1)
    out = np.zeros(len(logits), dtype=np.int64)
    if greedy.any():
        out[greedy] = logits[greedy].argmax(axis=-1)
    rows = np.flatnonzero(~greedy)
    out[rows] = sample_from(distributions(logits[rows], [cfgs[r] for r in rows]), [rngs[r] for r in rows])
    return out


def distributions(logits: np.ndarray, cfgs: list[SamplingConfig]) -> np.ndarray:
    """(rows, vocab) logits (biased and penalised already) -> each sampled row's distribution under
    its settings: temperature, then top_k, top_p and min_p."""
    temperature = np.array([[1.0 if c.temperature is None else c.temperature] for c in cfgs], np.float32)
    x = mask_top_k(apply_temperature(logits, temperature), np.array([c.top_k for c in cfgs]))
    x = mask_min_p(mask_top_p(x, np.array([c.top_p for c in cfgs])), np.array([c.min_p for c in cfgs]))
    return softmax(x)
