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
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from .machine import machine_info
from .reference import hf_checkpoint


def median_s(fn, repeats: int):
    result = fn()  # warm-up, and the output to check
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2onnx.engine.engine import Engine

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
    rows, hf_s, hf_tokens = [], None, None
    for folder in args.model:
        engine = Engine.load(folder, provider="cpu", max_batch=max(k, 1), threads=args.threads)
        c = engine.manifest.config
        prompt = np.random.default_rng(0).integers(0, c.vocab_size, args.prompt_tokens).tolist()
        greedy_s, _ = median_s(
            lambda: engine.generate(prompt, max_new_tokens=new, ignore_eos=True), args.repeats
        )
        beam_s, beam = median_s(
            lambda: engine.generate(prompt, max_new_tokens=new, num_beams=k, num_return_sequences=k),
            args.repeats,
        )
        beams = beam.completions[0].beams
        if hf_s is None:  # transformers once: every folder holds the same weights
            with tempfile.TemporaryDirectory() as tmp:
                model = GPT2LMHeadModel.from_pretrained(hf_checkpoint(folder, Path(tmp) / "hf")).eval()

            def hf_beams():
                with torch.no_grad():
                    return model.generate(torch.tensor([prompt]), max_new_tokens=new, num_beams=k, do_sample=False,
                                          num_return_sequences=k, pad_token_id=c.eos_token_id)  # fmt: skip

            hf_s, out = median_s(hf_beams, args.repeats)
            hf_tokens = [out[i, len(prompt) :].tolist() for i in range(k)]
        rows.append({
            "model": str(folder), "dtype": engine.manifest.dtype, "int8_kernel": engine.manifest.int8_kernel,
            "beam_s": beam_s, "greedy_s": greedy_s, "transformers_beam_s": hf_s,
            "beam_step_over_greedy_step": beam_s / greedy_s, "transformers_over_ours": hf_s / beam_s,
            "new_tokens": len(beams[0].token_ids),
            "tokens_equal_transformers": [b.token_ids for b in beams] == hf_tokens,
        })  # fmt: skip
    result = {"machine": machine_info(), "beams": k, "new_tokens": new, "prompt_tokens": args.prompt_tokens,
              "threads": args.threads, "repeats": args.repeats, "runs": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "beam_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# Beam search: {k} beams, batch 1, {new} new tokens, {args.prompt_tokens}-token prompt, "
        f"{args.threads} threads",
        "",
        f"CPU: {m.get('cpu')} ({', '.join(m.get('isa') or [])}), {m.get('cores')} cores",
        "",
        "| model | dtype | ours, beams (s) | ours, greedy (s) | transformers, beams (s) | transformers / ours "
        "| beam step / greedy step | tokens = transformers' |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *[
            f"| {Path(r['model']).name} | {r['dtype']}{'-' + r['int8_kernel'] if r['int8_kernel'] else ''} | "
            f"{r['beam_s']:.2f} | {r['greedy_s']:.2f} | {r['transformers_beam_s']:.2f} | "
            f"{r['transformers_over_ours']:.1f}x | {r['beam_step_over_greedy_step']:.2f}x | "
            f"{r['tokens_equal_transformers']} |"
            for r in rows
        ],  # fmt: skip
    ]
    (args.out / "beam_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
