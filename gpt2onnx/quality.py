"""What a precision costs on real text, measured against a reference model folder (fp32) of the
same weights: perplexity and its change, top-1 agreement over the text's positions, and how long
greedy continuations stay identical. `gpt2-onnx score --reference DIR` prints it; the README's
quality table is its output on the trained fixture."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gpt2onnx.engine.contract import InputError
from gpt2onnx.engine.engine import MAX_LOGITS, Engine


@dataclass(frozen=True)
class QualityConfig:
    stride: int | None = None  # the perplexity window's stride (default: half the context)
    positions: int = 2560  # top-1 agreement over about this many positions, whole windows
    prompts: int = 20  # greedy continuations, from prompts evenly spaced through the text
    prompt_len: int = 32
    new_tokens: int = 64  # cut to what the context leaves after the prompt


def top1(engine: Engine, windows: np.ndarray) -> np.ndarray:
    """The most likely next token at every position of each row, as few rows at a time as the
    engine's logits limit takes."""
    per_call = max(1, min(engine.session.max_batch, MAX_LOGITS // (windows.shape[1] * engine.vocab_size)))
    return np.concatenate([engine.logits(windows[i : i + per_call]).argmax(-1)
                           for i in range(0, len(windows), per_call)])  # fmt: skip


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Figures:
    """One model's part of a comparison: its perplexity, its top-1 tokens over the windows, and
    its greedy continuations of the prompts."""

    perplexity: float
    top1: np.ndarray
    greedy: list[list[int]]


def plan(engine: Engine, text: str, cfg: QualityConfig) -> tuple[list[int], np.ndarray, list[list[int]], int]:
    """What a comparison runs on `text`: its ids, the windows for top-1, the greedy prompts and
    the new tokens each. Raises InputError when the text is too short."""
    ids = engine.to_tokens(text, prepend_bos=False)
    window = engine.n_positions
    new_tokens = min(cfg.new_tokens, window - cfg.prompt_len)
    if len(ids) < max(window, cfg.prompt_len + new_tokens) or new_tokens < 1:
        raise InputError(
            f"the text has {len(ids)} tokens; comparing needs at least one {window}-token window"
        )
    n_windows = min(len(ids) // window, -(-cfg.positions // window))
    windows = np.asarray(ids[: n_windows * window]).reshape(n_windows, window)
    starts = np.linspace(0, len(ids) - cfg.prompt_len - new_tokens, cfg.prompts).astype(int)
    return ids, windows, [ids[s : s + cfg.prompt_len] for s in starts], new_tokens


def measure(engine: Engine, text: str, cfg: QualityConfig = QualityConfig()) -> Figures:
    """One model's figures on `text` (no BOS), to compare with another's."""
    _, windows, prompts, new_tokens = plan(engine, text, cfg)
    ppl = engine.score(text, prepend_bos=False, stride=cfg.stride).perplexity
    greedy = engine.generate(prompts, new_tokens, prepend_bos=False, ignore_eos=True).completions
    return Figures(ppl, top1(engine, windows), [c.token_ids for c in greedy])


def compare(model: Engine, reference: Engine, text: str, cfg: QualityConfig = QualityConfig(),
            reference_figures: Figures | None = None) -> dict:  # fmt: skip
    """The quality figures of `model` against `reference` on `text` (no BOS); reference_figures:
    the reference's own, measured once for several models. Raises InputError when the models do
    not share a tokenizer or context, or the text is too short."""
    if model.n_positions != reference.n_positions or model.vocab_size != reference.vocab_size:
        raise InputError("the model and the reference differ in context or vocabulary; compare two "
                         "exports of the same checkpoint")  # fmt: skip
    if model.to_tokens(text, prepend_bos=False) != reference.to_tokens(text, prepend_bos=False):
        raise InputError("the model and the reference tokenize the text differently; compare two "
                         "exports of the same checkpoint")  # fmt: skip
    _, windows, prompts, new_tokens = plan(model, text, cfg)
    mine, theirs = measure(model, text, cfg), reference_figures or measure(reference, text, cfg)
    ppl, ref_ppl = mine.perplexity, theirs.perplexity
    agree = float((mine.top1 == theirs.top1).mean())
    lengths = [equal_prefix(a, b) for a, b in zip(mine.greedy, theirs.greedy)]
    return {
        "perplexity": ppl,
        "reference_perplexity": ref_ppl,
        "perplexity_change": ppl / ref_ppl - 1,
        "top1_agreement": agree,
        "top1_positions": int(windows.size),
        "greedy_equal_tokens_mean": float(np.mean(lengths)),
        "greedy_equal_in_full": sum(n == new_tokens for n in lengths),
        "greedy_prompts": len(prompts),
        "greedy_new_tokens": new_tokens,
        "greedy_equal_tokens": lengths,
        "settings": asdict(cfg),
    }
