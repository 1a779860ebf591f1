"""TransformerLens's run_with_cache on a Hugging Face GPT-2 folder: the reference of
Engine.run_with_cache (tests) and its rival (benchmarks/inspect_bench.py).

    .venv-transformer-lens/bin/python benchmarks/transformer_lens_runner.py --model HF_FOLDER \
        --tokens TOKENS.npy [--out CACHE.npz] [--names NAME ...] [--repeats N --threads T --timing T.json]

Loads the folder with TransformerBridge.boot_transformers (no hub access, no compatibility mode:
the raw bridge, whose logits are transformers'), runs `run_with_cache(tokens, names_filter=...)`
and writes the logits and every cached activation as float32 (ints as int64) to CACHE.npz. With
--repeats, it times that many calls (after the first) and writes their seconds to --timing. Runs in .venv-transformer-lens (.ci/setup-transformer-lens); imports nothing
from gpt2onnx.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Hugging Face GPT-2 folder")
    parser.add_argument("--tokens", required=True, type=Path, help="a .npy of int64 token ids (batch, pos)")
    parser.add_argument("--out", type=Path, help="the .npz to write (default: none)")
    parser.add_argument("--names", nargs="*", help="names_filter (default: every name)")
    parser.add_argument("--repeats", type=int, default=0, help="time this many calls")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads")
    parser.add_argument("--timing", type=Path, help="the .json of the timed calls' seconds")
    args = parser.parse_args()

    import torch
    from transformer_lens.model_bridge import TransformerBridge

    if args.threads:
        torch.set_num_threads(args.threads)
    bridge = TransformerBridge.boot_transformers(args.model, device="cpu")
    tokens = torch.from_numpy(np.load(args.tokens))
    names = args.names or None
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=names)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            bridge.run_with_cache(tokens, names_filter=names)
            seconds.append(time.perf_counter() - start)
    if args.out:
        arrays = {"logits": logits.float().numpy()}
        for name in cache.keys():
            value = cache[name]
            arrays[name] = value.numpy() if value.dtype == torch.int64 else value.float().numpy()
        np.savez(args.out, **arrays)
    if args.timing:
        info = {"seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "names": len(cache.keys())}  # fmt: skip
        args.timing.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
