"""`gpt2-onnx inspect`: a prompt's activations (Engine.run_with_cache) written to a file that
numpy and PyTorch open directly: .npz (numpy.load) or .safetensors (safetensors' load_file, for
numpy or torch), one array per TransformerLens name.

    gpt2-onnx inspect --model DIR --prompt "Hello there" --output cache.npz
    gpt2-onnx inspect --model DIR --prompt "Hi" --names 'blocks.*.attn.hook_pattern' hook_embed --output p.safetensors

--names takes names or shell-style patterns (fnmatch); each must match at least one name. The
file is written to a temporary name beside it and renamed into place, so it is whole or absent.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
from pathlib import Path

import numpy as np

from gpt2onnx.engine.activations import sources
from gpt2onnx.engine.contract import UsageError, UserError
from gpt2onnx.engine.engine import Engine

FORMATS = (".npz", ".safetensors")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", parents=parents, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="write a prompt's activations (TransformerLens's names) to .npz or .safetensors")  # fmt: skip
    p.add_argument("--model", required=True, help="a model folder exported with --inspect")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text (<|endoftext|> is put first unless --no-bos)")
    source.add_argument("--tokens", help="token ids instead of a text, comma-separated: 50256,15496,995")
    p.add_argument("--no-bos", dest="bos", action="store_false", help="do not put <|endoftext|> first")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="names or patterns such as 'blocks.*.attn.hook_pattern' (default: every name)")  # fmt: skip
    p.add_argument("--output", required=True, type=Path, help="the file to write: .npz or .safetensors")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider")
    p.set_defaults(run=run)


def chosen(patterns: list[str] | None, n_layer: int) -> list[str] | None:
    """The names --names selects, in the cache's order; None for every name."""
    if not patterns:
        return None
    every = list(sources(n_layer))
    for pattern in patterns:
        if not fnmatch.filter(every, pattern):
            raise UsageError(
                f"--names {pattern!r} matches no activation of this {n_layer}-layer model; names are "
                "TransformerLens's, such as blocks.0.attn.hook_pattern or 'blocks.*.hook_resid_post'"
            )
    return [name for name in every if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--tokens {text!r} is not a comma-separated list of integers") from None


def run(args: argparse.Namespace) -> int:
    suffix = args.output.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--output {args.output} must end in .npz or .safetensors (the file's format)")
    if args.output.is_dir():
        raise UsageError(f"--output {args.output} is a folder; pass a file name ending in {suffix}")
    if not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: its folder {args.output.parent} does not exist")
    engine = Engine.load(args.model, provider=args.provider, max_batch=1)
    names = chosen(args.names, engine.manifest.config.n_layer)
    ids = token_list(args.tokens) if args.tokens is not None else engine.to_tokens(args.prompt, args.bos)
    if not ids:
        raise UsageError("the prompt gives no tokens; pass a text, or keep the BOS")
    _, cache = engine.run_with_cache([ids], names_filter=names)
    arrays = {name: np.ascontiguousarray(a) for name, a in cache.items()}
    str_tokens = engine.to_str_tokens(ids, prepend_bos=False)
    write(args.output, arrays, {"str_tokens": json.dumps(str_tokens), "model": str(args.model)})
    size = sum(a.nbytes for a in arrays.values())
    print(f"wrote {len(arrays)} activations of {len(ids)} tokens ({size / 2**20:.1f} MiB) to {args.output}")
    return 0


def write(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """`arrays` to `path` (.npz or .safetensors), whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if path.suffix.lower() == ".npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
                np.savez(f, **arrays)
        else:
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"--output {path} cannot be written ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
