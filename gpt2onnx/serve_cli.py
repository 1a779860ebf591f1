"""`gpt2-onnx serve`: flags in, the port bound, the model loaded, then gpt2onnx/server.py serves.

A bad flag, a port in use or a missing `[serve]` extra is one line before the model is loaded.
The server needs fastapi and uvicorn (`pip install 'gpt2-onnx[serve]'`), imported only here, so
the other commands work without them.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from gpt2onnx.engine import inputs
from gpt2onnx.engine.contract import InputError, UsageError, UserError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.extras import needs_extra
from gpt2onnx.engine.model_folder import read_manifest

log = logging.getLogger("gpt2onnx")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        parents=parents,
        help="serve a model over HTTP with OpenAI's completions API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a model folder (what `gpt2-onnx export` writes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a slot; past it, 429"
    )
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
    ray = p.add_argument_group("replicas on Ray Serve (the [ray] extra)")
    ray.add_argument("--ray", action="store_true", help="serve replicas on a Ray cluster behind one endpoint")
    ray.add_argument("--ray-address", default=None,
                     help="the cluster (auto: the running one; default: RAY_ADDRESS, a running local one, "
                          "else a new local one)")  # fmt: skip
    ray.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
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
    from gpt2onnx.ray_serve import Scaling  # only with --ray: it imports ray

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
            from gpt2onnx import ray_serve  # noqa: F401  (ray, and the server's own imports)
    check_flags(args)
    with needs_extra("serve", "gpt2-onnx serve"):
        from gpt2onnx import server
    if args.ray:
        return run_on_ray(args)
    sock = bind(args.host, args.port)
    with sock:
        engine = Engine.load(
            args.model, provider=args.provider, max_batch=args.max_batch, max_queue=args.max_queue
        )
        if engine.manifest.kv_cache != "shared":  # requests join a running batch in the shared cache's slots
            raise UserError(
                f"{engine.folder} has the {engine.manifest.kv_cache} cache, but the server batches requests in "
                "the slots of the shared cache: export the model again with --kv-cache shared"
            )
        name = args.served_model_name or engine.manifest.source.checkpoint
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"gpt2-onnx: serving {name!r} on http://{shown}:{port}/v1 (max batch {args.max_batch}, "
            f"max queue {args.max_queue}); SIGTERM or Ctrl-C drains and stops it",
            file=sys.stderr,
            flush=True,
        )
        level = "debug" if args.debug else "warning" if args.quiet else "info"
        server.serve(engine, sock, name, args.drain_timeout, level)
    return 0


def connect(address: str | None, level: int) -> bool:
    """Join the Ray cluster at `address`; without one, the running cluster (RAY_ADDRESS, or one
    started on this machine with `ray start --head`), else a new local one. Returns whether this
    process started it (and so stops it at the end)."""
    import ray

    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=level, include_dashboard=False)
        return False
    try:
        ray.init(address="auto", logging_level=level, include_dashboard=False)
        return False
    except ConnectionError:
        log.info("no running Ray cluster found: starting a local one for this server")
        ray.init(address="local", logging_level=level, include_dashboard=False)
        return True


def run_on_ray(args: argparse.Namespace) -> int:
    """Deploy the replicas on the cluster, say where they serve, wait for SIGTERM or Ctrl-C, then
    take the application down (each replica drains) and return."""
    import signal

    import ray
    from ray import serve

    from gpt2onnx import ray_serve

    folder = Path(args.model).resolve()  # replicas run elsewhere: an absolute path (on every node)
    manifest = read_manifest(folder)
    if manifest.kv_cache != "shared":
        raise UserError(f"{folder} has the {manifest.kv_cache} cache, but the server batches requests in the "
                        "slots of the shared cache: export the model again with --kv-cache shared")  # fmt: skip
    name = args.served_model_name or manifest.source.checkpoint
    threads = max(1, int(args.replica_cpus))
    load = dict(provider=args.provider, max_batch=args.max_batch, max_queue=args.max_queue, threads=threads)
    level = logging.DEBUG if args.debug else logging.WARNING
    started_here = connect(args.ray_address, level)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = ray_serve.application(str(folder), name, load, args.drain_timeout, args.scaling,
                                    args.replica_cpus, args.replica_gpus)  # fmt: skip
        serve.run(app, name=ray_serve.APP_NAME, route_prefix="/")  # returns when the replicas are up
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait, after Ray's
        shown = f"[{args.host}]" if ":" in args.host else args.host  # processes started (they inherit it)
        print(f"gpt2-onnx: serving {name!r} on http://{shown}:{args.port}/v1 with Ray Serve ({args.scaling}, "
              f"max batch {args.max_batch}, max queue {args.max_queue} per replica); SIGTERM or Ctrl-C "
              "drains and stops it", file=sys.stderr, flush=True)  # fmt: skip
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        log.warning("draining: running requests get %gs to finish", args.drain_timeout)
        serve.delete(ray_serve.APP_NAME)  # each replica's lifespan closes its engine (the drain)
    finally:
        if started_here:
            serve.shutdown()
        ray.shutdown()
    return 0
