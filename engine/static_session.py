"""The in-place cache with decode steps of one shape at fixed addresses, for CUDA graphs.

A CUDA graph replays captured kernels with their captured arguments, so everything a decode
step touches keeps its shape and its address from step to step and from call to call:

- the KV cache is allocated once, for max_batch x max_seq, when the session opens;
- a batch is padded up to a bucket (1, 2, 4, ..., max_batch) and each bucket has its own graph
  (run option gpu_graph_id = bucket index + 1; 0 is onnxruntime's, -1 runs without a graph);
  padding rows decode a dummy token at slot 0 of their own cache rows and are ignored;
- step inputs live in device buffers written in place (`update_inplace`: one small host->device
  copy each); outputs are device buffers, one set per bucket;
- total_sequence_length, which GroupQueryAttention reads on the host (so its value is frozen
  into a captured graph), is the cache length during decode: each row's real length is in
  seqlens_k, on the device. onnxruntime's checks allow this for a cache shared in place.
- onnxruntime runs a step up to three times while capturing it: a step is idempotent (it writes
  the new token's K/V at the slot its inputs name), and so is the sampling graph.
- a capture can fail where a plain run works (an operator that synchronizes or allocates inside
  the graph). The first run of a bucket's graph is where it happens, so a failure there turns
  graphs off for the session (gpu_graph_id -1 for every bucket), is logged once, is recorded in
  `cuda_graph` / `sampler_graph` and `graph_fallback`, and the same step runs again without a
  graph. Idempotence makes that safe: onnxruntime ends the failed capture before raising, the
  step's inputs are still in their buffers and the per-row state (seqlens, positions) only
  advances after the step has returned, so the retry recomputes exactly that step. A failure of
  a graph that has already run is not a capture problem and is raised as is.

Prefill has a new shape every call and runs without a graph. On the CPU provider the same code
runs without capture, so the tests exercise every part of it but the capture itself.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail, RuntimeException

from . import contract
from .session import SharedCacheSession

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes that get their own graph (and max_batch)
OUTPUT_DTYPES = {"logits": np.float32, "next_token": np.int64}
# Every buffer a decode step (and the sampling graph) reads or writes: dtype, shape after the batch dim.
# dims after the batch are 1 in a decode step (seq, kept); total_sequence_length, a host scalar, is not among them
STEP_INPUTS = {
    name: (np.dtype(t).type, (1,) * (len(dims) - 1))
    for name, (t, dims) in contract.STEP_INPUTS["shared"].items()
    if dims
}
SAMPLER_INPUTS = {"params": (np.float32, (4,)), "uniform": (np.float64, ())}
UPDATED_PER_STEP = ("input_ids", "position_ids", "seqlens_k")
RUN_ERRORS = (Fail, EPFail, RuntimeException, RuntimeError)  # what onnxruntime raises for a run that failed


def run_options(graph_id: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class Bucket:
    """The device buffers of one batch size, with host mirrors of the inputs (update_inplace
    copies a whole buffer, so each bucket has its own: a step copies its rows, no more)."""

    def __init__(self, batch: int, vocab_size: int, device: str):
        def new(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type((batch, *shape), dtype, device, 0)

        inputs = STEP_INPUTS | SAMPLER_INPUTS
        self.batch = batch
        self.host = {name: np.zeros((batch, *shape), dtype) for name, (dtype, shape) in inputs.items()}
        self.dev = {name: new(shape, dtype) for name, (dtype, shape) in inputs.items()}
        self.dev |= {
            "logits": new((1, vocab_size), np.float32),
            "next_token": new((1,), np.int64),
            "token": new((), np.int64),
        }

    def upload(self, *names: str) -> None:
        for name in names:
            self.dev[name].update_inplace(self.host[name])


class StaticCacheSession(SharedCacheSession):
    """SharedCacheSession whose decode steps a CUDA graph can capture (see the module docstring)."""

    captures = True

    def __init__(self, folder, manifest, config):
        super().__init__(folder, manifest, config)
        cap = self.max_batch
        self.buckets = [b for b in BUCKETS if b < cap] + [cap]
        self.reserve(cap, self.max_seq)  # once: captured graphs hold these addresses
        self._bufs = {b: Bucket(b, self.vocab_size, self.device) for b in self.buckets}
        self._total_decode = np.array(self._cap_seq, dtype=np.int32)  # a host input: constant during decode
        self._eager = run_options(-1)
        graphs = {b: run_options(i + 1) for i, b in enumerate(self.buckets)}
        self._graph = {"model": graphs, "sampler": dict(graphs)}  # run options per session and bucket
        self._graph_ran: dict[str, set[int]] = {
            "model": set(),
            "sampler": set(),
        }  # buckets whose graph has run
        if self.device == "cuda":  # asked for graphs on both sessions; create_session says which it got
            got = (("decode", self.cuda_graph), ("sampling", self.sampler_graph or self._sampler is None))
            if refused := [name for name, on in got if not on]:
                refused_graphs = " and ".join(refused)
                self.graph_fallback = (
                    f"onnxruntime refused to capture the {refused_graphs} graph at session creation"
                )
        log.info(
            "static decode: cache for %d x %d positions, batch buckets %s, CUDA graphs %s",
            cap,
            self._cap_seq,
            self.buckets,
            "on" if self.cuda_graph else "off",
        )

    def _reserve_sampler(self, cap: int) -> None:
        pass  # every bucket has its own sampling buffers

    def start(self, batch: int, seq: int, params: np.ndarray | None = None) -> None:
        self.reserve(batch, seq)  # allocates nothing: only checks the limits
        self.batch = batch
        self.bucket = next(b for b in self.buckets if b >= batch)
        self.pick = self._choose_pick(params)
        buf = self._buf = self._bufs[self.bucket]
        for host in buf.host.values():
            host[:] = 0  # padding rows: token 0 at position 0, alone in its row; greedy
        if params is not None:
            buf.host["params"][:batch] = params
        buf.upload("logits_index", "params")
        if self.pick == "sampler":  # bound once per call; the sampling graph is captured per bucket too
            logits = buf.dev["logits"]  # the model's (b, 1, vocab) output, read as (b, vocab)
            self._sampler_io.bind_input(
                "logits", self.device, 0, np.float32, (buf.batch, self.vocab_size), logits.data_ptr()
            )
            for name in ("params", "uniform"):
                self._sampler_io.bind_ortvalue_input(name, buf.dev[name])
            self._sampler_io.bind_ortvalue_output("token", buf.dev["token"])

    def prefill(self, ids, mask, positions, uniform=None):
        """As SharedCacheSession.prefill, without a graph; its outputs go to the bucket's buffers."""
        self._io.clear_binding_outputs()
        for name, dtype in OUTPUT_DTYPES.items():
            out = self._buf.dev[name]
            self._io.bind_output(name, self.device, 0, dtype, (self.batch, *out.shape()[1:]), out.data_ptr())
        self._bound = {}
        self._options, self._decode_bound = self._eager, False
        return super().prefill(ids, mask, positions, uniform)

    def decode(self, tokens: np.ndarray, uniform: np.ndarray | None = None) -> np.ndarray:
        B, host = self.batch, self._buf.host
        self._seqlens += 1
        assert self._position.max() < self._cap_seq, f"cache holds {self._cap_seq} positions"
        host["input_ids"][:B, 0], host["position_ids"][:B], host["seqlens_k"][:B] = (
            tokens,
            self._position,
            self._seqlens,
        )
        self._buf.upload(*UPDATED_PER_STEP)
        if not self._decode_bound:
            self._bind_decode()
        out = self._run(uniform)
        self._position += 1
        return out

    def _bind_decode(self) -> None:
        """Bind the bucket's shapes and buffers; every decode step of this call reuses them."""
        io, buf = self._io, self._buf
        for name in STEP_INPUTS:
            io.bind_ortvalue_input(name, buf.dev[name])
        io.bind_cpu_input("total_sequence_length", self._total_decode)
        io.clear_binding_outputs()
        for name in OUTPUT_DTYPES:
            io.bind_ortvalue_output(name, buf.dev[name])
        cache = (buf.batch, self.n_head, self._cap_seq, self.head_dim)
        for past, present, ptr in zip(self._past, self._present, self._kv_ptrs[0]):
            io.bind_input(past, self.device, 0, self.kv_dtype, cache, ptr)
            io.bind_output(present, self.device, 0, self.kv_dtype, cache, ptr)
        self._bound = {}  # the host bindings of prefill are gone
        self._options, self._decode_bound = self._graph["model"][buf.batch], True

    def _run(self, uniform: np.ndarray | None) -> np.ndarray:
        B, buf = self.batch, self._buf
        t0 = time.perf_counter()
        self._run_graph("model", self.session, self._io, self._options)
        if self.pick == "sampler":
            buf.host["uniform"][:B] = 0.0 if uniform is None else uniform
            buf.upload("uniform")
            self._run_graph("sampler", self._sampler, self._sampler_io, self._graph["sampler"][buf.batch])
            out = buf.dev["token"].numpy()[:B]
        elif self.pick == "argmax":
            out = buf.dev["next_token"].numpy()[:B, 0]
        else:
            out = buf.dev["logits"].numpy()[:B, 0]
        self.run_s += time.perf_counter() - t0
        return out

    def _run_graph(
        self, which: str, session: ort.InferenceSession, io: ort.IOBinding, options: ort.RunOptions
    ):
        """One run of the model or the sampling graph; when the bucket's graph fails at its first
        run (its capture), graphs go off and the step runs again without one (module docstring)."""
        captures = self.cuda_graph if which == "model" else self.sampler_graph
        if options is self._eager or not captures:
            session.run_with_iobinding(io, options)
            return
        bucket = self._buf.batch
        try:
            session.run_with_iobinding(io, options)
        except RUN_ERRORS as e:
            if bucket in self._graph_ran[which]:
                raise
            self._graphs_off(which, bucket, e)
            session.run_with_iobinding(io, self._eager)
            return
        self._graph_ran[which].add(bucket)

    def _graphs_off(self, which: str, bucket: int, error: Exception) -> None:
        """Run `which` ("model" or "sampler") without CUDA graphs from now on, and say why."""
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        graph = "decode" if which == "model" else "sampling"
        reason = f"the {graph} graph of batch bucket {bucket} failed at its capture ({first})"
        log.warning("CUDA graphs are off: %s; running without them", reason)
        self.graph_fallback = reason if self.graph_fallback is None else f"{self.graph_fallback}; {reason}"
        self._graph[which] = dict.fromkeys(self.buckets, self._eager)
        if which == "model":
            self.cuda_graph, self._options = False, self._eager
        else:
            self.sampler_graph = False

    def full_logits(self, ids: np.ndarray, first_position: int = 0) -> np.ndarray:
        return self.session.run(["logits"], self._full_feeds(ids, first_position), self._eager)[0]
