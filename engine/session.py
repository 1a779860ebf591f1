"""One owner for the ONNX Runtime session, its IO binding and every buffer it uses.

The KV cache lives on the session's device in two preallocated sets of buffers per layer
("ping" and "pong"). A step binds the pasts to one set and the presents to the other by
pointer, so the graph writes the new cache straight into our memory and the next step just
swaps the sets: no cache byte crosses to the host and nothing is allocated per step. Buffers
are sized for (batch, seq) on first use and only ever grow, up to max_batch x max_seq.

Inputs (ids, positions, mask) are written into preallocated host buffers and bound by
pointer; only the last position's logits come back, into a preallocated host buffer.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import Manifest, ModelFolderError, UserError, input_names, output_names, past_names, present_names

log = logging.getLogger(__name__)

KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32}
SEQ_GRANULE = 256  # the cache grows in steps of this many positions, so short calls do not each reallocate


class ProviderError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class SessionConfig:
    provider: str = "auto"  # "auto" | "cuda" | "cpu"
    max_batch: int = 8
    max_seq: int | None = None  # None: the model's n_positions
    threads: int | None = None  # CPU intra-op threads; None lets onnxruntime choose

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "cuda", "cpu"):
            raise ValueError(f"provider must be auto, cuda or cpu, got {self.provider!r}")
        if self.max_batch < 1 or (self.max_seq is not None and self.max_seq < 1):
            raise ValueError("max_batch and max_seq must be >= 1")


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


def create_session(model_path: Path, provider: str, threads: int | None) -> tuple[ort.InferenceSession, str]:
    """The one place that picks a provider and checks what onnxruntime actually gave us."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    want_cuda = provider == "cuda" or (provider == "auto" and cuda_device_count() > 0)
    if provider == "cuda" and cuda_device_count() == 0:
        raise ProviderError("--provider cuda was requested but no NVIDIA GPU is visible to the driver; use --provider cpu (or auto)")
    providers = ["CPUExecutionProvider"]
    if want_cuda:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # cuBLAS / cuDNN from the torch or nvidia-* wheels, when present
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
        raise ModelFolderError(f"{model_path} could not be loaded by onnxruntime ({str(e).splitlines()[0][:200]}); re-export the model folder") from e
    got = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    if want_cuda and got != "cuda":
        if provider == "cuda":
            raise ProviderError("the CUDA execution provider failed to start (missing CUDA 13 / cuDNN 9 libraries?); use --provider cpu")
        log.warning("a GPU is present but the CUDA execution provider failed to start; running on the CPU")
    log.info("running on %s (%s)", got.upper(), session.get_providers()[0])
    return session, got


class ModelSession:
    """prefill/decode steps over the graph with IO binding and a device-resident KV cache."""

    def __init__(self, folder: Path, manifest: Manifest, config: SessionConfig):
        c = manifest.config
        self.manifest, self.n_layer, self.vocab_size = manifest, c.n_layer, c.vocab_size
        self.max_batch = config.max_batch
        self.max_seq = min(config.max_seq or c.n_positions, c.n_positions)
        self.session, self.device = create_session(folder / manifest.model_file, config.provider, config.threads)
        self._check_graph()
        self.kv_dtype = KV_DTYPES[manifest.dtype]
        self._kv_shape_tail = (c.n_head, c.head_dim)
        self._past, self._present = past_names(c.n_layer), present_names(c.n_layer)
        self._io = self.session.io_binding()
        self._keep = np.ones((), dtype=np.int64)  # logits_to_keep = 1: decode needs the last position only
        self._cap_batch = self._cap_seq = 0
        self._kv: list[list[ort.OrtValue]] = [[], []]  # [ping, pong] x (key_0, value_0, key_1, ...)
        self._kv_ptrs: list[list[int]] = [[], []]  # their device addresses
        self._bound: dict[str, tuple[int, tuple]] = {}  # host buffers bound now: name -> (id, shape)
        self._cur = 0  # which set holds the current past
        self.past_len = 0
        self.batch = 0
        self.run_s = 0.0  # total time inside onnxruntime, for the Python-overhead figure

    def _check_graph(self) -> None:
        ins = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if ins != input_names(self.n_layer) or outs != output_names(self.n_layer):
            raise ModelFolderError("model.onnx does not have the inputs/outputs its manifest describes; re-export the model folder")

    # -- buffers ---------------------------------------------------------------------------
    def reserve(self, batch: int, seq: int) -> None:
        """Make room for `batch` rows of `seq` cache positions. Does nothing when already big enough."""
        if batch > self.max_batch or seq > self.max_seq:
            raise ValueError(f"batch {batch} x sequence {seq} exceeds the engine's max_batch {self.max_batch} x max_seq {self.max_seq}")
        if batch <= self._cap_batch and seq <= self._cap_seq:
            return
        self._cap_batch = max(batch, self._cap_batch)
        self._cap_seq = min(self.max_seq, max(self._cap_seq, -(-seq // SEQ_GRANULE) * SEQ_GRANULE))
        shape = (self._cap_batch, *self._kv_shape_tail[:1], self._cap_seq, self._kv_shape_tail[1])
        log.debug("allocating KV cache for batch %d x seq %d on %s", self._cap_batch, self._cap_seq, self.device)
        self._kv = [[ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0) for _ in self._past] for _ in range(2)]
        n = self._cap_batch * self._cap_seq
        self._host_ids = np.zeros(n, dtype=np.int64)
        self._host_pos = np.zeros(n, dtype=np.int64)
        self._host_mask = np.zeros(n, dtype=np.int64)
        self._host_logits = np.zeros(self._cap_batch * self.vocab_size, dtype=np.float32)
        self._kv_ptrs = [[v.data_ptr() for v in kv_set] for kv_set in self._kv]
        self._bound = {}  # new buffers: every host binding is stale

    def _bind_host(self, name: str, dtype, shape: tuple, buf: np.ndarray, output: bool = False) -> None:
        """Bind the start of a host buffer; skipped when it is already bound with this shape, so
        decode steps leave ids, positions, logits_to_keep and logits bound as they are."""
        if self._bound.get(name) == (id(buf), shape):
            return
        bind = self._io.bind_output if output else self._io.bind_input
        bind(name, "cpu", 0, dtype, shape, buf.ctypes.data)
        self._bound[name] = (id(buf), shape)

    @property
    def kv_pointers(self) -> list[list[int]]:
        """Device addresses of both cache sets (tests check that steps write into these)."""
        return [list(p) for p in self._kv_ptrs]

    # -- steps -----------------------------------------------------------------------------
    def start(self, batch: int, seq: int) -> None:
        """Begin a new batch with an empty cache that must hold `seq` positions."""
        self.reserve(batch, seq)
        self.batch, self.past_len, self._cur = batch, 0, 0

    def step(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run ids (batch, seq) with mask (batch, past_len + seq); returns (batch, vocab) logits of
        the last position, a view into a host buffer that the next step overwrites."""
        B, T = ids.shape
        total = self.past_len + T
        assert B == self.batch and mask.shape == (B, total), f"step shapes {ids.shape}, {mask.shape} vs batch {self.batch}, past {self.past_len}"
        assert total <= self._cap_seq, f"cache holds {self._cap_seq} positions, step needs {total}"
        io = self._io
        for name, buf, arr in (("input_ids", self._host_ids, ids), ("position_ids", self._host_pos, positions), ("attention_mask", self._host_mask, mask)):
            np.copyto(buf[: arr.size].reshape(arr.shape), arr)
            self._bind_host(name, np.int64, arr.shape, buf)
        self._bind_host("logits_to_keep", np.int64, (), self._keep)
        logits = self._host_logits[: B * self.vocab_size].reshape(B, 1, self.vocab_size)
        self._bind_host("logits", np.float32, logits.shape, self._host_logits, output=True)
        # The cache: pasts from one set, presents into the other; both shapes change every step.
        src, dst = self._kv_ptrs[self._cur], self._kv_ptrs[1 - self._cur]
        past_shape = (B, self._kv_shape_tail[0], self.past_len, self._kv_shape_tail[1])
        present_shape = (B, self._kv_shape_tail[0], total, self._kv_shape_tail[1])
        for name, ptr in zip(self._past, src):
            io.bind_input(name, self.device, 0, self.kv_dtype, past_shape, ptr)
        for name, ptr in zip(self._present, dst):
            io.bind_output(name, self.device, 0, self.kv_dtype, present_shape, ptr)
        t0 = time.perf_counter()
        self.session.run_with_iobinding(io)
        self.run_s += time.perf_counter() - t0
        self._cur, self.past_len = 1 - self._cur, total
        return logits[:, 0, :]

    def full_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits at every position of ids (batch, seq), no cache kept: for scoring."""
        B, T = ids.shape
        empty = np.zeros((B, self._kv_shape_tail[0], 0, self._kv_shape_tail[1]), dtype=self.kv_dtype)
        feeds = {
            "input_ids": ids,
            "position_ids": np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy(),
            "attention_mask": np.ones((B, T), dtype=np.int64),
            "logits_to_keep": np.array(T, dtype=np.int64),
            **{name: empty for name in self._past},
        }
        return self.session.run(["logits"], feeds)[0]
