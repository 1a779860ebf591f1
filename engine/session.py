"""One owner for the ONNX Runtime session, its IO binding and every buffer it uses.

The KV cache lives on the session's device, preallocated and bound by pointer, so the graph
writes the new cache straight into our memory: no cache byte crosses to the host and nothing
is allocated per step. Buffers are sized for (batch, seq) on first use and only ever grow, up
to max_batch x max_seq. Two layouts, chosen by the model folder's manifest:

- "concat" (the standard graph): two sets of buffers per layer, "ping" and "pong". A step binds
  the pasts to one set and the presents to the other; the next step swaps them. Shapes grow by
  one position per step, so the cache is rebound every step.
- "shared" (the fast graph): one buffer per layer, bound as past and present at once;
  GroupQueryAttention writes each new token's K/V in place. Nothing is rebound during decode.

Inputs are written into preallocated host buffers and bound by pointer (rebound only when their
shape changes). What comes back to the host is chosen per batch (`start`): the logits of each
row's last position when the host samples; only the ids when the fast graph's own argmax
(`next_token`) or the sampling graph (device_sampling.py) picks the tokens on the device.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import cuda_libs
from .contract import (
    ONNX_ELEM_TYPE,
    STEP_INPUTS,
    InputError,
    Manifest,
    ModelFolderError,
    UserError,
    past_names,
    present_names,
)
from .device_sampling import build_sampler
from .model_folder import check_graph

log = logging.getLogger(__name__)

KV_DTYPES = {dtype: np.dtype(elem).type for dtype, elem in ONNX_ELEM_TYPE.items()}  # numpy type of the cache
ONE = np.ones((), dtype=np.int64)  # logits_to_keep for generation: the last position only
SEQ_GRANULE = 256  # the cache grows in steps of this many positions, so short calls do not each reallocate


def host_dtypes(kv_cache: str) -> dict[str, type]:
    """numpy type of each step input of a cache layout, from the contract's table."""
    return {name: np.dtype(t).type for name, (t, _) in STEP_INPUTS[kv_cache].items()}


def positions_from(first: int, batch: int, seq: int) -> np.ndarray:
    """(batch, seq) int64 positions first, first + 1, ... on every row."""
    return np.broadcast_to(np.arange(first, first + seq, dtype=np.int64), (batch, seq)).copy()


def available_host_bytes() -> int | None:
    """Memory the system can give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class ProviderError(UserError, RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    provider: str = "auto"  # "auto" | "cuda" | "cpu"
    max_batch: int = 8
    max_seq: int | None = None  # None: the model's n_positions
    threads: int | None = None  # CPU intra-op threads; None lets onnxruntime choose
    device_sampling: bool | None = (
        None  # sample with the sampling graph; None: on the GPU only (on the CPU numpy is faster)
    )
    static_decode: bool | None = (
        None  # fixed decode shapes and addresses (CUDA graphs; shared cache only); None: on the GPU
    )

    def __post_init__(self) -> None:
        """Every setting through the input gate (InputError names it), before any folder is read."""
        from dataclasses import fields

        from . import inputs

        for f in fields(self):
            object.__setattr__(
                self, f.name, inputs.check(f.name, getattr(self, f.name))
            )  # frozen: set once, here


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver sees. onnxruntime-gpu lists CUDAExecutionProvider even with no GPU,
    so ask the driver directly instead of letting a CUDA session fail noisily."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def create_session(
    model: Path | bytes, provider: str, threads: int | None, cuda_graph: bool = False
) -> tuple[ort.InferenceSession, str, bool]:
    """The one place that picks a provider and checks what onnxruntime actually gave us.
    `model` is a model file, or a serialized model (the sampling graph). cuda_graph asks the
    CUDA provider to capture runs as CUDA graphs. Returns (session, "cuda" | "cpu", whether
    graphs are on). Raises ProviderError when provider="cuda" cannot be honoured."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's own log lines (warnings about shape ops placed on the CPU, a failed kernel's
    # error, which also comes back as the exception we report) only with --debug.
    options.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
    if threads:
        options.intra_op_num_threads = threads
    want_cuda = provider == "cuda" or (provider == "auto" and cuda_device_count() > 0)
    if provider == "cuda" and cuda_device_count() == 0:
        raise ProviderError(
            "--provider cuda was requested but no NVIDIA GPU is visible to the driver; use --provider cpu (or auto)"
        )
    providers = ["CPUExecutionProvider"]
    if want_cuda and load_cuda_libraries(provider):
        providers = [
            ("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if cuda_graph else {}),
            "CPUExecutionProvider",
        ]
    else:
        want_cuda = False
    source = model if isinstance(model, bytes) else str(model)
    try:
        try:
            session = ort.InferenceSession(source, options, providers=providers)
        except Exception as e:
            if not (want_cuda and cuda_graph):
                raise
            # Capture needs every compute node on the CUDA provider; run without graphs rather than fail.
            log.warning(
                "CUDA graphs are off: onnxruntime cannot capture this graph (%s)",
                str(e).splitlines()[0][:200],
            )
            return *create_session(model, provider, threads)[:2], False
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
        raise ModelFolderError(
            f"{model if isinstance(model, Path) else 'an in-memory graph'} could not be loaded by onnxruntime ({str(e).splitlines()[0][:200]}); re-export the model folder"
        ) from e
    got = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    if want_cuda and got != "cuda":
        why = "the CUDA libraries were found; --debug shows onnxruntime's own error"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            why = f"onnxruntime {ort.__version__} here has no CUDA provider: install onnxruntime-gpu"
        if provider == "cuda":
            raise ProviderError(f"the CUDA execution provider failed to start ({why}); use --provider cpu")
        log.warning(
            "a GPU is present but the CUDA execution provider failed to start (%s); running on the CPU", why
        )
    log.info(
        "running on %s (%s)%s",
        got.upper(),
        session.get_providers()[0],
        " with CUDA graphs" if cuda_graph and got == "cuda" else "",
    )
    return session, got, cuda_graph and got == "cuda"


def load_cuda_libraries(provider: str) -> bool:
    """Load the CUDA and cuDNN libraries from wherever the nvidia packages are (cuda_libs.py), before
    the CUDA provider looks for them. False, with a warning, when one is missing and provider is
    "auto" (the caller then runs on the CPU); ProviderError naming it when provider is "cuda"."""
    missing = cuda_libs.preload(cuda_libs.cuda_major(getattr(ort, "cuda_version", None)))
    if not missing:
        return True
    what = cuda_libs.describe(missing)
    fix = (
        "install torch's CUDA packages (nvidia-cublas, nvidia-cuda-runtime, nvidia-curand, nvidia-cudnn-cu13)"
    )
    if provider == "cuda":
        raise ProviderError(f"the CUDA execution provider cannot start: {what}; {fix} or use --provider cpu")
    log.warning("a GPU is present but the CUDA execution provider cannot start (%s); running on the CPU: %s",
                what, fix)  # fmt: skip
    return False


class ModelSession:
    """The parts both cache layouts share: the session, host buffers, binding and timing.
    Use `layouts.open_session`, which picks the layout from the manifest."""

    kv_sets = 1
    captures = False  # whether to ask the CUDA provider for CUDA graphs (StaticCacheSession)

    def __init__(self, folder: Path, manifest: Manifest, config: SessionConfig):
        c = manifest.config
        self.manifest, self.n_layer, self.vocab_size = manifest, c.n_layer, c.vocab_size
        self.max_batch = config.max_batch
        self.max_seq = min(config.max_seq or c.n_positions, c.n_positions)
        self.session, self.device, self.cuda_graph = create_session(
            folder / manifest.model_file, config.provider, config.threads, self.captures
        )
        outs = self.session.get_outputs()
        check_graph(self.session.get_inputs(), outs, manifest, folder / manifest.model_file)
        self.has_argmax = any(o.name == "next_token" for o in outs)  # the graph has its own greedy argmax
        self.graph_fallback: str | None = None  # why CUDA graphs were turned off after they were asked for
        self.device_sampling = (
            self.device == "cuda" if config.device_sampling is None else config.device_sampling
        )
        self._sampler, self.sampler_graph = None, False
        if self.device_sampling:  # same provider as the model, so it reads the logits where they are
            self._sampler, _, self.sampler_graph = create_session(
                build_sampler(self.vocab_size).SerializeToString(), self.device, config.threads, self.captures
            )
            self._sampler_io = self._sampler.io_binding()
        self.pick = "host"  # who picks the tokens of the current batch (see _choose_pick)
        self.kv_dtype = KV_DTYPES[manifest.dtype]
        self.n_head, self.head_dim = c.n_head, c.head_dim
        self._past, self._present = past_names(c.n_layer), present_names(c.n_layer)
        self._io = self.session.io_binding()
        self._cap_batch = self._cap_seq = 0
        self._kv: list[list[ort.OrtValue]] = []  # [set] x (key_0, value_0, key_1, ...)
        self._kv_ptrs: list[list[int]] = []  # their device addresses
        self._bound: dict[str, tuple[int, tuple]] = {}  # host buffers bound now: name -> (id, shape)
        self.batch = 0
        self.run_s = 0.0  # total time inside onnxruntime, for the Python-overhead figure

    def reserve(self, batch: int, seq: int) -> None:
        """Make room for `batch` rows of `seq` cache positions. Does nothing when already big enough."""
        if batch > self.max_batch or seq > self.max_seq:
            raise ValueError(
                f"batch {batch} x sequence {seq} exceeds the engine's max_batch {self.max_batch} x max_seq {self.max_seq}"
            )
        if batch <= self._cap_batch and seq <= self._cap_seq:
            return
        cap_batch = max(batch, self._cap_batch)
        cap_seq = min(self.max_seq, max(self._cap_seq, -(-seq // SEQ_GRANULE) * SEQ_GRANULE))
        shape = (cap_batch, self.n_head, cap_seq, self.head_dim)
        self._check_room(
            self.kv_sets * len(self._past) * int(np.prod(shape)) * np.dtype(self.kv_dtype).itemsize, shape
        )
        self._cap_batch, self._cap_seq = cap_batch, cap_seq
        log.debug(
            "allocating KV cache for batch %d x seq %d on %s", self._cap_batch, self._cap_seq, self.device
        )
        self._kv = [
            [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                for _ in self._past
            ]
            for _ in range(self.kv_sets)
        ]
        self._kv_ptrs = [[v.data_ptr() for v in kv_set] for kv_set in self._kv]
        n = self._cap_batch * self._cap_seq
        self._host = {name: np.zeros(n, dtype=dtype) for name, dtype in self.host_inputs.items()}
        self._host_logits = np.zeros(self._cap_batch * self.vocab_size, dtype=np.float32)
        self._host_next = np.zeros(self._cap_batch, dtype=np.int64)
        if self._sampler is not None:
            self._reserve_sampler(self._cap_batch)
        self._bound = {}  # new buffers: every host binding is stale

    def _check_room(self, nbytes: int, shape: tuple) -> None:
        """Refuse a host cache that cannot fit in the memory the system has free, before allocating
        it (a large max_batch x max_seq would otherwise be found out by the OOM killer)."""
        free = available_host_bytes() if self.device == "cpu" else None
        if free is not None and nbytes > free:
            raise InputError(
                f"a KV cache of {shape[0]} rows x {shape[2]} positions needs {nbytes / 2**30:.1f} GiB but only "
                f"{free / 2**30:.1f} GiB of memory is free; run fewer prompts at once (max_batch, --max-batch) "
                f"or shorter ones (max_seq, max_new_tokens)"
            )

    def _reserve_sampler(self, cap: int) -> None:
        """The sampling graph's inputs live on the device; host mirrors of full size for update_inplace."""
        V = self.vocab_size
        self._dev_logits = ort.OrtValue.ortvalue_from_shape_and_type((cap, 1, V), np.float32, self.device, 0)
        self._dev_params = ort.OrtValue.ortvalue_from_shape_and_type((cap, 4), np.float32, self.device, 0)
        self._dev_uniform = ort.OrtValue.ortvalue_from_shape_and_type((cap,), np.float64, self.device, 0)
        self._host_params, self._host_uniform = np.zeros((cap, 4), np.float32), np.zeros(cap, np.float64)

    @property
    def picks_on_device(self) -> bool:
        """Whether steps return (batch,) ids rather than (batch, vocab) logits."""
        return self.pick != "host"

    @property
    def kv_pointers(self) -> list[list[int]]:
        """Device addresses of the cache buffers (tests check that steps write into these)."""
        return [list(p) for p in self._kv_ptrs]

    def start(self, batch: int, seq: int, params: np.ndarray | None = None) -> None:
        """Begin a new batch with an empty cache that must hold `seq` positions.

        params: (batch, 4) sampling settings per row (device_sampling.row_params) when the
        tokens may be picked on the device; None when the host samples. `picks_on_device` then
        says whether steps return (batch,) ids (greedy rows through the graph's own argmax, or
        any row through the sampling graph) or (batch, vocab) logits for the host to sample."""
        self.reserve(batch, seq)
        self.batch = batch
        self.pick = self._choose_pick(params)
        self._io.clear_binding_outputs()  # what comes back is chosen per batch
        self._bound = {k: v for k, v in self._bound.items() if k not in ("logits", "next_token")}
        if self.pick == "argmax":
            self._out = self._host_next[:batch].reshape(batch, 1)
            self._bind_host("next_token", np.int64, self._out.shape, self._host_next, output=True)
        elif self.pick == "sampler":  # logits stay on the device, where the sampling graph reads them
            self._io.bind_output(
                "logits", self.device, 0, np.float32, (batch, 1, self.vocab_size), self._dev_logits.data_ptr()
            )
            self._host_params[:batch] = params
            self._dev_params.update_inplace(self._host_params)
            bind = self._sampler_io.bind_input
            bind("logits", self.device, 0, np.float32, (batch, self.vocab_size), self._dev_logits.data_ptr())
            bind("params", self.device, 0, np.float32, (batch, 4), self._dev_params.data_ptr())
            bind("uniform", self.device, 0, np.float64, (batch,), self._dev_uniform.data_ptr())
            self._sampler_io.bind_output("token", "cpu", 0, np.int64, (batch,), self._host_next.ctypes.data)
        else:
            self._out = self._host_logits[: batch * self.vocab_size].reshape(batch, 1, self.vocab_size)
            self._bind_host("logits", np.float32, self._out.shape, self._host_logits, output=True)

    def _choose_pick(self, params: np.ndarray | None) -> str:
        """Who picks the tokens: "argmax" (the graph's own, for all-greedy rows), "sampler" (the
        sampling graph) or "host" (numpy, from the logits)."""
        if params is None:
            return "host"
        if not params[:, 0].any() and self.has_argmax:  # temperature 0 on every row
            return "argmax"
        return "sampler" if self._sampler else "host"

    def _feed(self, **arrays: np.ndarray) -> None:
        """Copy step inputs into their host buffers and bind them (only when the shape changed)."""
        for name, arr in arrays.items():
            buf = self._host[name]
            np.copyto(buf[: arr.size].reshape(arr.shape), arr)
            self._bind_host(name, buf.dtype.type, arr.shape, buf)

    def _bind_host(self, name: str, dtype, shape: tuple, buf: np.ndarray, output: bool = False) -> None:
        if self._bound.get(name) == (id(buf), shape):
            return
        bind = self._io.bind_output if output else self._io.bind_input
        bind(name, "cpu", 0, dtype, shape, buf.ctypes.data)
        self._bound[name] = (id(buf), shape)

    def _bind_cache(self, name: str, ptr: int, seq: int, output: bool) -> None:
        shape = (self.batch, self.n_head, seq, self.head_dim)
        (self._io.bind_output if output else self._io.bind_input)(
            name, self.device, 0, self.kv_dtype, shape, ptr
        )

    def _run(self, uniform: np.ndarray | None) -> np.ndarray:
        """Run the bound graph; (batch, vocab) logits of one position per row, or (batch,) ids
        when picks_on_device, in a host buffer (bound in start) that the next step overwrites.
        uniform: (batch,) draws in [0, 1) for the sampling graph (None for greedy rows)."""
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self._io)
        if self.pick == "sampler":
            self._host_uniform[: self.batch] = 0.0 if uniform is None else uniform
            self._dev_uniform.update_inplace(self._host_uniform)
            self._sampler.run_with_iobinding(self._sampler_io)
            self.run_s += time.perf_counter() - t0
            return self._host_next[: self.batch]
        self.run_s += time.perf_counter() - t0
        return self._out[:, 0]


class ConcatCacheSession(ModelSession):
    """The standard graph: present = past + new, ping-pong between two preallocated sets."""

    kv_sets = 2
    host_inputs = host_dtypes("concat")

    def prefill(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, uniform: np.ndarray | None = None
    ) -> np.ndarray:
        """Left-padded prompts (batch, width) with their mask and positions -> last-position logits (or ids, see start)."""
        B, width = ids.shape
        assert B == self.batch, f"prefill of {B} rows after start({self.batch})"
        self._mask = np.ones((B, self._cap_seq), dtype=np.int64)  # decode steps add real tokens
        self._mask[:, :width] = mask
        self._next_position = positions[:, -1:] + 1
        self.past_len, self._cur = 0, 0
        return self._step(ids, positions, uniform)

    def decode(self, tokens: np.ndarray, uniform: np.ndarray | None = None) -> np.ndarray:
        """One new token per row (batch,) -> its logits (or the next ids, see start)."""
        out = self._step(tokens[:, None], self._next_position, uniform)
        self._next_position += 1
        return out

    def _step(self, ids: np.ndarray, positions: np.ndarray, uniform) -> np.ndarray:
        total = self.past_len + ids.shape[1]
        assert total <= self._cap_seq, f"cache holds {self._cap_seq} positions, step needs {total}"
        self._feed(
            input_ids=ids, position_ids=positions, attention_mask=self._mask[:, :total], logits_to_keep=ONE
        )
        # pasts from one set, presents into the other; both shapes change every step
        for name, ptr in zip(self._past, self._kv_ptrs[self._cur]):
            self._bind_cache(name, ptr, self.past_len, output=False)
        for name, ptr in zip(self._present, self._kv_ptrs[1 - self._cur]):
            self._bind_cache(name, ptr, total, output=True)
        out = self._run(uniform)
        self._cur, self.past_len = 1 - self._cur, total
        return out

    def full_logits(self, ids: np.ndarray, first_position: int = 0) -> np.ndarray:
        """Logits at every position of ids (batch, seq), no cache kept: for scoring.
        first_position: the position of ids[:, 0] (the load check probes the last one)."""
        B, T = ids.shape
        feeds = {
            "input_ids": ids,
            "position_ids": positions_from(first_position, B, T),
            "attention_mask": np.ones((B, T), dtype=np.int64),
            "logits_to_keep": np.array(T, dtype=np.int64),
            **{
                name: np.zeros((B, self.n_head, 0, self.head_dim), dtype=self.kv_dtype) for name in self._past
            },
        }
        return self.session.run(["logits"], feeds)[0]


class SharedCacheSession(ModelSession):
    """The fast graph: one buffer per layer, bound as past and present, updated in place.
    Rows are left-aligned in the cache, each with its own length: no padding inside it."""

    host_inputs = host_dtypes("shared")

    def prefill(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, uniform: np.ndarray | None = None
    ) -> np.ndarray:
        """Left-padded prompts -> each row's last-token logits (or ids, see start). Rows are moved to the left of a
        right-padded batch; padding K/V past a row's length is overwritten by its next token."""
        B, width = ids.shape
        assert B == self.batch, f"prefill of {B} rows after start({self.batch})"
        lengths = mask.sum(axis=1)
        right, right_pos = np.zeros_like(ids), np.zeros_like(positions)
        for r, n in enumerate(lengths):
            right[r, :n], right_pos[r, :n] = ids[r, width - n :], positions[r, width - n :]
        for name, ptr in zip(self._past, self._kv_ptrs[0]):  # bound once for the whole batch
            self._bind_cache(name, ptr, self._cap_seq, output=False)
        for name, ptr in zip(self._present, self._kv_ptrs[0]):
            self._bind_cache(name, ptr, self._cap_seq, output=True)
        # Per-row state for the decode steps, updated in place.
        self._seqlens = (lengths - 1).astype(np.int32)  # tokens in each row's cache, minus 1
        self._position = lengths.astype(np.int64)[:, None]  # the next token's position (and slot)
        self._decode_index = np.zeros((B, 1), dtype=np.int64)  # a decode step's only position
        self._total = np.array(width, dtype=np.int32)
        return self._step(right, right_pos, (lengths - 1)[:, None], uniform)

    def decode(self, tokens: np.ndarray, uniform: np.ndarray | None = None) -> np.ndarray:
        self._seqlens += 1
        self._total += 1  # every row grows by one
        out = self._step(tokens[:, None], self._position, self._decode_index, uniform)
        self._position += 1
        return out

    def _step(self, ids, positions, logits_index, uniform) -> np.ndarray:
        assert self._total <= self._cap_seq, (
            f"cache holds {self._cap_seq} positions, step needs {self._total}"
        )
        self._feed(
            input_ids=ids,
            position_ids=positions,
            seqlens_k=self._seqlens,
            total_sequence_length=self._total,
            logits_index=logits_index,
        )
        return self._run(uniform)

    def full_logits(self, ids: np.ndarray, first_position: int = 0) -> np.ndarray:
        """Logits at every position of ids (batch, seq): a one-off prompt pass with its own cache."""
        return self.session.run(["logits"], self._full_feeds(ids, first_position))[0]

    def _full_feeds(self, ids: np.ndarray, first_position: int = 0) -> dict[str, np.ndarray]:
        B, T = ids.shape
        return {
            "input_ids": ids,
            "position_ids": positions_from(first_position, B, T),
            "seqlens_k": np.full(B, T - 1, dtype=np.int32),
            "total_sequence_length": np.array(T, dtype=np.int32),
            "logits_index": np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy(),
            **{
                name: np.zeros((B, self.n_head, T, self.head_dim), dtype=self.kv_dtype) for name in self._past
            },
        }
