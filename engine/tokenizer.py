"""Tokenization with `tokenizers` (the model folder's tokenizer.json), and streaming detokenization.

GPT-2 has no real BOS token: `<|endoftext|>` is prepended by convention, as the GPT-2
walkthroughs do, so the first real token has something to attend to.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from tokenizers.decoders import DecodeStream

from .contract import ModelFolderError

MAX_TOKENIZER_BYTES = 64 << 20


class Tokenizer:
    def __init__(self, path: str | Path, bos_token_id: int, eos_token_id: int):
        size = Path(path).stat().st_size
        if size > MAX_TOKENIZER_BYTES:  # GPT-2's is 2 MB; a huge file would be read whole
            raise ModelFolderError(
                f"{path} is {size} bytes, more than a tokenizer's {MAX_TOKENIZER_BYTES}; put the model's own tokenizer.json in the folder"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelFolderError(
                f"{path} is not a valid tokenizer.json ({e}); re-export the model folder"
            ) from e
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.max_token_bytes, self.cuttable = byte_level_bounds(self._tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def vocab(self) -> dict[str, int]:
        """Every token's text -> its id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_tokens(self, text: str, prepend_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if prepend_bos else ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(to_tokens(text, False)) that costs nothing: every byte of the text
        lands in one token of at most max_token_bytes bytes. 0 when the tokenizer is not a plain
        byte-level BPE (a normalizer or pre-tokenizer may drop text)."""
        return -(-len(text) // self.max_token_bytes) if self.max_token_bytes else 0

    def last_tokens(self, text: str, n: int, max_chars: int) -> list[int] | None:
        """to_tokens(text, False)[-n:], tokenizing only a tail of a long text.

        GPT-2's pre-tokenizer splits text into words that BPE encodes one by one, and a space, tab
        or newline right after a non-space always starts a new word; encoding from such a cut gives
        exactly the tokens the whole text has from there on. A tail of n * max_token_bytes
        characters after the cut holds at least n tokens. Cuts are looked for in bands of growing
        size going back from there, within the last max_chars characters; without one (a giant
        word), or with another kind of tokenizer, a text of up to max_chars characters is encoded
        whole, and None is returned for a longer one."""
        need = n * (self.max_token_bytes or 0)
        if self.cuttable and len(text) > 2 * need:
            floor = max(0, len(text) - max_chars)
            lo, hi = max(floor, len(text) - 2 * need), len(text) - need + 1  # a cut at c: c <= len - need
            while True:
                cut = CUT.search(text, lo, hi)
                if cut:
                    return self.to_tokens(text[cut.start() + 1 :], prepend_bos=False)[-n:]
                if lo == floor:
                    break
                lo, hi = max(floor, 2 * lo - len(text)), lo + 1  # the next band, twice as far back
        return self.to_tokens(text, prepend_bos=False)[-n:] if len(text) <= max_chars else None

    def to_str_tokens(self, text: str | list[int], prepend_bos: bool = True) -> list[str]:
        """One string per token; a token holding part of a multi-byte character shows as U+FFFD."""
        ids = self.to_tokens(text, prepend_bos) if isinstance(text, str) else list(text)
        return [self._tok.decode([i], skip_special_tokens=False) for i in ids]

    def to_string(self, ids: list[int]) -> str:
        """Text of the ids, special tokens included (as the walkthrough shows them)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def completion_text(self, ids: list[int]) -> str:
        """The text a StreamDecoder fed `ids` gives in all, in one call: the same as a full decode
        unless that ends mid-character, a tail the stream holds back (then the stream's own)."""
        text = self._tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            decoder = self.decode_stream()
            text = "".join(decoder.push(i) for i in ids)
        return text

    def decode_stream(self) -> StreamDecoder:
        return StreamDecoder(self._tok)


# A cut: a space, tab or newline after a character that is not whitespace. Python's \s (plus
# U+180E) covers every character that onig's \s (the pre-tokenizer's regex) counts as a space, so
# the character before is never a space to the pre-tokenizer, and [ \t\n\r] always is one.
CUT = re.compile(r"[^\s\u180e][ \t\n\r]")


def byte_level_bounds(tok: HFTokenizer) -> tuple[int | None, bool]:
    """(the most bytes of text one token covers, whether texts may be cut at CUT) for a plain
    byte-level BPE like GPT-2's; (None, False) for any other tokenizer.

    Plain: no normalizer; the ByteLevel pre-tokenizer (each byte one character of its alphabet,
    none dropped); a BPE holding the whole alphabet, so every byte is in some token and a token
    of k characters covers k bytes; added tokens that absorb no whitespace around them. Cuts
    further need GPT-2's split (use_regex, no prefix space) and added tokens without whitespace,
    so that no cut falls inside one."""
    byte_level = isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel) and isinstance(tok.model, models.BPE)
    if tok.normalizer is not None or not byte_level:
        return None, False
    vocab = tok.get_vocab(with_added_tokens=False)
    added = list(tok.get_added_tokens_decoder().values())
    whole_alphabet = all(ch in vocab for ch in pre_tokenizers.ByteLevel.alphabet())
    if not whole_alphabet or any(a.lstrip or a.rstrip for a in added):
        return None, False
    longest = max([len(t) for t in vocab] + [len(a.content.encode()) for a in added])
    split = tok.pre_tokenizer.use_regex and not tok.pre_tokenizer.add_prefix_space
    return longest, split and not any(re.search(r"\s", a.content) for a in added)


class StreamDecoder:
    """Turns token ids into text pieces one at a time, never splitting a UTF-8 character:
    a token that ends mid-character gives "" until the character is complete."""

    def __init__(self, tok: HFTokenizer):
        self._tok, self._stream = tok, DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
