"""int8 weights multiplied as s8 on CPUs where that is exact (VNNI): the same bits as u8, decided
by a probe that agrees with the CPU's flags, and the model file left as it is."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import export_folder
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.session import SessionConfig
from gpt2onnx.engine.signed_int8 import signed_is_exact

VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # vpdpbusd: u8 x s8 summed in 32 bits


def cpu_flags() -> set[str] | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_the_probe_agrees_with_the_cpus_flags():
    """With VNNI, u8 x s8 sums exactly; without it MLAS adds product pairs in 16 bits, and the
    probe's full-range values overflow them."""
    flags = cpu_flags()
    if flags is None or not {"avx2", "avx512f"} & flags:
        pytest.skip("an x86 CPU's flags from /proc/cpuinfo")
    assert signed_is_exact() == bool(VNNI_FLAGS & flags)


def streamed(engine: Engine, prompt: list[int]) -> list[tuple]:
    return [(p.token_ids, p.token_logprobs, p.top_logprobs) for p in engine.submit(prompt, 12, logprobs=3)]


@pytest.fixture(scope="module")
def int8_external(varied_hf_folder, tmp_path_factory) -> Path:
    """The weights in model.onnx.data: the signed graph is loaded from memory and reads them there."""
    folder = tmp_path_factory.mktemp("signed") / "int8"
    export_folder(varied_hf_folder, folder, dtype="int8", kv_cache="shared", external_data_threshold=0)
    assert (folder / "model.onnx.data").exists()
    return folder


@pytest.mark.parametrize("model", ["tiny_int8_shared", "varied_int8_shared", "int8_external"])
def test_signed_weights_give_the_same_bits_as_unsigned(model, request):
    folder = request.getfixturevalue(model)
    digest = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    signed = Engine.load(folder, provider="cpu")
    assert signed.session.signed_int8 == signed_is_exact()
    unsigned = Engine(folder, SessionConfig(provider="cpu", signed_int8=False))
    assert not unsigned.session.signed_int8
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, signed.vocab_size, int(n)).tolist() for n in (3, 9, 17)]
    for prompt in prompts:
        assert streamed(signed, prompt) == streamed(unsigned, prompt)
    together = [c.token_ids for c in signed.generate(prompts, max_new_tokens=12).completions]
    assert together == [c.token_ids for c in unsigned.generate(prompts, max_new_tokens=12).completions]
    assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("model", ["tiny_shared", "tiny_int4_shared"])
def test_other_dtypes_keep_their_graph(model, request):
    assert not Engine.load(request.getfixturevalue(model), provider="cpu").session.signed_int8
