"""`gpt2-onnx export`: arguments in, ExportConfig out, then the library does the work."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2onnx.engine.contract import DTYPES, KV_CACHES
from gpt2onnx.engine.extras import needs_extra


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        parents=parents,
        help="export a GPT-2 checkpoint to an ONNX model folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) or a hub id: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2",
    )
    src.add_argument(
        "--random-init",
        metavar="SIZE",
        help="the real shape of SIZE (gpt2/124m, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) with seeded random weights, for benchmarks and offline runs",
    )
    p.add_argument("--output", required=True, type=Path, help="the model folder to write")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="precision: fp32; fp16 (for CUDA); int8 or int4 weights with fp32 activations (for the CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="a folder with tokenizer.json (or vocab.json + merges.txt); default: beside the weights, else GPT-2's (shipped with gpt2-onnx)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    p.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default="concat",
        help="concat: past + new -> present, with an attention_mask input; shared: a fixed-size cache updated in place by GroupQueryAttention (faster; CUDA graphs need it)",
    )
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="keep the plain graph (standard ONNX ops only) instead of the fused one (MultiHeadAttention, SkipLayerNormalization, FastGelu)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with needs_extra("export", "gpt2-onnx export"):  # torch: imported only when exporting
        from .exporter import ExportConfig, export

    cfg = ExportConfig(
        output=args.output, model=args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
        tokenizer=args.tokenizer, force=args.force, optimize=args.optimize, kv_cache=args.kv_cache,
    )  # fmt: skip
    manifest = export(cfg)  # SIGTERM / SIGHUP clean up like Ctrl-C (gpt2onnx/cli.py's main)
    print(f"exported {manifest.source.checkpoint} ({manifest.dtype}) to {args.output}")
    return 0
