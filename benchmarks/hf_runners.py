"""Baselines on Hugging Face stacks: transformers' eager generate and Optimum's ORTModelForCausalLM.

This module imports nothing from gpt2onnx, so it also runs in a separate environment
(Optimum pins an older transformers). Both time tokens with a LogitsProcessor, called once
per generated token right after the forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from measure import Run, StepClock


def _timed_generate(model, prompts: np.ndarray, new_tokens: int, device: str = "cpu") -> Run:
    from transformers import LogitsProcessor, LogitsProcessorList

    clock = StepClock()

    class Tick(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if device == "cuda":
                torch.cuda.synchronize()  # the step is done when its kernels are, not when they are queued
            clock.tick()
            return scores

    ids = torch.from_numpy(prompts).to(device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, use_cache=True,
            logits_processor=LogitsProcessorList([Tick()]), eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return Run(clock.ttft_s, clock.steps, out[:, prompts.shape[1] :].tolist())


def transformers_eager(hf_folder: str, provider: str, dtype: str = "fp32"):
    """On the GPU in the model's dtype (fp16 against an fp16 export); fp32 on the CPU."""
    from transformers import GPT2LMHeadModel

    device = "cuda" if provider == "cuda" or (provider == "auto" and torch.cuda.is_available()) else "cpu"
    torch_dtype = torch.float16 if device == "cuda" and dtype == "fp16" else torch.float32
    model = (
        GPT2LMHeadModel.from_pretrained(hf_folder, attn_implementation="eager", torch_dtype=torch_dtype)
        .to(device)
        .eval()
    )
    model.generation_config.eos_token_id = None

    def run(prompts: np.ndarray, new_tokens: int) -> Run:
        return _timed_generate(model, prompts, new_tokens, device)

    return run, device


def optimum(hf_folder: str, provider: str):
    from optimum.onnxruntime import ORTModelForCausalLM

    ep = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    model = ORTModelForCausalLM.from_pretrained(hf_folder, export=True, use_cache=True, provider=ep)
    model.generation_config.eos_token_id = None

    def run(prompts: np.ndarray, new_tokens: int) -> Run:
        return _timed_generate(model, prompts, new_tokens)

    # What its session really runs on: the worker fails a --provider cuda run that fell back to the CPU.
    return run, "cuda" if model.providers[0] == "CUDAExecutionProvider" else "cpu"


RUNNERS = {"transformers-eager": transformers_eager, "optimum": optimum}
