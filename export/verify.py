"""The export-time check: run the ONNX model under onnxruntime (CPU) against the PyTorch module.

Concat cache: shapes cover an empty past, a past > 0, batch > 1 with left padding,
full-sequence and last-position logits; logits and presents are compared. Shared
cache: ragged batches run prefill and decode steps through the engine's session, and every
step's logits are compared (a wrong cache write shows in the next step's logits). The export
fails when a figure leaves the dtype's tolerance, or when the top-1 token disagrees where the
reference is not a near-tie.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from gpt2onnx.engine.clock import Clock
from gpt2onnx.engine.contract import GPT2Config, UserError, past_names
from gpt2onnx.engine.kv_cache import KV_DTYPES, left_pad
from gpt2onnx.engine.pickers import HostPicker, SlotSampling
from gpt2onnx.engine.sampling import SamplingConfig

from .model import GPT2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """|Δ| allowed is atol + rtol * max|reference| (per output tensor)."""

    atol: float
    rtol: float


# The one tolerance table. fp16 is compared against the fp32 reference, so it measures fp16's real error.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "int8": Tolerance(atol=5e-2, rtol=5e-2),
    "int4": Tolerance(atol=5e-1, rtol=5e-1),
}

# (batch, seq, past_len, logits_to_keep or None for all, left padding of the last rows)
CHECK_SHAPES = [(1, 1, 0, None, 0), (1, 7, 0, 1, 0), (3, 5, 0, None, 3), (2, 1, 6, 1, 2), (2, 4, 3, None, 4)]


class ExportCheckError(UserError, RuntimeError):
    """The exported graph does not agree with the PyTorch module."""


@dataclass
class CheckReport:
    max_abs_logits: float
    max_abs_present: float | None  # None: presents not compared one by one (the shared cache)
    top1_agreement: float  # fraction of positions whose argmax matches
    positions: int

    def __str__(self) -> str:
        return (
            f"max |Δ logits| {self.max_abs_logits:.3g}, "
            + (
                f"max |Δ present| {self.max_abs_present:.3g}, "
                if self.max_abs_present is not None
                else "presents checked through later steps' logits, "
            )
            + f"top-1 agreement {self.top1_agreement:.2%} over {self.positions} positions"
        )


def random_inputs(
    config: GPT2Config,
    batch: int,
    seq: int,
    past_len: int,
    keep: int | None,
    pad: int,
    gen: np.random.Generator,
    np_dtype,
) -> dict[str, np.ndarray]:
    """Inputs in the graph contract's names; the last rows of the batch are left-padded by up to `pad`."""
    total = past_len + seq
    mask = np.ones((batch, total), dtype=np.int64)
    for row in range(1, batch):
        mask[row, : min(pad, total - 1) * row // max(batch - 1, 1)] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past_len:]
    feeds = {
        "input_ids": gen.integers(0, config.vocab_size, (batch, seq), dtype=np.int64),
        "position_ids": positions.astype(np.int64),
        "attention_mask": mask,
        "logits_to_keep": np.array(keep or seq, dtype=np.int64),
    }
    for name in past_names(config.n_layer):
        feeds[name] = gen.standard_normal((batch, config.n_head, past_len, config.head_dim)).astype(np_dtype)
    return feeds


def check_export(session, reference: GPT2, dtype: str, seed: int = 0) -> CheckReport:
    """Compare `session` (onnxruntime) with the fp32 `reference` module; raise ExportCheckError on a miss."""
    config = reference.config
    gen = np.random.default_rng(seed)
    np_dtype = KV_DTYPES[dtype]
    report = CheckReport(0.0, 0.0, 0.0, 0)
    for i, shape in enumerate(CHECK_SHAPES):
        log.info(
            "checking against PyTorch: shape %d/%d (batch, seq, past, keep, pad) = %s",
            i + 1,
            len(CHECK_SHAPES),
            shape,
        )
        feeds = random_inputs(config, *shape, gen=gen, np_dtype=np_dtype)
        got = session.run(None, feeds)
        with torch.no_grad():
            want = [
                t.numpy()
                for t in reference(
                    *(
                        torch.from_numpy(v).float() if v.dtype == np_dtype else torch.from_numpy(v)
                        for v in feeds.values()
                    )
                )
            ]
        # Outputs at padding positions are unspecified (a padded query attends to nothing real),
        # so only real query positions and real cache slots are compared.
        mask = feeds["attention_mask"].astype(bool)
        real_query = mask[:, -feeds["input_ids"].shape[1] :][:, -got[0].shape[1] :, None]
        _compare(report, "logits", got[0], want[0], real_query, TOLERANCES[dtype], shape)
        for j, (g, w) in enumerate(zip(got[1:], want[1:])):
            _compare(report, f"present {j}", g, w, mask[:, None, :, None], TOLERANCES[dtype], shape)
    return report


# (prompt lengths, decode steps) for the shared-cache graph: one row, and a ragged batch.
SHARED_CHECKS = [([1], 3), ([7], 2), ([5, 2, 4], 3)]


def check_shared_export(session, reference: GPT2, dtype: str, seed: int = 0) -> CheckReport:
    """The shared-cache graph through the engine's own session (prefill, then decode steps that
    update the cache in place), against the reference module run over the whole sequences."""
    config, gen = reference.config, np.random.default_rng(seed)
    report = CheckReport(0.0, None, 0.0, 0)
    for lengths, steps in SHARED_CHECKS:
        log.info("checking the shared cache against PyTorch: prompts %s, %d decode steps", lengths, steps)
        prompts = [gen.integers(0, config.vocab_size, n).tolist() for n in lengths]
        new = gen.integers(0, config.vocab_size, (len(lengths), steps))
        B, rng = len(lengths), np.random.default_rng(0)
        session.start(
            B,
            max(lengths) + steps,
            HostPicker(SlotSampling.for_batch(prompts, SamplingConfig(), rng, config.vocab_size)),
            Clock(),
        )
        session.prefill(prompts)
        got = [session.last_logits(B).copy()]
        for i in range(steps):
            session.decode(new[:, i])
            got.append(session.last_logits(B).copy())
        full_ids, full_mask, full_pos = left_pad([p + n.tolist() for p, n in zip(prompts, new)])
        with torch.no_grad():
            want = reference(
                *map(torch.from_numpy, (full_ids, full_pos, full_mask, np.array(steps + 1))),
                *[torch.zeros(len(lengths), config.n_head, 0, config.head_dim)] * (2 * config.n_layer),
            )[0].numpy()
        _compare(
            report,
            "logits",
            np.stack(got, axis=1),
            want,
            np.ones(want.shape[:2] + (1,), bool),
            TOLERANCES[dtype],
            (lengths, steps),
        )
    return report


def _compare(
    report: CheckReport,
    what: str,
    got: np.ndarray,
    want: np.ndarray,
    valid: np.ndarray,
    tol: Tolerance,
    shape,
) -> None:
    """Check one output where `valid` (broadcastable) is true; fold the figures into `report`."""
    got = got.astype(np.float32)
    if not np.isfinite(got).all():
        raise ExportCheckError(f"{what} has non-finite values at shape {shape}")
    diff = np.where(valid, np.abs(got - want), 0.0)
    limit = tol.atol + tol.rtol * float(np.abs(want).max(initial=0.0))
    if diff.max(initial=0.0) > limit:
        where = np.unravel_index(diff.argmax(), diff.shape)
        raise ExportCheckError(
            f"{what} differ from PyTorch by {diff.max():.3g} (limit {limit:.3g}) at index {tuple(int(x) for x in where)}, shape {shape}"
        )
    if what == "logits":
        report.max_abs_logits = max(report.max_abs_logits, float(diff.max(initial=0.0)))
        rows = np.broadcast_to(valid[..., 0], got.shape[:-1])
        agree, n = top1_agreement(got[rows], want[rows], limit)
        seen = report.top1_agreement * report.positions
        report.positions += n
        report.top1_agreement = (seen + agree) / report.positions
    else:
        report.max_abs_present = max(report.max_abs_present, float(diff.max(initial=0.0)))


def top1_agreement(got: np.ndarray, want: np.ndarray, limit: float) -> tuple[int, int]:
    """(agreeing, total) argmax positions over (..., vocab) logits. A disagreement raises
    ExportCheckError unless the reference's top two are within 2 * limit there (a near-tie)."""
    g_top, w_top = got.argmax(-1), want.argmax(-1)
    agree = g_top == w_top
    for idx in zip(*np.nonzero(~agree)):
        margin = want[idx][w_top[idx]] - want[idx][g_top[idx]]
        if margin > 2 * limit:
            raise ExportCheckError(
                f"top-1 token differs at position {tuple(int(i) for i in idx)} with reference margin {margin:.3g}"
            )
    return int(agree.sum()), agree.size
