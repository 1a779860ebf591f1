"""Decode steps of fixed shapes at fixed addresses, for CUDA graphs, and the runs that replay them.

A CUDA graph replays captured kernels with their captured arguments, so everything a decode
step touches keeps its shape and its address from step to step and from call to call:

- the KV cache is allocated once, for max_batch x max_seq, when the session opens;
- a batch is padded up to a bucket (1, 2, 4, ..., max_batch) and each bucket has its own graph
  (run option gpu_graph_id = bucket index + 1; 0 is onnxruntime's, -1 runs without a graph);
  padding rows (and free slots) decode a dummy token at position 0 of their own cache rows;
- step inputs live in device buffers written in place (`update_inplace`: one small host->device
  copy each); outputs are device buffers, one set per bucket;
- total_sequence_length, which GroupQueryAttention reads on the host (so its value is frozen
  into a captured graph), is the cache length during decode: each row's real length is in
  seqlens_k, on the device. onnxruntime's checks allow this for a cache shared in place.
- onnxruntime runs a step up to three times while capturing it: a step is idempotent (it writes
  the new token's K/V at the position its inputs name), and so is the sampling graph.
- a capture can fail where a plain run works (an operator that synchronizes or allocates inside
  the graph). The first run of a bucket's graph is where it happens, so a failure there turns
  graphs off for that graph (decode or sampling) for the session, is logged once, is recorded in
  `GraphRunner.on` and `GraphRunner.fallback`, and the same step runs again without a graph.
  Idempotence makes that safe: onnxruntime ends the failed capture before raising, the step's
  inputs are still in their buffers and nothing was written but the step's own K/V. A failure of
  a graph that has already run is not a capture problem and is raised as is.

Prefill has a new shape every call and runs without a graph. On the CPU provider the same code
runs without capture, so the tests exercise every part of it but the capture itself.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail, RuntimeException

from . import contract
from .binding import Binding
from .kv_cache import SharedCache
from .runtime import first_line

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes that get their own graph (and max_batch)
# The device buffers of a decode step: dtype and the shape after the batch dim, which is 1 in a
# decode step (seq, kept); total_sequence_length, a host scalar, is not among them.
STEP_INPUTS = {
    name: (np.dtype(t).type, (1,) * (len(dims) - 1))
    for name, (t, dims) in contract.STEP_INPUTS["shared"].items()
    if dims
}
SAMPLING_INPUTS = {"params": (np.float32, (4,)), "uniform": (np.float64, ())}
RUN_ERRORS = (Fail, EPFail, RuntimeException, RuntimeError)  # what onnxruntime raises for a run that failed


def run_options(graph_id: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class GraphRunner:
    """Runs of the decode and sampling graphs: per batch bucket a captured graph while `on` says
    so, without one otherwise (prefill, a session without graphs). Empty `buckets`: plain runs."""

    def __init__(self, buckets: tuple[int, ...] = (), captured: dict[str, bool] | None = None,
                 asked: tuple[str, ...] = ()):  # fmt: skip
        """captured: whether onnxruntime agreed to capture the decode and sampling graphs;
        asked: those the session asked it for (on the GPU), a refusal of which is recorded."""
        self.buckets = buckets
        self.on = {"decode": False, "sampling": False} | (captured or {})  # whether each is captured
        self.fallback: str | None = None  # why graphs were turned off after they were asked for
        if refused := [name for name in asked if not self.on[name]]:
            self.fallback = (
                f"onnxruntime refused to capture the {' and '.join(refused)} graph at session creation"
            )
        self.eager = run_options(-1) if buckets else None
        graph_ids = {b: run_options(i + 1) for i, b in enumerate(buckets)}
        self._options = {"decode": graph_ids, "sampling": dict(graph_ids)}  # per graph and bucket
        self._ran: dict[str, set[int]] = {"decode": set(), "sampling": set()}  # buckets whose graph ran

    def run(self, which: str, session: ort.InferenceSession, binding: Binding, bucket: int | None) -> None:
        """One run of `which` ("decode" or "sampling") for a batch bucket (None: without a graph)."""
        options = self.eager if bucket is None else self._options[which][bucket]
        if options is self.eager or not self.on[which]:  # on the CPU the graph ids are only labels
            session.run_with_iobinding(binding.io, options)
            return
        try:
            session.run_with_iobinding(binding.io, options)
        except RUN_ERRORS as e:
            if bucket in self._ran[which]:
                raise
            self.turn_off(
                which, f"the {which} graph of batch bucket {bucket} failed at its capture ({first_line(e)})"
            )
            session.run_with_iobinding(binding.io, self.eager)  # the same step again (module docstring)
            return
        self._ran[which].add(bucket)

    def turn_off(self, which: str, reason: str) -> None:
        """Run `which` without CUDA graphs from now on, and say why."""
        log.warning("CUDA graphs are off: %s; running without them", reason)
        self.fallback = reason if self.fallback is None else f"{self.fallback}; {reason}"
        self.on[which] = False
        self._options[which] = dict.fromkeys(self.buckets, self.eager)


class Bucket:
    """The device buffers of one batch size, with host mirrors of the inputs (update_inplace
    copies a whole buffer, so each bucket has its own: a step copies its rows, no more). It is
    also where a step's outputs land (binding.HostOutputs's attributes, on the device)."""

    token_on_device = True  # the sampling graph's ids stay in `dev["token"]` (a captured graph)

    def __init__(self, batch: int, vocab_size: int, device: str):
        def new(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type((batch, *shape), dtype, device, 0)

        inputs = STEP_INPUTS | SAMPLING_INPUTS
        self.batch, self.vocab_size, self.device = batch, vocab_size, device
        self.host = {name: np.zeros((batch, *shape), dtype) for name, (dtype, shape) in inputs.items()}
        self.dev = {name: new(shape, dtype) for name, (dtype, shape) in inputs.items()}
        self.dev |= {"logits": new((1, vocab_size), np.float32), "next_token": new((1,), np.int64),
                     "token": new((), np.int64)}  # fmt: skip
        self.upload(*self.host)  # zeros: logits_index stays 0 (a decode step's only position)
        # addresses and shapes asked of onnxruntime once, not every step
        self.dev_ptrs = {name: value.data_ptr() for name, value in self.dev.items()}
        self.shapes = {name: tuple(value.shape()) for name, value in self.dev.items()}

    def upload(self, *names: str) -> None:
        for name in names:
            self.dev[name].update_inplace(self.host[name])

    def bind(self, binding: Binding, name: str, rows: int, on_device: bool = True) -> None:
        """Bind both outputs of the model for `rows` rows (a captured graph has all its outputs bound)."""
        for out, dtype in (("logits", np.float32), ("next_token", np.int64)):
            binding.output(out, self.device, dtype, (rows, *self.shapes[out][1:]), self.dev_ptrs[out])

    def read(self, name: str, rows: int) -> np.ndarray:
        return self.dev[name].numpy()[:rows]


class CudaGraphCache:
    """The shared cache (kv_cache.SharedCache, which does the prefill and holds the slots) with
    decode steps of one shape per batch bucket at fixed addresses (see the module docstring)."""

    kv_cache = "shared"
    has_slots = True

    def __init__(
        self, manifest: contract.Manifest, device: str, max_batch: int, max_seq: int, sampling: bool
    ):
        self.shared = SharedCache(manifest, device, max_batch, max_seq, sampling=False)
        self.shared.start(max_batch, max_seq)  # once: captured graphs hold these addresses
        self.kv, self.device = self.shared.kv, device
        self.buckets = tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)
        self._buckets = {b: Bucket(b, manifest.config.vocab_size, device) for b in self.buckets}
        self.outputs = self._buckets[max_batch]
        self._total = np.array(self.kv.cap_seq, dtype=np.int32)  # a host input: constant during decode
        log.info(
            "CUDA graph cache: %d x %d positions, batch buckets %s", max_batch, self.kv.cap_seq, self.buckets
        )

    @property
    def batch(self) -> int:
        return self.shared.batch

    @property
    def row_lengths(self):
        return self.shared.row_lengths

    def start(self, batch: int, seq: int) -> None:
        self.shared.start(batch, seq)  # allocates nothing: only checks the limits
        self.outputs = self._buckets[next(b for b in self.buckets if b >= batch)]
        for host in self.outputs.host.values():
            host[:] = 0  # padding rows: token 0 at position 0, alone in its row; greedy
        self.outputs.upload("logits_index")

    def bind_prefill(self, binding: Binding, prompts: list[list[int]], first: int = 0) -> None:
        """Prompts into slots (the shared cache's); their picks land in a bucket with room for them."""
        self.outputs = self._buckets[next(b for b in self.buckets if b >= len(prompts))]
        self.shared.bind_prefill(binding, prompts, first)

    def bind_prefill_slot(self, binding: Binding, slot: int, tokens: list[int], past: int = 0,
                          decoding: bool = True) -> None:  # fmt: skip
        self.shared.bind_prefill_slot(binding, slot, tokens, past, decoding)

    def free(self, slot: int) -> None:
        self.shared.free(slot)

    @property
    def rows(self) -> int:
        """Rows the last decode step bound: its bucket."""
        return self.outputs.batch

    def bind_decode(self, binding: Binding, tokens: np.ndarray) -> int:
        """Write the step's inputs into the bucket's buffers and bind the bucket's shapes (the
        same every step in that bucket). Returns the bucket, whose graph runs the step."""
        B = len(tokens)
        bucket = self.outputs = self._buckets[next(b for b in self.buckets if b >= B)]
        host, rows, b = bucket.host, self.shared.row_lengths, bucket.batch
        host["input_ids"][:B, 0], host["input_ids"][B:] = tokens, 0  # rows past B: out of the step
        host["position_ids"][:, 0] = rows.lengths[:b]  # before the step
        host["seqlens_k"][:] = rows.step(b)[0]  # rows past B are not used: a dummy token, kept as they are
        bucket.upload("input_ids", "position_ids", "seqlens_k")
        for name, (dtype, _) in STEP_INPUTS.items():
            binding.input(name, self.device, dtype, bucket.shapes[name], bucket.dev_ptrs[name])
        binding.host_input("total_sequence_length", self._total)
        self.kv.bind(binding, 0, False, bucket.batch, self.kv.cap_seq)
        self.kv.bind(binding, 0, True, bucket.batch, self.kv.cap_seq)
        return bucket.batch

    def full_feeds(
        self, ids: np.ndarray, first_position: int = 0, keep: int | None = None
    ) -> dict[str, np.ndarray]:
        return self.shared.full_feeds(ids, first_position, keep)
