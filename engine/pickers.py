"""Token pickers: who turns a step's output into the next token ids.

- `HostPicker`: the step's logits come to the host and `sampling.next_tokens` picks (every
  setting, penalties and logit bias included, which need the token history kept here).
- `ArgmaxPicker`: the shared graph's own greedy argmax (`next_token`); only the ids come back.
- `DeviceSamplingPicker`: the sampling graph (device_sampling.py) reads the logits where the model
  wrote them and only the ids come back; one uniform draw per row goes the other way.

Each binds the outputs it needs (`bind`) and returns ids (`pick`), so the session's prefill and
decode always return token ids. `choose_picker` is the one place that decides which picks.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnxruntime as ort

from .binding import Binding
from .cuda_graphs import GraphRunner
from .device_sampling import matches_host, row_params
from .sampling import SamplingConfig, sample_rows


class RowSampling:
    """Each row's sampling settings and random generator, the sampling graph's row of `params`,
    and the token history that penalties need: filled when a prompt enters a row (`admit`)."""

    def __init__(self, batch: int, vocab: int):
        self.vocab = vocab
        self.configs = [GREEDY] * batch
        self.rngs: list[np.random.Generator | None] = [None] * batch
        self.params = np.zeros((batch, 4), dtype=np.float32)  # device_sampling.row_params per row
        self.seen: np.ndarray | None = None  # (batch, vocab): tokens in the prompt or made so far
        self.counts: np.ndarray | None = None  # (batch, vocab): tokens made so far
        self.version = 0  # changes with every admit: the sampling graph's params are uploaded again

    def admit(
        self, row: int, prompt: list[int], cfg: SamplingConfig, rng: np.random.Generator | None
    ) -> None:
        self.configs[row], self.rngs[row] = cfg, rng
        self.params[row] = row_params(cfg, 1)[0]
        if cfg.uses_history and self.seen is None:
            self.seen = np.zeros((len(self.configs), self.vocab), dtype=bool)
            self.counts = np.zeros((len(self.configs), self.vocab), dtype=np.int32)
        if self.seen is not None:
            self.seen[row], self.counts[row] = False, 0
            self.seen[row, prompt] = True
        self.version += 1

    def free(self, row: int) -> None:
        self.admit(row, [], GREEDY, None)

    def record(self, rows: slice, tokens: np.ndarray) -> None:
        """The tokens just picked for `rows`, into their history."""
        if self.seen is not None:
            r = np.arange(rows.start, rows.stop)
            self.seen[r, tokens], self.counts[r, tokens] = True, self.counts[r, tokens] + 1

    def record_row(self, row: int, tokens: list[int]) -> None:
        """Several tokens of one row, in order (a speculative step's), into its history."""
        if self.seen is not None:
            for token in tokens:
                self.seen[row, token], self.counts[row, token] = True, self.counts[row, token] + 1

    def history(self, row: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The row's (seen, counts), or (None, None) when no row keeps a history."""
        return (None, None) if self.seen is None else (self.seen[row], self.counts[row])

    @contextlib.contextmanager
    def aside(self, rows: list[int]):
        """Rows that sit a step out (a speculative row between rows that decode plainly): in it they
        pick greedily, draw nothing from their generator and record nothing in their history."""
        saved = [(r, self.configs[r], self.rngs[r]) for r in rows]
        history = None if self.seen is None else (self.seen[rows], self.counts[rows])  # copies
        for r in rows:
            self.configs[r], self.rngs[r] = GREEDY, None
        try:
            yield
        finally:
            for r, cfg, rng in saved:
                self.configs[r], self.rngs[r] = cfg, rng
            if history is not None:
                self.seen[rows], self.counts[rows] = history


GREEDY = SamplingConfig()


class HostPicker:
    def __init__(self, sampling: RowSampling):
        self.sampling = sampling

    def bind(self, binding: Binding, outputs, rows: int, first: int = 0) -> None:
        outputs.bind(binding, "logits", rows)

    def pick(self, outputs, n: int, first: int = 0, bucket: int | None = None) -> np.ndarray:
        logits = outputs.read("logits", n)[:, 0]  # (n, vocab)
        rows, sampling = slice(first, first + n), self.sampling
        seen, counts = (None, None) if sampling.seen is None else (sampling.seen[rows], sampling.counts[rows])
        tokens = sample_rows(logits, sampling.configs[rows], sampling.rngs[rows], seen, counts)
        sampling.record(rows, tokens)
        return tokens


class ArgmaxPicker:
    def bind(self, binding: Binding, outputs, rows: int, first: int = 0) -> None:
        outputs.bind(binding, "next_token", rows)

    def pick(self, outputs, n: int, first: int = 0, bucket: int | None = None) -> np.ndarray:
        return outputs.read("next_token", n)[:, 0]


class DeviceSamplingPicker:
    """Runs the sampling graph (its own onnxruntime session, on the model's device) after each
    step, with each row's `params` and a uniform draw per sampled row from its generator."""

    def __init__(
        self, session: ort.InferenceSession, binding: Binding, graphs: GraphRunner, sampling: RowSampling
    ):
        self.session, self.binding, self.graphs, self.sampling = session, binding, graphs, sampling
        self._uploaded: tuple | None = None  # (outputs, rows, first, settings version) on the device

    def bind(self, binding: Binding, outputs, rows: int, first: int = 0) -> None:
        """The model's logits stay on the device, where the sampling graph reads them."""
        outputs.bind(binding, "logits", rows, on_device=True)
        dev, host, ptrs, device = outputs.dev, outputs.host, outputs.dev_ptrs, outputs.device
        if self._uploaded != (outputs, rows, first, self.sampling.version):
            params = self.sampling.params[first : first + rows]
            host["params"][:rows] = 0  # padding rows of a bucket: greedy
            host["params"][: len(params)] = params
            dev["params"].update_inplace(host["params"])
            self._uploaded = (outputs, rows, first, self.sampling.version)
        s = self.binding
        s.input("logits", device, np.float32, (rows, outputs.vocab_size), ptrs["logits"])
        s.input("params", device, np.float32, (rows, 4), ptrs["params"])
        s.input("uniform", device, np.float64, (rows,), ptrs["uniform"])
        if outputs.token_on_device:
            s.output("token", device, np.int64, (rows,), ptrs["token"])
        else:
            s.output("token", "cpu", np.int64, (rows,), outputs.host_ptrs["token"])

    def pick(self, outputs, n: int, first: int = 0, bucket: int | None = None) -> np.ndarray:
        configs, rngs = self.sampling.configs, self.sampling.rngs
        uniform = outputs.host["uniform"]
        for i, r in enumerate(range(first, first + n)):
            uniform[i] = 0.0 if configs[r].greedy else rngs[r].random()
        outputs.dev["uniform"].update_inplace(uniform)
        self.graphs.run("sampling", self.session, self.binding, bucket)
        return outputs.read("token", n)


def choose_picker(session, sampling: RowSampling, rows: int):
    """Who picks for the first `rows` rows: the graph's argmax when every one is plain greedy and
    the graph has one; the sampling graph when the session has it and it picks exactly what the
    host would for every row (device_sampling.matches_host); numpy otherwise."""
    configs = sampling.configs[:rows]
    if all(matches_host(cfg) for cfg in configs):
        if all(cfg.greedy for cfg in configs) and session.has_argmax:
            return ArgmaxPicker()
        if session.sampling_session is not None:
            return DeviceSamplingPicker(
                session.sampling_session, session.sampling_binding, session.graphs, sampling
            )
    return HostPicker(sampling)
