"""`gpt2-onnx serve`: flags in, the port bound, the model found (or exported on first use) and
loaded, then serve/server.py serves (serve/ray_serve.py with --ray).

`--model` / `--random-init` take what `generate` takes: a model folder, or a checkpoint exported
once into --models-dir with the shared cache, the one the server batches in (export/model_source.py).
A bad flag, a port in use or a missing `[serve]` extra is one line before anything is exported or
loaded. The server needs fastapi and uvicorn (`pip install 'gpt2-onnx[serve]'`), imported only
here, so the other commands work without them.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from gpt2onnx.engine import inputs
from gpt2onnx.engine.contract import DTYPES, InputError, Manifest, UsageError, UserError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.extras import needs_extra
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.engine.runtime import resolve_device
from gpt2onnx.engine.speculation import DRAFTS_A_STEP
from gpt2onnx.export.cli import HelpFormatter
from gpt2onnx.export.model_source import resolve_model

log = logging.getLogger("gpt2onnx")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        parents=parents,
        help="serve a model over HTTP with OpenAI's completions API",
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder, or anything `export --model` takes (a hub id, a Hugging "
                                     "Face folder), exported with the shared cache into --models-dir on first use")  # fmt: skip
    src.add_argument("--random-init", metavar="SIZE", help="a random-weight model of SIZE (exported into "
                                                           "--models-dir on first use); its text is meaningless")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init's weights")
    p.add_argument("--dtype", choices=DTYPES, help="dtype when exporting on first use (default: fp16 where the "
                                                   "server runs on CUDA, which the shared cache needs there; "
                                                   "else fp32)")  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer folder when exporting on first use")
    p.add_argument("--models-dir", default="models", help="where models exported on first use are kept")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a slot; past it, 429"
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding by prompt lookup for every request that allows it (greedy or "
        "plain sampling) and does not say its own prompt_lookup: up to N tokens a step (0 = off)",
    )
    p.add_argument("--draft-model", metavar="DIR",
                   help="speculative decoding: a smaller exported model (shared cache, the same tokenizer) "
                   "that proposes tokens for every request it can serve (greedy or plain sampling; the "
                   "model's own tokens or distribution) when a draft run costs at most 20%% of the "
                   "target's (measured at load; else only requests that pass draft_tokens); /metrics "
                   "counts proposed and accepted tokens")  # fmt: skip
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider")
    p.add_argument(
        "--served-model-name",
        help="the model's name in the API (requests' `model`, /v1/models); default: the manifest's checkpoint",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on SIGTERM or Ctrl-C before they are cancelled",
    )
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (headers and body) from its first byte; "
                        "then 408 and the connection is closed")  # fmt: skip
    p.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle connection stays open between requests")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=None,
                   help="connections served at once; past it a request gets 503 (default: 256, or twice "
                        "--max-batch + --max-queue when that is more)")  # fmt: skip
    ray = p.add_argument_group("replicas on Ray Serve (the [ray] extra)")
    ray.add_argument("--ray", action="store_true", help="serve replicas on a Ray cluster behind one endpoint")
    ray.add_argument("--ray-address", default=None,
                     help="the cluster to join: HOST:PORT, or auto (the one `ray start --head` runs on this "
                          "machine); default: RAY_ADDRESS, else a private one on loopback that stops with "
                          "the server")  # fmt: skip
    ray.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default: 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: the fewest replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: the most replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests in flight per replica it aims at (default: max batch)")  # fmt: skip
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves per replica; its engine uses that many threads")  # fmt: skip
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    p.set_defaults(run=run)


def check_flags(args: argparse.Namespace) -> None:
    """The flags through the API's input gate, before anything is bound or loaded."""
    ray_flags = [f for f in RAY_FLAGS if getattr(args, f.lstrip("-").replace("-", "_")) is not None]
    if ray_flags and not args.ray:
        raise UsageError(f"{ray_flags[0]} is for replicas on Ray: add --ray; see gpt2-onnx serve --help")
    try:
        args.max_batch = inputs.check("max_batch", args.max_batch, "--max-batch")
        args.max_queue = inputs.Count(1, 1 << 20, "an integer from 1 to 1048576")(
            "--max-queue", args.max_queue
        )
        inputs.Count(0, 65535, "a port number from 0 to 65535")("--port", args.port)
        inputs.Real(0.0, 86400.0, "seconds from 0 to 86400")("--drain-timeout", args.drain_timeout)
        seconds = inputs.Real(0.0, 86400.0, "seconds above 0, at most 86400", low_open=True)
        seconds("--read-timeout", args.read_timeout)
        seconds("--timeout-keep-alive", args.timeout_keep_alive)
        inputs.Count(1, 1 << 20, "an integer from 1 to 1048576", optional=True)(
            "--max-connections", args.max_connections
        )
        DRAFTS_A_STEP("--prompt-lookup", args.prompt_lookup)
        if args.ray:
            args.scaling = scaling(args)
            inputs.Real(0.01, 1024.0, "a number of CPUs from 0.01 to 1024")(
                "--replica-cpus", args.replica_cpus
            )
            inputs.Real(0.0, 64.0, "a number of GPUs from 0 to 64")("--replica-gpus", args.replica_gpus)
    except InputError as e:
        raise UsageError(f"{e}; see gpt2-onnx serve --help") from None


RAY_FLAGS = ("--ray-address", "--replicas", "--min-replicas", "--max-replicas", "--target-ongoing-requests")


def scaling(args: argparse.Namespace):
    """--replicas, or the autoscaling flags (not both), checked."""
    from gpt2onnx.serve.ray_serve import Scaling  # only with --ray: it imports ray

    count = inputs.Count(1, 1024, "an integer from 1 to 1024")
    auto = [args.min_replicas, args.max_replicas, args.target_ongoing_requests]
    if args.replicas is not None and any(x is not None for x in auto):
        raise InputError("--replicas is a fixed count: leave out --min-replicas, --max-replicas and "
                         "--target-ongoing-requests, or --replicas to autoscale")  # fmt: skip
    if all(x is None for x in auto):
        return Scaling(replicas=count("--replicas", 1 if args.replicas is None else args.replicas))
    low = count("--min-replicas", 1 if args.min_replicas is None else args.min_replicas)
    high = count("--max-replicas", low if args.max_replicas is None else args.max_replicas)
    if high < low:
        raise InputError(f"--max-replicas {high} is below --min-replicas {low}")
    target = args.target_ongoing_requests or float(args.max_batch)
    target = inputs.Real(0.1, 1e6, "a number of requests above 0")("--target-ongoing-requests", target)
    return Scaling(None, low, high, target)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a port in use fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise UsageError(
            f"--host {host!r} is not an address to listen on ({e}); see gpt2-onnx serve --help"
        ) from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
        ) from None
    return sock


def run(args: argparse.Namespace) -> int:
    if args.ray:
        with needs_extra("ray", "gpt2-onnx serve --ray"):
            from gpt2onnx.serve import ray_serve  # noqa: F401  (ray, and the server's own imports)
    check_flags(args)
    with needs_extra("serve", "gpt2-onnx serve"):
        from gpt2onnx.serve import server
    sock = bind(args.host, args.port)
    with sock:
        folder = resolve_model(args.model, args.random_init, args.seed, first_use_dtype(args), args.tokenizer,
                               args.models_dir, kv_cache="shared")  # fmt: skip
        if args.ray:
            return run_on_ray(args, sock, folder)
        engine = Engine.load(folder, provider=args.provider, max_batch=args.max_batch, max_queue=args.max_queue,
                             draft=args.draft_model, prompt_lookup=args.prompt_lookup)  # fmt: skip
        check_shared(engine.manifest, engine.folder)
        name = args.served_model_name or engine.manifest.source.checkpoint
        announce(sock, name, f"max batch {args.max_batch}, max queue {args.max_queue}")
        limits = server.Limits(args.read_timeout, args.timeout_keep_alive, args.max_connections)
        server.serve(engine, sock, name, args.drain_timeout, log_level(args), limits)
    return 0


def first_use_dtype(args: argparse.Namespace) -> str:
    """--dtype, else what runs best where the server will: fp16 on CUDA (the shared cache's
    GroupQueryAttention has CUDA kernels in fp16 only), fp32 on the CPU. Used only when exporting."""
    if args.dtype:
        return args.dtype
    if args.provider == "cpu":
        return "fp32"
    if args.ray:  # the replicas' device: Ray hides the GPUs from a replica without one
        gpu = args.provider == "cuda" or args.replica_gpus > 0
    else:
        gpu = resolve_device(args.provider) == "cuda"
    return "fp16" if gpu else "fp32"


def check_shared(manifest: Manifest, folder: Path) -> None:
    """The server batches requests in the slots of the shared cache: a concat-cache folder is refused."""
    if manifest.kv_cache != "shared":
        source = manifest.source
        size = source.checkpoint.removeprefix("random-init:")
        again = (
            f"--random-init {size} --seed {source.seed}"
            if source.random_init
            else f"--model {source.checkpoint}"
        )
        raise UserError(f"{folder} has the {manifest.kv_cache} cache, but the server batches requests in the "
                        "slots of the shared cache: export the model again with --kv-cache shared, or serve "
                        f"its checkpoint ({again}), which is exported with it on first use")  # fmt: skip


def announce(sock: socket.socket, name: str, settings: str) -> None:
    """The line that says the server is up; from here a connection waits in the socket's backlog
    until uvicorn accepts it, rather than being refused (a client that starts on the line, as the
    load benchmark does, used to find nothing listening yet)."""
    sock.listen(socket.SOMAXCONN)  # uvicorn's own listen() on the same socket only sets the backlog
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"gpt2-onnx: serving {name!r} on http://{shown}:{port}/v1 ({settings}); SIGTERM or Ctrl-C drains "
          "and stops it", file=sys.stderr, flush=True)  # fmt: skip


def log_level(args: argparse.Namespace) -> str:
    return "debug" if args.debug else "warning" if args.quiet else "info"


def run_on_ray(args: argparse.Namespace, sock: socket.socket, folder: Path) -> int:
    """Replicas on a Ray cluster behind this process's endpoint (serve/ray_serve.py) until
    SIGTERM or Ctrl-C, then drained and taken down."""
    from gpt2onnx.serve import ray_serve, server

    folder = folder.resolve()  # replicas run elsewhere: an absolute path (the same on every node)
    manifest = read_manifest(folder)
    check_shared(manifest, folder)
    name = args.served_model_name or manifest.source.checkpoint
    threads = max(1, int(args.replica_cpus))
    load = dict(provider=args.provider, max_batch=args.max_batch, max_queue=args.max_queue, threads=threads,
                prompt_lookup=args.prompt_lookup)  # fmt: skip
    if args.draft_model:  # each replica loads it too: checked here first, so a bad one is one line
        draft = Path(args.draft_model).resolve()
        if read_manifest(draft).kv_cache != "shared":
            raise UsageError(f"--draft-model {draft} has the concat cache; export it with --kv-cache shared")
        load["draft"] = str(draft)
    settings = (f"Ray Serve, {args.scaling}, max batch {args.max_batch}, max queue {args.max_queue} per "
                "replica")  # fmt: skip
    ray_serve.serve_replicas(
        sock, str(folder), name, load, args.drain_timeout, args.scaling, args.replica_cpus, args.replica_gpus,
        ray_address=args.ray_address, ray_log_level=logging.DEBUG if args.debug else logging.WARNING,
        log_level=log_level(args), announce=lambda: announce(sock, name, settings),
        limits=server.Limits(args.read_timeout, args.timeout_keep_alive, args.max_connections),
    )  # fmt: skip
    return 0
