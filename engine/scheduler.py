"""Continuous batching: which requests run, and the loop that runs them. This is the engine's
one decode loop: Engine.generate and Engine.stream submit here too.

One thread owns the session while there is work. Each turn of the loop:

1. admit: waiting requests take free slots (rows of the shared cache), lowest first, in their
   order; a request for its prompt's logprobs alone (max_new_tokens 0) is scored without a slot;
2. prefill: new prompts side by side go in together in one run (`Session.prefill`); a long
   prompt joining running rows goes in chunks of `chunk` tokens (`Session.prefill_slot`), one
   chunk a turn, so the running rows never wait for more than one chunk;
3. decode: one step over the rows up to the last one decoding (`Session.decode`);
4. hand out: each request gets its token (`_take`), and its slot is freed as soon as it ends
   (EOS, a stop string, its length, or its caller cancelled it).

A request's progress is one number, `Slot.computed`: its tokens whose keys and values are in the
cache. Its prompt is in once that reaches the prompt's length; there are no phases to keep in step.

The concat cache has no slots: its requests run in static batches, admitted together when the
batch is empty (`_takes_requests`); the batch runs until its last row ends, an ended row
decoding a dummy token.

What the scheduler does not do: it does not pick tokens or keep sampling state (the session
does, per row, from the settings `Session.admit` gives it), nor time the runs (clock.py), nor
define a request and its handle (requests.py).

How a decoding strategy plugs in. Today each slot feeds one token a step and takes the one the
session picks (`_take`). A strategy changes only what a slot feeds and what it takes:
- beam search: a request holds `num_beams` slots; `_take` for its slots ranks the beams from
  their rows' log-probabilities and tells the session which rows to copy into which
  (a cache row copy), then each beam feeds its next token;
- speculative decoding: a slot feeds its pending token and k drafted ones in one step (a
  prefill-like run over its row, `Session.prefill_slot` with k + 1 tokens), takes the accepted
  prefix and the target's next token, and `computed` moves by that many.
Admission, prefill and the loop stay as they are: a strategy is a property of the slot.

Submission is thread-safe and bounded: past the free slots, at most max_queue requests wait, and
a submission that does not fit is refused at once (QueueFullError). The scheduler holds the
Engine's lock while it has work; between bursts Engine.logits and Engine.score use the session.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from .beam import BeamSearch
from .clock import Clock, charge
from .completion import BeamResult, Completion, Continuation
from .draft import Draft
from .logprobs import token_logprobs
from .requests import EngineClosedError, Piece, QueueFullError, Request, RequestHandle
from .sampling import SamplingConfig, distributions
from .session import Session
from .speculation import Lookup, accept_greedy, accept_sampled, picker_logits
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK = 256  # prompt tokens prefilled between two decode steps
CANCEL_S = 30.0  # close(): how long the loop may take to end after its requests are cancelled
MAX_PADDING = (
    1.25  # prompts joining running rows together: padded tokens at most this many times the real ones
)


@dataclass
class Slot:
    """A request in a row of the running batch. It takes part in decode steps once its whole
    prompt is in (`decoding`: computed >= prompt_len)."""

    handle: RequestHandle
    continuation: Continuation
    prompt_ids: list[int]
    prompt_len: int
    computed: int = 0  # its tokens whose keys and values are in the cache
    token: int = 0  # the token to feed at the next decode step
    group: BeamGroup | None = None  # beam search: the request's beams, one slot each
    beam: int = 0  # which of them
    lookup: Lookup | None = None  # speculative decoding by prompt lookup (speculation.py)
    draft_tokens: int = 0  # speculative decoding with the draft model (draft.py): tokens it proposes

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prompt_len and (self.group is None or self.group.started)


@dataclass
class BeamGroup:
    """A beam search request's k slots. Only beam 0's slot takes the prompt; its row is copied to
    the others when the first step forks it. Each step, every beam's logits arrive (`logits`),
    then BeamSearch ranks them, rows are copied from their parents, and each beam feeds its token."""

    search: BeamSearch
    rows: list[int]  # beam i's row of the batch
    slots: list[Slot]
    logits: np.ndarray  # (k, vocab) float32, this step's
    waiting: set[int]  # beams whose logits have not arrived this step
    started: bool = False  # the prompt is in and the beams decode


class Scheduler:
    def __init__(self, session: Session, tokenizer: Tokenizer, lock: AbstractContextManager,
                 max_queue: int = 64, chunk: int = CHUNK, draft: Draft | None = None):  # fmt: skip
        self.session, self.tokenizer, self.lock, self.draft = session, tokenizer, lock, draft
        self.max_queue, self.chunk = max_queue, chunk
        self.static = not session.cache.has_slots  # the concat cache: static batches
        self.waiting: collections.deque[RequestHandle] = collections.deque()
        self.slots: list[Slot | None] = [None] * session.max_batch
        self.rows = 0  # rows of the batch the cache was started for (static batches: its size)
        self.seq = 0  # positions each row has room for
        self.on_step: Callable[[], None] | None = None  # called after each turn (tests, metrics)
        self._cond = threading.Condition()
        self._closing = False
        self._cancels = self._cancels_seen = 0  # handles cancelled, and as of the last look
        self._clock = Clock()  # the session's, for the current burst
        self.holds_lock = False  # the Engine's lock, while a burst runs
        self.stepped = time.monotonic()  # the loop's last turn (or when work came after a rest)
        self._thread: threading.Thread | None = None
        self.proposed = self.accepted = 0  # speculative decoding's drafted tokens, and those kept

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
        free = self.slots.count(None) if self._takes_requests() else 0
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
        seconds, then cancel what is left; return when the loop has stopped (or, if a step hangs,
        CANCEL_S seconds later, with a warning: the loop's thread is a daemon)."""
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
            thread.join(CANCEL_S)  # cancelled requests end at the loop's next turn
            if thread.is_alive():  # a step that hangs inside onnxruntime: nothing more to wait for
                log.warning(
                    "the scheduler's loop did not stop within %.0f s of cancelling its requests", CANCEL_S
                )

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
        """Turns until no request is waiting or running."""
        self.slots = [None] * self.session.max_batch
        self.rows = self.seq = 0  # the cache is started by the first admission
        while True:
            self._admit()
            self._drop_cancelled()
            self._prefill()
            self._decode()
            self.stepped = time.monotonic()
            if self.on_step is not None:
                self.on_step()
            with self._cond:
                if not self.waiting and not any(self.slots):
                    return

    # -- admission -----------------------------------------------------------------------------
    def _takes_requests(self) -> bool:
        """Whether the batch takes new requests into its free slots now: always with slots; a
        static batch (concat cache) only when it is empty."""
        return not self.static or not any(self.slots)

    def _start(self, rows: int, seq: int) -> None:
        """(Re)start the cache, every slot free, for `rows` rows of `seq` positions."""
        self._clock = Clock()
        self.session.start(rows, seq, self._clock)
        if self.draft is not None:
            self.draft.start(rows, seq)
        self.rows, self.seq = rows, self.session.cache.kv.cap_seq

    def _admit(self) -> None:
        """Waiting requests into free slots, lowest first, in their order. The cache grows only
        while no slot is in use: a request that needs more room than it has waits (and those
        behind it) until the running ones end."""
        with self._cond:
            self._drop_waiting_cancelled()
            scoring = []  # requests for their prompt's logprobs alone: no slot, one pass each
            while self.waiting and self.waiting[0].request.max_new_tokens == 0:
                scoring.append(self.waiting.popleft())
                self._drop_waiting_cancelled()
        for handle in scoring:
            self._score(handle)
            self._end(handle, Continuation(None, ()), "length")
        with self._cond:
            if not self.waiting or not self._takes_requests():
                return
            if not any(self.slots) and (self.static or _need(self.waiting[0]) > self.seq):
                batch = list(itertools.islice(self.waiting, self.session.max_batch))
                try:
                    self._start(len(batch) if self.static else self.session.max_batch, max(map(_need, batch)))
                except Exception as e:  # no room for the cache they need (InputError says why): they fail
                    for handle in batch:
                        self.waiting.remove(handle)
                        self._end(handle, Continuation(None, ()), "error", e)
                    return
            while self.waiting and None in self.slots[: self.rows] and _need(self.waiting[0]) <= self.seq:
                beams = self.waiting[0].request.beams
                if beams is not None and self.slots[: self.rows].count(None) < beams.num_beams:
                    break  # a beam search waits for its k slots (and those behind it wait too)
                handle = self.waiting.popleft()
                request = handle.request
                per_token = request.stream or bool(request.stop)  # stop strings need the text as it comes
                decoder = self.tokenizer.decode_stream() if per_token else None
                continuation = Continuation(decoder, request.stop)
                slot = Slot(handle, continuation, request.prompt_ids, len(request.prompt_ids))
                if request.prompt_lookup:
                    slot.lookup = Lookup(request.prompt_lookup)
                row = self.slots.index(None)
                if request.draft_tokens:
                    slot.draft_tokens, slot.lookup = request.draft_tokens, Lookup(request.draft_tokens)
                    self.draft.admit(row)
                self.slots[row] = slot
                if beams is not None:
                    self._admit_beams(slot)
                self._drop_waiting_cancelled()
            if self.static and 0 < (n := self.active()) < self.rows:  # some were cancelled as they came in
                self._start(n, self.seq)

    def _admit_beams(self, first: Slot) -> None:
        """A beam search's other k - 1 slots: they skip the prompt (beam 0's row is copied into
        theirs at the first step) and decode once the group has started."""
        request = first.handle.request
        k = request.beams.num_beams
        slots = [first] + [Slot(first.handle, first.continuation, first.prompt_ids, first.prompt_len,
                                computed=first.prompt_len) for _ in range(k - 1)]  # fmt: skip
        rows = [self.slots.index(first)]
        for slot in slots[1:]:
            rows.append(self.slots.index(None))
            self.slots[rows[-1]] = slot
        search = BeamSearch(request.beams, request.max_new_tokens, request.eos_id)
        group = BeamGroup(search, rows, slots, np.zeros((k, self.session.vocab_size), np.float32), {0})
        for beam, slot in enumerate(slots):
            slot.group, slot.beam = group, beam

    def _drop_waiting_cancelled(self) -> None:
        while self.waiting and self.waiting[0].cancelled:
            self._end(self.waiting.popleft(), Continuation(None, ()), "cancelled")

    def _drop_cancelled(self) -> None:
        """Free the slots whose callers cancelled them. A static batch's prompts go in together,
        so there a slot whose prompt is not in yet ends after its prefill (at `_take`)."""
        if self._cancels == self._cancels_seen:
            return
        self._cancels_seen = self._cancels
        for r, slot in enumerate(self.slots):
            if slot is not None and slot.group is not None and slot.handle.cancelled:
                self._end_beams(slot.group, "cancelled")
            elif slot is not None and slot.handle.cancelled and (slot.decoding or not self.static):
                self._end(slot.handle, slot.continuation, "cancelled")
                self._free(r)

    # -- running the session -------------------------------------------------------------------
    def _prefill(self) -> None:
        """Prompt work between two decode steps: new prompts in free slots side by side start
        together in one run (right-padded, as a static batch does; while other rows decode, only
        as many as fit in a chunk of tokens with little padding), or the next chunk of one prompt."""
        slots = self.slots
        r0 = next((r for r, s in enumerate(slots) if s is not None and s.computed < s.prompt_len), None)
        if r0 is None:
            return  # every prompt is in
        decoding = any(s is not None and s.computed >= s.prompt_len for s in slots)
        group = [slots[r0]]
        for r in range(r0 + 1, self.rows):
            slot, lengths = slots[r], [len(s.prompt_ids) for s in group]
            if slot is None or slot.decoding or slot.computed or group[0].computed:
                break
            lengths.append(len(slot.prompt_ids))
            padded = len(lengths) * max(lengths)
            if decoding and (padded > self.chunk or padded > MAX_PADDING * sum(lengths)):
                break
            group.append(slot)
        if not group[0].computed and (len(group) > 1 or not decoding):
            self._prefill_rows(r0, group)
        else:
            self._prefill_chunk(r0, group[0])

    def _prefill_rows(self, r0: int, group: list[Slot]) -> None:
        """Whole prompts into slots r0, r0 + 1, ... in one run, and their first tokens."""
        for r, slot in enumerate(group, r0):
            self._admit_settings(r, slot)
            self._score(slot.handle)
        run0 = self._clock.run_s
        tokens = self.session.prefill([slot.prompt_ids for slot in group], first=r0).tolist()
        charge([s.handle.request.clock for s in group], self._clock.run_s - run0, "prefill")
        now = time.perf_counter()
        for i, slot in enumerate(group):
            slot.computed = len(slot.prompt_ids)
            self._take(r0 + i, slot, tokens[i], i, now)

    def _prefill_chunk(self, r: int, slot: Slot) -> None:
        """The next chunk of a slot's prompt; after the last one, its first token."""
        prompt = slot.prompt_ids
        if not slot.computed:
            self._score(slot.handle)
        chunk = prompt[slot.computed : slot.computed + self.chunk]
        last = slot.computed + len(chunk) == len(prompt)
        if last:
            self._admit_settings(r, slot)
        run0 = self._clock.run_s
        token = self.session.prefill_slot(r, chunk, slot.computed, pick=last)
        charge([slot.handle.request.clock], self._clock.run_s - run0, "prefill" if last else "chunk")
        slot.computed += len(chunk)
        if last:
            self._take(r, slot, token, 0, time.perf_counter())

    def _admit_settings(self, r: int, slot: Slot) -> None:
        """A slot's sampling settings, from its first token on (until then its row draws nothing)."""
        request = slot.handle.request
        if slot.group is not None:  # beam search ranks every beam's logits on the host
            self.session.admit(r, slot.prompt_ids, SamplingConfig(), logits=True)
            return
        self.session.admit(r, slot.prompt_ids, request.sampling, logits=request.logprobs is not None)

    def _score(self, handle: RequestHandle) -> None:
        """The prompt's logprobs, when its request asks for them (echo)."""
        if (k := handle.request.prompt_logprobs) is not None:
            scored, tops = self.session.prompt_logprobs(handle.request.prompt_ids, k)
            handle.prompt_logprobs, handle.prompt_top_logprobs = [None, *scored], [None, *tops]

    def _decode(self) -> None:
        """One decode step over the rows up to the last decoding one; the rows before it that are
        free or still taking their prompt decode a dummy token and keep their state."""
        live = [(r, s) for r, s in enumerate(self.slots) if s is not None and s.decoding]
        if not live:
            return
        drafts = {r: self._drafts(r, s) for r, s in live if s.lookup is not None}
        drafts = {r: d for r, d in drafts.items() if d[0]}  # the rows that speculate this step
        speculating = [(r, s) for r, s in live if r in drafts]
        live = [(r, s) for r, s in live if r not in drafts]
        if live:
            with self.session.sampling.aside([r for r, _ in speculating if r < live[-1][0]]):
                self._decode_rows(live)
            for r, s in speculating:  # the step wrote a dummy token in these rows too: not theirs
                self.session.set_length(r, s.computed)
        for r, slot in speculating:
            self._verify(r, slot, *drafts[r])

    def _decode_rows(self, live: list[tuple[int, Slot]]) -> None:
        tokens = np.zeros(live[-1][0] + 1, np.int64)
        tokens[[r for r, _ in live]] = [s.token for _, s in live]
        run0 = self._clock.run_s
        picked = self.session.decode(tokens).tolist()
        charge([s.handle.request.clock for _, s in live], self._clock.run_s - run0, "decode")
        now = time.perf_counter()
        for r, slot in live:
            slot.computed += 1
            self._take(r, slot, picked[r], r, now)

    # -- speculative decoding ------------------------------------------------------------------
    def _drafts(self, r: int, slot: Slot) -> tuple[list[int], np.ndarray | None]:
        """The tokens a speculative slot proposes this step ([]: a plain step), and the draft
        model's distributions they were drawn from (None: greedy, or prompt lookup)."""
        request = slot.handle.request
        made = slot.continuation.token_ids
        room = request.max_new_tokens - len(made) - 1  # the step adds the target's own token too
        if not slot.draft_tokens:
            return slot.lookup.propose(np.array(slot.prompt_ids + made, np.int64), room), None
        k = slot.lookup.budget(room)  # the draft model's proposals adapt as prompt lookup's do
        if not k:
            return [], None
        rng = self.session.sampling.rngs[r]
        return self.draft.propose(r, slot.prompt_ids + made, k, request.sampling, rng)

    def _verify(self, r: int, slot: Slot, drafts: list[int], draft_probs: np.ndarray | None) -> None:
        """One run over the slot's pending token and its drafts; the kept ones and the target's
        next token are handed out as if decoded one by one."""
        request, sampling = slot.handle.request, self.session.sampling
        cfg = request.sampling
        argmax_only = cfg.greedy and not (cfg.logit_bias or cfg.uses_history) and request.logprobs is None
        run0 = self._clock.run_s
        argmax, logits = self.session.verify(r, [slot.token, *drafts], logits=not argmax_only)
        run_s = self._clock.run_s - run0
        picked = None if argmax_only else picker_logits(logits, drafts, cfg, *sampling.history(r))
        if cfg.greedy:
            new = accept_greedy(drafts, argmax if picked is None else picked.argmax(axis=-1))
        else:
            probs = distributions(picked, [cfg] * len(picked)).astype(np.float64)
            new = accept_sampled(drafts, probs, sampling.rngs[r], draft_probs)
        sampling.record_row(r, new)
        kept = len(new) - 1
        charge([request.clock], run_s, "decode", len(new))
        slot.lookup.kept(len(drafts), kept)
        self.proposed, self.accepted = self.proposed + len(drafts), self.accepted + kept
        slot.computed += 1 + kept
        self.session.set_length(r, slot.computed)
        if slot.draft_tokens:
            self.draft.kept(r, slot.computed)
        now = time.perf_counter()
        for i, token in enumerate(new):
            self._take(r, slot, token, 0, now, None if request.logprobs is None else logits[i : i + 1])
            if self.slots[r] is not slot:  # it ended (EOS, a stop string, its length)
                return

    # -- handing out ---------------------------------------------------------------------------
    def _take(self, r: int, slot: Slot, token: int, logits_row: int, now: float,
              logits: np.ndarray | None = None) -> None:  # fmt: skip
        """A slot's new token: pushed to its continuation and handed to its caller; the slot is
        freed when the request ends. Its log-probabilities come from row `logits_row` of the last
        step's logits, or from `logits` (1, vocab) when given (a speculative step's)."""
        if slot.group is not None:
            self._beam_logits(slot, logits_row)
            return
        handle, continuation = slot.handle, slot.continuation
        request = handle.request
        text = continuation.push(token, request.eos_id, request.max_new_tokens)
        slot.token = token
        if request.pieces:
            piece = Piece(text, [token])
            if request.logprobs is not None:
                if logits is None:
                    logprob, top = self.session.token_logprobs(logits_row, token, request.logprobs)
                else:
                    (logprob,), (top,) = token_logprobs(logits, [token], request.logprobs)
                piece.token_logprobs, piece.top_logprobs = [float(logprob)], [top]
            handle.push(piece, now)
        if continuation.finish_reason is not None or handle.cancelled:
            self._end(handle, continuation, continuation.finish_reason or "cancelled")
            self._free(r)

    # -- beam search -------------------------------------------------------------------------
    def _beam_logits(self, slot: Slot, logits_row: int) -> None:
        """A beam's logits of this run; once every beam's are in, the step."""
        group = slot.group
        group.logits[slot.beam] = self.session.last_logits(logits_row + 1)[logits_row]
        group.waiting.discard(slot.beam)
        if group.waiting:
            return
        if not group.started:  # the prompt's logits: every beam starts from them (only beam 0 counts)
            group.logits[1:] = group.logits[0]
        parents, tokens = group.search.step(group.logits)
        if group.search.done or slot.handle.cancelled:
            self._end_beams(group, "cancelled" if slot.handle.cancelled else None)
            return
        self._place_beams(group, parents)
        for beam, s in enumerate(group.slots):
            s.token = int(tokens[beam])
        group.started, group.waiting = True, set(range(len(group.slots)))

    def _place_beams(self, group: BeamGroup, parents: np.ndarray) -> None:
        """The new beams into rows: a beam stays in its parent's row when it is that parent's first
        child (no copy; which row holds which beam does not matter), and only a parent's further
        children are copied, into the rows of beams that had no child. Sources are never written."""
        old, rows = list(group.rows), [None] * len(parents)
        claimed = set()
        for beam, parent in enumerate(parents):
            if parent not in claimed:
                claimed.add(parent)
                rows[beam] = old[parent]
        free = [old[b] for b in range(len(old)) if b not in claimed]
        moves = []
        for beam, parent in enumerate(parents):
            if rows[beam] is None:
                rows[beam] = free.pop()
                moves.append((old[parent], rows[beam]))
        if moves:
            self.session.copy_rows([src for src, _ in moves], [dst for _, dst in moves])
        group.rows, group.slots = rows, [self.slots[r] for r in rows]
        for beam, slot in enumerate(group.slots):
            slot.beam = beam

    def _end_beams(self, group: BeamGroup, reason: str | None) -> None:
        """A beam search ends: its best hypotheses become the completion (the best one's tokens,
        the others in `beams`), and its k rows are freed."""
        first = group.slots[0]
        request = first.handle.request
        results = []
        for hyp in group.search.results() if reason is None else []:
            ended = bool(hyp.token_ids) and hyp.token_ids[-1] == request.eos_id
            text = self.tokenizer.completion_text(hyp.token_ids[:-1] if ended else hyp.token_ids)
            results.append(BeamResult(hyp.token_ids, text, hyp.score, "eos" if ended else "length"))
        continuation = Continuation(None, ())
        if results:
            continuation.token_ids = list(results[0].token_ids)
        self._end(first.handle, continuation, reason or results[0].finish_reason, beams=results or None)
        for r in group.rows:
            if self.slots[r] is not None and self.slots[r].group is group:
                self._free(r)

    def _free(self, r: int) -> None:
        self.slots[r] = None
        self.session.free(r)

    def _fail_running(self, error: Exception) -> None:
        for r, slot in enumerate(self.slots):
            if slot is not None:
                if slot.group is None or slot.beam == 0:  # a beam search ends once
                    self._end(slot.handle, slot.continuation, "error", error)
                self.slots[r] = None
        self.rows = self.seq = 0

    def _end(self, handle: RequestHandle, continuation: Continuation, reason: str,
             error: Exception | None = None, beams: list[BeamResult] | None = None) -> None:  # fmt: skip
        request = handle.request
        if continuation.decoder is None:  # its text in one call (Tokenizer.completion_text), as generate's
            ids = continuation.token_ids
            continuation.text = self.tokenizer.completion_text(ids[:-1] if reason == "eos" else ids)
        completion = Completion(request.prompt, request.prompt_ids, continuation.token_ids, continuation.text,
                                reason, beams)  # fmt: skip
        handle.finish(completion, error)


def _need(handle: RequestHandle) -> int:
    """Positions a request's row needs: its prompt and its new tokens."""
    return len(handle.request.prompt_ids) + handle.request.max_new_tokens
