"""`gpt2-onnx serve`: flags in, the port bound, the model loaded, then gpt2onnx/server.py serves.

A bad flag, a port in use or a missing `[serve]` extra is one line before the model is loaded.
The server needs fastapi and uvicorn (`pip install 'gpt2-onnx[serve]'`), imported only here, so
the other commands work without them.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from gpt2onnx.engine import inputs
from gpt2onnx.engine.contract import InputError, UsageError, UserError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.extras import needs_extra

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
    p.set_defaults(run=run)


def check_flags(args: argparse.Namespace) -> None:
    """The flags through the API's input gate, before anything is bound or loaded."""
    try:
        args.max_batch = inputs.check("max_batch", args.max_batch, "--max-batch")
        args.max_queue = inputs.Count(1, 1 << 20, "an integer from 1 to 1048576")(
            "--max-queue", args.max_queue
        )
        inputs.Count(0, 65535, "a port number from 0 to 65535")("--port", args.port)
        inputs.Real(0.0, 86400.0, "seconds from 0 to 86400")("--drain-timeout", args.drain_timeout)
    except InputError as e:
        raise UsageError(f"{e}; see gpt2-onnx serve --help") from None


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
    check_flags(args)
    with needs_extra("serve", "gpt2-onnx serve"):
        from gpt2onnx import server
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
