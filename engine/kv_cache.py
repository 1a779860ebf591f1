"""The KV cache: where each row's keys and values live between steps, and how a step binds them.

The cache lives on the session's device, preallocated and bound by pointer, so the graph writes
the new keys and values straight into our memory: no cache byte crosses to the host and nothing
is allocated per step. Buffers are sized for (batch, seq) on first use and only ever grow, up to
max_batch x max_seq. The manifest's `kv_cache` picks the layout:

- `ConcatCache` (the "concat" graph: present = past + new): two sets of buffers per layer. A step
  binds the pasts to one set and the presents to the other; the next step swaps them. Shapes grow
  by one position per step, so the cache is rebound every step. Prompts are left-padded.
- `SharedCache` (the "shared" graph): one buffer per layer, bound as past and present at once;
  GroupQueryAttention writes each new token's K/V in place. Rows are left-aligned, each with its
  own length, so there is no padding inside the cache. Each row is a slot: a prompt can be
  prefilled into one slot (its own view of the buffer) while the other rows keep their state,
  and a freed slot is reused. Nothing is rebound during decode.
- `cuda_graphs.CudaGraphCache`: the shared cache with decode steps of fixed shapes and addresses.

Each cache binds a step's inputs and its own buffers (`bind_prefill`, `bind_decode`) and holds
where the step's outputs land (`outputs`); the session runs the step and its picker reads them.
What every cache offers is written down once, in `KVCache`.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .binding import Binding, HostOutputs
from .contract import ONNX_ELEM_TYPE, STEP_INPUTS, InputError, Manifest, past_names, present_names

log = logging.getLogger(__name__)

KV_DTYPES = {dtype: np.dtype(elem).type for dtype, elem in ONNX_ELEM_TYPE.items()}  # numpy type of the cache
ONE = np.ones((), dtype=np.int64)  # logits_to_keep for generation: the last position only
SEQ_GRANULE = 256  # the cache grows in steps of this many positions, so short calls do not each reallocate


def host_dtypes(kv_cache: str) -> dict[str, type]:
    """numpy type of each step input of a cache layout, from the contract's table."""
    return {name: np.dtype(t).type for name, (t, _) in STEP_INPUTS[kv_cache].items()}


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, positions), each (batch, longest); padding is on the left, positions count real tokens."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


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


class KVBuffers:
    """`sets` buffers of (cap_batch, n_head, cap_seq, head_dim) per layer input, key then value."""

    def __init__(self, manifest: Manifest, device: str, sets: int, max_batch: int, max_seq: int):
        c = manifest.config
        self.n_head, self.head_dim, self.dtype = c.n_head, c.head_dim, KV_DTYPES[manifest.dtype]
        self.past, self.present = past_names(c.n_layer), present_names(c.n_layer)
        self.device, self.sets, self.max_batch, self.max_seq = device, sets, max_batch, max_seq
        self.cap_batch = self.cap_seq = self.row_bytes = 0
        self.values: list[list[ort.OrtValue]] = []  # [set][key_0, value_0, key_1, ...]
        self.ptrs: list[list[int]] = []  # their device addresses
        self._views: tuple[list[int], list[np.ndarray]] = ([], [])  # host_views, for these ptrs

    def reserve(self, batch: int, seq: int) -> None:
        """Room for `batch` rows of `seq` positions; does nothing when already big enough."""
        if batch > self.max_batch or seq > self.max_seq:
            raise ValueError(f"batch {batch} x sequence {seq} exceeds the engine's max_batch "
                             f"{self.max_batch} x max_seq {self.max_seq}")  # fmt: skip
        if batch <= self.cap_batch and seq <= self.cap_seq:
            return
        cap_batch = max(batch, self.cap_batch)
        cap_seq = min(self.max_seq, max(self.cap_seq, -(-seq // SEQ_GRANULE) * SEQ_GRANULE))
        shape = (cap_batch, self.n_head, cap_seq, self.head_dim)
        self._check_room(
            self.sets * len(self.past) * int(np.prod(shape)) * np.dtype(self.dtype).itemsize, shape
        )
        log.debug("allocating KV cache for batch %d x seq %d on %s", cap_batch, cap_seq, self.device)
        self.values = [
            [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0) for _ in self.past]
            for _ in range(self.sets)
        ]
        self.ptrs = [[v.data_ptr() for v in kv_set] for kv_set in self.values]
        self.cap_batch, self.cap_seq = cap_batch, cap_seq
        self.row_bytes = self.n_head * cap_seq * self.head_dim * np.dtype(self.dtype).itemsize

    def bind(self, binding: Binding, kv_set: int, output: bool, rows: int, seq: int, first: int = 0) -> None:
        """Bind one set as the pasts (or the presents) of `rows` rows of `seq` positions; `first`
        is the first row (a slot) of a view that spans the whole sequence axis."""
        assert first == 0 or seq == self.cap_seq, "a view of a slot spans the whole sequence axis"
        ptrs = self.ptrs[kv_set]
        if first:  # the row's view: its own addresses
            ptrs = [ptr + first * self.row_bytes for ptr in ptrs]
        group = "presents" if output else "pasts"
        shape = (rows, self.n_head, seq, self.head_dim)
        binding.group(
            group, output, self.present if output else self.past, self.device, self.dtype, shape, ptrs
        )

    def host_views(self) -> list[np.ndarray]:
        """Numpy views of set 0's buffers (host memory only): key_0, value_0, key_1, ..."""
        if self.device != "cpu":
            raise InputError("copying cache rows needs the cache in host memory (the CPU provider)")
        if self._views[0] != self.ptrs[0]:
            shape = (self.cap_batch, self.n_head, self.cap_seq, self.head_dim)
            count = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
            views = [np.frombuffer((ctypes.c_byte * count).from_address(ptr), self.dtype).reshape(shape)
                     for ptr in self.ptrs[0]]  # fmt: skip
            self._views = (list(self.ptrs[0]), views)
        return self._views[1]

    def copy_rows(self, src: list[int], dst: list[int], length: int) -> None:
        """Rows dst[i] take the first `length` positions of rows src[i], every layer: each row is
        written after every copy that reads it (a cycle of rows goes through one saved row), so
        each moved row costs one pass over its values."""
        plan = copy_order(src, dst)
        for view in self.host_views():
            saved = None
            for s, d in plan:
                if s == SAVE:
                    saved = view[d, :, :length].copy()
                else:
                    view[d, :, :length] = saved if s == SAVED else view[s, :, :length]

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


SAVE, SAVED = -1, -2  # copy_order's steps: save a row aside; read the saved row


def copy_order(src: list[int], dst: list[int]) -> list[tuple[int, int]]:
    """(source, destination) row copies in an order that reads every row before it is written;
    a cycle (rows swapping places) first saves one row aside: (SAVE, row), then (SAVED, dst)."""
    pending = {d: s for s, d in zip(src, dst) if s != d}
    plan = []
    while pending:
        read = set(pending.values())
        ready = next((d for d in pending if d not in read), None)
        if ready is None:  # every pending destination is still to be read: a cycle
            ready = next(iter(pending))
            plan.append((SAVE, ready))
            pending = {d: SAVED if s == ready else s for d, s in pending.items()}
        plan.append((pending.pop(ready), ready))
    return plan


class HostInputs:
    """A layout's step inputs in host buffers, bound by pointer."""

    def __init__(self, kv_cache: str):
        self.dtypes, self.size = host_dtypes(kv_cache), 0
        self.bufs: dict[str, np.ndarray] = {}
        self.ptrs: dict[str, int] = {}  # their addresses (numpy's .ctypes is slow to ask every step)

    def reserve(self, size: int) -> None:
        if size > self.size:
            self.size, self.bufs = size, {name: np.zeros(size, dtype) for name, dtype in self.dtypes.items()}
            self.ptrs = {name: buf.ctypes.data for name, buf in self.bufs.items()}

    def feed(self, binding: Binding, **arrays: np.ndarray) -> None:
        for name, arr in arrays.items():
            buf = self.bufs[name]
            np.copyto(buf[: arr.size].reshape(arr.shape), arr)
            binding.host_values(name, buf.dtype.type, arr.shape, self.ptrs[name])


class KVCache(Protocol):
    """What the session asks of a cache (ConcatCache, SharedCache, cuda_graphs.CudaGraphCache)."""

    kv_cache: str  # the manifest's layout: "concat" or "shared"
    has_slots: bool  # rows are filled and freed one at a time (prefill_slot, free); else static batches
    kv: KVBuffers
    outputs: HostOutputs  # where a step's outputs land, for the picker

    @property
    def rows(self) -> int:
        """Rows the last decode step bound."""

    def start(self, batch: int, seq: int) -> None:
        """Begin a batch of `batch` rows that need up to `seq` positions each."""

    def bind_prefill(self, binding: Binding, prompts: list[list[int]], first: int = 0) -> None:
        """Bind whole prompts into rows first, first + 1, ..."""

    def bind_prefill_slot(self, binding: Binding, slot: int, tokens: list[int], past: int = 0,
                          decoding: bool = True) -> None:  # fmt: skip
        """Bind prompt tokens into one row after the `past` ones it holds (slots only)."""

    def bind_decode(self, binding: Binding, tokens: np.ndarray) -> int | None:
        """Bind one new token for each of the first len(tokens) rows; returns the batch bucket
        whose CUDA graph runs the step (None: no graph)."""

    def free(self, slot: int) -> None:
        """A row's request ended."""

    def full_feeds(
        self, ids: np.ndarray, first_position: int = 0, keep: int | None = None
    ) -> dict[str, np.ndarray]:
        """Inputs of one pass over ids (batch, seq) with a cache of its own, logits at the last
        `keep` positions (None: every position)."""


class ConcatCache:
    """The concat graph's cache: present = past + new, alternating between two sets of buffers."""

    kv_cache = "concat"
    has_slots = False

    def __init__(self, manifest: Manifest, device: str, max_batch: int, max_seq: int, sampling: bool):
        self.kv = KVBuffers(manifest, device, 2, max_batch, max_seq)
        self.inputs = HostInputs("concat")
        self.outputs = HostOutputs(manifest.config.vocab_size, device, sampling)
        self.batch = self.past_len = 0  # rows; positions in the cache so far
        self.cur = 0  # the set that holds the pasts
        self.mask = np.ones((0, 0), dtype=np.int64)  # (batch, cap_seq): 0 for left padding
        self.next_position = np.zeros((0, 1), dtype=np.int64)  # (batch, 1): the next token's, per row

    def start(self, batch: int, seq: int) -> None:
        """Begin a batch whose rows need `seq` positions each."""
        self.kv.reserve(batch, seq)
        self.inputs.reserve(self.kv.cap_batch * self.kv.cap_seq)
        self.outputs.reserve(self.kv.cap_batch)
        self.batch = batch

    @property
    def rows(self) -> int:
        """Rows a decode step binds."""
        return self.batch

    def bind_prefill(self, binding: Binding, prompts: list[list[int]], first: int = 0) -> None:
        """Bind a left-padded batch of prompts: the whole batch (no slots, first is 0)."""
        ids, mask, positions = left_pad(prompts)
        assert first == 0 and len(prompts) == self.batch, (
            f"prefill of {len(prompts)} rows after start({self.batch})"
        )
        self.mask = np.ones((self.batch, self.kv.cap_seq), dtype=np.int64)  # decode steps add real tokens
        self.mask[:, : ids.shape[1]] = mask
        self.next_position = positions[:, -1:] + 1  # (B, 1)
        self.past_len, self.cur = 0, 0
        self._bind(binding, ids, positions)

    def bind_decode(self, binding: Binding, tokens: np.ndarray) -> None:
        """Bind one new token per row, the whole batch: rows past len(tokens) (ended) decode a
        dummy token. Returns the batch bucket: None, no CUDA graph."""
        assert len(tokens) <= self.batch, f"a decode step of {len(tokens)} rows after start({self.batch})"
        if len(tokens) == self.batch:  # every row still running: no copy
            ids = tokens[:, None]
        else:
            ids = np.zeros((self.batch, 1), np.int64)
            ids[: len(tokens), 0] = tokens
        self._bind(binding, ids, self.next_position)
        self.next_position += 1

    def _bind(self, binding: Binding, ids: np.ndarray, positions: np.ndarray) -> None:
        total = self.past_len + ids.shape[1]
        assert total <= self.kv.cap_seq, f"cache holds {self.kv.cap_seq} positions, step needs {total}"
        mask = self.mask[:, :total]
        self.inputs.feed(
            binding, input_ids=ids, position_ids=positions, attention_mask=mask, logits_to_keep=ONE
        )
        self.kv.bind(binding, self.cur, False, self.batch, self.past_len)  # pasts from one set,
        self.kv.bind(binding, 1 - self.cur, True, self.batch, total)  # presents into the other
        self.cur, self.past_len = 1 - self.cur, total

    def bind_prefill_slot(self, binding: Binding, slot: int, tokens: list[int], past: int = 0,
                          decoding: bool = True) -> None:  # fmt: skip
        raise ValueError("slots need the shared cache: export the model with --kv-cache shared")

    def free(self, slot: int) -> None:
        """Nothing: a static batch keeps its rows until it ends (an ended row decodes a dummy token)."""

    def full_feeds(
        self, ids: np.ndarray, first_position: int = 0, keep: int | None = None
    ) -> dict[str, np.ndarray]:
        """Inputs of one pass over ids (batch, seq) with an empty past, logits at the last `keep`
        positions (None: every position)."""
        B, T = ids.shape
        empty = (B, self.kv.n_head, 0, self.kv.head_dim)
        return {
            "input_ids": ids,
            "position_ids": positions_from(first_position, B, T),
            "attention_mask": np.ones((B, T), dtype=np.int64),
            "logits_to_keep": np.array(T if keep is None else keep, dtype=np.int64),
            **{name: np.zeros(empty, dtype=self.kv.dtype) for name in self.kv.past},
        }


class RowLengths:
    """The shared cache's per-row state, in one place: how many tokens each row (slot) holds and
    whether it takes part in decode steps. A row that does not (free, or its prompt still going
    in by chunks) writes a dummy token at its next position in a decode step and stays as it
    was: that position is overwritten by its next real token."""

    def __init__(self, batch: int):
        self.lengths = np.zeros(batch, dtype=np.int64)  # also each row's next position
        self.used = np.zeros(batch, dtype=np.int64)  # 1 for a row in decode steps, else 0
        self.seqlens = np.zeros(batch, dtype=np.int32)  # GroupQueryAttention's seqlens_k after a step

    def fill(self, rows: slice | int, lengths, decoding: bool = True) -> None:
        self.lengths[rows], self.used[rows] = lengths, int(decoding)

    def free(self, slot: int) -> None:
        self.lengths[slot], self.used[slot] = 0, 0

    def step(self, rows: int) -> tuple[np.ndarray, int]:
        """A decode step of the first `rows` rows: each used row grows by one. Returns (seqlens_k
        (rows,), the longest row after it); read `lengths` first for the step's positions."""
        lengths, seqlens, used = self.lengths[:rows], self.seqlens[:rows], self.used[:rows]
        lengths += used
        np.subtract(lengths, used, out=seqlens, casting="unsafe")  # a dummy token: its row's length
        return seqlens, int(seqlens.max()) + 1


class SharedCache:
    """The shared graph's cache: one buffer per layer, updated in place, one slot per row."""

    kv_cache = "shared"
    has_slots = True

    def __init__(self, manifest: Manifest, device: str, max_batch: int, max_seq: int, sampling: bool):
        self.kv = KVBuffers(manifest, device, 1, max_batch, max_seq)
        self.inputs = HostInputs("shared")
        self.outputs = HostOutputs(manifest.config.vocab_size, device, sampling)
        self.row_lengths, self.batch, self.rows = RowLengths(0), 0, 0
        self.decode_index = np.zeros((0, 1), np.int64)

    def start(self, batch: int, seq: int) -> None:
        """Begin a batch of `batch` free slots whose rows need `seq` positions each."""
        self.kv.reserve(batch, seq)
        self.inputs.reserve(self.kv.cap_batch * self.kv.cap_seq)
        self.outputs.reserve(self.kv.cap_batch)
        self.row_lengths = RowLengths(self.kv.cap_batch)  # rows past the batch stay free
        self.batch, self.rows = batch, batch  # rows: of the last decode step
        self.decode_index = np.zeros((batch, 1), np.int64)  # a decode step's only position

    def bind_prefill(self, binding: Binding, prompts: list[list[int]], first: int = 0) -> None:
        """Bind new prompts into slots first, first + 1, ... (a view of the buffer from that row;
        the other rows keep their state), right-padded: the K/V a padding token writes past a
        row's length is overwritten by that row's next token."""
        B = len(prompts)
        assert first + B <= self.batch, f"prefill of rows {first}..{first + B - 1} after start({self.batch})"
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        ids, positions = np.zeros((B, width), np.int64), np.zeros((B, width), np.int64)
        for r, p in enumerate(prompts):
            ids[r, : len(p)], positions[r, : len(p)] = p, np.arange(len(p))
        self._bind(binding, ids, positions, lengths, width, first)
        self.row_lengths.fill(slice(first, first + B), lengths)

    def bind_prefill_slot(self, binding: Binding, slot: int, tokens: list[int], past: int = 0,
                          decoding: bool = True) -> None:  # fmt: skip
        """Bind prompt tokens into `slot` alone (a view of the buffer at that row), after the `past`
        tokens the slot already holds (0: a new prompt, the slot's old contents are overwritten;
        more: the next chunk of a long prompt). The other rows keep their state. decoding=False:
        more chunks follow, the row stays out of decode steps."""
        assert 0 <= slot < self.batch, f"slot {slot} of a batch of {self.batch}"
        n = past + len(tokens)
        assert n <= self.kv.cap_seq, f"cache holds {self.kv.cap_seq} positions, the prompt needs {n}"
        ids, positions = np.array([tokens], np.int64), np.arange(past, n, dtype=np.int64)[None]
        self._bind(binding, ids, positions, np.array([n]), n, slot, logits_at=np.array([[len(tokens) - 1]]))
        self.row_lengths.fill(slot, n, decoding)

    def bind_verify(self, binding: Binding, slot: int, tokens: list[int], last: int | None = None) -> None:
        """Bind tokens into `slot` after what it holds, with logits (and argmax) at each of them
        (or at the `last` ones): a speculative step's verification, or a draft's run. The row
        then holds them all; `set_length` takes back the ones not kept."""
        past = int(self.row_lengths.lengths[slot])
        n = past + len(tokens)
        assert n <= self.kv.cap_seq, f"cache holds {self.kv.cap_seq} positions, the step needs {n}"
        ids, positions = np.array([tokens], np.int64), np.arange(past, n, dtype=np.int64)[None]
        at = np.arange(len(tokens) - (last or len(tokens)), len(tokens), dtype=np.int64)[None]
        self._bind(binding, ids, positions, np.array([n]), n, slot, logits_at=at)
        self.row_lengths.fill(slot, n)

    def set_length(self, slot: int, length: int) -> None:
        """The tokens `slot` holds (a rollback: what lies past them is overwritten by the next)."""
        self.row_lengths.lengths[slot] = length

    def _bind(self, binding, ids, positions, lengths, total: int, first: int, logits_at=None) -> None:
        """A prompt pass over rows first.. of the cache, each holding `lengths` tokens after it;
        logits at each row's last token (`logits_at`: its index in this pass, when not lengths - 1)."""
        rows = len(ids)
        logits_at = (lengths - 1)[:, None] if logits_at is None else logits_at
        self.inputs.feed(binding, input_ids=ids, position_ids=positions, seqlens_k=(lengths - 1).astype(np.int32),
                         total_sequence_length=np.array(total, np.int32), logits_index=logits_at)  # fmt: skip
        self.kv.bind(binding, 0, False, rows, self.kv.cap_seq, first)
        self.kv.bind(binding, 0, True, rows, self.kv.cap_seq, first)

    def bind_decode(self, binding: Binding, tokens: np.ndarray) -> None:
        """Bind one new token per row (returns the batch bucket: None, no CUDA graph)."""
        B = self.rows = len(tokens)
        positions = self.row_lengths.lengths[:B, None]  # before the step
        self.inputs.feed(binding, input_ids=tokens[:, None], position_ids=positions)
        seqlens, total = self.row_lengths.step(B)
        assert total <= self.kv.cap_seq, f"cache holds {self.kv.cap_seq} positions, step needs {total}"
        self.inputs.feed(binding, seqlens_k=seqlens, total_sequence_length=np.array(total, np.int32),
                         logits_index=self.decode_index[:B])  # fmt: skip
        self.kv.bind(binding, 0, False, B, self.kv.cap_seq)
        self.kv.bind(binding, 0, True, B, self.kv.cap_seq)

    def free(self, slot: int) -> None:
        """Give up a slot: its row decodes a dummy token from now on, until a prompt fills it."""
        self.row_lengths.free(slot)

    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        """Rows dst[i] become copies of rows src[i] (keys, values, length, whether they decode):
        beam search's forks. Moves n_layer x 2 x n_head x length x head_dim values per row."""
        lengths = self.row_lengths
        self.kv.copy_rows(src, dst, int(lengths.lengths[src].max()))
        lengths.lengths[dst], lengths.used[dst] = lengths.lengths[src], lengths.used[src]

    def full_feeds(
        self, ids: np.ndarray, first_position: int = 0, keep: int | None = None
    ) -> dict[str, np.ndarray]:
        """Inputs of one pass over ids (batch, seq) with a cache of its own, logits at the last
        `keep` positions (None: every position)."""
        B, T = ids.shape
        keep = T if keep is None else keep
        cache = (B, self.kv.n_head, T, self.kv.head_dim)
        return {
            "input_ids": ids,
            "position_ids": positions_from(first_position, B, T),
            "seqlens_k": np.full(B, T - 1, dtype=np.int32),
            "total_sequence_length": np.array(T, dtype=np.int32),
            "logits_index": np.broadcast_to(np.arange(T - keep, T, dtype=np.int64), (B, keep)).copy(),
            **{name: np.zeros(cache, dtype=self.kv.dtype) for name in self.kv.past},
        }
