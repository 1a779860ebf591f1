"""`gpt2-onnx score`: the perplexity of a text file under a model folder, with a sliding window
of the model's context (Engine.score), as transformers' perplexity guide computes it; the same
harness for any precision (fp32, fp16, int8) and for real GPT-2 weights when a folder has them."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from gpt2onnx import quality
from gpt2onnx.engine.contract import InputError, UsageError, UserError
from gpt2onnx.engine.engine import Engine


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("score", parents=parents, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="perplexity of a text file (sliding window over the model's context)")  # fmt: skip
    p.add_argument("--model", required=True, help="a model folder (what `gpt2-onnx export` writes)")
    p.add_argument("--file", required=True, type=Path, help="a UTF-8 text file ('-': standard input)")
    p.add_argument("--stride", type=int, help="tokens the window moves each time (default: half the context)")
    p.add_argument("--bos", action="store_true", help="put <|endoftext|> first (scores the first token too)")
    p.add_argument("--reference", metavar="DIR",
                   help="a model folder of the same weights to compare with (an fp32 export): adds the "
                   "perplexity change, top-1 agreement and how long greedy continuations stay equal")  # fmt: skip
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--file {path} cannot be read as UTF-8 text ({e})") from None


def run(args: argparse.Namespace) -> int:
    text = read_text(args.file)
    engine = Engine.load(args.model, provider=args.provider)
    if args.reference:
        return run_comparison(args, engine, text)
    try:
        s = engine.score(text, prepend_bos=args.bos, stride=args.stride)
    except InputError as e:
        message = str(e).replace("stride must", "--stride must", 1)
        raise UsageError(f"{message}; see gpt2-onnx score --help") from None
    stride = args.stride or engine.n_positions // 2
    result = {"model": str(args.model), "dtype": engine.manifest.dtype, "file": str(args.file),
              "tokens": len(s.tokens), "scored": int(np.isfinite(s.logprobs).sum()), "window": engine.n_positions, "stride": stride,
              "bos": args.bos, "nll_per_token": float(-np.nanmean(s.logprobs)), "perplexity": s.perplexity}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {s.perplexity:.4f} ({math.log(s.perplexity):.4f} nats/token) over {result['scored']} "
              f"tokens of {args.file}, window {engine.n_positions}, stride {stride}, {engine.manifest.dtype}")  # fmt: skip
    return 0


def run_comparison(args: argparse.Namespace, engine: Engine, text: str) -> int:
    """score --reference: quality.compare, printed as one line each or one JSON object."""
    if args.bos:
        raise UsageError("--bos is not used with --reference (the comparison scores the text as it is)")
    reference = Engine.load(args.reference, provider=args.provider)
    try:
        q = quality.compare(engine, reference, text, quality.QualityConfig(stride=args.stride))
    except InputError as e:
        raise UsageError(
            f"{str(e).replace('stride must', '--stride must', 1)}; see gpt2-onnx score --help"
        ) from None
    result = {"model": str(args.model), "dtype": engine.manifest.dtype, "reference": str(args.reference),
              "reference_dtype": reference.manifest.dtype, "file": str(args.file), **q}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"perplexity {q['perplexity']:.4f} ({result['dtype']}) against {q['reference_perplexity']:.4f} "
        f"({result['reference_dtype']}): {100 * q['perplexity_change']:+.2f}%"
    )
    print(f"top-1 agreement {100 * q['top1_agreement']:.2f}% over {q['top1_positions']} positions")
    print(f"greedy continuations of {q['greedy_prompts']} prompts: equal for {q['greedy_equal_tokens_mean']:.1f} "
          f"of {q['greedy_new_tokens']} tokens on average, {q['greedy_equal_in_full']} equal in full")  # fmt: skip
    return 0
