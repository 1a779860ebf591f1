"""A draft model for speculative decoding: a smaller exported model that proposes the next k
tokens of a slot, which the target verifies in one run (speculation.py has the acceptance rules).

The draft has its own session and shared cache, one row per slot of the target's batch (the same
row numbers), started with the target's batch. A row catches up on the tokens it has not seen
(the prompt at first, then the tokens kept since its last proposal) in one run, then proposes
one token a run; after the target's verification both caches take back what was not kept.
Loaded with `Engine.load(..., draft=DIR)`: the draft must share the target's tokenizer (every
token's id and text, BOS and EOS) and hold the engine's context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .clock import Clock
from .contract import ModelFolderError
from .model_folder import read_manifest
from .sampling import SamplingConfig
from .session import Session, SessionConfig
from .speculation import target_probs


class Draft:
    def __init__(
        self, folder: Path, target_folder: Path, target_vocab: dict, config: SessionConfig, max_seq: int
    ):
        manifest = read_manifest(folder)
        c = manifest.config
        if manifest.kv_cache != "shared":
            raise ModelFolderError(
                f"draft model {folder} has the {manifest.kv_cache} cache; export it with --kv-cache shared"
            )
        vocab = _vocab(folder / manifest.tokenizer_file)
        if vocab != target_vocab:
            differs = sorted(set(vocab.items()) ^ set(target_vocab.items()))[:1]
            raise ModelFolderError(
                f"draft model {folder} has another tokenizer than {target_folder} ({len(vocab)} tokens against "
                f"{len(target_vocab)}; first difference {differs}); a draft must share the target's tokenizer"
            )
        if c.n_positions < max_seq:
            raise ModelFolderError(
                f"draft model {folder} holds {c.n_positions} positions, fewer than the engine's {max_seq}; "
                f"load with max_seq={c.n_positions} or use a draft with the target's context"
            )
        self.folder, self.manifest = folder, manifest
        self.session = Session(folder, manifest, config)
        self.seen = np.zeros(config.max_batch, np.int64)  # tokens of each row in the draft's cache

    def start(self, batch: int, seq: int) -> None:
        self.session.start(batch, seq, Clock())
        self.seen[:] = 0

    def admit(self, row: int) -> None:
        """A new request in `row`: the draft has seen none of it."""
        self.seen[row] = 0
        self.session.set_length(row, 0)

    def propose(self, row: int, history: list[int], k: int, sampling: SamplingConfig,
                rng: np.random.Generator | None) -> tuple[list[int], np.ndarray | None]:  # fmt: skip
        """k tokens after `history` (prompt, made tokens, the pending one last): greedy, or drawn
        from the draft's distribution under `sampling` (returned too: (k, vocab), for the rule)."""
        greedy = sampling.greedy
        feed, drafts, qs = history[self.seen[row] :], [], []
        self.session.set_length(row, int(self.seen[row]))
        for _ in range(k):
            argmax, logits = self.session.verify(row, feed, logits=not greedy, last=1)
            self.seen[row] += len(feed)
            if greedy:
                token = int(argmax[-1])
            else:
                q = target_probs(logits[-1:], sampling)[0]
                qs.append(q)
                token = int(min(np.searchsorted(np.cumsum(q), rng.random(), side="right"), len(q) - 1))
            drafts.append(token)
            feed = [token]
        return drafts, (np.stack(qs) if qs else None)

    def kept(self, row: int, length: int) -> None:
        """The target kept `length` tokens of the row in all: the draft's cache past them is void."""
        self.seen[row] = min(int(self.seen[row]), length)
        self.session.set_length(row, int(self.seen[row]))


def _vocab(path: Path) -> dict:
    """token -> id, with the added tokens, from a tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ModelFolderError(
            f"{path} is not a valid tokenizer.json ({e}); re-export the model folder"
        ) from e
