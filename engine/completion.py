"""A request's new tokens and its result: `Continuation` takes each new token (text held back while it may
be the start of a stop string; the reason it ends), `Completion` is what the caller gets.
The decode loop that feeds them is the scheduler's (scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import StreamDecoder


@dataclass
class Completion:
    prompt: str
    prompt_token_ids: list[int]  # with the BOS when one was prepended
    token_ids: list[int]  # new tokens only (an EOS that ended the row included)
    text: str  # new text only, cut before a stop string
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    beams: list[BeamResult] | None = None  # beam search: the best num_return_sequences, best first


@dataclass
class BeamResult:
    """One hypothesis of a beam search (Completion.beams): the first is the completion's own."""

    token_ids: list[int]  # new tokens (an EOS that ended it included)
    text: str
    score: float  # summed log-probabilities / generated length ** length_penalty (transformers')
    finish_reason: str  # "eos" | "length"


@dataclass
class Continuation:
    """What a request has generated so far. `push` holds back text that might be the start of a
    stop string. A continuation without a decoder (nobody streams it, no stop strings) only
    collects token ids: its text is made in one call once they are all in
    (Tokenizer.completion_text)."""

    decoder: StreamDecoder | None
    stop: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None

    def push(self, token: int, eos_id: int, max_new_tokens: int) -> str:
        """Add a token; return the text that is now final."""
        self.token_ids.append(token)
        if token == eos_id:
            self.finish_reason = "eos"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            for s in self.stop:
                if (at := self.text.find(s, max(0, self.emitted - len(s)))) >= 0:
                    self.text, self.finish_reason = self.text[:at], "stop"
        if self.finish_reason is None and len(self.token_ids) >= max_new_tokens:
            self.finish_reason = "length"
        if self.decoder is None:
            return ""
        final = len(self.text) if self.finish_reason or not self.stop else len(self.text) - self._held()
        piece, self.emitted = self.text[self.emitted : final], max(self.emitted, final)
        return piece

    def _held(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        return max(
            (
                n
                for s in self.stop
                for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                if s.startswith(self.text[-n:])
            ),
            default=0,
        )
