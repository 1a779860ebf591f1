"""`gpt2-onnx bench`: arguments in, BenchConfig out."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from gpt2onnx.engine.contract import DTYPES, KV_CACHES
from gpt2onnx.engine.extras import check_installed
from gpt2onnx.export.model_source import resolve_model

from . import report
from .bench import ALL_BASELINES, EXTRA_BASELINES, QUICK, BenchConfig, BenchError, failure_line, run_bench
from .peers import PEERS

log = logging.getLogger("gpt2onnx")
# What the transformers baselines import here (their reference weights) and in their worker process.
# The peers need them here for their reference checkpoint and transformers' greedy tokens.
BASELINE_MODULES = {"transformers-eager": ("torch", "transformers"), "optimum": ("torch",),
                    **dict.fromkeys(PEERS, ("torch", "transformers"))}  # fmt: skip


def ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        parents=parents,
        help="benchmark the engine side by side with transformers, Optimum and naive loops",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder, or anything `export --model` takes")
    src.add_argument(
        "--random-init",
        metavar="SIZE",
        help="a random-weight model of SIZE (exported into --models-dir once)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype when exporting")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder when exporting (default: beside the weights, "
        "else GPT-2's, shipped with gpt2-onnx)",
    )
    p.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default="concat",
        help="KV cache layout when exporting (shared: updated in place, fastest; see export --help)",
    )
    p.add_argument("--models-dir", default="models", help="where exported models are kept")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the targets' setting only (batch 1, prompt 32, 128 new tokens, 3 runs after 1 warm-up): about 2 minutes for the 124M shape on 2 cores",
    )
    p.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="execution provider for ours and the ONNX baselines",
    )
    p.add_argument("--batches", type=ints, default=(1, 2, 4, 8), help="batch sizes")
    p.add_argument("--prompt-lens", type=ints, default=(32, 256), help="prompt lengths")
    p.add_argument("--new-tokens", type=ints, default=(128,), help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per configuration")
    p.add_argument(
        "--baselines",
        default=",".join(ALL_BASELINES),
        help="comma-separated baselines to run beside ours. llama.cpp-* and ctranslate2-* run when "
        ".ci/setup-llamacpp / .ci/setup-ctranslate2 made their venvs (else skipped). Also on request: "
        "gpt2-onnx-eager (ours without CUDA graphs and device sampling) and gpt2-onnx-fp32 / -fp16 / "
        "-int8 / -int4 (ours at that dtype, exported from the same weights), gpt2-onnx-int8-blocks (int8 "
        "with --int8-kernel blocks)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every runner this many times in turn (alternating, against a machine's drift); "
        "medians over all rounds' runs",
    )
    p.add_argument(
        "--optimum-python",
        help="a Python interpreter whose environment has optimum-onnx (default: this one, else .venv-optimum)",
    )
    p.set_defaults(run=run)


def check_baseline_modules(baselines: tuple[str, ...], known: tuple[str, ...]) -> None:
    """Before the sweep, not in a worker's traceback minutes later. Raises MissingExtraError."""
    without = ",".join(b for b in known if b not in BASELINE_MODULES)
    for name in baselines:
        for module in BASELINE_MODULES.get(name, ()):
            check_installed(module, "bench", f"the {name} baseline", f"leave it out: --baselines {without}")


def run(args: argparse.Namespace) -> int:
    baselines = tuple(b for b in args.baselines.split(",") if b)
    unknown = set(baselines) - set(ALL_BASELINES) - set(EXTRA_BASELINES)
    if unknown:
        raise ValueError(
            f"unknown baselines {sorted(unknown)}; choose from {', '.join(ALL_BASELINES + EXTRA_BASELINES)}"
        )
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        raise ValueError("--repeats and --rounds must be >= 1 and --warmup >= 0")
    check_baseline_modules(baselines, ALL_BASELINES)
    folder = resolve_model(
        args.model, args.random_init, args.seed, args.dtype, args.tokenizer, args.models_dir, args.kv_cache
    )
    cfg = BenchConfig(
        model_folder=folder,
        out=args.out,
        provider=args.provider,
        batches=args.batches,
        prompt_lens=args.prompt_lens,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        baselines=baselines,
        optimum_python=args.optimum_python,
        rounds=args.rounds,
    )
    if args.quick:
        cfg = replace(cfg, **QUICK)
    results = run_bench(cfg)
    for path in report.write(results, args.out):  # also when ours failed: what ran, and why it failed
        log.info("wrote %s", path)
    print(report.markdown(results))
    failed = failure_line(results)
    if failed:  # our engine failed: the benchmark failed, however many baselines ran
        raise BenchError(f"{failed} (results so far in {args.out})")
    return 0
