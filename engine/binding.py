"""What a step binds: onnxruntime's IO binding, and the host buffers where a step's outputs land.

`Binding` is the one owner of what is bound to a session: it skips a bind identical to the one in
place (same device, type, shape and address), so a step rebinds only what changed and nobody
has to remember to invalidate anything. One exception, kept here: host memory whose values
changed (`host_values`). The CPU provider reads it where it is, but a GPU provider copies a host
input to the device when it is bound and keeps that copy (onnxruntime's IOBinding::BindInput;
onnxruntime #11133, #29782), so there new values reach the device only through a new bind.
`HostOutputs` holds the logits and ids of a step on the host, bound by pointer, and the sampling
graph's device-side buffers; the CUDA-graph cache has its own per batch bucket
(cuda_graphs.Bucket), with the same attributes.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class Binding:
    def __init__(self, session: ort.InferenceSession):
        self.io = session.io_binding()
        # whether a bound host input is copied to the device at bind time (any provider but the CPU's)
        self.copies_host_inputs = session.get_providers()[0] != "CPUExecutionProvider"
        self._bound: dict[tuple[str, bool], tuple] = {}  # (name, is output) -> (device, type, shape, address)
        self._groups: dict[str, tuple] = {}  # a group of names bound together -> how

    def input(self, name: str, device: str, dtype, shape: tuple, ptr: int) -> None:
        self._bind(name, False, device, dtype, shape, ptr)

    def output(self, name: str, device: str, dtype, shape: tuple, ptr: int) -> None:
        self._bind(name, True, device, dtype, shape, ptr)

    def host_input(self, name: str, array: np.ndarray) -> None:
        """Bind a host array whose values never change while it is bound (a constant)."""
        self._bind(name, False, "cpu", array.dtype.type, array.shape, array.ctypes.data)

    def host_values(self, name: str, dtype, shape: tuple, ptr: int) -> None:
        """Bind host memory whose values may have changed since its last bind: bound again every
        time where the provider copies host inputs at bind time (module docstring), skipped when
        bound so already on the CPU provider, which reads the memory itself."""
        if self.copies_host_inputs:
            self._bound.pop((name, False), None)
        self._bind(name, False, "cpu", dtype, shape, ptr)

    @property
    def outputs(self) -> dict[str, tuple[str, int]]:
        """The outputs bound now: name -> (device, address)."""
        return {name: (key[0], key[3]) for (name, output), key in self._bound.items() if output}

    def group(self, group: str, output: bool, names: list[str], device: str, dtype, shape: tuple,
              ptrs: list[int]) -> None:  # fmt: skip
        """Bind many names of one shape at once (a cache's 2 x n_layer pasts or presents): skipped
        with one comparison when bound so already. Names bound through a group are bound only so."""
        key = (output, device, dtype, shape, ptrs[0])
        if self._groups.get(group) == key:
            return
        bind = self.io.bind_output if output else self.io.bind_input
        for name, ptr in zip(names, ptrs):
            bind(name, device, 0, dtype, shape, ptr)
        self._groups[group] = key

    def clear_outputs(self) -> None:
        self.io.clear_binding_outputs()
        self._bound = {key: v for key, v in self._bound.items() if not key[1]}
        self._groups.clear()

    def _bind(self, name: str, output: bool, device: str, dtype, shape: tuple, ptr: int) -> None:
        key = (device, dtype, shape, ptr)
        if self._bound.get((name, output)) == key:
            return
        (self.io.bind_output if output else self.io.bind_input)(name, device, 0, dtype, shape, ptr)
        self._bound[(name, output)] = key


class HostOutputs:
    """A step's logits (rows, 1, vocab) and the graph's argmax ids (rows, 1) in host buffers for
    max_batch rows; with the sampling graph, its device buffers (the model's logits stay on the
    device, where it reads them) and host mirrors for `update_inplace`."""

    token_on_device = False  # the sampling graph writes its ids straight to the host

    def __init__(self, vocab_size: int, device: str, sampling: bool):
        self.vocab_size, self.device, self.sampling = vocab_size, device, sampling
        self.cap = 0
        self.host: dict[str, np.ndarray] = {}
        self.host_ptrs: dict[str, int] = {}  # their addresses (numpy's .ctypes is slow to ask every step)
        self.dev_ptrs: dict[str, int] = {}
        self.dev: dict[str, ort.OrtValue] = {}  # only with the sampling graph

    def reserve(self, cap: int) -> None:
        if cap <= self.cap:
            return
        self.cap, V = cap, self.vocab_size
        self.host = {
            "logits": np.zeros((cap, 1, V), np.float32),
            "next_token": np.zeros((cap, 1), np.int64),
            "token": np.zeros(cap, np.int64),
            "params": np.zeros((cap, 4), np.float32),
            "uniform": np.zeros(cap, np.float64),
        }
        self.host_ptrs = {name: buf.ctypes.data for name, buf in self.host.items()}
        if self.sampling:
            shapes = {"logits": ((cap, 1, V), np.float32), "params": ((cap, 4), np.float32),
                      "uniform": ((cap,), np.float64)}  # fmt: skip
            self.dev = {
                name: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)
                for name, (shape, dtype) in shapes.items()
            }
            self.dev_ptrs = {name: value.data_ptr() for name, value in self.dev.items()}

    def bind(self, binding: Binding, name: str, rows: int, on_device: bool = False) -> None:
        """Bind the model's output `name` for `rows` rows: to the host, or (logits for the sampling
        graph) to the device buffer."""
        ptr = self.dev_ptrs[name] if on_device else self.host_ptrs[name]
        dtype = np.float32 if name == "logits" else np.int64
        shape = (rows, 1, self.vocab_size) if name == "logits" else (rows, 1)
        binding.output(name, self.device if on_device else "cpu", dtype, shape, ptr)

    def read(self, name: str, rows: int) -> np.ndarray:
        return self.host[name][:rows]
