"""Tokenization with `tokenizers` (the model folder's tokenizer.json), and streaming detokenization.

GPT-2 has no real BOS token: `<|endoftext|>` is prepended by convention, as the GPT-2
walkthroughs do, so the first real token has something to attend to.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .contract import ModelFolderError

MAX_TOKENIZER_BYTES = 64 << 20


class Tokenizer:
    def __init__(self, path: str | Path, bos_token_id: int, eos_token_id: int):
        size = Path(path).stat().st_size
        if size > MAX_TOKENIZER_BYTES:  # GPT-2's is 2 MB; a huge file would be read whole
            raise ModelFolderError(f"{path} is {size} bytes, more than a tokenizer's {MAX_TOKENIZER_BYTES}; put the model's own tokenizer.json in the folder")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelFolderError(f"{path} is not a valid tokenizer.json ({e}); re-export the model folder") from e
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_tokens(self, text: str, prepend_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if prepend_bos else ids

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

    def decode_stream(self) -> "StreamDecoder":
        return StreamDecoder(self._tok)


class StreamDecoder:
    """Turns token ids into text pieces one at a time, never splitting a UTF-8 character:
    a token that ends mid-character gives "" until the character is complete."""

    def __init__(self, tok: HFTokenizer):
        self._tok, self._stream = tok, DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
