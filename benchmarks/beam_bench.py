"""Beam search against transformers' on the same weights and CPU, in one run: a prompt's k beams
for N new tokens, and what a step of k beams costs against a greedy step.

    python -m gpt2onnx.benchmarks.beam_bench --model FOLDER [--model FOLDER ...] --out DIR
        [--beams 4] [--new-tokens 128] [--prompt-tokens 32] [--repeats 3] [--threads 2]

Each FOLDER is a model folder with the shared cache (int8 for the issue's target; an fp32 one
also checks the tokens: they must equal transformers'). transformers runs the folder's exact
weights (benchmarks/reference.py) in fp32 with torch at the same threads. Timed, medians of
--repeats after a warm-up: our beam search, our greedy decode of the same length (ms per step),
transformers' beam search. Writes DIR/beam_bench.json and .md with the machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from .machine import machine_info
from .measure import median_s
from .reference import hf_checkpoint
from .report import cpu_line, dtype_label, write_small


def ours(folder: Path, args) -> tuple:
    """(engine, prompt, greedy seconds, beam seconds, the beams) for one model folder."""
    from gpt2onnx.engine.engine import Engine

    engine = Engine.load(folder, provider="cpu", max_batch=args.beams, threads=args.threads)
    prompt = np.random.default_rng(0).integers(0, engine.vocab_size, args.prompt_tokens).tolist()
    new, k = args.new_tokens, args.beams
    greedy_s, _ = median_s(lambda: engine.generate(prompt, max_new_tokens=new, ignore_eos=True), args.repeats)
    beam_s, beam = median_s(
        lambda: engine.generate(prompt, max_new_tokens=new, num_beams=k, num_return_sequences=k), args.repeats
    )
    return engine, prompt, greedy_s, beam_s, beam.completions[0].beams


def transformers_beams(folder: Path, prompt: list[int], eos: int, args) -> tuple[float, list[list[int]]]:
    """transformers' beam search on the folder's exact weights: (seconds, each beam's new tokens)."""
    import torch
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        model = GPT2LMHeadModel.from_pretrained(hf_checkpoint(folder, Path(tmp) / "hf")).eval()

    def run():
        with torch.no_grad():
            return model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, num_beams=args.beams,
                                  do_sample=False, num_return_sequences=args.beams, pad_token_id=eos)  # fmt: skip

    seconds, out = median_s(run, args.repeats)
    return seconds, [out[i, len(prompt) :].tolist() for i in range(args.beams)]


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, type=Path, action="append", help="a shared-cache model folder"
    )
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    k, new = args.beams, args.new_tokens
    rows, hf = [], None
    for folder in args.model:
        engine, prompt, greedy_s, beam_s, beams = ours(folder, args)
        if hf is None:  # transformers once: every folder holds the same weights
            hf = transformers_beams(folder, prompt, engine.manifest.config.eos_token_id, args)
        rows.append({
            "model": str(folder), "dtype": engine.manifest.dtype, "int8_kernel": engine.manifest.int8_kernel,
            "beam_s": beam_s, "greedy_s": greedy_s, "transformers_beam_s": hf[0],
            "beam_step_over_greedy_step": beam_s / greedy_s, "transformers_over_ours": hf[0] / beam_s,
            "new_tokens": len(beams[0].token_ids), "tokens_equal_transformers": [b.token_ids for b in beams] == hf[1],
        })  # fmt: skip
    result = {"machine": machine_info(), "beams": k, "new_tokens": new, "prompt_tokens": args.prompt_tokens,
              "threads": args.threads, "repeats": args.repeats, "runs": rows}  # fmt: skip
    lines = [
        f"# Beam search: {k} beams, batch 1, {new} new tokens, {args.prompt_tokens}-token prompt, "
        f"{args.threads} threads",
        "",
        cpu_line(result["machine"]),
        "",
        "| model | dtype | ours, beams (s) | ours, greedy (s) | transformers, beams (s) | transformers / ours "
        "| beam step / greedy step | tokens = transformers' |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *[
            f"| {Path(r['model']).name} | {dtype_label(r['dtype'], r['int8_kernel'])} | "
            f"{r['beam_s']:.2f} | {r['greedy_s']:.2f} | {r['transformers_beam_s']:.2f} | "
            f"{r['transformers_over_ours']:.1f}x | {r['beam_step_over_greedy_step']:.2f}x | "
            f"{r['tokens_equal_transformers']} |"
            for r in rows
        ],  # fmt: skip
    ]
    write_small(args.out, "beam_bench", result, lines)


if __name__ == "__main__":
    main()
