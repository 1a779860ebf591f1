"""Host inputs under a provider that copies them at bind time, as CUDA does, checked on the CPU.

onnxruntime's CUDA provider copies a host input to the device when it is bound and keeps that
copy: new values written into the same numpy buffer reach the device only through a new bind
(IOBinding::BindInput; onnxruntime #11133, #29782). The CPU provider reads the buffer where it
is, so no plain CPU test can see a path that writes new values and skips the bind. `CopyAtBind`
gives the CPU provider CUDA's behaviour: a host step input is copied when bound, and the copy is
what the session reads until the next bind. Under it, every path that feeds host inputs (the
concat cache, the shared cache without graphs, prefills of the CUDA-graph cache) must give the
tokens of a plain CPU engine.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from gpt2onnx.engine import contract, cuda_graphs
from gpt2onnx.engine import session as session_module
from gpt2onnx.engine.binding import Binding
from gpt2onnx.engine.engine import Engine

PROMPTS = ["Hello", "The quick brown fox jumps over", "a", "Once upon a time, in a land far away"]
# the step inputs a cache feeds from the host (the KV buffers are device memory on a GPU: not these)
HOST_NAMES = {name for layout in contract.STEP_INPUTS.values() for name in layout}


class CopyAtBind:
    """An IO binding that copies a host step input when it is bound and hands the session the
    copy. Addresses in `device_ptrs` stand for device memory (the CUDA-graph buckets' buffers,
    written in place with update_inplace) and are bound as they are."""

    def __init__(self, io, device_ptrs: set[int]):
        self.io, self.device_ptrs = io, device_ptrs
        self.copies: dict[str, np.ndarray] = {}  # what the "device" holds for each input
        self.copied = 0

    def __getattr__(self, name):
        return getattr(self.io, name)

    def bind_input(self, name, device, device_id, dtype, shape, ptr):
        if device == "cpu" and name in HOST_NAMES and ptr not in self.device_ptrs:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            host = np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)
            self.copies[name] = host.copy()  # the device's copy, fixed until the next bind
            ptr = self.copies[name].ctypes.data
            self.copied += 1
        self.io.bind_input(name, device, device_id, dtype, shape, ptr)


@pytest.fixture
def copy_at_bind(monkeypatch):
    """Sessions opened while this is active bind through CopyAtBind and know that their provider
    copies at bind time (Binding.copies_host_inputs). Yields the doubles made."""
    device_ptrs: set[int] = set()
    doubles: list[CopyAtBind] = []
    bucket_init = cuda_graphs.Bucket.__init__

    def bucket(self, *args, **kw):
        bucket_init(self, *args, **kw)
        device_ptrs.update(self.dev_ptrs.values())

    class CopyingBinding(Binding):
        def __init__(self, session):
            super().__init__(session)
            self.io = CopyAtBind(self.io, device_ptrs)
            self.copies_host_inputs = True
            doubles.append(self.io)

    monkeypatch.setattr(cuda_graphs.Bucket, "__init__", bucket)
    monkeypatch.setattr(session_module, "Binding", CopyingBinding)
    yield doubles


def token_ids(engine: Engine, prompts, **kw) -> list[list[int]]:
    kw = {"max_new_tokens": 12, "ignore_eos": True} | kw
    return [c.token_ids for c in engine.generate(prompts, **kw).completions]


def test_the_double_hands_the_session_a_copy_frozen_at_bind_time(varied_shared, copy_at_bind):
    """The double itself: values written after a bind are not seen until the next bind."""
    engine = Engine.load(varied_shared, provider="cpu", max_batch=4, cuda_graphs=False)
    (double,) = copy_at_bind
    buf = np.arange(6, dtype=np.int64)
    double.bind_input("input_ids", "cpu", 0, np.int64, (2, 3), buf.ctypes.data)
    buf[:] = 7
    assert double.copies["input_ids"].ravel().tolist() == [0, 1, 2, 3, 4, 5]
    double.bind_input("input_ids", "cpu", 0, np.int64, (2, 3), buf.ctypes.data)
    assert double.copies["input_ids"].ravel().tolist() == [7] * 6
    assert engine.session.binding.copies_host_inputs


@pytest.mark.parametrize(
    "folder, graphs",
    [("varied_fp32", None), ("varied_shared", False), ("varied_shared", True)],
    ids=["concat", "shared-eager", "shared-cuda-graphs"],
)
def test_host_inputs_reach_a_provider_that_copies_at_bind(request, folder, graphs):
    """Greedy and sampled tokens, a batch and one prompt, and back-to-back one-token calls with
    prompts of one length (two prefills of the same shape in a row): each as on a plain CPU engine.
    The varied model, whose tokens change with their inputs: a stale input shows."""
    folder = request.getfixturevalue(folder)
    want_engine = Engine.load(folder, provider="cpu", max_batch=4, cuda_graphs=graphs)  # binds as usual
    copy_at_bind = request.getfixturevalue("copy_at_bind")
    engine = Engine.load(folder, provider="cpu", max_batch=4, cuda_graphs=graphs)
    (double,) = copy_at_bind
    cases = [
        (PROMPTS, {}),
        (PROMPTS[1:2], {}),
        (PROMPTS, {"top_k": 20, "seed": 3}),
        *[([p], {"max_new_tokens": 1}) for p in ("one two", "six ten", "red fox")],
    ]
    for prompts, kw in cases:
        got, want = token_ids(engine, prompts, **kw), token_ids(want_engine, prompts, **kw)
        assert got == want, f"{prompts} {kw}: a stale host input on a copy-at-bind provider"
    assert double.copied > 0, "the double copied nothing: the test would prove nothing"


class RecordingIO:
    def __init__(self):
        self.binds: list[str] = []

    def bind_input(self, name, *args):
        self.binds.append(name)


class FakeSession:
    def __init__(self, provider: str):
        self.provider = provider

    def io_binding(self):
        return RecordingIO()

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]


@pytest.mark.parametrize("provider, binds", [("CPUExecutionProvider", 1), ("CUDAExecutionProvider", 2)])
def test_changed_host_values_are_bound_again_only_where_the_provider_copies(provider, binds):
    """The CPU provider reads the buffer itself: an unchanged bind is still skipped there (no cost).
    A constant host input (host_input) is bound once everywhere."""
    binding = Binding(FakeSession(provider))
    assert binding.copies_host_inputs == (provider != "CPUExecutionProvider")
    buf, total = np.zeros(4, np.int64), np.array(9, np.int32)
    for _ in range(2):
        binding.host_values("input_ids", np.int64, (1, 4), buf.ctypes.data)
        binding.host_input("total_sequence_length", total)
    assert binding.io.binds.count("input_ids") == binds
    assert binding.io.binds.count("total_sequence_length") == 1
