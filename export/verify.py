"""The export-time check: run the ONNX model under onnxruntime (CPU) against the PyTorch module.

Concat cache: shapes cover an empty past, a past > 0, batch > 1 with left padding,
full-sequence and last-position logits; logits and presents are compared. Shared
cache: ragged batches run prefill and decode steps through the engine's session, and every
step's logits are compared (a wrong cache write shows in the next step's logits).

fp32 and fp16 must reproduce the reference: the export fails when a figure leaves the dtype's
tolerance (TOLERANCES), or when the top-1 token disagrees where the reference is not a near-tie.
int8 and int4 graphs are meant to differ, by an amount that grows with the weights' scale (a real
model's activations are far larger than random ones), so an absolute bound refuses healthy
models. They are judged relative to the reference's own scale (QUANTIZED_BOUNDS): the RMS error
of each position's logits over the spread (standard deviation) of the reference's logits there,
the RMS error of each cache tensor over the tensor's RMS, and top-1 disagreements only where the
reference's margin is within a stated number of spreads. Healthy exports sit well inside (see
the table's comment). Two more passes then judge what the graph stores: each dequantized weight
within one quantization step of the checkpoint's (a corrupt block, scale or layer is found here
whatever the weights' scale), and the graph against the reference holding those very weights,
closely (STORED: only the kernels' rounding is left between them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from gpt2onnx.engine.clock import Clock
from gpt2onnx.engine.contract import GPT2Config, UserError, past_names
from gpt2onnx.engine.kv_cache import KV_DTYPES, left_pad
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


@dataclass(frozen=True)
class QuantizedBounds:
    logits: float  # RMS error of a position's logits / the reference logits' standard deviation there
    logits_max: float  # the largest error of one logit, in the same spreads (a fault in a few columns)
    present: float  # RMS error of a cache tensor / the tensor's RMS
    present_max: float  # the largest error in a cache tensor / the tensor's largest value
    near_tie: float  # a top-1 disagreement passes where the reference's margin is under this many spreads


# Measured on healthy exports (concat check shapes, 2026-12-04), the largest figure of each kind
# (RMS logits, max logit, RMS cache, max cache, margins of the disagreements): int8 0.093, 0.40,
# 0.058, 0.10, <= 0.18 (124M shape, weights x1..x5; tiny model x20; the trained 4-layer fixture
# 0.054, 0.098, 0.017, 0.018, none); int4 0.58, 2.56, 0.44, 0.68, <= 1.23 (124M x5; fixture 0.21,
# 0.93, 0.17, 0.13, <= 0.33). The bounds leave about 2x room.
QUANTIZED_BOUNDS = {
    "int8": QuantizedBounds(logits=0.25, logits_max=1.0, present=0.2, present_max=0.3, near_tie=1.0),
    "int4": QuantizedBounds(logits=1.2, logits_max=5.0, present=0.9, present_max=1.5, near_tie=3.0),
}

# A quantized graph against the reference holding the very weights the graph stores (dequantized):
# what is left is the kernels' own rounding (activations in 8 bits at accuracy level 4). Measured
# (same cases as above): logits 0.04, 0.17, cache 0.016, 0.025 at most. Bounds with room for
# larger models, whose rounding compounds over more layers.
STORED = QuantizedBounds(logits=0.3, logits_max=1.5, present=0.15, present_max=0.25, near_tie=1.0)

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
    rel_logits: float | None = None  # quantized graphs: the largest relative errors (QuantizedBounds)
    rel_present: float | None = None
    weight_steps: float | None = None  # the stored weights' largest error, in quantization steps
    stored_rel_logits: float | None = None  # the graph against the weights it stores (STORED)
    stored_rel_present: float | None = None
    inspect_rel: float | None = None  # the inspection graph: largest error / its tensor's largest value

    def __str__(self) -> str:
        return (
            f"max |Δ logits| {self.max_abs_logits:.3g}, "
            + (
                f"max |Δ present| {self.max_abs_present:.3g}, "
                if self.max_abs_present is not None
                else "presents checked through later steps' logits, "
            )
            + f"top-1 agreement {self.top1_agreement:.2%} over {self.positions} positions"
            + (f", relative RMS error: logits {self.rel_logits:.3g}" if self.rel_logits is not None else "")
            + (f", cache {self.rel_present:.3g}" if self.rel_present is not None else "")
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


@dataclass
class Case:
    """One check: the graph's inputs and what the reference module computed from them.
    Concat cache: `feeds` in the contract's names, `want` every output (logits, then the
    presents). Shared cache: `prompts` and the `new` tokens decoded after them, `want` the
    logits of the last prompt position and of each decode step."""

    feeds: dict[str, np.ndarray] | None = None
    prompts: list[list[int]] | None = None
    new: np.ndarray | None = None
    want: list[np.ndarray] | None = None


def expected_outputs(reference: GPT2, dtype: str, kv_cache: str, seed: int = 0) -> list[Case]:
    """The reference module's outputs on every check case, so that the module can be let go
    before onnxruntime loads the graph (the export holds one copy of the weights at a time)."""
    config, gen = reference.config, np.random.default_rng(seed)
    cases = []
    with torch.no_grad():
        if kv_cache == "shared":
            for lengths, steps in SHARED_CHECKS:
                prompts = [gen.integers(0, config.vocab_size, n).tolist() for n in lengths]
                new = gen.integers(0, config.vocab_size, (len(lengths), steps))
                ids, mask, pos = left_pad([p + n.tolist() for p, n in zip(prompts, new)])
                past = [torch.zeros(len(lengths), config.n_head, 0, config.head_dim)] * (2 * config.n_layer)
                logits = reference(*map(torch.from_numpy, (ids, pos, mask, np.array(steps + 1))), *past)[0]
                cases.append(Case(prompts=prompts, new=new, want=[logits.numpy()]))
            return cases
        np_dtype = KV_DTYPES[dtype]
        for shape in CHECK_SHAPES:
            feeds = random_inputs(config, *shape, gen=gen, np_dtype=np_dtype)
            args = (
                torch.from_numpy(v).float() if v.dtype == np_dtype else torch.from_numpy(v)
                for v in feeds.values()
            )
            cases.append(Case(feeds=feeds, want=[t.numpy() for t in reference(*args)]))
    return cases


def check_export(session, cases: list[Case], dtype: str, tol=None) -> CheckReport:
    """Compare `session` (onnxruntime) with the fp32 reference's outputs (expected_outputs); raise
    ExportCheckError on a miss. tol: how (default judge(dtype))."""
    tol = tol or judge(dtype)
    report = CheckReport(0.0, 0.0, 0.0, 0)
    for shape, case in zip(CHECK_SHAPES, cases):
        log.info("checking against PyTorch: (batch, seq, past, keep, pad) = %s", shape)
        got, feeds = session.run(None, case.feeds), case.feeds
        # Outputs at padding positions are unspecified (a padded query attends to nothing real),
        # so only real query positions and real cache slots are compared.
        mask = feeds["attention_mask"].astype(bool)
        real_query = mask[:, -feeds["input_ids"].shape[1] :][:, -got[0].shape[1] :, None]
        _compare(report, "logits", got[0], case.want[0], real_query, tol, shape)
        for j, (g, w) in enumerate(zip(got[1:], case.want[1:])):
            _compare(report, f"present {j}", g, w, mask[:, None, :, None], tol, shape)
    return report


# (prompt lengths, decode steps) for the shared-cache graph: one row, and a ragged batch.
SHARED_CHECKS = [([1], 3), ([7], 2), ([5, 2, 4], 3)]


def check_shared_export(session, cases: list[Case], dtype: str, tol=None) -> CheckReport:
    """The shared-cache graph through the engine's own session (prefill, then decode steps that
    update the cache in place), against the reference's outputs over the whole sequences."""
    tol = tol or judge(dtype)
    report = CheckReport(0.0, None, 0.0, 0)
    for case in cases:
        B, steps = len(case.prompts), case.new.shape[1]
        log.info("checking the shared cache against PyTorch: prompts %s, %d decode steps",
                 [len(p) for p in case.prompts], steps)  # fmt: skip
        session.start(B, max(map(len, case.prompts)) + steps, Clock())
        for row, prompt in enumerate(case.prompts):  # logits=True: they come to the host, for the check
            session.admit(row, prompt, SamplingConfig(), logits=True)
        session.prefill(case.prompts)
        got = [session.last_logits(B).copy()]
        for i in range(steps):
            session.decode(case.new[:, i])
            got.append(session.last_logits(B).copy())
        want = case.want[0]
        valid = np.ones(want.shape[:2] + (1,), bool)
        _compare(
            report, "logits", np.stack(got, axis=1), want, valid, tol, ([len(p) for p in case.prompts], steps)
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
    """Check one output where `valid` (broadcastable) is true; fold the figures into `report`.
    `tol` is the dtype's absolute Tolerance, or its QuantizedBounds for a quantized graph."""
    got = got.astype(np.float32)
    if not np.isfinite(got).all():
        raise ExportCheckError(f"{what} has non-finite values at shape {shape}")
    if isinstance(tol, QuantizedBounds):
        _compare_relative(report, what, got, want, valid, tol, shape)
        return
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


def _compare_relative(report, what, got, want, valid, bounds: QuantizedBounds, shape) -> None:
    """A quantized graph's output against the fp32 reference, relative to the reference's scale:
    an RMS figure for error spread everywhere, a largest-error figure for a fault in a few places."""
    if what != "logits":
        mask = np.broadcast_to(valid, got.shape)
        diff, scale = np.where(mask, got - want, 0.0), np.abs(want[mask])
        rms = np.sqrt(np.square(diff).sum() / max(np.square(scale).sum(), 1e-30))
        worst = np.abs(diff).max(initial=0.0) / max(scale.max(initial=0.0), 1e-30)
        report.rel_present = max(report.rel_present or 0.0, float(rms))
        _within(f"{what}: relative RMS error", rms, bounds.present, shape)
        _within(f"{what}: largest error over the largest value", worst, bounds.present_max, shape)
        return
    rows = np.broadcast_to(valid[..., 0], got.shape[:-1])
    g, w = got[rows], want[rows]  # (positions, vocab)
    spread = np.maximum(w.std(axis=-1), 1e-12)  # the reference logits' standard deviation, per position
    rms = np.sqrt(np.square(g - w).mean(axis=-1)) / spread
    worst = np.abs(g - w).max(axis=-1, initial=0.0) / spread
    report.rel_logits = max(report.rel_logits or 0.0, float(rms.max(initial=0.0)))
    report.max_abs_logits = max(report.max_abs_logits, float(np.abs(g - w).max(initial=0.0)))
    _within("logits: relative RMS error (in spreads)", rms.max(initial=0.0), bounds.logits, shape)
    _within("logits: largest error (in spreads)", worst.max(initial=0.0), bounds.logits_max, shape)
    g_top, w_top = g.argmax(-1), w.argmax(-1)
    for i in np.nonzero(g_top != w_top)[0]:
        margin = (w[i, w_top[i]] - w[i, g_top[i]]) / spread[i]
        if margin > bounds.near_tie:
            raise ExportCheckError(
                f"top-1 token differs at position {i} of shape {shape} where the reference's margin is "
                f"{margin:.3g} spreads of its logits (quantization may flip only near-ties under {bounds.near_tie})"
            )
    seen = report.top1_agreement * report.positions
    report.positions += len(g)
    report.top1_agreement = (seen + int((g_top == w_top).sum())) / report.positions


def _within(figure: str, value: float, bound: float, shape) -> None:
    if value > bound:
        raise ExportCheckError(
            f"{figure} {value:.3g} against PyTorch at shape {shape}, where a healthy quantized export stays "
            f"under {bound}: the quantized weights do not compute what the checkpoint does"
        )


def judge(dtype: str) -> Tolerance | QuantizedBounds:
    """How a graph of `dtype` is compared with the fp32 reference (module docstring)."""
    return QUANTIZED_BOUNDS.get(dtype) or TOLERANCES[dtype]


def check_and_load_stored_weights(reference: GPT2, weights) -> float:
    """Each weight a quantized graph stores ((name, float weight, bits) from
    export/dequantize.py, one at a time) against the checkpoint's: every element within one
    quantization step of its column (a row of the token table), the step being the column's range
    over 2^(bits-1) - 1 levels. Then the weight replaces the checkpoint's in the reference, in
    place, for the last pass of the check. Returns the largest error in steps; raises
    ExportCheckError naming the weight and where."""
    worst = 0.0
    for name, stored, bits in weights:
        table = name == "wte"  # the graph looks tokens up in a table of its own, from the head's
        param = reference.wte_t.t() if table else dict(reference.named_parameters())[name]
        want = param.detach().numpy()
        axis = 1 if table else 0  # a MatMulNBits weight (K, N) is quantized along K
        step = np.maximum(np.ptp(want, axis=axis, keepdims=True), 1e-30) / ((1 << (bits - 1)) - 1)
        worst_here, where = _most_steps(stored, want, step)
        worst = max(worst, worst_here)
        if worst_here > 1.0:
            raise ExportCheckError(
                f"the quantized weight {name} differs from the checkpoint's by {worst_here:.3g} quantization "
                f"steps at {where} (a correct {bits}-bit weight stays within one): the quantized weights are corrupt"
            )
        with torch.no_grad():
            if table:
                reference.wte = torch.nn.Parameter(torch.from_numpy(stored))
            else:
                param.copy_(torch.from_numpy(stored))
    return worst


def _most_steps(stored: np.ndarray, want: np.ndarray, step: np.ndarray, rows: int = 4096):
    """The largest |stored - want| / step and where, a few thousand rows at a time (a whole
    difference of the token table would be another copy of it)."""
    worst, where = 0.0, (0, 0)
    for r in range(0, len(want), rows):
        part = np.subtract(stored[r : r + rows], want[r : r + rows])
        np.abs(part, out=part)
        part /= step if step.shape[0] == 1 else step[r : r + rows]
        i = np.unravel_index(part.argmax(), part.shape)
        if part[i] > worst:
            worst, where = float(part[i]), (int(i[0]) + r, int(i[1]))
    return worst, where


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
