"""llama.cpp as a benchmark runner: llama-cpp-python's Llama over a GGUF of the same weights, as
its users run it (Llama.generate, greedy: temperature 0, top-k 1, no repeat penalty; EOS does not
stop it). f32 is llama.cpp's converter output; f16, q8_0 and q4_0 are made from it with
llama_model_quantize, as llama-quantize makes them (q4_0 keeps the token embedding, which is also
the tied head, in q6_K). One sequence at a time: Llama has no batch API, so batch 1 only.

Runs in .venv-llamacpp (worker.py); imports nothing from gpt2onnx."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from checks import check_greedy, check_same
from measure import Run, StepClock

FTYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@contextmanager
def quiet_stderr():
    """llama.cpp's C code logs every tensor to file descriptor 2; send it nowhere for a while."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def quantize(src: Path, dst: Path, precision: str, threads: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPES[precision]}")
    params.nthread = threads
    with quiet_stderr():
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeError(f"llama_model_quantize failed ({failed}) to make {precision} from {src}")
    return dst


def llamacpp(spec: dict):
    """(run, device) for spec["peer"]["precision"], after the checks (checks.py); run.details
    carries what they found and the GGUF's size."""
    import llama_cpp

    precision, threads = spec["peer"]["precision"], spec["threads"]
    gguf = Path(spec["gguf_f32"])
    if precision != "f32":
        gguf = quantize(gguf, Path(spec["workdir"]) / f"model-{precision}.gguf", precision, threads)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=spec["n_positions"], n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip

    def greedy(prompt: list[int], new_tokens: int) -> Run:
        llm.reset()  # else generate() reuses the cached prompt prefix and skips the prefill
        clock, tokens = StepClock(), []
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            clock.tick()
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return Run(clock.ttft_s, clock.steps, [tokens])

    def run(prompts: np.ndarray, new_tokens: int) -> Run:
        if prompts.shape[0] != 1:
            raise ValueError("llama-cpp-python's Llama runs one sequence at a time: batch 1 only")
        return greedy(prompts[0].tolist(), new_tokens)

    who, check = spec["runner"], spec["check"]
    ids = llm.tokenize(check["text"].encode(), add_bos=False, special=False)
    check_same(who, "its token ids for the check text", ids, check["ids"])
    found = greedy(check["prompt"], len(check["greedy"])).tokens[0]
    run.details = {
        **check_greedy(who, found, check["greedy"], exact=precision == "f32"),
        "weight_bytes": gguf.stat().st_size,
        "kv_bytes": 2,  # llama.cpp's default cache type is f16
        "threads": threads,
    }
    return run, "cpu"
