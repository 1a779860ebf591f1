"""The `gpt2-onnx` command: one subcommand per job, each in its own package's cli module.

Errors from bad input (UserError, ValueError) print as one line on stderr with a non-zero
exit; `--debug` shows the traceback instead. A bad flag (unknown, unparsable, out of range) is
one line too, `gpt2-onnx: error: <what is wrong>; see gpt2-onnx CMD --help`, exit 2, found
before any model is loaded or exported: generate's flags go through the API's own input gate.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import NoReturn

from gpt2onnx import generate_cli, score_cli, serve_cli
from gpt2onnx.benchmarks import cli as bench_cli
from gpt2onnx.benchmarks import serve_bench
from gpt2onnx.engine.contract import UserError
from gpt2onnx.export import cli as export_cli

log = logging.getLogger("gpt2onnx")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, `gpt2-onnx: error: <what is wrong>; see gpt2-onnx CMD --help`
    and exit 2, instead of the whole usage text before the line that matters. Subcommands'
    parsers are of this class too (add_subparsers makes its parsers of the parent's class)."""

    commands: dict[str, argparse.ArgumentParser] | None = None  # the subcommands' parsers, by name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gpt2-onnx: error: {message}; see {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        """As argparse's, but an unknown flag is blamed on the subcommand it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = (self.commands or {}).get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(extras)[:200]}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2-onnx", description="Export and run GPT-2 models on ONNX Runtime.")
    add_log_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    common = argparse.ArgumentParser(add_help=False)
    add_log_flags(common, argparse.SUPPRESS)  # also accepted after the subcommand, without clobbering
    export_cli.add_parser(sub, parents=[common])
    generate_cli.add_parser(sub, parents=[common])
    score_cli.add_parser(sub, parents=[common])
    bench_cli.add_parser(sub, parents=[common])
    serve_cli.add_parser(sub, parents=[common])
    serve_bench.add_parser(sub, parents=[common])
    return parser


def add_log_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )
    parser.add_argument("--quiet", action="store_true", default=default, help="log warnings and errors only")
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help="log progress of every command (export logs it by default)",
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that an export (or any work in
    progress) cleans up the same way instead of dying with its temp folder on disk."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM (`kill`, a container stop) and SIGHUP (a closed terminal) raise Terminated for the
    duration; the previous handlers come back after. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chatty = args.command in ("export", "bench", "bench-serve") or args.verbose
    level = logging.DEBUG if args.debug else logging.INFO if chatty and not args.quiet else logging.WARNING
    # Our progress at `level`; the libraries' own INFO (the fusion and quantizer chatter) only with --debug.
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="gpt2-onnx: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    log.setLevel(level)
    try:
        with signals_as_interrupts():
            return args.run(args)
    except Terminated as e:
        print(f"gpt2-onnx: terminated ({e.name}); temporary files were removed", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("gpt2-onnx: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"gpt2-onnx: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, with the way to see more
        if args.debug:
            raise
        print(
            f"gpt2-onnx: internal error: {e.__class__.__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
