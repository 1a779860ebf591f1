"""CTranslate2 as a benchmark runner: its TransformersConverter on the same weights
(quantization float32 or int8), then Generator.generate_batch, greedy (sampling_topk 1), EOS
masked until the last token (min_length), timed per step by its callback.

CTranslate2 takes token strings, not ids: the prompts go in through the converted model's own
vocabulary, which must equal our tokenizer's, entry for entry, before anything is timed.

Runs in .venv-ctranslate2 (worker.py); imports nothing from gpt2onnx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from checks import check_greedy, check_same
from measure import Run, StepClock


def ctranslate2(spec: dict):
    """(run, device) for spec["peer"]["precision"] (float32 or int8), after the checks."""
    import ctranslate2 as ct2
    from ctranslate2.converters import TransformersConverter

    precision, threads = spec["peer"]["precision"], spec["threads"]
    folder = Path(spec["workdir"]) / f"ctranslate2-{precision}"
    if not (folder / "model.bin").exists():
        TransformersConverter(spec["hf_folder"]).convert(str(folder), quantization=precision, force=True)
    vocab = json.loads((folder / "vocabulary.json").read_text())
    who, check = spec["runner"], spec["check"]
    check_same(who, "its vocabulary entries", vocab, check["vocab"])
    generator = ct2.Generator(str(folder), device="cpu", compute_type=precision, intra_threads=threads,
                              inter_threads=1)  # fmt: skip

    def run(prompts: np.ndarray, new_tokens: int) -> Run:
        clock = StepClock()

        def step(result) -> None:  # called for every row after each step; row 0 marks the step
            if result.batch_id == 0:
                clock.tick()

        out = generator.generate_batch([[vocab[i] for i in row] for row in prompts.tolist()],
                                       max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                       include_prompt_in_result=False, callback=step)  # fmt: skip
        return Run(clock.ttft_s, clock.steps, [r.sequences_ids[0] for r in out])

    found = run(np.asarray([check["prompt"]]), len(check["greedy"])).tokens[0]
    run.details = {
        **check_greedy(who, found, check["greedy"], exact=precision == "float32"),
        "weight_bytes": (folder / "model.bin").stat().st_size,
        "threads": threads,
    }
    return run, "cpu"
