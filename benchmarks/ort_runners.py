"""Runners on onnxruntime: our engine, and the two loops a first implementation would write
over the same exported graph (plain session.run with the cache through numpy; no cache at all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2onnx.engine.contract import DTYPES, past_names
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.kv_cache import KV_DTYPES
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.engine.runtime import create_session, device_of, resolve_device

from .measure import Run, StepClock


class EngineRunner:
    """The engine as users get it, as a runner; graph_state() says after the timed runs whether CUDA
    graphs really ran (a capture that failed at run time turns them off, with a reason)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, prompts: np.ndarray, new_tokens: int) -> Run:
        rows = [row.tolist() for row in prompts]
        result = self.engine.generate(rows, max_new_tokens=new_tokens, ignore_eos=True)
        t = (
            result.timing
        )  # its clocks cover the decode loop, not the text made after it (no baseline makes text)
        return Run(
            t.first_token_s, list(t.step_s), [c.token_ids for c in result.completions], t.python_overhead_ms()
        )

    def graph_state(self) -> dict:
        graphs = self.engine.session.graphs
        return {"cuda_graphs": graphs.on["decode"], "cuda_graphs_fallback": graphs.fallback}


def ours(folder: Path, provider: str, max_batch: int, fast_gpu_path: bool | None = None):
    """The engine as users get it; fast_gpu_path=False turns off CUDA graphs and device sampling
    (the "gpt2-onnx-eager" baseline: what those two are worth on a GPU)."""
    engine = Engine.load(folder, provider=provider, max_batch=max_batch,
                         cuda_graphs=fast_gpu_path, device_sampling=fast_gpu_path)  # fmt: skip
    return EngineRunner(engine), engine.device


def _plain(folder: Path, provider: str):
    manifest = read_manifest(folder)
    session, _ = create_session(folder / manifest.model_file, resolve_device(provider), None)
    device = device_of(session)  # where it really runs
    c = manifest.config
    kv_dtype = KV_DTYPES[manifest.dtype]

    def empty(B):
        return {name: np.zeros((B, c.n_head, 0, c.head_dim), kv_dtype) for name in past_names(c.n_layer)}

    return session, device, empty


def plain_run_loop(folder: Path, provider: str):
    """session.run each step; presents come back to numpy and go in again as pasts."""
    session, device, empty = _plain(folder, provider)
    names = [o.name for o in session.get_outputs()]

    def run(prompts: np.ndarray, new_tokens: int) -> Run:
        B, L = prompts.shape
        feeds = {
            "input_ids": prompts,
            "position_ids": np.tile(np.arange(L), (B, 1)),
            "attention_mask": np.ones((B, L), np.int64),
            "logits_to_keep": np.array(1),
            **empty(B),
        }
        tokens, clock = [], StepClock()
        for i in range(new_tokens):
            out = session.run(None, feeds)
            nxt = out[0][:, -1].argmax(-1)
            tokens.append(nxt)
            clock.tick()
            total = L + i + 1
            feeds = {
                "input_ids": nxt[:, None],
                "position_ids": np.full((B, 1), total - 1),
                "attention_mask": np.ones((B, total), np.int64),
                "logits_to_keep": np.array(1),
            }
            feeds |= {name.replace("present", "past"): value for name, value in zip(names[1:], out[1:])}
        return Run(clock.ttft_s, clock.steps, np.stack(tokens, 1).tolist())

    return run, device


def naive_no_cache(folder: Path, provider: str):
    """Re-runs the whole sequence for every new token: O(n^2), how a first implementation does it."""
    session, device, empty = _plain(folder, provider)

    def run(prompts: np.ndarray, new_tokens: int) -> Run:
        B = prompts.shape[0]
        seq, clock = prompts, StepClock()
        for _ in range(new_tokens):
            T = seq.shape[1]
            feeds = {
                "input_ids": seq,
                "position_ids": np.tile(np.arange(T), (B, 1)),
                "attention_mask": np.ones((B, T), np.int64),
                "logits_to_keep": np.array(1),
                **empty(B),
            }
            nxt = session.run(["logits"], feeds)[0][:, -1].argmax(-1)
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
            clock.tick()
        return Run(clock.ttft_s, clock.steps, seq[:, prompts.shape[1] :].tolist())

    return run, device


RUNNERS = {
    "gpt2-onnx": ours,
    "gpt2-onnx-eager": lambda *a: ours(*a, fast_gpu_path=False),
    **{f"gpt2-onnx-{dtype}": ours for dtype in DTYPES},  # ours at another dtype (bench.OUR_DTYPES)
    "gpt2-onnx-int8-blocks": ours,  # int8 with MatMulNBits (bench.OUR_TWINS)
    "ort-plain-loop": plain_run_loop,
    "naive-no-cache": naive_no_cache,
}
