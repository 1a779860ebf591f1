"""A request as the scheduler runs it (`Request`) and as its caller holds it (`RequestHandle`):
the pieces it hands out, how it ends, and the errors a submission or a run can raise.

The scheduler (scheduler.py) pushes pieces and the completion into the handle from its own
thread; the caller reads them from any thread, or from asyncio (`async for`, `await`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from .beam import BeamConfig
from .clock import Clock
from .completion import Completion
from .contract import UserError
from .sampling import SamplingConfig

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
    beams: BeamConfig | None = None  # beam search (beam.py); None: one row, sampling's settings
    prompt_lookup: int = 0  # speculative decoding: drafts proposed per step by prompt lookup (0: off)
    draft_tokens: int = 0  # speculative decoding: tokens the engine's draft model proposes a step (0: off)


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
    def cancelled(self) -> bool:
        """Whether its caller cancelled it (the scheduler ends it at its next turn)."""
        return self._cancelled

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

    # -- the scheduler's side (its thread) -----------------------------------------------------
    def push(self, piece: Piece, now: float) -> None:
        with self._lock:
            self.token_times.append(now)
            self._pieces.append(piece)
            if self._sleepers or self._waiters:
                self._wake()

    def finish(self, completion: Completion, error: BaseException | None = None) -> None:
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
