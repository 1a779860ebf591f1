"""`Session`: one owner for the onnxruntime session, its IO binding, a KV cache, each row's
sampling state and the token picker.

The parts are chosen once, when the session opens, from the manifest and the device:

- the KV cache (kv_cache.py): `ConcatCache` for the concat graph, `SharedCache` for the shared
  graph, `CudaGraphCache` (cuda_graphs.py) for the shared graph on the GPU: decode steps of fixed
  shapes, captured as CUDA graphs;
- the sampling graph (device_sampling.py), on the GPU by default.

Each row has its sampling settings and generator (`admit`; greedy until then). The token picker
(pickers.py) is chosen here, again whenever a row's settings change: the graph's argmax, the
sampling graph or numpy. `prefill` and `decode` bind the step (the cache), bind the outputs the
picker needs, run, and return token ids:

    session.start(batch, seq, clock)
    for row, prompt in enumerate(prompts): session.admit(row, prompt, sampling)
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
from .cuda_graphs import CudaGraphCache, GraphRunner
from .device_sampling import build_sampling_graph
from .kv_cache import ConcatCache, KVCache, SharedCache
from .logprobs import token_logprobs
from .model_folder import check_graph
from .pickers import HostPicker, RowSampling, choose_picker
from .runtime import create_session, device_of, resolve_device
from .sampling import SamplingConfig
from .signed_int8 import signed_graph, signed_is_exact

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
    spinning: bool = True  # onnxruntime's idle threads spin; off when a draft model takes turns on the cores
    signed_int8: bool = True  # int8 weights as s8 where that is exact and faster (signed_int8.py); False: u8

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
        # int8 weights multiplied as s8 where that is exact and faster (VNNI; signed_int8.py)
        self.signed_int8 = (
            config.signed_int8
            and device == "cpu"
            and manifest.dtype == "int8"
            and manifest.int8_kernel == "rows"
            and signed_is_exact()
        )
        source, files = signed_graph(model) if self.signed_int8 else (model, {})
        self.ort_session, decode_captured = create_session(source, device, config.threads, fixed, strict,
                                                           config.spinning, model, files)  # fmt: skip
        del files  # onnxruntime copied them
        self.device = device_of(self.ort_session)
        outputs = self.ort_session.get_outputs()
        check_graph(self.ort_session.get_inputs(), outputs, manifest, model)
        self.has_argmax = any(o.name == "next_token" for o in outputs)  # the graph's own greedy argmax
        self.sampling_session, self.sampling_binding, sampling_captured = None, None, False
        if self.device == "cuda" if config.device_sampling is None else config.device_sampling:
            # on the model's device, so it reads the logits where the model wrote them
            graph = build_sampling_graph(c.vocab_size).SerializeToString()
            self.sampling_session, sampling_captured = create_session(
                graph, self.device, config.threads, fixed, strict
            )
            self.sampling_binding = Binding(self.sampling_session)
        cache = CudaGraphCache if fixed else SharedCache if shared else ConcatCache
        self.cache: KVCache = cache(
            manifest, self.device, self.max_batch, self.max_seq, self.sampling_session is not None
        )
        self.graphs = GraphRunner()
        if fixed:
            asked = ("decode", "sampling") if self.sampling_session else ("decode",)
            captured = {"decode": decode_captured, "sampling": sampling_captured}
            self.graphs = GraphRunner(self.cache.buckets, captured, asked if self.device == "cuda" else ())
        self.binding = Binding(self.ort_session)
        self.sampling = RowSampling(self.max_batch, self.vocab_size)
        self.logits_rows: set[int] = set()  # rows whose log-probabilities are read: logits to the host
        self.picker, self._picker_stale, self.clock = None, True, Clock()

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps run as captured CUDA graphs now."""
        return self.graphs.on["decode"]

    def start(self, batch: int, seq: int, clock: Clock) -> None:
        """Begin a batch of `batch` rows (slots) of up to `seq` positions each, every row greedy
        until `admit` says otherwise; the runs are timed on `clock`."""
        self.cache.start(batch, seq)
        self.sampling = RowSampling(self.max_batch, self.vocab_size)
        self.logits_rows.clear()
        self._picker_stale, self.clock = True, clock

    def admit(self, row: int, prompt: list[int], sampling: SamplingConfig, rng: np.random.Generator | None = None,
              logits: bool = False) -> None:  # fmt: skip
        """A row's sampling settings and random generator (default: seeded with sampling.seed),
        from its next pick on; `prompt` starts the history that penalties read. logits=True: the
        row's log-probabilities are read (`token_logprobs`), so its logits come to the host."""
        rng = np.random.default_rng(sampling.seed) if rng is None else rng
        self.sampling.admit(row, prompt, sampling, rng)
        (self.logits_rows.add if logits else self.logits_rows.discard)(row)
        self._picker_stale = True

    def _pick_with(self):
        """The picker for every row's settings now (pickers.choose_picker), chosen again after
        rows came or went; another kind binds other outputs."""
        if self._picker_stale:
            if self.logits_rows:
                picker = HostPicker(self.sampling)
            else:
                picker = choose_picker(self, self.sampling, self.max_batch)  # free rows: greedy
            if type(picker) is not type(self.picker):
                self.binding.clear_outputs()
            self.picker, self._picker_stale = picker, False
        return self.picker

    def prefill(self, prompts: list[list[int]], first: int = 0) -> np.ndarray:
        """New prompts into rows first, first + 1, ... -> each row's first new token (len(prompts),).
        The concat cache takes its whole batch at once (first 0); the shared cache takes prompts
        into free slots of a running batch too, whose other rows keep their state."""
        picker = self._pick_with()  # first: a new kind of picker clears the bound outputs
        self.cache.bind_prefill(self.binding, prompts, first)
        picker.bind(self.binding, self.cache.outputs, len(prompts), first=first)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, None)
        ids = picker.pick(self.cache.outputs, len(prompts), first=first)
        self.clock.ran(time.perf_counter() - t0)
        return ids

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One new token for each of the first len(tokens) rows -> the next one for each. Rows past
        them must be free (the shared cache: a running batch shrinks to its last slot in use)."""
        picker = self._pick_with()
        bucket = self.cache.bind_decode(self.binding, tokens)
        picker.bind(self.binding, self.cache.outputs, self.cache.rows)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, bucket)
        ids = picker.pick(self.cache.outputs, len(tokens), bucket=bucket)
        self.clock.ran(time.perf_counter() - t0)
        return ids

    def prefill_slot(self, slot: int, tokens: list[int], past: int = 0, pick: bool = True) -> int | None:
        """Prompt tokens into one row (slot) of the running batch -> the token after them. The other
        rows keep their cache; the next `decode` continues them all. `past`: tokens of this prompt
        already in the slot (a long prompt goes in chunks: 0, then the length so far); pick=False
        for a chunk before the last (no token, no draw; the row stays out of decode steps). The
        slot's sampling settings are admitted first (`admit`). Shared cache only."""
        picker = self._pick_with()
        picker.bind(self.binding, self.cache.outputs, 1, first=slot)
        self.cache.bind_prefill_slot(self.binding, slot, tokens, past, decoding=pick)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, None)
        token = int(picker.pick(self.cache.outputs, 1, first=slot)[0]) if pick else None
        self.clock.ran(time.perf_counter() - t0)
        return token

    def last_logits(self, rows: int) -> np.ndarray:
        """The last step's logits (rows, vocab) for its first `rows` rows, when its picker had them
        come back (rows admitted with logits=True, or any row picked on the host)."""
        return self.cache.outputs.read("logits", rows)[:, 0]

    def token_logprobs(self, row: int, token: int, top: int) -> tuple[float, dict[int, float]]:
        """The log-probability of `token` at row `row` of the last run, and the `top` most likely
        tokens' (the row was admitted with logits=True)."""
        logits = self.last_logits(row + 1)[row : row + 1]
        (logprob,), (tops,) = token_logprobs(logits, [token], top)
        return float(logprob), tops

    def prompt_logprobs(self, ids: list[int], top: int) -> tuple[list[float], list[dict[int, float]]]:
        """Each token's log-probability after the ones before it (from the second token on) and the
        `top` most likely tokens' there: one pass over the prompt outside the cache."""
        logits = self.full_logits(np.array([ids], np.int64))[0]
        scored, tops = token_logprobs(logits[:-1], ids[1:], top)  # position i predicts token i + 1
        return scored.tolist(), tops

    def free(self, slot: int) -> None:
        """Give a row up (its request ended): it picks greedily from now on and, with slots (the
        shared cache), `prefill_slot` reuses it."""
        self.cache.free(slot)
        self.sampling.free(slot)
        self.logits_rows.discard(slot)
        self._picker_stale = True

    def verify(self, slot: int, tokens: list[int], logits: bool = False,
               last: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
        """One run of `slot` over `tokens` (its pending token, then drafted ones) after what it
        holds -> the graph's argmax after each (len(tokens),) and, with logits=True, the logits
        there (len(tokens), vocab); after the `last` ones only, when given. The row then holds
        them all (`set_length` takes some back). The other rows keep their state. Shared cache
        on the CPU provider."""
        n = last or len(tokens)
        self.binding.clear_outputs()  # this run's outputs have their own shapes
        self.picker = None  # the next step's picker binds its own again
        self._picker_stale = True
        self.cache.bind_verify(self.binding, slot, tokens, last)
        argmax = np.empty((1, n), np.int64)
        self.binding.output("next_token", "cpu", np.int64, (1, n), argmax.ctypes.data)
        out = np.empty((1, n, self.vocab_size), np.float32) if logits else None
        if logits:
            self.binding.output("logits", "cpu", np.float32, (1, n, self.vocab_size), out.ctypes.data)
        t0 = time.perf_counter()
        self.graphs.run("decode", self.ort_session, self.binding, None)
        self.clock.ran(time.perf_counter() - t0)
        self.binding.clear_outputs()
        return argmax[0], None if out is None else out[0]

    def set_length(self, slot: int, length: int) -> None:
        """How many tokens `slot` holds: takes back tokens a verification wrote and were not kept."""
        self.cache.set_length(slot, length)

    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        """Rows dst[i] become copies of rows src[i]: cache and length (beam search; the shared
        cache in host memory only)."""
        self.cache.copy_rows(src, dst)

    def full_logits(self, ids: np.ndarray, first_position: int = 0, keep: int | None = None) -> np.ndarray:
        """Logits at every position of ids (batch, seq), or at the last `keep` ones, no cache kept:
        for scoring. first_position: the position of ids[:, 0] (the load check probes the last one)."""
        feeds = self.cache.full_feeds(ids, first_position, keep)
        return self.ort_session.run(["logits"], feeds, self.graphs.eager)[0]

    @property
    def kv_pointers(self) -> list[list[int]]:
        """Device addresses of the cache buffers (tests check that steps write into these)."""
        return [list(p) for p in self.cache.kv.ptrs]
