"""Continuous batching: requests join and leave a running batch between decode steps.

One thread owns the session while there is work. Between two decode steps it admits waiting
requests into free slots of the shared cache (`Session.prefill_slot`; a long prompt goes in
chunks of `chunk` tokens, one chunk between two steps, so the running rows are never stalled
for more than one chunk), runs one decode step over the slots in use (the batch is cut after
the last one in use), hands each request its token, and frees a slot as soon as its request
ends: EOS, a stop string, its length, or its caller cancelled it.

Each request has its own sampling settings and its own random generator (pickers.SlotSampling),
so its tokens do not depend on what else is in the batch: greedy, they are the tokens of the
request run alone; seeded, too. Fixed decode shapes stay: under CUDA graphs a step runs in the
bucket of its row count.

Submission is thread-safe and bounded: a full queue refuses at once (QueueFullError). A
`RequestHandle` is iterated for its pieces (from a thread, or `async for` in asyncio), awaited or
`result()`-ed for its Completion, and cancelled. The scheduler holds the Engine's lock while it
has work; between bursts the Engine's own methods run as before.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from .clock import Clock
from .contract import UserError
from .generate import Completion, Row
from .pickers import HostPicker, SlotSampling, choose_picker
from .sampling import SamplingConfig, softmax
from .session import Session
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK = 256  # prompt tokens prefilled between two decode steps
_ids = itertools.count(1)


class QueueFullError(UserError, RuntimeError):
    """The engine's queue of waiting requests is full: retry later, or raise max_queue."""


class EngineClosedError(UserError, RuntimeError):
    """The engine is shutting down (or shut down) and takes no new requests."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (the message says how); the requests after
    it are served again."""


@dataclass
class Piece:
    """What one new token adds to a request: its text (may be empty while a stop string or a
    character is incomplete), its id, and with logprobs its log-probability and the top ones."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    sampling: SamplingConfig
    eos_id: int  # -1: ignore EOS
    logprobs: int | None  # None: none; 0..5: the chosen token's, and that many top ones
    stream: bool = True  # text piece by piece; False: pieces carry ids only, the text is made at the end


class RequestHandle:
    """One submitted request, as its caller sees it. Thread-safe; `async for` and `await` work
    from any event loop."""

    def __init__(self, request: Request):
        self.request = request
        self.id = f"req-{next(_ids)}"
        self.prompt_token_ids = request.prompt_ids
        self.finish_reason: str | None = None
        self.token_times: list[float] = []  # perf_counter() of each new token
        self.submitted = time.perf_counter()
        self._pieces: list[Piece] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- the caller's side ---------------------------------------------------------------------
    def cancel(self) -> None:
        """End the request at the next step; its slot is freed, finish_reason "cancelled"."""
        self._cancelled = True

    @property
    def done(self) -> bool:
        return self._completion is not None

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to end. Raises TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._completion is not None, timeout):
                raise TimeoutError(f"{self.id} did not finish within {timeout} s")
            self._raise_error()
            return self._completion

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RequestFailedError(f"{self.id} failed: {self._error}") from self._error

    def __iter__(self) -> Iterator[Piece]:
        i = 0
        while True:
            with self._cond:
                while i == len(self._pieces) and self._completion is None:
                    self._cond.wait()
                new, finished = self._pieces[i:], self._completion is not None
            yield from new
            i += len(new)
            if finished and i == len(self._pieces):
                self._raise_error()
                return

    async def __aiter__(self) -> AsyncIterator[Piece]:
        i = 0
        while True:
            event = asyncio.Event()
            with self._cond:
                new, finished = self._pieces[i:], self._completion is not None
                if not new and not finished:
                    self._waiters.append((asyncio.get_running_loop(), event))
            for piece in new:
                yield piece
            i += len(new)
            if not new and not finished:
                await event.wait()
            elif finished and i == len(self._pieces):
                self._raise_error()
                return

    def __await__(self):
        async def wait() -> Completion:
            async for _ in self:
                pass
            return self._completion

        return wait().__await__()

    # -- the scheduler's side ------------------------------------------------------------------
    def _push(self, piece: Piece) -> None:
        with self._cond:
            self.token_times.append(time.perf_counter())
            self._pieces.append(piece)
            self._wake()

    def _finish(self, completion: Completion, error: BaseException | None = None) -> None:
        with self._cond:
            self._error = error
            self.finish_reason, self._completion = completion.finish_reason, completion
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, event in self._waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop has closed: nobody waits there any more
                pass
        self._waiters.clear()


@dataclass
class Slot:
    """A request in a slot of the running batch."""

    handle: RequestHandle
    row: Row
    prefilled: int = 0  # prompt tokens in the cache so far
    token: int = 0  # the token to feed at the next decode step

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.row.prompt_ids)


@dataclass
class Stats:
    requests: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # summed over steps: rows per step = decode_rows / decode_steps
    decode_step_s: float = 0.0  # a step: its tokens, the run, the hand-out
    decode_run_s: float = 0.0  # of which inside onnxruntime

    def overhead_ms(self) -> float:
        """Per decode step, the scheduler's and session's time outside onnxruntime."""
        steps = self.decode_steps
        return 1e3 * (self.decode_step_s - self.decode_run_s) / steps if steps else 0.0


class Scheduler:
    def __init__(self, session: Session, tokenizer: Tokenizer, lock: AbstractContextManager,
                 max_queue: int = 64, chunk: int = CHUNK):  # fmt: skip
        self.session, self.tokenizer, self.lock = session, tokenizer, lock
        self.max_queue, self.chunk = max_queue, chunk
        self.waiting: collections.deque[RequestHandle] = collections.deque()
        self.slots: list[Slot | None] = [None] * session.max_batch
        self.table = SlotSampling(session.max_batch, session.vocab_size)
        self.stats = Stats()
        self.on_step: Callable[[], None] | None = None  # called after each step (tests, metrics)
        self._cond = threading.Condition()
        self._closing = False
        self._picker_stale = True  # requests came or went since the picker was chosen
        self.holds_lock = False  # the Engine's lock, while a burst runs
        self._thread: threading.Thread | None = None

    # -- submission (any thread) ---------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        handle = RequestHandle(request)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue}); "
                    "retry later or load the engine with a larger max_queue"
                )
            self.waiting.append(handle)
            self.stats.requests += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="gpt2onnx-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return handle

    def queue_depth(self) -> int:
        return len(self.waiting)

    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def close(self, timeout: float) -> None:
        """Take no new requests; let the admitted and waiting ones finish within `timeout`
        seconds, then cancel what is left; return when the loop has stopped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                for handle in [*self.waiting, *(s.handle for s in self.slots if s)]:
                    handle.cancel()
                self._cond.notify_all()
            thread.join()

    # -- the loop (its own thread) -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.waiting or self._closing)
                if not self.waiting:
                    return  # closing, and nothing left to do
            with self.lock:  # the session is ours until the work runs out
                self.holds_lock = True
                try:
                    self._burst()
                except Exception as e:  # a bug or a failed run: its requests fail, not the caller's wait
                    log.exception("the scheduler failed; failing its running requests")
                    self._fail_running(e)
                finally:
                    self.holds_lock = False

    def _burst(self) -> None:
        """Steps until no request is waiting or running."""
        session = self.session
        self.table = SlotSampling(session.max_batch, session.vocab_size)
        clock = Clock()
        session.start(session.max_batch, session.max_seq, HostPicker(self.table), clock)
        self.slots = [None] * session.max_batch
        self._picker_stale = True
        while True:
            self._picker_stale |= self._admit()
            self._drop_cancelled()
            prefilling = next((s for s in self.slots if s and not s.decoding), None)
            if prefilling is not None:
                self._prefill_chunk(prefilling)
            rows = 1 + max((i for i, s in enumerate(self.slots) if s and s.decoding), default=-1)
            if rows:
                t0, run0 = time.perf_counter(), clock.run_s
                self._refresh_picker()
                tokens = np.array([s.token if s and s.decoding else 0 for s in self.slots[:rows]], np.int64)
                self._hand_out(session.decode(tokens), rows)
                stats = self.stats
                stats.decode_steps, stats.decode_rows = stats.decode_steps + 1, stats.decode_rows + rows
                stats.decode_step_s += time.perf_counter() - t0
                stats.decode_run_s += clock.run_s - run0
            if self.on_step is not None:
                self.on_step()
            with self._cond:
                if not self.waiting and not any(self.slots):
                    return

    def _refresh_picker(self) -> None:
        """After requests came or went: the picker that serves every request in a slot now."""
        if not self._picker_stale:
            return
        if any(s and s.handle.request.logprobs is not None for s in self.slots):
            picker = HostPicker(self.table)  # logprobs need the logits on the host
        else:
            picker = choose_picker(self.session, self.table, len(self.slots))  # free slots: greedy
        self.session.use(picker)
        self._picker_stale = False

    def _admit(self) -> bool:
        """Waiting requests into free slots, lowest first. Returns whether any came in."""
        admitted = False
        with self._cond:
            while self.waiting and None in self.slots:
                handle = self.waiting.popleft()
                if handle._cancelled:
                    self._end(handle, Row(handle.request.prompt_ids, None, ()), "cancelled")
                    continue
                r, request = self.slots.index(None), handle.request
                per_token = request.stream or bool(request.stop)  # stop strings need the text as it comes
                row = Row(
                    request.prompt_ids, self.tokenizer.decode_stream() if per_token else None, request.stop
                )
                self.slots[r] = Slot(handle, row)
                self.stats.prompt_tokens += len(request.prompt_ids)
                admitted = True
        return admitted

    def _prefill_chunk(self, slot: Slot) -> None:
        """The next chunk of a slot's prompt; after the last one, its first token."""
        r, prompt = self.slots.index(slot), slot.row.prompt_ids
        chunk = prompt[slot.prefilled : slot.prefilled + self.chunk]
        last = slot.prefilled + len(chunk) == len(prompt)
        if last:  # its settings from now on: until here its row drew nothing in decode steps
            request = slot.handle.request
            self.table.admit(r, prompt, request.sampling, np.random.default_rng(request.sampling.seed))
            self._picker_stale = True
            self._refresh_picker()
        token = self.session.prefill_slot(r, chunk, slot.prefilled, pick=last)
        slot.prefilled += len(chunk)
        if last:
            self._take(r, slot, token, 0)

    def _hand_out(self, picked: np.ndarray, rows: int) -> None:
        """Each decoding slot's new token."""
        for r in range(rows):
            slot = self.slots[r]
            if slot is not None and slot.decoding:
                self._take(r, slot, int(picked[r]), r)

    def _take(self, r: int, slot: Slot, token: int, logits_row: int) -> None:
        """A slot's new token: pushed to its row and handed to its caller; the slot is freed when
        the request ends."""
        request, row = slot.handle.request, slot.row
        logprob = top = None
        if request.logprobs is not None:
            logprob, top = token_logprobs(
                self.session.last_logits(logits_row + 1)[logits_row], token, request.logprobs
            )
        text = row.push(token, request.eos_id, request.max_new_tokens)
        self.stats.new_tokens += 1
        slot.token = token
        slot.handle._push(Piece(text, [token], None if logprob is None else [logprob],
                                None if top is None else [top]))  # fmt: skip
        if row.finish_reason is not None or slot.handle._cancelled:
            self._end(slot.handle, row, row.finish_reason or "cancelled")
            self._free(r)

    def _free(self, r: int) -> None:
        self.slots[r] = None
        self.table.free(r)
        self.session.free(r)
        self._picker_stale = True

    def _fail_running(self, error: Exception) -> None:
        for r, slot in enumerate(self.slots):
            if slot is not None:
                self._end(slot.handle, slot.row, "error", error)
                self.slots[r] = None

    def _drop_cancelled(self) -> None:
        for r, slot in enumerate(self.slots):
            if slot is not None and slot.handle._cancelled:
                self._end(slot.handle, slot.row, "cancelled")
                self._free(r)

    def _end(self, handle: RequestHandle, row: Row, reason: str, error: Exception | None = None) -> None:
        request = handle.request
        self.stats.finished[reason] += 1
        if row.decoder is None:  # its text in one call (Tokenizer.completion_text), as generate's
            row.text = self.tokenizer.completion_text(
                row.token_ids[:-1] if reason == "eos" else row.token_ids
            )
        handle._finish(Completion(request.prompt, request.prompt_ids, row.token_ids, row.text, reason), error)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, dict[int, float]]:
    """The model's log-probability of `token`, and the `top` most likely tokens' (raw logits)."""
    logp = np.log(softmax(logits.astype(np.float64)))
    best = np.argsort(-logp)[:top] if top else []
    return float(logp[token]), {int(t): float(logp[t]) for t in best}
