"""Loglikelihood scoring as a harness runs it: through `gpt2-onnx serve` against transformers.

    python -m gpt2onnx.benchmarks.score_bench MODEL_FOLDER [--requests 200] [--rounds 2]
        [--max-tokens 0] [--out DIR]

What lm-evaluation-harness does for a loglikelihood task with `local-completions` (the server)
and with its `hf` backend (transformers), on the same checkpoint and the same requests:

- the requests: (context, continuation) pairs cut from held-out text (the trained fixture's
  heldout.txt when ../shared/fixtures is there, else seeded random tokens), contexts of 16 to 96
  tokens and continuations of 1 to 16, as multiple-choice and perplexity tasks send them;
- server: one request at a time (the harness's defaults: batch 1, one connection), each a
  completion with the whole sequence as the prompt, `echo: true`, `logprobs: 1`, `max_tokens` 0
  (or 1), temperature 0; the continuation's logprob is the sum of the echoed token logprobs over
  its span, and "greedy" is whether each was the top token;
- transformers: one forward pass per request (the `hf` backend at its default batch size 1) in
  float32 on the CPU, log-softmax, the same sum and greedy check.

Rounds alternate the two (server, transformers, server, ...); the table gives the median round's
seconds per request, and checks that both give the same logprobs (within 1e-3) and greedy flags.
The model folder must be fp32 with the shared cache (what the server runs; transformers reads
the checkpoint it was exported from, rebuilt from the folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.engine.tokenizer import Tokenizer

from .reference import hf_checkpoint
from .serve_bench import server

FIXTURE_TEXT = (
    Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "pydocs-gpt2-4l" / "heldout.txt"
)


def make_requests(tokenizer: Tokenizer, n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(token ids of context + continuation, length of the continuation), n of them."""
    gen = np.random.default_rng(seed)
    ids = tokenizer.to_tokens(FIXTURE_TEXT.read_text(), prepend_bos=False) if FIXTURE_TEXT.is_file() else None
    out = []
    for _ in range(n):
        ctx, cont = int(gen.integers(16, 97)), int(gen.integers(1, 17))
        if ids is not None:
            start = int(gen.integers(0, len(ids) - ctx - cont))
            seq = ids[start : start + ctx + cont]
        else:
            seq = gen.integers(0, vocab, ctx + cont).tolist()
        out.append((seq, cont))
    return out


def score_server(url: str, model: str, requests, max_tokens: int) -> list[tuple[float, bool]]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for seq, cont in requests:
            body = {"model": model, "prompt": seq, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
                    "temperature": 0}  # fmt: skip
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            lp = r.json()["choices"][0]["logprobs"]
            span = slice(len(seq) - cont, len(seq))
            tokens, logprobs, tops = lp["tokens"][span], lp["token_logprobs"][span], lp["top_logprobs"][span]
            greedy = all(max(top, key=top.get) == tok for tok, top in zip(tokens, tops))
            out.append((float(sum(logprobs)), greedy))
    return out


def score_transformers(model, requests) -> list[tuple[float, bool]]:
    import torch

    out = []
    with torch.no_grad():
        for seq, cont in requests:
            logits = model(torch.tensor([seq])).logits[0, -cont - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(seq[-cont:])
            out.append(
                (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "model", type=Path, help="an fp32 model folder (its checkpoint is what transformers reads)"
    )
    p.add_argument("--requests", type=int, default=200, help="loglikelihood requests per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each, alternating")
    p.add_argument("--max-tokens", type=int, default=0, help="max_tokens of each request (0 or 1)")
    p.add_argument("--out", type=Path, default=Path("bench-results/score"), help="output folder")
    args = p.parse_args(argv)
    manifest = read_manifest(args.model)
    c = manifest.config
    tokenizer = Tokenizer(args.model / "tokenizer.json", c.bos_token_id, c.eos_token_id)
    requests = make_requests(tokenizer, args.requests, manifest.config.vocab_size)

    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_checkpoint(args.model, args.out / "hf")).eval()
    serve_args = argparse.Namespace(model=args.model, provider="cpu", max_batch=8)
    times: dict[str, list[float]] = {"gpt2-onnx serve": [], "transformers": []}
    with server("continuous", serve_args) as (url, name):
        score_server(url, name, requests[:5], args.max_tokens)  # warm-up
        score_transformers(hf, requests[:5])
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            ours = score_server(url, name, requests, args.max_tokens)
            times["gpt2-onnx serve"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = score_transformers(hf, requests)
            times["transformers"].append(time.perf_counter() - t0)
    diff = max(abs(a - b) for (a, _), (b, _) in zip(ours, ref))
    same_greedy = sum(a == b for (_, a), (_, b) in zip(ours, ref))
    rows = {k: statistics.median(v) / len(requests) * 1e3 for k, v in times.items()}
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "requests": len(requests),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "text": "fixture heldout.txt" if FIXTURE_TEXT.is_file() else "random tokens",
        "ms_per_request": rows,
        "round_seconds": times,
        "max_abs_logprob_diff": diff,
        "same_greedy": f"{same_greedy}/{len(requests)}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"| runner | ms/request (median of {args.rounds} rounds, {len(requests)} requests) |")
    print("|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    print(f"max |Δ logprob| {diff:.2e}; greedy flags equal {same_greedy}/{len(requests)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
