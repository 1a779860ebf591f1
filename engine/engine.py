"""`Engine`: the public API apps embed. Loads a model folder; generates, streams and scores.

An Engine owns one onnxruntime session and its buffers, and one scheduler (scheduler.py) that
runs every generation on them: `submit`, and `generate` and `stream` on top of it, may be called
from any thread at once and share the running batch. `logits` and `score` use the session
between the scheduler's bursts (they wait for it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from . import atomic_folder, inputs
from .activations import ActivationCache, NamesFilter
from .beam import EARLY_STOPPING, BeamConfig
from .clock import Clock
from .completion import Completion
from .contract import InputError, ModelFolderError
from .draft import DRAFT_PAYS, Draft
from .inspection import Inspector
from .logprobs import token_logprobs
from .model_folder import check_tokenizer, read_manifest
from .requests import Request, RequestHandle
from .sampling import SamplingConfig
from .scheduler import Scheduler
from .session import Session, SessionConfig
from .speculation import DRAFTS_A_STEP
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Generation:
    completions: list[Completion]
    timing: Clock  # timing.as_dict(): prefill_ms, decode_ms_per_token, tokens_per_s; per-step times


@dataclass
class Score:
    tokens: list[int]
    str_tokens: list[str]
    logprobs: (
        np.ndarray
    )  # (len(tokens) - 1,): log p(token[i+1] | its window's tokens before it); nan: unscored
    perplexity: float


@dataclass(frozen=True)
class CallOptions:
    """One generate/stream/submit call's settings, checked by the input gate."""

    max_new_tokens: int
    stop: tuple[str, ...]
    prepend_bos: bool
    truncate: str | None
    ignore_eos: bool
    sampling: SamplingConfig


SAMPLING_KEYWORDS = tuple(f.name for f in fields(SamplingConfig))
MAX_WHOLE_PROMPT_CHARS = 1 << 20  # truncate="left" on a text with no place to cut: tokenized whole up to this
MAX_LOGITS = 1 << 28  # floats (1 GiB) one logits() call may return
DRAFT_TOKENS = 4  # tokens a draft model proposes a step, when the engine has one and a call does not say
MAX_INSPECT_ROWS = 1 << 16  # run_with_cache: the size of what it returns is bounded (engine/inspection.py)
SCORE_LOGITS = 1 << 26  # floats (256 MiB) of logits per run while scoring (windows side by side)


class Engine:
    def __init__(self, folder: Path, config: SessionConfig, draft: str | Path | None = None,
                 prompt_lookup: int = 0):  # fmt: skip
        if draft is not None:  # two sessions take turns: a spinning pool would hold the cores the other needs
            config = dataclasses.replace(config, spinning=False)
        self.folder = Path(folder)
        atomic_folder.recover(self.folder)  # an `export --force` killed mid-swap left it aside
        self.manifest = read_manifest(self.folder)
        c = self.manifest.config
        tokenizer_path = self.folder / self.manifest.tokenizer_file
        self.tokenizer = Tokenizer(tokenizer_path, c.bos_token_id, c.eos_token_id)
        check_tokenizer(self.tokenizer, c, tokenizer_path)
        self.session = Session(self.folder, self.manifest, config)  # checks the graph against the manifest
        self._probe()
        self._lock = threading.Lock()
        self.draft = (
            None
            if draft is None
            else Draft(
                inputs.folder_path(draft), self.folder, self.tokenizer.vocab(), config, self.session.max_seq
            )
        )
        self.draft_tokens = 0  # the calls' default: DRAFT_TOKENS where the draft pays (draft.py)
        self.draft_cost = None  # a draft run's time over the target's, timed here
        if self.draft is not None:
            self.draft_cost = cost = self.draft.step_cost(self.session)
            self.draft_tokens = DRAFT_TOKENS if cost <= DRAFT_PAYS else 0
            log.info("draft model %s: a run costs %.0f%% of the target's; %s", self.draft.folder, 100 * cost,
                     "calls use it by default" if self.draft_tokens else
                     f"above {DRAFT_PAYS:.0%} it rarely pays, so only calls that pass draft_tokens use it")  # fmt: skip
        self.scheduler = Scheduler(
            self.session, self.tokenizer, self._lock, config.max_queue, draft=self.draft
        )
        self.inspector = Inspector(self.folder, self.manifest, self.device, config.threads)
        self.prompt_lookup = 0  # the calls' default (Engine.load's prompt_lookup), checked here as a call's
        greedy = CallOptions(1, (), True, None, False, SamplingConfig())
        self.prompt_lookup = self._speculation(prompt_lookup, 0, greedy, None).get("prompt_lookup", 0)
        if self.manifest.source.random_init:
            log.info(
                "%s holds RANDOM weights (%s, seed %s): its text is meaningless",
                self.folder,
                self.manifest.source.checkpoint,
                self.manifest.source.seed,
            )

    def _probe(self) -> None:
        """One token through the graph at load, at the last position the manifest promises: a folder
        whose graph cannot run, has fewer positions or gives no finite logits fails here with the
        fix, not at a later generate with onnxruntime's error."""
        c = self.manifest.config
        try:
            logits = self.session.full_logits(np.array([[c.bos_token_id]], dtype=np.int64), c.n_positions - 1)
        except Exception as e:  # onnxruntime raises its own untyped errors
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ModelFolderError(
                f"{self.folder}: the graph fails on one token ({first}); re-export the model folder"
            ) from e
        if logits.shape != (1, 1, c.vocab_size) or not np.isfinite(logits).all():
            raise ModelFolderError(
                f"{self.folder}: the graph gives logits of shape {logits.shape} (finite: {bool(np.isfinite(logits).all())}) for one token, expected (1, 1, {c.vocab_size}) and finite; re-export the model folder"
            )

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", max_batch: int = 8, max_seq: int | None = None,
             threads: int | None = None, device_sampling: bool | None = None,
             cuda_graphs: bool | None = None, max_queue: int = 64,
             draft: str | Path | None = None, prompt_lookup: int = 0) -> Engine:  # fmt: skip
        """Load a model folder. device_sampling: pick tokens with the sampling graph; cuda_graphs:
        decode steps of fixed shapes, captured as CUDA graphs (shared cache only). Both default
        to on with the CUDA provider, off on the CPU. draft: a smaller model folder (shared cache,
        the same tokenizer) for speculative decoding: calls that pass draft_tokens use it, and
        greedy calls propose DRAFT_TOKENS tokens a step with it when a draft run costs at most
        DRAFT_PAYS of a target run (measured here; engine/draft.py). prompt_lookup:
        the calls' default for speculative decoding by prompt lookup (0: off), applied where a
        call allows it (the server's --prompt-lookup).
        Raises InputError (a bad argument, before the folder is read), ModelFolderError
        (missing/corrupt folder), ProviderError (cuda unavailable)."""
        folder = inputs.folder_path(path)
        config = SessionConfig(provider=provider, max_batch=max_batch, max_seq=max_seq, threads=threads,
                               device_sampling=device_sampling, cuda_graphs=cuda_graphs,
                               max_queue=max_queue)  # fmt: skip
        return cls(folder, config, draft, prompt_lookup)

    @property
    def device(self) -> str:
        """Where the graph runs: "cuda" or "cpu" (what provider="auto" resolved to)."""
        return self.session.device

    @property
    def n_positions(self) -> int:
        """The context this engine serves: the model's n_positions, or less when max_seq says so."""
        return self.session.max_seq

    @property
    def vocab_size(self) -> int:
        return self.manifest.config.vocab_size

    # -- tokenization ----------------------------------------------------------------------
    # Every public method checks its arguments through `inputs` (InputError) before any work.
    def to_tokens(self, text: str, prepend_bos: bool = True) -> list[int]:
        return self.tokenizer.to_tokens(inputs.text("text", text), inputs.check("prepend_bos", prepend_bos))

    def to_str_tokens(self, text: str | Sequence[int], prepend_bos: bool = True) -> list[str]:
        prepend_bos = inputs.check("prepend_bos", prepend_bos)
        return self.tokenizer.to_str_tokens(inputs.prompt("text", text, self.vocab_size), prepend_bos)

    def to_string(self, ids: Sequence[int]) -> str:
        return self.tokenizer.to_string(inputs.token_ids("ids", ids, self.vocab_size))

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                 max_new_tokens: int = 32, *, stop: str | Sequence[str] = (), prepend_bos: bool = True,
                 truncate: str | None = None, ignore_eos: bool = False, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool | str = False,
                 num_return_sequences: int = 1, prompt_lookup: int | None = None, draft_tokens: int | None = None,
                 **sampling) -> Generation:  # fmt: skip
        """Complete each prompt: a str, a list of token ids, or a list of prompts (all str or all
        id lists). Sampling keywords are SamplingConfig's (greedy by default); each prompt is a
        request of its own (`submit`), so with a seed each prompt's tokens are those it gets
        alone with that seed. ignore_eos=True always generates max_new_tokens (benchmarks).
        The prompts are queued together (past max_queue) and start in one batch when there is
        room; other callers' requests may share the batch.

        num_beams > 1: beam search as transformers' generate(num_beams=k, do_sample=False) runs
        it (engine/beam.py: length_penalty, early_stopping True | False | "never"); each prompt's
        k beams are k rows of the running batch. Each completion is the best hypothesis, and
        `completion.beams` holds the best num_return_sequences with their scores. Greedy only
        (no sampling settings or stop strings), the shared cache on the CPU provider.

        prompt_lookup=N: speculative decoding that proposes up to N tokens a step from the prompt
        and the text so far and verifies them in one run (engine/speculation.py): greedy gives
        plain greedy decoding's tokens, sampling the same distribution (not the same draws for a
        seed), with penalties, logit_bias and logprobs as without it (greedy with int8 weights:
        see docs/engine.md on near-ties); not with beams; the shared cache on the CPU provider.

        Raises InputError (a ValueError) naming the argument for any bad argument, an empty
        prompt without BOS, or a prompt that does not fit the context (unless truncate="left"
        drops its oldest tokens)."""
        options = self._options("generate", max_new_tokens, stop, prepend_bos, truncate, ignore_eos, sampling)
        beams = self._beam_config(num_beams, length_penalty, early_stopping, num_return_sequences, options)
        spec = self._speculation(prompt_lookup, draft_tokens, options, beams)
        prompts = inputs.prompts(prompts, self.vocab_size)
        clock = Clock()
        requests = [self._submission(p, options, stream=False, clock=clock, pieces=False, beams=beams,
                                     **spec) for p in prompts]  # fmt: skip
        clock.begin()
        handles = self.scheduler.submit_all(requests, bounded=False)
        try:
            completions = [handle.result() for handle in handles]
        finally:
            for handle in handles:  # interrupted (KeyboardInterrupt): the rest stop at the next step
                handle.cancel()
        return Generation(completions, clock)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 32, *, stop: str | Sequence[str] = (),
               prepend_bos: bool = True, truncate: str | None = None, prompt_lookup: int | None = None,
               draft_tokens: int | None = None, **sampling) -> Iterator[str]:  # fmt: skip
        """Yield the completion's text piece by piece; breaking out of the loop (or closing the
        iterator) cancels the request. The arguments are checked (InputError) and the request
        submitted here, before the first piece is asked for. prompt_lookup: as `generate`'s (the
        tokens a verification keeps come out together)."""
        options = self._options("stream", max_new_tokens, stop, prepend_bos, truncate, False, sampling)
        spec = self._speculation(prompt_lookup, draft_tokens, options, None)
        prompt = inputs.prompt("prompt", prompt, self.vocab_size)
        handle = self.scheduler.submit(self._submission(prompt, options, stream=True, **spec))
        return _texts(handle)

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 16, *, stop: str | Sequence[str] = (),
               prepend_bos: bool = True, truncate: str | None = None, ignore_eos: bool = False,
               logprobs: int | None = None, prompt_logprobs: int | None = None, stream: bool = True,
               num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
               num_return_sequences: int = 1, prompt_lookup: int | None = None, draft_tokens: int | None = None,
               **sampling) -> RequestHandle:  # fmt: skip
        """Queue one prompt for the running batch (continuous batching, scheduler.py) and return
        at once with its handle: iterate it for pieces (or `async for`), `result()` or await it
        for the Completion, `cancel()` it. Thread-safe. Settings as `generate`'s, each request its
        own (a seed makes its tokens those of the seed run alone); logprobs: 0 to 5 to get the
        chosen token's log-probability and that many top ones per token; prompt_logprobs: 0 to 5
        for the prompt's tokens' too (handle.prompt_logprobs, set before the first piece; the
        prompt runs once more for them); stream=False: pieces carry token ids only (no text until
        the end: less work a token). num_beams > 1: a beam search (see `generate`); its handle
        yields no pieces, and its Completion has the best hypotheses in `beams`.
        With the concat cache (no slots), requests run in static batches: the waiting ones start
        together when the running batch has ended.
        Raises InputError (bad arguments, a prompt that does not fit), QueueFullError (no room:
        the free slots are claimed and max_queue requests wait beyond them), EngineClosedError
        (after close)."""
        prompt_logprobs = inputs.check("logprobs", prompt_logprobs, "prompt_logprobs")
        score_only = max_new_tokens == 0 and prompt_logprobs is not None
        options = self._options("submit", 1 if score_only else max_new_tokens, stop, prepend_bos, truncate,
                                ignore_eos, sampling)  # fmt: skip
        if score_only:  # the prompt's logprobs alone: one pass, no slot, no new token
            options = dataclasses.replace(options, max_new_tokens=0)
        logprobs = inputs.check("logprobs", logprobs)
        beams = self._beam_config(num_beams, length_penalty, early_stopping, num_return_sequences, options)
        if beams is not None and logprobs is not None:
            raise InputError(
                "logprobs do not apply to beam search (each hypothesis' score is in completion.beams); "
                "drop logprobs or use num_beams=1",
                param="logprobs",
            )
        spec = self._speculation(prompt_lookup, draft_tokens, options, beams)
        prompt = inputs.prompt("prompt", prompt, self.vocab_size)
        stream = inputs.check("stream", stream)
        return self.scheduler.submit(
            self._submission(
                prompt,
                options,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                stream=stream,
                beams=beams,
                **spec,
            )  # fmt: skip
        )

    def _beam_config(self, num_beams, length_penalty, early_stopping, num_return_sequences,
                     options: CallOptions) -> BeamConfig | None:  # fmt: skip
        """Beam search's settings through the input gate; None for one beam (greedy or sampling)."""
        most = min(self.session.max_batch, self.vocab_size)
        k = inputs.Count(1, most, f"an integer from 1 to {most} (each beam is a row: max_batch)")(
            "num_beams", num_beams
        )
        n = inputs.Count(1, k, f"an integer from 1 to num_beams ({k})")(
            "num_return_sequences", num_return_sequences
        )
        if early_stopping not in EARLY_STOPPING or type(early_stopping) not in (bool, str):
            raise InputError(
                f"early_stopping must be True, False or 'never', got {early_stopping!r}",
                param="early_stopping",
            )
        if type(length_penalty) not in (int, float) or not np.isfinite(length_penalty):
            raise InputError(
                f"length_penalty must be a finite number, got {length_penalty!r}", param="length_penalty"
            )
        if k == 1:
            return None  # transformers' num_beams=1 is greedy search (length_penalty does not apply)
        if not options.sampling.greedy or options.sampling.uses_history or options.sampling.logit_bias:
            raise InputError(
                "beam search ranks the model's own log-probabilities: drop the sampling settings "
                "(temperature, top_k, top_p, min_p, penalties, logit_bias) or use num_beams=1",
                param="num_beams",
            )
        if options.stop:
            raise InputError(
                "stop strings do not apply to beam search; drop stop or use num_beams=1", param="stop"
            )
        self._needs_rows_on_host("beam search", "num_beams")
        return BeamConfig(k, float(length_penalty), early_stopping, n)

    def _speculation(self, prompt_lookup, draft_tokens, options: CallOptions, beams) -> dict:
        """Speculative decoding's settings through the input gate, as the Request's keywords:
        prompt_lookup (None: the engine's default, Engine.load's prompt_lookup) and draft_tokens
        (None: the engine's default, DRAFT_TOKENS when its draft pays). A default applies only where the call
        allows speculation (else it runs plainly); a value asked for where it cannot is refused."""
        beam = beams is not None
        if prompt_lookup is None:
            prompt_lookup = self.prompt_lookup if not beam and draft_tokens in (None, 0) else 0
        n = DRAFTS_A_STEP("prompt_lookup", prompt_lookup)
        # the engine's draft by default for greedy calls that allow one (else plainly): the default is
        # measured (draft.py), and a seeded sampled call must draw the same tokens on every load
        if draft_tokens is None:
            draft_tokens = self.draft_tokens if not (beam or n) and options.sampling.greedy else 0
        k = DRAFTS_A_STEP("draft_tokens", draft_tokens)
        if k and self.draft is None:
            raise InputError(
                "draft_tokens needs a draft model: Engine.load(..., draft=DIR)", param="draft_tokens"
            )
        if n and k:
            raise InputError("pass prompt_lookup or draft_tokens, not both", param="prompt_lookup")
        if not (n or k):
            return {}
        name = "prompt_lookup" if n else "draft_tokens"
        if beam:
            raise InputError(f"{name} does not work with beam search; drop one of them", param=name)
        self._needs_rows_on_host(name, name)
        return {"prompt_lookup": n, "draft_tokens": k}

    def _needs_rows_on_host(self, what: str, param: str) -> None:
        """Beam search and speculative decoding copy and roll back cache rows in host memory: the
        shared cache on the CPU provider."""
        if self.manifest.kv_cache != "shared" or self.device != "cpu":
            raise InputError(
                f"{what} needs the shared cache on the CPU provider (this engine: {self.manifest.kv_cache} "
                f"cache on {self.device}); export with --kv-cache shared and load with provider='cpu'",
                param=param,
            )

    def _submission(self, prompt: str | list[int], options: CallOptions, **extra) -> Request:
        """A checked prompt and a call's settings as one request for the scheduler; `extra`:
        the Request's own (logprobs, stream, clock, pieces, prompt_logprobs)."""
        ids = self._prompt_tokens(prompt, options)
        text = prompt if isinstance(prompt, str) else self.tokenizer.to_string(ids)
        extra.setdefault("logprobs", None)
        return Request(text, ids, options.max_new_tokens, options.stop, options.sampling, self._eos(options),
                       **extra)  # fmt: skip

    def stats(self) -> dict[str, int]:
        """The scheduler's figures now: queue_depth, active_slots, max_batch, max_queue, and room
        (requests `submit` takes now: the free slots, then max_queue places beyond them)."""
        s = self.scheduler
        return {"queue_depth": s.queue_depth(), "active_slots": s.active(), "max_batch": self.session.max_batch,
                "max_queue": s.max_queue, "room": s.room(), "draft_tokens_proposed": s.proposed,
                "draft_tokens_accepted": s.accepted}  # fmt: skip

    def stuck(self, seconds: float = 60.0) -> bool:
        """Whether requests wait or run but the scheduler's loop has not turned for `seconds`
        (health checks: a hung step)."""
        return self.scheduler.stuck(seconds)

    def close(self, timeout: float = 30.0) -> None:
        """Take no more requests; let the submitted ones finish within `timeout` seconds, cancel
        the rest, and return when the scheduler has stopped."""
        self.scheduler.close(timeout)

    def _eos(self, options: CallOptions) -> int:
        return -1 if options.ignore_eos else self.manifest.config.eos_token_id

    def _options(self, method: str, max_new_tokens, stop, prepend_bos, truncate, ignore_eos,
                 sampling: dict) -> CallOptions:  # fmt: skip
        """One call's settings through the input gate, before any prompt is looked at."""
        inputs.known_keywords(method, sampling, SAMPLING_KEYWORDS)
        cfg = SamplingConfig(**sampling)
        inputs.logit_bias(cfg.logit_bias, self.vocab_size)  # its ids against this model's vocabulary
        n = inputs.check("max_new_tokens", max_new_tokens)
        if n >= self.n_positions:
            raise InputError(
                f"max_new_tokens {n} leaves no room for a prompt in the {self.n_positions}-token context; "
                "ask for fewer",
                param="max_new_tokens",
            )
        flags = dict(prepend_bos=prepend_bos, truncate=truncate, ignore_eos=ignore_eos)
        flags = {name: inputs.check(name, value) for name, value in flags.items()}
        return CallOptions(n, inputs.stop_strings(stop), **flags, sampling=cfg)

    def _prompt_tokens(self, prompt: str | list[int], options: CallOptions) -> list[int]:
        """A checked prompt's ids, within the room the context leaves it: text is tokenized (BOS
        first unless prepend_bos=False), ids are taken as they are."""
        room = self.n_positions - options.max_new_tokens
        left = options.truncate == "left"
        ids = self._text_tokens(prompt, options, room) if isinstance(prompt, str) else prompt
        if not ids:
            raise InputError(
                "the prompt is empty; pass some text, or keep the BOS token (prepend_bos=True, no --no-bos) "
                "to generate from nothing",
                param="prompt",
            )
        if len(ids) > room:
            if not left:
                raise InputError(self._too_long(str(len(ids)), options.max_new_tokens), param="prompt")
            ids = ids[len(ids) - room :]
        return ids

    def _text_tokens(self, text: str, options: CallOptions, room: int) -> list[int]:
        """A text's ids without tokenizing more than can fit: a text that surely has more tokens
        than `room` is refused unread; with truncate="left" only a tail of it is tokenized (the
        same last tokens as the whole text's, see Tokenizer.last_tokens). The caller trims."""
        bos = [self.tokenizer.bos_token_id] if options.prepend_bos else []
        if options.truncate == "left":
            tail = self.tokenizer.last_tokens(text, room, MAX_WHOLE_PROMPT_CHARS)
            if tail is None:
                raise InputError(
                    f"the prompt ({len(text)} characters) has no space or newline after other text in its "
                    f"last {MAX_WHOLE_PROMPT_CHARS} characters, so truncate='left' would have to tokenize all of "
                    "it; pass a shorter tail of it",
                    param="prompt",
                )
            return bos + tail
        at_least = self.tokenizer.min_tokens(text) + len(bos)
        if at_least > room:
            raise InputError(self._too_long(f"at least {at_least}", options.max_new_tokens), param="prompt")
        return self.tokenizer.to_tokens(text, options.prepend_bos)

    def _too_long(self, tokens: str, max_new_tokens: int) -> str:
        return (
            f"the prompt has {tokens} tokens and {max_new_tokens} new tokens are asked for, past the "
            f"{self.n_positions}-token context; shorten it, lower max_new_tokens or use truncate='left' "
            "(--truncate left)"
        )  # fmt: skip

    # -- scoring ---------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Full-sequence logits, (batch, seq, vocab) float32; a flat list counts as batch 1.
        Raises InputError for ids that are not ints in the vocabulary, ragged or empty rows, more
        rows than max_batch, sequences past the context, or more than 1 GiB of logits."""
        rows = inputs.token_rows("tokens", tokens, self.vocab_size, self.session.max_batch)
        batch, seq = len(rows), len(rows[0])
        if seq > self.n_positions:
            raise InputError(
                f"tokens has {seq} ids a row, past the {self.n_positions}-token context; pass fewer",
                param="tokens",
            )
        if batch * seq * self.vocab_size > MAX_LOGITS:
            gib = batch * seq * self.vocab_size * 4 / 2**30
            raise InputError(
                f"tokens of {batch} x {seq} ids would return {gib:.1f} GiB of logits; pass fewer rows",
                param="tokens",
            )
        with self._lock:  # between the scheduler's bursts: the session is one
            return self.session.full_logits(np.array(rows, dtype=np.int64))

    def run_with_cache(self, tokens, names_filter: NamesFilter = None,
                       remove_batch_dim: bool = False) -> tuple[np.ndarray, ActivationCache]:  # fmt: skip
        """TransformerLens's `logits, cache = model.run_with_cache(tokens)` on the inspection graph
        (a folder exported with --inspect): logits (batch, seq, vocab) float32 and a cache of
        numpy arrays under TransformerLens's names and shapes (engine/activations.py), such as
        cache["blocks.0.attn.hook_pattern"] (batch, head, query, key) or cache["pattern", 0].
        tokens: ids as `logits` takes them (a list, a 2-D array or tensor of equal rows), a text
        (BOS prepended), or a list of texts (right-padded with <|endoftext|>, as TransformerLens's
        to_tokens pads). Attention is causal over each whole row, positions 0..seq-1.
        names_filter: None (every name), a name, a list of names, or a predicate of a name; only
        the outputs those need are copied out. remove_batch_dim: drop the batch dim of a batch-1
        cache (TransformerLens's flag). fp16 folders give float16 activations (scores, pattern and
        logits float32). Raises ModelFolderError (the folder cannot inspect: the message has the
        export command) and InputError (bad tokens or names)."""
        rows = self._inspect_rows(tokens)
        if not isinstance(remove_batch_dim, bool):
            raise InputError(
                f"remove_batch_dim must be a bool, got {remove_batch_dim!r}", param="remove_batch_dim"
            )
        if remove_batch_dim and len(rows) != 1:
            raise InputError(
                f"remove_batch_dim needs a batch of one; tokens has {len(rows)} rows",
                param="remove_batch_dim",
            )
        logits, cache = self.inspector.run(np.array(rows, dtype=np.int64), names_filter)
        if remove_batch_dim:
            cache = ActivationCache({name: a[0] for name, a in cache.items()}, cache.n_layer)
        return logits, cache

    def _inspect_rows(self, tokens) -> list[list[int]]:
        if isinstance(tokens, str):
            rows = [self.tokenizer.to_tokens(tokens, True)]
        elif isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
            rows = [self.tokenizer.to_tokens(t, True) for t in tokens]
            longest = max(map(len, rows))
            rows = [r + [self.manifest.config.eos_token_id] * (longest - len(r)) for r in rows]
        else:
            if hasattr(tokens, "__array__") and not isinstance(tokens, np.ndarray):
                tokens = np.asarray(tokens)  # a torch tensor, as TransformerLens users hold them
            rows = inputs.token_rows("tokens", tokens, self.vocab_size, MAX_INSPECT_ROWS)
        n_positions = self.manifest.config.n_positions
        if len(rows[0]) > n_positions:
            raise InputError(
                f"tokens has {len(rows[0])} ids a row, past the model's {n_positions} positions; pass fewer",
                param="tokens",
            )
        return rows

    def score(self, text: str, prepend_bos: bool = True, stride: int | None = None) -> Score:
        """Per-token log-probs of `text` and its perplexity (over every token after the first).
        A text longer than the context is scored with a sliding window of the whole context that
        moves `stride` tokens at a time (default: half the context): each token is scored once,
        with the longest context a window gives it (as transformers' perplexity guide does). With
        stride equal to the context, the windows do not overlap and each window's first token has
        nothing before it: it is not scored (nan in logprobs), as in that guide.
        Raises InputError for a non-str text, a bad stride, or fewer than two tokens."""
        text, prepend_bos = inputs.text("text", text), inputs.check("prepend_bos", prepend_bos)
        window = self.n_positions
        stride = (
            window // 2
            if stride is None
            else inputs.Count(1, window, f"an integer from 1 to {window}")("stride", stride)
        )
        ids = self.tokenizer.to_tokens(text, prepend_bos)
        if len(ids) < 2:
            raise InputError(
                "scoring needs at least two tokens; pass a longer text (or keep the BOS)", param="text"
            )
        windows, scored, begin = [], 0, 0  # (begin, first token to score, end); tokens [0, scored) are done
        while scored < len(ids):
            end = min(begin + window, len(ids))
            windows.append((begin, max(scored, begin + 1), end))
            scored, begin = end, begin + stride
        logprobs = np.full(len(ids) - 1, np.nan)
        rows = max(1, min(self.session.max_batch, SCORE_LOGITS // (window * self.vocab_size)))
        for group in _alike_runs(windows, rows):  # several windows a run: a GEMM, not GEMVs
            keep = group[0][2] - group[0][1] + 1  # logits only where they score a token (and the last)
            with self._lock:  # between the scheduler's bursts: the session is one
                logits = self.session.full_logits(
                    np.array([ids[b:e] for b, _, e in group], np.int64), keep=keep
                )
            for row, (_, first, e) in enumerate(group):
                logprobs[first - 1 : e - 1] = token_logprobs(logits[row, :-1], ids[first:e])[0]
        return Score(ids, self.tokenizer.to_str_tokens(ids), logprobs, float(np.exp(-np.nanmean(logprobs))))


def _alike_runs(windows: list[tuple[int, int, int]], rows: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows (begin, first scored, end) of one length and as many scored tokens, at
    most `rows` at a time."""
    group: list[tuple[int, int, int]] = []
    for w in windows:
        shape = (w[2] - w[0], w[2] - w[1])
        if group and (len(group) == rows or shape != (group[0][2] - group[0][0], group[0][2] - group[0][1])):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def _texts(handle: RequestHandle) -> Iterator[str]:
    """A streamed request's text pieces; closing the iterator cancels the request."""
    try:
        for piece in handle:
            if piece.text:
                yield piece.text
    finally:
        handle.cancel()
