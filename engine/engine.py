"""`Engine`: the public API apps embed. Loads a model folder; generates, streams and scores.

An Engine owns one onnxruntime session and its buffers, so it is not thread-safe: a second
call while one is running (from another thread, or while a stream is still open) raises
EngineBusyError at once instead of corrupting the cache. Use one Engine per thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract import ModelFolderError, UserError
from .generate import Row, Timing, decode_batch
from .model_folder import check_tokenizer, read_manifest
from .sampling import SamplingConfig, softmax
from .session import SessionConfig, open_session
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineBusyError(UserError, RuntimeError):
    pass


@dataclass
class Completion:
    prompt: str
    prompt_token_ids: list[int]  # with the BOS when one was prepended
    token_ids: list[int]  # new tokens only (an EOS that ended the row included)
    text: str  # new text only, cut before a stop string
    finish_reason: str  # "length" | "stop" | "eos"


@dataclass
class Generation:
    completions: list[Completion]
    timing: dict[str, float] = field(default_factory=dict)  # prefill_ms, decode_ms_per_token, tokens_per_s
    details: Timing | None = None  # per-step times, for benchmarks


@dataclass
class Score:
    tokens: list[int]
    str_tokens: list[str]
    logprobs: np.ndarray  # (len(tokens) - 1,): log p(token[i+1] | tokens[:i+1])
    perplexity: float


class Engine:
    def __init__(self, folder: Path, config: SessionConfig):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        c = self.manifest.config
        tokenizer_path = self.folder / self.manifest.tokenizer_file
        self.tokenizer = Tokenizer(tokenizer_path, c.bos_token_id, c.eos_token_id)
        check_tokenizer(self.tokenizer, c, tokenizer_path)
        self.session = open_session(self.folder, self.manifest, config)  # checks the graph against the manifest
        self._probe()
        self._lock = threading.Lock()
        if self.manifest.source.random_init:
            log.info("%s holds RANDOM weights (%s, seed %s): its text is meaningless", self.folder, self.manifest.source.checkpoint, self.manifest.source.seed)

    def _probe(self) -> None:
        """One token through the graph at load, at the last position the manifest promises: a folder
        whose graph cannot run, has fewer positions or gives no finite logits fails here with the
        fix, not at a later generate with onnxruntime's error."""
        c = self.manifest.config
        try:
            logits = self.session.full_logits(np.array([[c.bos_token_id]], dtype=np.int64), c.n_positions - 1)
        except Exception as e:  # onnxruntime raises its own untyped errors
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ModelFolderError(f"{self.folder}: the graph fails on one token ({first}); re-export the model folder") from e
        if logits.shape != (1, 1, c.vocab_size) or not np.isfinite(logits).all():
            raise ModelFolderError(f"{self.folder}: the graph gives logits of shape {logits.shape} (finite: {bool(np.isfinite(logits).all())}) for one token, expected (1, 1, {c.vocab_size}) and finite; re-export the model folder")

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", max_batch: int = 8, max_seq: int | None = None, threads: int | None = None, device_sampling: bool | None = None, static_decode: bool | None = None) -> "Engine":
        """Load a model folder. device_sampling: pick tokens with the sampling graph; static_decode:
        decode steps of fixed shapes, captured as CUDA graphs (in-place cache only). Both default
        to on with the CUDA provider, off on the CPU.
        Raises ModelFolderError (missing/corrupt folder), ProviderError (cuda unavailable)."""
        return cls(Path(path), SessionConfig(provider=provider, max_batch=max_batch, max_seq=max_seq, threads=threads, device_sampling=device_sampling, static_decode=static_decode))

    @property
    def provider(self) -> str:
        return self.session.device

    @property
    def n_positions(self) -> int:
        """The context this engine serves: the model's n_positions, or less when max_seq says so."""
        return self.session.max_seq

    # -- tokenization ----------------------------------------------------------------------
    def to_tokens(self, text: str, prepend_bos: bool = True) -> list[int]:
        return self.tokenizer.to_tokens(text, prepend_bos)

    def to_str_tokens(self, text: str | list[int], prepend_bos: bool = True) -> list[str]:
        return self.tokenizer.to_str_tokens(text, prepend_bos)

    def to_string(self, ids: Sequence[int]) -> str:
        return self.tokenizer.to_string(list(ids))

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32, *, stop: str | Sequence[str] = (), prepend_bos: bool = True, truncate: str | None = None, ignore_eos: bool = False, **sampling) -> Generation:
        """Complete each prompt. Sampling keywords are SamplingConfig's (greedy by default);
        ignore_eos=True always generates max_new_tokens (benchmarks).

        Raises ValueError for bad settings, an empty prompt without BOS, or a prompt that does
        not fit the context (unless truncate="left" drops its oldest tokens)."""
        prompts = [prompts] if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))) else list(prompts)
        rows, timing = [], Timing()
        for _ in self._run(prompts, max_new_tokens, stop, prepend_bos, truncate, sampling, rows, timing, ignore_eos, streaming=False):
            pass
        completions = [Completion(p if isinstance(p, str) else self.to_string(r.prompt_ids), r.prompt_ids, r.token_ids, r.text, r.finish_reason) for p, r in zip(prompts, rows)]
        return Generation(completions, timing.as_dict(), timing)

    def stream(self, prompt: str, max_new_tokens: int = 32, *, stop: str | Sequence[str] = (), prepend_bos: bool = True, truncate: str | None = None, **sampling) -> Iterator[str]:
        """Yield the completion's text piece by piece; breaking out of the loop stops generation."""
        for _, piece in self._run([prompt], max_new_tokens, stop, prepend_bos, truncate, sampling, [], Timing()):
            yield piece

    def _run(self, prompts, max_new_tokens, stop, prepend_bos, truncate, sampling, rows_out, timing, ignore_eos=False, streaming=True) -> Iterator[tuple[int, str]]:
        cfg = SamplingConfig(**sampling)
        self._check_request(cfg, max_new_tokens, truncate)
        stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
        prompt_ids = [self._prompt_tokens(p, prepend_bos, max_new_tokens, truncate) for p in prompts]
        rng = np.random.default_rng(cfg.seed)
        eos = -1 if ignore_eos else self.manifest.config.eos_token_id
        with self._exclusive():
            for start in range(0, len(prompts), self.session.max_batch):
                # Text as tokens come only when someone reads it (a stream) or stop strings need it.
                text_per_step = streaming or bool(stop)
                rows = [Row(ids, self.tokenizer.decode_stream() if text_per_step else None, stop) for ids in prompt_ids[start : start + self.session.max_batch]]
                rows_out.extend(rows)
                for r, piece in decode_batch(self.session, rows, max_new_tokens, cfg, rng, eos, timing):
                    yield start + r, piece
                if not text_per_step:
                    t0 = time.perf_counter()
                    for row in rows:
                        row.text = self.tokenizer.completion_text(row.token_ids[:-1] if row.finish_reason == "eos" else row.token_ids)
                    timing.text_s += time.perf_counter() - t0

    def _prompt_tokens(self, prompt: str | Sequence[int], prepend_bos: bool, max_new_tokens: int, truncate: str | None) -> list[int]:
        """A prompt's ids: text is tokenized (BOS prepended unless prepend_bos=False), ids are taken as they are."""
        if isinstance(prompt, str):
            ids = self.tokenizer.to_tokens(prompt, prepend_bos)
        else:
            ids = self._token_array(prompt)[0].tolist() if len(prompt) else []
        if not ids:
            raise ValueError("the prompt is empty; pass some text, or keep the BOS token (drop --no-bos) to generate from nothing")
        room = self.n_positions - max_new_tokens
        if len(ids) > room:
            if truncate != "left":
                raise ValueError(f"the prompt has {len(ids)} tokens and {max_new_tokens} new tokens are asked for, past the {self.n_positions}-token context; shorten it, lower max_new_tokens or use truncate='left' (--truncate left)")
            ids = ids[len(ids) - room :]
        return ids

    def _check_request(self, cfg: SamplingConfig, max_new_tokens: int, truncate: str | None) -> None:
        """The settings of one call, checked once before any prompt is looked at."""
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if max_new_tokens >= self.n_positions:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {self.n_positions}-token context")
        if truncate not in (None, "left"):
            raise ValueError(f"truncate must be None or 'left', got {truncate!r}")
        bad = [t for t in cfg.logit_bias if not 0 <= int(t) < self.manifest.config.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.manifest.config.vocab_size})")

    @contextmanager
    def _exclusive(self):
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("this Engine is already running a call (another thread, or an open stream); Engine is not thread-safe, use one per thread")
        try:
            yield
        finally:
            self._lock.release()

    # -- scoring ---------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Full-sequence logits, (batch, seq, vocab) float32; a flat list counts as batch 1.
        Raises ValueError for ids outside the vocabulary, ragged rows or sequences past the context."""
        ids = self._token_array(tokens)
        if ids.shape[1] > self.n_positions:
            raise ValueError(f"{ids.shape[1]} tokens exceed the {self.n_positions}-token context")
        with self._exclusive():
            return self.session.full_logits(ids)

    def _token_array(self, tokens) -> np.ndarray:
        """(batch, seq) int64 ids, checked against the vocabulary; a flat list is batch 1."""
        try:
            ids = np.asarray(tokens, dtype=np.int64)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"tokens must be a list of token ids or equal-length lists of them ({e})") from e
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty list of ids or a (batch, seq) array, got shape {ids.shape}")
        vocab = self.manifest.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)]
            raise ValueError(f"token ids {bad[:5].tolist()} are outside the vocabulary [0, {vocab})")
        return ids

    def score(self, text: str, prepend_bos: bool = True) -> Score:
        """Per-token log-probs of `text` and its perplexity (over every token after the first)."""
        ids = self.to_tokens(text, prepend_bos)
        if len(ids) < 2:
            raise ValueError("scoring needs at least two tokens; pass a longer text (or keep the BOS)")
        logits = self.logits(ids)[0].astype(np.float64)
        logprobs = np.log(softmax(logits[:-1]))[np.arange(len(ids) - 1), ids[1:]]
        return Score(ids, self.to_str_tokens(ids), logprobs, float(np.exp(-logprobs.mean())))
