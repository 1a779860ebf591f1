"""A draft model for speculative decoding: a smaller exported model that proposes the next k
tokens of a slot, which the target verifies in one run (speculation.py has the acceptance rules).

The draft has its own session and shared cache, one row per slot of the target's batch (the same
row numbers), started with the target's batch. A row catches up on the tokens it has not seen
(the prompt at first, then the tokens kept since its last proposal) in one run, then proposes
one token a run; after the target's verification both caches take back what was not kept.
Loaded with `Engine.load(..., draft=DIR)`: the draft must share the target's tokenizer (every
token's id and text, BOS and EOS) and hold the engine's context.

Whether it pays. A step proposing k tokens costs k draft runs and one verification over k + 1
positions, and makes 1 to k + 1 tokens. On this project's 2-core CPU the pairs we can measure
do not pay reliably (docs/engine.md, "A draft model": 0.61-1.39x for drafts whose run costs
27-49% of the target's, 80-96% kept). A draft about a fifth of the target's cost or less (a
large target, a small draft) is what pays, so `step_cost` is measured at load and the engine
makes the draft every greedy call's default only at or below DRAFT_PAYS; any call can still
ask for it (draft_tokens).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .clock import Clock
from .contract import ModelFolderError
from .model_folder import read_manifest
from .sampling import SamplingConfig, sample_from
from .session import Session, SessionConfig
from .speculation import target_probs

DRAFT_PAYS = 0.2  # a draft run's time over the target's, at most which calls use it by default


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

    def step_cost(self, target: Session) -> float:
        """A draft run's time over the target's: one token at batch 1, the median of 5 runs each
        after a warm-up, taken in turns."""
        ids, times = np.zeros((1, 1), np.int64), {id(target): [], id(self.session): []}
        for _ in range(6):
            for session in (target, self.session):
                t0 = time.perf_counter()
                session.full_logits(ids)
                times[id(session)].append(time.perf_counter() - t0)
        target_s, draft_s = (float(np.median(times[id(s)][1:])) for s in (target, self.session))
        return draft_s / target_s

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
                token = int(sample_from(q[None], [rng])[0])
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
