"""`gpt2-onnx export`: arguments in, ExportConfig out, then the library does the work.

The KV cache layout defaults to the shared cache, the fastest where it was measured: on the CPU
it decodes faster than the concat cache at batch 1 (README, Performance: fp32 16.9 against 18.2
ms/token, int8 4.9 against 5.5), and on CUDA it is the one that runs in fp16 with CUDA graphs;
the server batches in it too. Only the plain graph (--no-optimize), which has no
GroupQueryAttention, defaults to concat.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2onnx.engine.contract import DTYPES, INT8_KERNELS, KV_CACHES, UsageError
from gpt2onnx.engine.extras import needs_extra


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each flag's default said once: "(default: X)" is added unless the help
    text already says its default, or there is none to show (None; a switch, which takes no value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        parents=parents,
        help="export a GPT-2 checkpoint to an ONNX model folder",
        formatter_class=HelpFormatter,
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
    p.add_argument(
        "--int8-kernel",
        choices=INT8_KERNELS,
        help="with --dtype int8: rows quantizes each activation row at run time (MatMulIntegerToFloat; "
        "its cost per row falls as the batch grows); blocks keeps activations in float (MatMulNBits "
        "over 8-bit blocks; see the README's per-CPU advice) (default: rows)",
    )
    p.add_argument(
        "--inspect",
        action="store_true",
        help="also write the inspection graph (inspect.onnx, a few MB: it reads model.onnx's weights) "
        "for Engine.run_with_cache and `gpt2-onnx inspect`: every activation under TransformerLens's "
        "names; fp32 and fp16 only",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="a folder with tokenizer.json (or vocab.json + merges.txt) (default: beside the weights, else "
        "GPT-2's, shipped with gpt2-onnx)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    p.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        help="shared: a fixed-size cache updated in place by GroupQueryAttention (the fastest on the CPU; the "
        "server and CUDA graphs need it; on CUDA, fp16 only); concat: past + new -> present, with "
        "an attention_mask input (on CUDA in fp32 too) (default: shared; concat with --no-optimize)",
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
        tokenizer=args.tokenizer, force=args.force, optimize=args.optimize, kv_cache=kv_cache(args),
        int8_kernel=int8_kernel(args), inspect=args.inspect,
    )  # fmt: skip
    manifest = export(cfg)  # SIGTERM / SIGHUP clean up like Ctrl-C (gpt2onnx/cli.py's main)
    print(
        f"exported {manifest.source.checkpoint} ({manifest.dtype}, {manifest.kv_cache} cache"
        f"{', inspectable' if manifest.inspect_file else ''}) to {args.output}"
    )
    return 0


def int8_kernel(args: argparse.Namespace) -> str:
    """--int8-kernel, which only an int8 export has; rows unless asked."""
    if args.int8_kernel is not None and args.dtype != "int8":
        raise UsageError(
            f"--int8-kernel applies to --dtype int8 only (this export is {args.dtype}); drop it or pass "
            "--dtype int8; see gpt2-onnx export --help"
        )
    return args.int8_kernel or "rows"


def kv_cache(args: argparse.Namespace) -> str:
    """--kv-cache, else the shared cache (see the module's docstring); the plain graph has only concat."""
    return args.kv_cache or ("shared" if args.optimize else "concat")
