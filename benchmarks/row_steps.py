"""What a decode step costs as rows are added: model folders timed side by side at 1, 4 and 16
rows (32-token prompts, medians of 3 generations each), alternating so the machine's drift hits
them alike; with --text, each folder's perplexity on it (stride 64).

    python -m gpt2onnx.benchmarks.row_steps NAME=FOLDER [NAME=FOLDER ...] --out DIR
        [--rows 1,4,16] [--rounds 3] [--new-tokens 32] [--text FILE]

For the int8 kernels (issue 25): `export --dtype int8` (rows) beside `--int8-kernel blocks` and
fp32, from the same weights. Writes DIR/row_steps.json with the machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .machine import machine_info


def step_ms(folder: Path, rows: int, new_tokens: int, signed_int8: bool = True) -> float:
    from gpt2onnx.engine.engine import Engine
    from gpt2onnx.engine.session import SessionConfig

    config = SessionConfig(provider="cpu", max_batch=max(rows, 1), threads=2, signed_int8=signed_int8)
    engine = Engine(folder, config)
    prompts = [list(range(1000 + r, 1032 + r)) for r in range(rows)]
    engine.generate(prompts, max_new_tokens=4, ignore_eos=True)  # warm-up
    runs = [engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True) for _ in range(3)]
    return float(np.median([r.timing.as_dict()["decode_ms_per_token"] for r in runs]))


def folder_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path, "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: pass NAME=FOLDER with an exported model folder")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=folder_arg, metavar="NAME=FOLDER")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text", type=Path, help="a text for the perplexity of each folder")
    parser.add_argument("--unsigned", action="store_true",
                        help="also time each int8 folder with its weights kept u8 (as NAME-u8): on a CPU "
                        "with VNNI the engine multiplies them as s8 (engine/signed_int8.py)")  # fmt: skip
    args = parser.parse_args(argv)
    folders = {name: (folder, True) for name, folder in args.folders}
    if args.unsigned:
        folders |= {f"{name}-u8": (folder, False) for name, folder in args.folders
                    if json.loads((folder / "manifest.json").read_text())["dtype"] == "int8"}  # fmt: skip
    rows = [int(r) for r in args.rows.split(",")]
    times: dict[str, dict[int, list[float]]] = {name: {r: [] for r in rows} for name in folders}
    for _ in range(args.rounds):
        for r in rows:
            for name, (folder, signed) in folders.items():
                times[name][r].append(step_ms(folder, r, args.new_tokens, signed))
    steps = {name: {r: float(np.median(v)) for r, v in t.items()} for name, t in times.items()}
    result = {"machine": machine_info(), "ms_per_step": steps, "rounds": args.rounds,
              "signed_int8": {name: signed for name, (_, signed) in folders.items()},
              "most_over_one_row": {n: s[max(rows)] / s[min(rows)] for n, s in steps.items()}}  # fmt: skip
    if args.text:
        from gpt2onnx.engine.engine import Engine

        text = args.text.read_text()
        result["perplexity"] = {
            name: Engine.load(f, provider="cpu").score(text, prepend_bos=False, stride=64).perplexity
            for name, (f, _) in folders.items()
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "row_steps.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
