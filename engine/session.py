"""`Session`: one owner for the onnxruntime session, its IO binding, a KV cache and a token picker.

The parts are chosen once, when the session opens, from the manifest and the device:

- the KV cache (kv_cache.py): `ConcatCache` for the concat graph, `SharedCache` for the shared
  graph, `CudaGraphCache` (cuda_graphs.py) for the shared graph on the GPU: decode steps of fixed
  shapes, captured as CUDA graphs;
- the sampling graph (device_sampling.py), on the GPU by default.

A token picker (pickers.py) is chosen per batch, from its sampling settings. `prefill` and
`decode` bind the step (the cache), bind the outputs the picker needs, run, and return token ids:

    session.start(batch, seq, picker, clock)
    tokens = session.prefill(prompts)
    while ...: tokens = session.decode(tokens)

Slots (shared cache only): `prefill_slot` fills one row of a running batch with a new prompt
while the others keep their state; `free` gives a row up. The next call reuses the buffers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import inputs
from .binding import Binding
from .clock import Clock
from .contract import Manifest
from .cuda_graphs import CudaGraphCache, CudaGraphs
from .device_sampling import build_sampling_graph
from .kv_cache import ConcatCache, SharedCache
from .model_folder import check_graph
from .pickers import SlotSampling, choose_picker
from .runtime import create_session, device_of, resolve_device
from .sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionConfig:
    provider: str = "auto"  # "auto" | "cuda" | "cpu"
    max_batch: int = 8
    max_seq: int | None = None  # None: the model's n_positions
    threads: int | None = None  # CPU intra-op threads; None lets onnxruntime choose
    device_sampling: bool | None = None  # the sampling graph picks; None: on the GPU only
    cuda_graphs: bool | None = None  # fixed decode shapes, captured (shared cache only); None: on the GPU
    max_queue: int = 64  # submitted requests waiting for a slot (Engine.submit); more are refused

    def __post_init__(self) -> None:
        """Every setting through the input gate (InputError names it), before any folder is read."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, inputs.check(f.name, getattr(self, f.name)))  # frozen: set once


class Session:
    def __init__(self, folder: Path, manifest: Manifest, config: SessionConfig):
        c = manifest.config
        self.vocab_size, self.max_batch = c.vocab_size, config.max_batch
        self.max_seq = min(config.max_seq or c.n_positions, c.n_positions)
        shared = manifest.kv_cache == "shared"
        device = resolve_device(config.provider, manifest)
        if config.cuda_graphs and not shared:
            raise ValueError(
                "CUDA graphs (fixed decode shapes) need the shared cache: export with --kv-cache shared"
            )
        fixed = shared and (device == "cuda" if config.cuda_graphs is None else config.cuda_graphs)
        strict = config.provider == "cuda"
        model = folder / manifest.model_file
        self.ort_session, decode_captured = create_session(model, device, config.threads, fixed, strict)
        self.device = device_of(self.ort_session)
        outputs = self.ort_session.get_outputs()
        check_graph(self.ort_session.get_inputs(), outputs, manifest, model)
        self.has_argmax = any(o.name == "next_token" for o in outputs)  # the graph's own greedy argmax
        self.sampling_graph, self.sampling_binding, sampling_captured = None, None, False
        if self.device == "cuda" if config.device_sampling is None else config.device_sampling:
            # on the model's device, so it reads the logits where the model wrote them
            graph = build_sampling_graph(c.vocab_size).SerializeToString()
            self.sampling_graph, sampling_captured = create_session(
                graph, self.device, config.threads, fixed, strict
            )
            self.sampling_binding = Binding(self.sampling_graph)
        cache = CudaGraphCache if fixed else SharedCache if shared else ConcatCache
        self.cache = cache(
            manifest, self.device, self.max_batch, self.max_seq, self.sampling_graph is not None
        )
        self.graphs = CudaGraphs()
        if fixed:
            asked = ("decode", "sampling") if self.sampling_graph else ("decode",)
            captured = {"decode": decode_captured, "sampling": sampling_captured}
            self.graphs = CudaGraphs(self.cache.buckets, captured, asked if self.device == "cuda" else ())
        self.binding = Binding(self.ort_session)
        self.picker, self.clock = None, Clock()

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps run as captured CUDA graphs now."""
        return self.graphs.on["decode"]

    def picker_for(self, sampling: SamplingConfig, rng: np.random.Generator, prompts: list[list[int]]):
        """The picker of one batch of prompts with the same settings (one generator for all rows)."""
        slots = SlotSampling.for_batch(prompts, sampling, rng, self.vocab_size)
        return choose_picker(self, slots, len(prompts))

    def start(self, batch: int, seq: int, picker, clock: Clock) -> None:
        """Begin a batch of `batch` rows (slots) of up to `seq` positions each, its tokens picked
        by `picker`."""
        self.cache.start(batch, seq)
        self.use(picker)
        self.clock = clock

    def use(self, picker) -> None:
        """Pick with `picker` from the next step on (another kind binds other outputs)."""
        if type(picker) is not type(self.picker):
            self.binding.clear_outputs()
        self.picker = picker

    def prefill(self, prompts: list[list[int]], first: int = 0) -> np.ndarray:
        """New prompts into rows first, first + 1, ... -> each row's first new token (len(prompts),).
        The concat cache takes its whole batch at once (first 0); the shared cache takes prompts
        into free slots of a running batch too, whose other rows keep their state."""
        self.cache.bind_prefill(self.binding, prompts, first)
        self.picker.bind(self.binding, self.cache.outputs, len(prompts), first=first)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, None)
        ids = self.picker.pick(self.cache.outputs, len(prompts), first=first)
        self.clock.ran(time.perf_counter() - t0)
        return ids

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One new token for each of the first len(tokens) rows -> the next one for each. Rows past
        them must be free (the shared cache: a running batch shrinks to its last slot in use)."""
        bucket = self.cache.bind_decode(self.binding, tokens)
        self.picker.bind(self.binding, self.cache.outputs, self.cache.rows)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, bucket)
        ids = self.picker.pick(self.cache.outputs, len(tokens), bucket=bucket)
        self.clock.ran(time.perf_counter() - t0)
        return ids

    def prefill_slot(self, slot: int, tokens: list[int], past: int = 0, pick: bool = True) -> int | None:
        """Prompt tokens into one row (slot) of the running batch -> the token after them. The other
        rows keep their cache; the next `decode` continues them all. `past`: tokens of this prompt
        already in the slot (a long prompt goes in chunks: 0, then the length so far); pick=False
        for a chunk before the last (no token, no draw; the row stays out of decode steps). The slot's sampling settings are admitted
        first (pickers.SlotSampling). Shared cache only."""
        self.picker.bind(self.binding, self.cache.outputs, 1, first=slot)
        self.cache.bind_prefill_slot(self.binding, slot, tokens, past, decoding=pick)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, None)
        token = int(self.picker.pick(self.cache.outputs, 1, first=slot)[0]) if pick else None
        self.clock.ran(time.perf_counter() - t0)
        return token

    def last_logits(self, rows: int) -> np.ndarray:
        """The last step's logits (rows, vocab) for its first `rows` rows, when its picker had them
        come back (HostPicker): for checks against a reference."""
        return self.cache.outputs.read("logits", rows)[:, 0]

    def free(self, slot: int) -> None:
        """Give a row up (its request ended); `prefill_slot` reuses it. Shared cache only."""
        self.cache.free(slot)

    def full_logits(self, ids: np.ndarray, first_position: int = 0) -> np.ndarray:
        """Logits at every position of ids (batch, seq), no cache kept: for scoring.
        first_position: the position of ids[:, 0] (the load check probes the last one)."""
        feeds = self.cache.full_feeds(ids, first_position)
        return self.ort_session.run(["logits"], feeds, self.graphs.eager)[0]

    @property
    def kv_pointers(self) -> list[list[int]]:
        """Device addresses of the cache buffers (tests check that steps write into these)."""
        return [list(p) for p in self.cache.kv.ptrs]
