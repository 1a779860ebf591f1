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

import numpy as np
import onnxruntime as ort

from .binding import Binding
from .cuda_graphs import CudaGraphs
from .device_sampling import matches_host, row_params
from .sampling import SamplingConfig, next_tokens


class HostPicker:
    def __init__(
        self, sampling: SamplingConfig, rng: np.random.Generator, prompts: list[list[int]], vocab: int
    ):
        self.sampling, self.rng = sampling, rng
        self.seen = self.counts = None  # (batch, vocab): tokens in the prompt or made; tokens made
        if sampling.uses_history:
            self.seen = np.zeros((len(prompts), vocab), dtype=bool)
            self.counts = np.zeros((len(prompts), vocab), dtype=np.int32)
            for r, prompt in enumerate(prompts):
                self.admit(r, prompt)

    def admit(self, row: int, prompt: list[int]) -> None:
        """A new prompt in `row`: its history starts from the prompt."""
        if self.seen is not None:
            self.seen[row], self.counts[row] = False, 0
            self.seen[row, prompt] = True

    def bind(self, binding: Binding, outputs, rows: int) -> None:
        outputs.bind(binding, "logits", rows)

    def pick(self, outputs, n: int, first: int = 0, bucket: int | None = None) -> np.ndarray:
        logits = outputs.read("logits", n)[:, 0]  # (n, vocab)
        rows = slice(first, first + n)
        seen, counts = (None, None) if self.seen is None else (self.seen[rows], self.counts[rows])
        tokens = next_tokens(logits, self.sampling, self.rng, seen, counts)
        if seen is not None:
            r = np.arange(n)
            seen[r, tokens], counts[r, tokens] = True, counts[r, tokens] + 1
        return tokens


class ArgmaxPicker:
    def admit(self, row: int, prompt: list[int]) -> None:
        pass

    def bind(self, binding: Binding, outputs, rows: int) -> None:
        outputs.bind(binding, "next_token", rows)

    def pick(self, outputs, n: int, first: int = 0, bucket: int | None = None) -> np.ndarray:
        return outputs.read("next_token", n)[:, 0]


class DeviceSamplingPicker:
    """Runs the sampling graph (its own onnxruntime session, on the model's device) after each
    step, with one row of `params` per batch row and a uniform draw per row from `rng`."""

    def __init__(self, session: ort.InferenceSession, binding: Binding, graphs: CudaGraphs,
                 sampling: SamplingConfig, rng: np.random.Generator, batch: int):  # fmt: skip
        self.session, self.binding, self.graphs, self.rng = session, binding, graphs, rng
        self.params = row_params(sampling, batch)  # (batch, 4)
        self.draws = not sampling.greedy
        self._uploaded: tuple | None = None  # (outputs, rows) whose params are on the device

    def admit(self, row: int, prompt: list[int]) -> None:
        pass

    def bind(self, binding: Binding, outputs, rows: int) -> None:
        """The model's logits stay on the device, where the sampling graph reads them."""
        outputs.bind(binding, "logits", rows, on_device=True)
        dev, host, device = outputs.dev, outputs.host, outputs.device
        if self._uploaded != (outputs, rows):  # one batch's settings: every row alike
            host["params"][:rows] = 0  # padding rows of a bucket: greedy
            host["params"][: min(rows, len(self.params))] = self.params[:rows]
            dev["params"].update_inplace(host["params"])
            self._uploaded = (outputs, rows)
        s = self.binding
        s.input("logits", device, np.float32, (rows, outputs.vocab_size), dev["logits"].data_ptr())
        s.input("params", device, np.float32, (rows, 4), dev["params"].data_ptr())
        s.input("uniform", device, np.float64, (rows,), dev["uniform"].data_ptr())
        token = dev["token"] if outputs.token_on_device else host["token"]
        ptr = token.data_ptr() if outputs.token_on_device else token.ctypes.data
        s.output("token", device if outputs.token_on_device else "cpu", np.int64, (rows,), ptr)

    def pick(self, outputs, n: int, first: int = 0, bucket: int | None = None) -> np.ndarray:
        outputs.host["uniform"][:n] = self.rng.random(n) if self.draws else 0.0
        outputs.dev["uniform"].update_inplace(outputs.host["uniform"])
        self.graphs.run("sampling", self.session, self.binding, bucket)
        return outputs.read("token", n)


def choose_picker(session, sampling: SamplingConfig, rng: np.random.Generator, prompts: list[list[int]]):
    """The graph's argmax for greedy rows when it has one; the sampling graph when the session has
    it and it picks exactly what the host would (device_sampling.matches_host); numpy otherwise."""
    if matches_host(sampling):
        if sampling.greedy and session.has_argmax:
            return ArgmaxPicker()
        if session.sampling_graph is not None:
            return DeviceSamplingPicker(session.sampling_graph, session.sampling_binding, session.graphs,
                                        sampling, rng, len(prompts))  # fmt: skip
    return HostPicker(sampling, rng, prompts, session.vocab_size)
