"""Speculative decoding by prompt lookup against plain decoding, batch 1, same run: tokens/s,
acceptance, and whether the tokens are the same.

    python -m gpt2onnx.benchmarks.speculation_bench --model FOLDER [--model FOLDER ...] --text FILE
        --out DIR [--lookup 8] [--prompts 12] [--new-tokens 48] [--threads 2]

Two kinds of prompts from the text (held-out documentation, say): "repeat" prompts hold a
passage and then its first lines again, so the model is asked to continue something it has
partly seen (what prompt lookup is for: code, edits, extraction); "plain" prompts are windows
of the text with nothing in particular to look up. Each FOLDER (shared cache) runs every prompt
greedily, plainly and with prompt_lookup, alternating. Writes DIR/speculation_bench.json and .md
with the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .machine import machine_info
from .report import cpu_line, write_small


def prompt_sets(tokens: list[int], count: int, room: int, new: int) -> dict[str, list[list[int]]]:
    """count "repeat" and "plain" prompts that leave `new` tokens of room in `room` positions."""
    passage, again = (room - new) * 2 // 3, (room - new) // 3
    step = max(1, (len(tokens) - room) // count)
    starts = [i * step for i in range(count)]
    return {
        "repeat": [tokens[s : s + passage] + tokens[s : s + again] for s in starts],
        "plain": [tokens[s + 7 : s + 7 + passage + again] for s in starts],
    }


def run(engine, prompts: list[list[int]], new: int, **speculation) -> tuple[float, int, list[list[int]]]:
    """(seconds, new tokens, each prompt's tokens) for the prompts one at a time."""
    start, made, outs = time.perf_counter(), 0, []
    for prompt in prompts:
        c = engine.generate(prompt, max_new_tokens=new, ignore_eos=True, **speculation).completions[0]
        made, outs = made + len(c.token_ids), outs + [c.token_ids]
    return time.perf_counter() - start, made, outs


def measure(folder: Path, sets: dict, args) -> list[dict]:
    """Each kind of prompt, plainly and with each method (prompt lookup; the draft model when
    --draft), rounds alternating."""
    from gpt2onnx.engine.engine import Engine

    plain = Engine.load(folder, provider="cpu", max_batch=1, threads=args.threads)
    methods = {"prompt lookup": (plain, {"prompt_lookup": args.lookup})}
    if args.draft:
        drafted = Engine.load(folder, provider="cpu", max_batch=1, threads=args.threads, draft=args.draft)
        methods[f"draft {args.draft.name}"] = (drafted, {"draft_tokens": args.draft_tokens})
    rows = []
    for kind, prompts in sets.items():
        for method, (engine, speculation) in methods.items():
            run(engine, prompts[:2], 4, **speculation)  # warm-up
            run(plain, prompts[:2], 4)
            plain_s, fast_s = [], []
            for _ in range(args.rounds):
                s, made, plain_tokens = run(plain, prompts, args.new_tokens)
                plain_s.append(s)
                before = engine.stats()
                s, made_fast, fast_tokens = run(engine, prompts, args.new_tokens, **speculation)
                fast_s.append(s)
                after = engine.stats()
            proposed = after["draft_tokens_proposed"] - before["draft_tokens_proposed"]
            accepted = after["draft_tokens_accepted"] - before["draft_tokens_accepted"]
            plain_tps, fast_tps = made / float(np.median(plain_s)), made_fast / float(np.median(fast_s))
            rows.append({
                "model": str(folder), "dtype": engine.manifest.dtype, "prompts": kind, "count": len(prompts),
                "method": method, "plain_tokens_per_s": plain_tps, "method_tokens_per_s": fast_tps,
                "speedup": fast_tps / plain_tps, "proposed": proposed, "accepted": accepted,
                "acceptance": accepted / proposed if proposed else None, "same_tokens": fast_tokens == plain_tokens,
                "draft_run_cost": engine.draft_cost if method.startswith("draft") else None,
                "default": bool(engine.draft_tokens) if method.startswith("draft") else None,
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    from gpt2onnx.engine.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, type=Path, action="append", help="a shared-cache model folder"
    )
    parser.add_argument("--text", required=True, type=Path, help="the text the prompts are taken from")
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--lookup", type=int, default=8, help="prompt_lookup: tokens proposed a step")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draft", type=Path, help="a draft model folder: measure it too")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes a step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    for folder in args.model:
        manifest = json.loads((folder / "manifest.json").read_text())
        c = manifest["config"]
        tokenizer = Tokenizer(folder / manifest["tokenizer_file"], c["bos_token_id"], c["eos_token_id"])
        tokens = tokenizer.to_tokens(args.text.read_text(encoding="utf-8"), prepend_bos=False)
        room = min(c["n_positions"], 256)
        rows += measure(folder, prompt_sets(tokens, args.prompts, room, args.new_tokens), args)
    result = {"machine": machine_info(), "lookup": args.lookup, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "threads": args.threads, "text": str(args.text),
              "draft_tokens": args.draft_tokens, "runs": rows}  # fmt: skip
    write_small(args.out, "speculation_bench", result, table(result))


def table(result: dict) -> list[str]:
    """The Markdown report of a result (its JSON holds everything it shows)."""
    from gpt2onnx.engine.draft import DRAFT_PAYS

    def cost(r: dict) -> str:
        if r["draft_run_cost"] is None:
            return "-"
        return f"{r['draft_run_cost']:.0%} ({'default' if r['default'] else 'when asked'})"

    return [
        f"# Speculative decoding (prompt lookup: {result['lookup']} tokens a step; draft: {result['draft_tokens']}) "
        f"against plain decoding: batch 1, greedy, {result['new_tokens']} new tokens, {result['threads']} threads",
        "",
        cpu_line(result["machine"]),
        "",
        "| model | dtype | prompts | method | plain tokens/s | its tokens/s | speed-up | accepted / proposed "
        "| same tokens | draft run / target run |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|",
        *[
            f"| {Path(r['model']).name} | {r['dtype']} | {r['prompts']} ({r['count']}) | {r['method']} | "
            f"{r['plain_tokens_per_s']:.1f} | {r['method_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['accepted']} / {r['proposed']} | {r['same_tokens']} | {cost(r)} |"
            for r in result["runs"]
        ],  # fmt: skip
        "",
        f"Draft run / target run: one token at batch 1, timed at load (Engine.load); at most "
        f"{DRAFT_PAYS:.0%} makes the draft every greedy call's default. The rows above asked for it.",
    ]


if __name__ == "__main__":
    main()
