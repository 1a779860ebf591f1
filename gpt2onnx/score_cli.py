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

from gpt2onnx.engine.contract import InputError, UsageError, UserError
from gpt2onnx.engine.engine import Engine


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("score", parents=parents, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="perplexity of a text file (sliding window over the model's context)")  # fmt: skip
    p.add_argument("--model", required=True, help="a model folder (what `gpt2-onnx export` writes)")
    p.add_argument("--file", required=True, type=Path, help="a UTF-8 text file ('-': standard input)")
    p.add_argument("--stride", type=int, help="tokens the window moves each time (default: half the context)")
    p.add_argument("--bos", action="store_true", help="put <|endoftext|> first (scores the first token too)")
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
