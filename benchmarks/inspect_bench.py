"""Engine.run_with_cache against TransformerLens's run_with_cache: the same weights, the same
tokens and threads, in one run; and how far apart their activations are.

    python -m gpt2onnx.benchmarks.inspect_bench --model FOLDER --out DIR
        [--batch 8] [--seq 128] [--repeats 5] [--threads 2] [--names NAME NAME]

FOLDER is a model folder exported with --inspect; TransformerLens (its TransformerBridge on
the folder's exact weights as a transformers folder, benchmarks/reference.py) runs in
.venv-transformer-lens (.ci/setup-transformer-lens), or the Python in $TRANSFORMER_LENS_PYTHON.
Timed, medians of --repeats after a warm-up: our `logits` (the decode graph's forward),
run_with_cache with every name and with --names (two by default), and TransformerLens's
run_with_cache with every name and with --names. Exactness: every name of a 1 x 32 batch, the
largest |difference| over the tensor's largest value (masked scores compared as equal fills).
Writes DIR/inspect_bench.json and .md with the machine (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .machine import machine_info
from .measure import median_s
from .reference import hf_checkpoint
from .report import cpu_line, write_small

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("transformer_lens_runner.py")
TWO_NAMES = ("blocks.0.attn.hook_pattern", "ln_final.hook_normalized")


def transformer_lens_python() -> Path | None:
    """The Python that has TransformerLens: $TRANSFORMER_LENS_PYTHON, else .venv-transformer-lens's."""
    path = Path(os.environ.get("TRANSFORMER_LENS_PYTHON", REPO / ".venv-transformer-lens" / "bin" / "python"))
    return path if path.is_file() else None


def run_transformer_lens(python: Path, hf_folder: Path, tokens: np.ndarray, work: Path, *,
                         names=None, out: Path | None = None, repeats: int = 0,
                         threads: int | None = None) -> list[float]:  # fmt: skip
    """TransformerLens's run_with_cache in its venv: the cache to `out` (.npz), and the seconds of
    `repeats` timed calls."""
    np.save(work / "tokens.npy", tokens)
    command = [str(python), str(RUNNER), "--model", str(hf_folder), "--tokens", str(work / "tokens.npy")]
    command += ["--out", str(out)] if out else []
    command += ["--names", *names] if names else []
    timing = work / "timing.json"
    command += ["--repeats", str(repeats), "--timing", str(timing)] if repeats else []
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"TransformerLens failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(timing.read_text())["seconds"] if repeats else []


def differences(logits: np.ndarray, cache, reference, only=None) -> dict[str, float]:
    """name -> largest |ours - reference| / largest |reference|, over every name of `reference`
    (an npz from the runner), or those of `only`; masked scores must be the same fill."""
    worst = {}
    for name in only or reference.files:
        want = reference[name].astype(np.float64)
        got = (logits if name == "logits" else cache[name]).astype(np.float64)
        if got.shape != want.shape:
            raise AssertionError(f"{name}: ours {got.shape}, TransformerLens {want.shape}")
        if name.endswith("hook_attn_scores"):
            masked = want < -1e30
            if not (got[masked] == want[masked]).all():
                raise AssertionError(f"{name}: masked scores differ from TransformerLens's fill")
            got, want = np.where(masked, 0, got), np.where(masked, 0, want)
        worst[name] = float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30))
    return worst


def main(argv: list[str] | None = None) -> None:
    from gpt2onnx.engine.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a model folder exported with --inspect")
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--names", nargs="+", default=list(TWO_NAMES), help="the filtered call's names")
    args = parser.parse_args(argv)
    python = transformer_lens_python()
    if python is None:
        raise SystemExit("TransformerLens is not installed: run .ci/setup-transformer-lens")
    engine = Engine.load(args.model, provider="cpu", max_batch=args.batch, threads=args.threads)
    c = engine.manifest.config
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (args.batch, args.seq), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf = hf_checkpoint(args.model, work / "hf")
        small = tokens[:1, :32]
        run_transformer_lens(python, hf, small, work, out=work / "reference.npz")
        worst = differences(*engine.run_with_cache(small), np.load(work / "reference.npz"))
        ours = {
            "logits": median_s(lambda: engine.logits(tokens), args.repeats)[0],
            "run_with_cache, every name": median_s(lambda: engine.run_with_cache(tokens), args.repeats)[0],
            f"run_with_cache, {len(args.names)} names": median_s(
                lambda: engine.run_with_cache(tokens, names_filter=args.names), args.repeats
            )[0],
        }
        theirs = {
            key: float(np.median(run_transformer_lens(python, hf, tokens, work, names=names,
                                                      repeats=args.repeats, threads=args.threads)))
            for key, names in (("every name", None), (f"{len(args.names)} names", args.names))
        }  # fmt: skip
    every, filtered = ours["run_with_cache, every name"], ours[f"run_with_cache, {len(args.names)} names"]
    result = {
        "machine": machine_info(),
        "model": str(args.model), "dtype": engine.manifest.dtype, "n_layer": c.n_layer, "n_embd": c.n_embd,
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "repeats": args.repeats,
        "names": args.names, "ours_s": ours, "transformer_lens_s": theirs,
        "transformer_lens_over_ours_every_name": theirs["every name"] / every,
        "filtered_over_logits": filtered / ours["logits"],
        "largest_relative_difference": max(worst.values()),
        "worst_names": sorted(worst, key=worst.get)[-3:],
    }  # fmt: skip
    lines = [
        f"# run_with_cache: ours against TransformerLens ({c.n_layer} layers, {c.n_embd} wide, "
        f"{engine.manifest.dtype}; {args.batch} x {args.seq} tokens; {args.threads} threads)",
        "",
        cpu_line(result["machine"]),
        "",
        "| call | seconds (median) |",
        "|---|---:|",
        *[f"| ours: {k} | {v:.3f} |" for k, v in ours.items()],
        *[f"| TransformerLens: run_with_cache, {k} | {v:.3f} |" for k, v in theirs.items()],
        "",
        f"TransformerLens / ours, every name: {result['transformer_lens_over_ours_every_name']:.2f}x; "
        f"ours filtered / logits: {result['filtered_over_logits']:.2f}x; largest difference from "
        f"TransformerLens over the tensor's largest value: {result['largest_relative_difference']:.2g}.",
    ]
    write_small(args.out, "inspect_bench", result, lines)


if __name__ == "__main__":
    main()
