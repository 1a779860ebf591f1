"""`gpt2-onnx generate`: flags in, through the engine's own input gate, then `Engine` does the work.

A bad flag is one line, `gpt2-onnx: error: <what is wrong>; see gpt2-onnx generate --help`, exit 2,
found before any model is loaded or exported. `--model` / `--random-init` that are not a model
folder are exported on first use (export/model_source.py), so this command sits above both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys

from gpt2onnx.engine import inputs
from gpt2onnx.engine.contract import DTYPES, KV_CACHES, InputError, UsageError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.speculation import DRAFTS_A_STEP
from gpt2onnx.export.model_source import resolve_model

log = logging.getLogger("gpt2onnx")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        parents=parents,
        help="generate text with an exported model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="a model folder, or anything `export --model` takes (exported into --models-dir on first use)",
    )
    src.add_argument(
        "--random-init",
        metavar="SIZE",
        help="a random-weight model of SIZE (exported into --models-dir on first use); its text is meaningless",
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument(
        "--temperature",
        type=finite,
        help="sampling temperature (0 = greedy, else 1e-05 to 100); default greedy unless a "
        "sampling flag is given, then 1.0",
    )
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=finite, default=1.0, help="nucleus sampling mass, in (0, 1] (1 = off)")
    p.add_argument(
        "--min-p",
        type=finite,
        default=0.0,
        help="drop tokens below min_p x the top probability, in [0, 1] (0 = off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=finite,
        default=1.0,
        help="transformers-style penalty on prompt and generated tokens, in [0.01, 100] (1 = off)",
    )
    p.add_argument(
        "--presence-penalty",
        type=finite,
        default=0.0,
        help="OpenAI-style presence penalty on generated tokens, in [-2, 2]",
    )
    p.add_argument(
        "--frequency-penalty",
        type=finite,
        default=0.0,
        help="OpenAI-style frequency penalty on generated tokens, in [-2, 2]",
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        type=bias_item,
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (in [-10000, 10000]; -100 bans it) to token ID's logit; repeatable",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="sampling seed (same seed, same output); also the seed of --random-init weights",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop a row when its text contains this string (not included); repeatable",
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams (1 = greedy or sampling); as transformers' "
        "generate(num_beams=...), each beam a row of the batch (needs --kv-cache shared, the CPU)",
    )
    p.add_argument(
        "--length-penalty",
        type=finite,
        default=1.0,
        help="beam search: a hypothesis scores its summed log-probabilities / length ** this",
    )
    p.add_argument(
        "--early-stopping",
        choices=EARLY_STOPPING_FLAGS,
        default="false",
        help="beam search: true stops once num_beams hypotheses are done; false when no running "
        "beam can beat them (at the current length); never when none could at any length",
    )
    p.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        help="beam search: how many of the best hypotheses to return (at most --num-beams)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding: propose up to N tokens a step from the prompt and the text so "
        "far, verified in one run (the same greedy tokens, the same sampling distribution; needs "
        "--kv-cache shared, the CPU) (0 = off)",
    )
    p.add_argument(
        "--draft-model",
        metavar="DIR",
        help="speculative decoding with a smaller exported model (shared cache, the same tokenizer) "
        "that proposes --num-speculative-tokens tokens a step, verified in one run",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        metavar="K",
        help="with --draft-model: tokens it proposes a step (default: 4 when a draft run costs at most "
        "20%% of the target's, measured at load; else the draft is left unused unless K is given)",
    )
    p.add_argument("--no-bos", action="store_true", help="do not prepend <|endoftext|> to prompts")
    p.add_argument(
        "--truncate", choices=["left"], help="drop a too-long prompt's oldest tokens instead of failing"
    )
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider")
    p.add_argument("--max-batch", type=int, default=8, help="prompts run together; more are run in turns")
    p.add_argument(
        "--cuda-graphs",
        choices=SWITCH,
        default="auto",
        help="decode steps of fixed shapes, captured as CUDA graphs (needs --kv-cache shared; auto: on with the CUDA provider; on the CPU: fixed shapes, no capture)",
    )
    p.add_argument(
        "--device-sampling",
        choices=SWITCH,
        default="auto",
        help="pick tokens with the sampling graph where the logits are (auto: on with the CUDA provider)",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with completions and timing")
    p.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="dtype when exporting on first use (int8: CPU)"
    )
    p.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        help="KV cache layout when exporting on first use (shared: updated in place, fastest; see export "
        "--help) (default: concat; shared with --num-beams above 1)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder when exporting on first use")
    p.add_argument("--models-dir", default="models", help="where models exported on first use are kept")
    p.set_defaults(run=run)


SWITCH = {"auto": None, "on": True, "off": False}
EARLY_STOPPING_FLAGS = {"true": True, "false": False, "never": "never"}


def finite(text: str) -> float:
    """argparse type of a float flag: float() takes 'nan' and 'inf', which no setting means."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def bias_item(text: str) -> tuple[int, float]:
    """argparse type of --logit-bias: ID=BIAS, an integer token id and a finite bias."""
    token, _, value = text.partition("=")
    try:
        return int(token), finite(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ID=BIAS (an integer id, a finite bias), e.g. --logit-bias 50256=-100"
        ) from None


GENERATE_COUNTS_AND_NUMBERS = (
    "max_new_tokens", "max_batch", "seed", "top_k", "temperature", "top_p", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip


def completion_json(completion) -> dict:
    """A completion as --json prints it: with `beams` (every returned hypothesis and its score)
    only for a beam search."""
    out = dataclasses.asdict(completion)
    if out["beams"] is None:
        del out["beams"]
    return out


def check_generate_flags(args: argparse.Namespace) -> None:
    """generate's flags through the API's input gate (the rules Engine.generate applies), before
    any model is loaded or exported, so that a bad one costs nothing; errors name the flag."""
    try:
        for name in GENERATE_COUNTS_AND_NUMBERS:
            setattr(args, name, inputs.check(name, getattr(args, name), "--" + name.replace("_", "-")))
        args.logit_bias = inputs.logit_bias(dict(args.logit_bias), label="--logit-bias")
        args.stop = inputs.stop_strings(args.stop, label="--stop")
        DRAFTS_A_STEP("--prompt-lookup", args.prompt_lookup)
    except InputError as e:
        raise UsageError(f"{e}; see gpt2-onnx generate --help") from None
    beams = args.num_beams
    if beams < 1 or beams > args.max_batch:
        raise UsageError(
            f"--num-beams must be from 1 to --max-batch ({args.max_batch}; each beam is a row), got {beams}; "
            "see gpt2-onnx generate --help"
        )
    if not 1 <= args.num_return_sequences <= beams:
        raise UsageError(
            f"--num-return-sequences must be from 1 to --num-beams ({beams}), got {args.num_return_sequences}; "
            "see gpt2-onnx generate --help"
        )
    if args.num_speculative_tokens is not None and not args.draft_model:
        raise UsageError("--num-speculative-tokens needs --draft-model DIR; see gpt2-onnx generate --help")
    if args.draft_model and args.prompt_lookup:
        raise UsageError(
            "--draft-model and --prompt-lookup are two ways to speculate: pass one; see gpt2-onnx generate --help"
        )
    if beams > 1 and args.stream:
        raise UsageError(
            "--stream does not apply to beam search (the best beams are known at the end); drop one; "
            "see gpt2-onnx generate --help"
        )
    if args.no_bos and not all(args.prompt):
        raise UsageError("an empty prompt needs the BOS token to generate from; drop --no-bos or pass text")


def run(args: argparse.Namespace) -> int:
    check_generate_flags(args)
    sampling = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=args.logit_bias, seed=args.seed,
    )  # fmt: skip
    folder = resolve_model(
        args.model,
        args.random_init,
        args.seed or 0,
        args.dtype,
        args.tokenizer,
        args.models_dir,
        args.kv_cache
        or ("shared" if args.num_beams > 1 or args.prompt_lookup or args.draft_model else "concat"),
    )
    engine = Engine.load(
        folder,
        provider=args.provider,
        max_batch=args.max_batch,
        cuda_graphs=SWITCH[args.cuda_graphs],
        device_sampling=SWITCH[args.device_sampling],
        draft=args.draft_model,
    )
    options = dict(
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        prepend_bos=not args.no_bos,
        truncate=args.truncate,
        **sampling,
    )
    beams = dict(num_beams=args.num_beams, length_penalty=args.length_penalty,
                 early_stopping=EARLY_STOPPING_FLAGS[args.early_stopping],
                 num_return_sequences=args.num_return_sequences, prompt_lookup=args.prompt_lookup,
                 draft_tokens=args.num_speculative_tokens)  # fmt: skip
    if args.stream and not args.json:
        for prompt in args.prompt:
            print(prompt, end="", flush=True)
            for piece in engine.stream(prompt, **options, prompt_lookup=args.prompt_lookup,
                                       draft_tokens=args.num_speculative_tokens):  # fmt: skip
                print(piece, end="", flush=True)
            print()
        return 0
    result = engine.generate(args.prompt, **options, **beams)
    source = engine.manifest.source
    if args.json:
        out = {
            "model": source.checkpoint,
            "model_folder": str(engine.folder),
            "random_init": source.random_init,
            "provider": engine.device,
            "completions": [completion_json(c) for c in result.completions],
            "timing": result.timing.as_dict(),
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        for c in result.completions:
            if c.beams is not None and len(c.beams) > 1:
                for b in c.beams:
                    print(f"[{b.score:.4f}] {c.prompt + b.text}")
            else:
                print(c.prompt + c.text)
        t = result.timing.as_dict()
        log.info(
            "prefill %.1f ms, decode %.2f ms/token, %.1f tokens/s",
            t["prefill_ms"],
            t["decode_ms_per_token"],
            t["tokens_per_s"],
        )
    if source.random_init and not args.json:
        print(
            f"gpt2-onnx: note: {source.checkpoint} has RANDOM weights (seed {source.seed}); the text above is meaningless",
            file=sys.stderr,
        )
    return 0
