"""Continuous batching: requests join and leave a running batch between decode steps. This is
the engine's one decode loop: Engine.generate and Engine.stream submit here too.

One thread owns the session while there is work. Between two decode steps it admits waiting
requests into free slots of the shared cache; new prompts side by side go in together in one
run (`Session.prefill(prompts, first)`), and a long prompt joining running rows goes in chunks
of `chunk` tokens (`Session.prefill_slot`), one chunk between two steps, so the running rows are
never stalled for more than one chunk. It then runs one decode step over the slots in use (the
batch is cut after the last one in use), hands each request its token, and frees a slot as soon
as its request ends: EOS, a stop string, its length, or its caller cancelled it. The concat
cache has no slots: its requests run in static batches (admitted together when the batch is
empty; the batch runs until its last row ends).

Each request has its own sampling settings and its own random generator (pickers.SlotSampling),
so its tokens do not depend on what else is in the batch: greedy, they are the tokens of the
request run alone; seeded, too. Fixed decode shapes stay: under CUDA graphs a step runs in the
bucket of its row count.

Submission is thread-safe and bounded: past the free slots, at most max_queue requests wait, and
a submission that does not fit is refused at once (QueueFullError). A `RequestHandle` is iterated
for its pieces (from a thread, or `async for` in asyncio), awaited or `result()`-ed for its
Completion, and cancelled. The scheduler holds the Engine's lock while it has work; between
bursts Engine.logits and Engine.score use the session.
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
from .completion import Completion, Row
from .contract import UserError
from .logprobs import token_logprobs
from .pickers import HostPicker, SlotSampling, choose_picker
from .sampling import SamplingConfig
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
    clock: Clock | None = None  # the figures of the call it belongs to (Engine.generate), if any
    prompt_logprobs: int | None = None  # the prompt's tokens' log-probabilities too, with this many top ones
    pieces: bool = True  # False: only the completion, no pieces (Engine.generate: less work a token)


class RequestHandle:
    """One submitted request, as its caller sees it. Thread-safe; `async for` and `await` work
    from any event loop."""

    def __init__(self, request: Request, on_cancel: Callable[[], None] | None = None):
        self.request, self._on_cancel = request, on_cancel
        self.id = f"req-{next(_ids)}"
        self.prompt_token_ids = request.prompt_ids
        self.finish_reason: str | None = None
        self.token_times: list[float] = []  # perf_counter() of each new token
        # with request.prompt_logprobs, set before the first piece: per prompt token (None for the first)
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[dict[int, float] | None] | None = None
        self.submitted = time.perf_counter()
        self._pieces: list[Piece] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0  # threads waiting in the condition
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- the caller's side ---------------------------------------------------------------------
    def cancel(self) -> None:
        """End the request at the next step; its slot is freed, finish_reason "cancelled"."""
        if not self._cancelled and self._completion is None:
            self._cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()

    @property
    def done(self) -> bool:
        return self._completion is not None

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to end. Raises TimeoutError after `timeout` seconds."""
        with self._lock:
            if not self._wait(lambda: self._completion is not None, timeout):
                raise TimeoutError(f"{self.id} did not finish within {timeout} s")
            self._raise_error()
            return self._completion

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """With the lock held: wait until ready() (False: the timeout passed first)."""
        self._sleepers += 1  # the scheduler wakes the handle's threads only when there are some
        try:
            return self._cond.wait_for(ready, timeout)
        finally:
            self._sleepers -= 1

    def _raise_error(self) -> None:
        if isinstance(self._error, UserError):  # the request's own fault, told as it was
            raise self._error
        if self._error is not None:
            raise RequestFailedError(f"{self.id} failed: {self._error}") from self._error

    def __iter__(self) -> Iterator[Piece]:
        i = 0
        while True:
            with self._lock:
                self._wait(lambda i=i: i < len(self._pieces) or self._completion is not None)
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
            with self._lock:
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
    def _push(self, piece: Piece, now: float) -> None:
        with self._lock:
            self.token_times.append(now)
            self._pieces.append(piece)
            if self._sleepers or self._waiters:
                self._wake()

    def _finish(self, completion: Completion, error: BaseException | None = None) -> None:
        with self._lock:
            self._error = error
            self.finish_reason, self._completion = completion.finish_reason, completion
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        if not self._waiters:
            return
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
    decoding: bool = False  # the whole prompt is in: the slot takes part in decode steps


@dataclass
class Stats:
    requests: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_runs: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # summed over steps: rows per step = decode_rows / decode_steps
    decode_step_s: float = 0.0  # a step: its tokens, the run, the hand-out
    decode_run_s: float = 0.0  # of which inside onnxruntime

    def overhead_ms(self) -> float:
        """Per decode step, the scheduler's and session's time outside onnxruntime."""
        steps = self.decode_steps
        return 1e3 * (self.decode_step_s - self.decode_run_s) / steps if steps else 0.0


MAX_PADDING = (
    1.25  # prompts joining running rows together: padded tokens at most this many times the real ones
)


class Scheduler:
    """Continuous batching over a session. With the concat cache (no slots) requests run in
    static batches instead: the waiting ones start together when the batch is empty, and the
    batch runs until its last row ends."""

    def __init__(self, session: Session, tokenizer: Tokenizer, lock: AbstractContextManager,
                 max_queue: int = 64, chunk: int = CHUNK):  # fmt: skip
        self.session, self.tokenizer, self.lock = session, tokenizer, lock
        self.max_queue, self.chunk = max_queue, chunk
        self.static = session.cache.kv_cache == "concat"
        self.waiting: collections.deque[RequestHandle] = collections.deque()
        self.slots: list[Slot | None] = [None] * session.max_batch
        self.rows = 0  # rows of the batch the cache was started for (static batches: its size)
        self.seq = 0  # positions each row has room for
        self.table = SlotSampling(session.max_batch, session.vocab_size)
        self.stats = Stats()
        self.on_step: Callable[[], None] | None = None  # called after each step (tests, metrics)
        self._cond = threading.Condition()
        self._closing = False
        self._picker_stale = True  # requests came or went since the picker was chosen
        self._cancels = self._cancels_seen = 0  # handles cancelled, and as of the last look
        self._pending = 0  # slots whose prompt is not all in yet
        self._clock = Clock()  # the session's, for the current burst
        self.holds_lock = False  # the Engine's lock, while a burst runs
        self.stepped = time.monotonic()  # the loop's last turn (or when work came after a rest)
        self._thread: threading.Thread | None = None

    # -- submission (any thread) ---------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request], bounded: bool = True) -> list[RequestHandle]:
        """Queue requests together (they are admitted in this order, and start in one batch when
        there is room), all or none: QueueFullError when they do not all fit in room().
        bounded=False: past max_queue (one call's prompts, already in memory)."""
        handles = [RequestHandle(request, self._note_cancel) for request in requests]
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if bounded and len(handles) > (room := self.room()):
                raise QueueFullError(
                    f"{len(handles)} more requests do not fit: {len(self.waiting)} wait, for the free slots "
                    f"and max_queue {self.max_queue} places beyond them (room for {max(room, 0)} more); retry "
                    "later or load the engine with a larger max_queue"
                )
            if not self.waiting and not self.holds_lock:
                self.stepped = time.monotonic()  # work after a rest: the loop's time starts now
            self.waiting.extend(handles)
            self.stats.requests += len(handles)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="gpt2onnx-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return handles

    def _note_cancel(self) -> None:
        self._cancels += 1  # the loop looks for cancelled slots when this changes

    def queue_depth(self) -> int:
        return len(self.waiting)

    def room(self) -> int:
        """Requests a bounded submission may add now. Waiting requests take the free slots first
        (the loop moves them in at its next turn), so only those beyond the free slots count
        against max_queue: an idle engine takes max_batch + max_queue at once, and the loop's moves
        leave the room as it is. A static batch has no free slot while it runs."""
        free = 0 if self.static and any(self.slots) else self.slots.count(None)
        return free + self.max_queue - len(self.waiting)

    def stuck(self, seconds: float) -> bool:
        """Whether there is work (waiting or running) but the loop has not turned for `seconds`:
        a step that hangs, or the session held elsewhere that long (health checks)."""
        busy = bool(self.waiting) or self.holds_lock
        return busy and time.monotonic() - self.stepped > seconds

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
        self.slots = [None] * self.session.max_batch
        self.rows = self.seq = 0  # the cache is started by the first admission
        while True:
            self._picker_stale |= self._admit()
            self._drop_cancelled()
            self._prefill()
            self._decode()
            self.stepped = time.monotonic()
            if self.on_step is not None:
                self.on_step()
            with self._cond:
                if not self.waiting and not any(self.slots):
                    return

    def _start(self, rows: int, seq: int) -> None:
        """(Re)start the cache, every slot free, for `rows` rows of `seq` positions."""
        session = self.session
        self.table = SlotSampling(session.max_batch, session.vocab_size)
        self._clock = Clock()
        session.start(rows, seq, HostPicker(self.table), self._clock)
        self.rows, self.seq = rows, session.cache.kv.cap_seq
        self._picker_stale = True

    def _admit(self) -> bool:
        """Waiting requests into free slots, lowest first, in their order. Returns whether any
        came in. The cache grows only while no slot is in use: a request that needs more room
        than it has waits (and those behind it) until the running ones end. A static batch
        (concat cache) takes requests only when it is empty."""
        admitted = False
        with self._cond:
            self._drop_waiting_cancelled()
            scoring = []  # requests for their prompt's logprobs alone: no slot, one pass each
            while self.waiting and self.waiting[0].request.max_new_tokens == 0:
                scoring.append(self.waiting.popleft())
                self._drop_waiting_cancelled()
        for handle in scoring:
            self._score(handle)
            self._end(handle, Row(handle.request.prompt_ids, None, ()), "length")
        with self._cond:
            if not self.waiting:
                return False
            empty = not any(self.slots)
            if empty and (self.static or _need(self.waiting[0]) > self.seq):
                batch = list(itertools.islice(self.waiting, self.session.max_batch))
                try:
                    self._start(len(batch) if self.static else self.session.max_batch, max(map(_need, batch)))
                except Exception as e:  # no room for the cache they need (InputError says why): they fail
                    for handle in batch:
                        self.waiting.remove(handle)
                        self._end(handle, Row(handle.request.prompt_ids, None, ()), "error", e)
                    return False
            elif self.static:
                return False
            while self.waiting and None in self.slots[: self.rows] and _need(self.waiting[0]) <= self.seq:
                handle = self.waiting.popleft()
                r, request = self.slots.index(None), handle.request
                per_token = request.stream or bool(request.stop)  # stop strings need the text as it comes
                row = Row(
                    request.prompt_ids, self.tokenizer.decode_stream() if per_token else None, request.stop
                )
                self.slots[r] = Slot(handle, row)
                self._pending += 1
                self.stats.prompt_tokens += len(request.prompt_ids)
                admitted = True
                self._drop_waiting_cancelled()
            n = self.active()
            if self.static and 0 < n < self.rows:  # some were cancelled as they came in
                self._start(n, self.seq)
        return admitted

    def _drop_waiting_cancelled(self) -> None:
        while self.waiting and self.waiting[0]._cancelled:
            handle = self.waiting.popleft()
            self._end(handle, Row(handle.request.prompt_ids, None, ()), "cancelled")

    def _prefill(self) -> None:
        """Prompt work between two decode steps: new prompts in free slots side by side start
        together in one run (right-padded, as a static batch does; while other rows decode, only
        as many as fit in a chunk of tokens with little padding), or the next chunk of one prompt."""
        if not self._pending:
            return
        r0 = next(r for r, s in enumerate(self.slots) if s is not None and not s.decoding)
        decoding = any(s is not None and s.decoding for s in self.slots)
        group = [self.slots[r0]]
        for r in range(r0 + 1, self.rows):
            slot, lengths = self.slots[r], [len(s.row.prompt_ids) for s in group]
            if slot is None or slot.decoding or slot.prefilled or group[0].prefilled:
                break
            lengths.append(len(slot.row.prompt_ids))
            padded = len(lengths) * max(lengths)
            if decoding and (padded > self.chunk or padded > MAX_PADDING * sum(lengths)):
                break
            group.append(slot)
        if not group[0].prefilled and (self.static or len(group) > 1 or not decoding):
            self._prefill_rows(r0, group)
        else:
            self._prefill_chunk(group[0])

    def _prefill_rows(self, r0: int, group: list[Slot]) -> None:
        """Whole prompts into slots r0, r0 + 1, ... in one run, and their first tokens."""
        for r, slot in enumerate(group, r0):
            self._admit_settings(r, slot)
            self._score(slot.handle)
        self._refresh_picker()
        run0 = self._clock.run_s
        tokens = self.session.prefill([slot.row.prompt_ids for slot in group], first=r0).tolist()
        self.stats.prefill_runs += 1
        self._call_clocks(group, self._clock.run_s - run0, "prefill")
        now = time.perf_counter()
        self._pending -= len(group)
        self.stats.new_tokens += len(group)
        for i, slot in enumerate(group):
            slot.prefilled, slot.decoding = len(slot.row.prompt_ids), True
            self._take(r0 + i, slot, tokens[i], i, now)

    def _prefill_chunk(self, slot: Slot) -> None:
        """The next chunk of a slot's prompt; after the last one, its first token."""
        r, prompt = self.slots.index(slot), slot.row.prompt_ids
        if not slot.prefilled:
            self._score(slot.handle)
        chunk = prompt[slot.prefilled : slot.prefilled + self.chunk]
        last = slot.prefilled + len(chunk) == len(prompt)
        if last:
            self._admit_settings(r, slot)
            self._refresh_picker()
        run0 = self._clock.run_s
        token = self.session.prefill_slot(r, chunk, slot.prefilled, pick=last)
        self.stats.prefill_runs += 1
        self._call_clocks([slot], self._clock.run_s - run0, "prefill" if last else "chunk")
        slot.prefilled += len(chunk)
        slot.decoding = last
        if last:
            self._pending -= 1
            self.stats.new_tokens += 1
            self._take(r, slot, token, 0, time.perf_counter())

    def _score(self, handle: RequestHandle) -> None:
        """The prompt's logprobs, when its request asks for them (echo): a pass over the prompt,
        outside the cache, with the logits of every position."""
        k = handle.request.prompt_logprobs
        if k is None:
            return
        prompt = handle.request.prompt_ids
        logits = self.session.full_logits(np.array([prompt], np.int64))[0]
        scored, tops = token_logprobs(logits[:-1], prompt[1:], k)  # position i predicts token i + 1
        handle.prompt_logprobs = [None] + scored.tolist()
        handle.prompt_top_logprobs = [None] + tops

    def _admit_settings(self, r: int, slot: Slot) -> None:
        """A slot's sampling settings and generator, from its first token on (until then its row
        drew nothing in decode steps)."""
        request = slot.handle.request
        self.table.admit(
            r, slot.row.prompt_ids, request.sampling, np.random.default_rng(request.sampling.seed)
        )
        self._picker_stale = True

    def _decode(self) -> None:
        """One decode step over the slots in use: the rows up to the last decoding one (a static
        batch: all its rows, the ended ones too)."""
        slots = self.slots
        if self.static:
            rows = self.rows if any(slots) else 0
        else:
            rows = len(slots)
            while rows and not ((last := slots[rows - 1]) is not None and last.decoding):
                rows -= 1
        if not rows:
            return
        t0, run0 = time.perf_counter(), self._clock.run_s
        self._refresh_picker()
        live = [(r, s) for r, s in enumerate(slots[:rows]) if s is not None and s.decoding]
        tokens = np.zeros(rows, np.int64)
        tokens[[r for r, _ in live]] = [s.token for _, s in live]
        picked = self.session.decode(tokens).tolist()
        run = self._clock.run_s - run0
        self._call_clocks([s for _, s in live], run)
        now = time.perf_counter()
        for r, slot in live:
            self._take(r, slot, picked[r], r, now)
        stats = self.stats
        stats.new_tokens += len(live)
        stats.decode_steps, stats.decode_rows = stats.decode_steps + 1, stats.decode_rows + rows
        stats.decode_step_s += time.perf_counter() - t0
        stats.decode_run_s += run

    def _call_clocks(self, slots: list[Slot], run_s: float, run: str = "decode") -> None:
        """The figures of the calls (Engine.generate) whose rows this run was for: `run` is a
        "decode" step, a "prefill" (first tokens) or a "chunk" of a prompt (no tokens yet)."""
        rows: dict[int, list] = {}  # id(clock) -> [clock, its rows]
        for slot in slots:
            if (clock := slot.handle.request.clock) is not None:
                if (entry := rows.get(id(clock))) is None:
                    rows[id(clock)] = [clock, 1]
                else:
                    entry[1] += 1
        for clock, n in rows.values():
            if run == "chunk" or run == "prefill" and clock.has_tokens:
                clock.prefill_run(run_s)  # a prompt's chunk, or a later row's prompt: not a step
            else:
                clock.ran(run_s)
                clock.tokens()
            if run != "chunk":
                clock.new_tokens += n

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

    def _take(self, r: int, slot: Slot, token: int, logits_row: int, now: float) -> None:
        """A slot's new token: pushed to its row and handed to its caller; the slot is freed when
        the request ends."""
        handle = slot.handle
        request, row = handle.request, slot.row
        text = row.push(token, request.eos_id, request.max_new_tokens)
        slot.token = token
        if not request.pieces:
            pass
        elif request.logprobs is None:
            handle._push(Piece(text, [token]), now)
        else:
            logits = self.session.last_logits(logits_row + 1)[logits_row : logits_row + 1]
            (logprob,), (top,) = token_logprobs(logits, [token], request.logprobs)
            handle._push(Piece(text, [token], [float(logprob)], [top]), now)
        if row.finish_reason is not None or handle._cancelled:
            self._end(handle, row, row.finish_reason or "cancelled")
            self._free(r)

    def _free(self, r: int) -> None:
        self._pending -= not self.slots[r].decoding
        self.slots[r] = None
        self.table.free(r)
        if not self.static:  # a static batch keeps its rows until it ends
            self.session.free(r)
        self._picker_stale = True

    def _fail_running(self, error: Exception) -> None:
        for r, slot in enumerate(self.slots):
            if slot is not None:
                self._end(slot.handle, slot.row, "error", error)
                self.slots[r] = None
        self.rows = self.seq = self._pending = 0

    def _drop_cancelled(self) -> None:
        if self._cancels == self._cancels_seen:
            return
        self._cancels_seen = self._cancels
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


def _need(handle: RequestHandle) -> int:
    """Positions a request's row needs: its prompt and its new tokens."""
    return len(handle.request.prompt_ids) + handle.request.max_new_tokens
