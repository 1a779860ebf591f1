"""The `gpt2-onnx` command: one subcommand per job, each in its own package's cli module.

Errors from bad input (UserError, ValueError) print as one line on stderr with a non-zero
exit; `--debug` shows the traceback instead. A bad flag (unknown, unparsable, out of range) is
one line too, `gpt2-onnx: error: <what is wrong>; see gpt2-onnx CMD --help`, exit 2, found
before any model is loaded or exported: generate's flags go through the API's own input gate.

Ctrl-C, at any moment of any command (its imports, a model's load or export, a decode, a stream),
prints one line, `gpt2-onnx: interrupted`, and exits 130, with no traceback. `main` takes SIGINT
over before it imports the subcommands (numpy, onnxruntime, torch: seconds), which is why this
module and the package's __init__ import nothing heavy. The interrupted work cleans up as the
interrupt unwinds it (an export removes its temp folder, engine/atomic_folder.py), then the process
ends with os._exit: the engine's decode thread may be inside onnxruntime, and an interpreter
that exits under such a thread aborts ("terminate called without an active exception"). A second
Ctrl-C ends the process at once, clean-up done or not (what a kill leaves, the next command
recovers). SIGTERM and SIGHUP end it the same way, `gpt2-onnx: terminated (SIGTERM); ...`, exit
128 + the signal. A closed stdout (`| head`) ends it quietly, exit 141, as SIGPIPE would.
`serve` stops on Ctrl-C as on SIGTERM: while it serves, the server's own handler drains the
requests and the command exits 0 (serve/server.py); a Ctrl-C before it serves (imports, the
model's export or load) is an interrupt like any other: one line, 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

from gpt2onnx.engine.contract import UserError

log = logging.getLogger("gpt2onnx")
INTERRUPTED = "gpt2-onnx: interrupted"
BROKEN_PIPE = 128 + signal.SIGPIPE  # the status a shell reports for a process that SIGPIPE ended
interrupted = False  # a Ctrl-C came (set in the command's own process only: main(None))


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
    """The command's parser. Imports the subcommands, and with them numpy and onnxruntime."""
    from gpt2onnx import generate_cli, inspect_cli, score_cli
    from gpt2onnx.benchmarks import cli as bench_cli
    from gpt2onnx.benchmarks import serve_bench
    from gpt2onnx.export import cli as export_cli
    from gpt2onnx.serve import cli as serve_cli

    parser = Parser(prog="gpt2-onnx", description="Export and run GPT-2 models on ONNX Runtime.")
    add_log_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    common = argparse.ArgumentParser(add_help=False)
    add_log_flags(common, argparse.SUPPRESS)  # also accepted after the subcommand, without clobbering
    export_cli.add_parser(sub, parents=[common])
    generate_cli.add_parser(sub, parents=[common])
    score_cli.add_parser(sub, parents=[common])
    inspect_cli.add_parser(sub, parents=[common])
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
    """The command; returns its exit status. With argv None it is this process's own command (the
    console script, `python -m gpt2onnx`): Ctrl-C is taken over before anything else, and an
    interrupt, a signal or a closed stdout ends the process here (`leave`). Given a list (tests,
    other programs), those return 130, 128 + N or 141 like any other status."""
    owner = argv is None and threading.current_thread() is threading.main_thread()
    try:
        if owner:
            signal.signal(signal.SIGINT, interrupt)  # first: the subcommands' imports take seconds
        try:
            code, line = command(argv)
        finally:
            if owner:  # from here on a Ctrl-C ends the process at once
                signal.signal(signal.SIGINT, interrupt_again)
    except KeyboardInterrupt:  # came as the command was reporting its outcome
        code, line = 130, INTERRUPTED
    if interrupted:  # whatever the interrupt became on its way out: a closed pipe, a library's error
        code, line = 130, INTERRUPTED
    if owner and code >= 128:
        leave(code, line)
    if line:
        print(line, file=sys.stderr)
    return code


def command(argv: list[str] | None) -> tuple[int, str]:
    """Parse, run, and turn what ended the run into (exit status, the line to print or "")."""
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        setup_logging(args)
        with signals_as_interrupts():
            code = args.run(args)
        sys.stdout.flush()  # a closed stdout shows here, not in the interpreter's last flush
        return code, ""
    except Terminated as e:
        return 128 + e.signum, f"gpt2-onnx: terminated ({e.name}); temporary files were removed"
    except KeyboardInterrupt:
        return 130, INTERRUPTED
    except BrokenPipeError:  # stdout's reader is gone: nobody is left to tell
        return BROKEN_PIPE, ""
    except (UserError, ValueError, OSError) as e:
        if debug and not interrupted:
            raise
        return 2, f"gpt2-onnx: error: {e}"
    except Exception as e:  # a bug of ours: still one line, with the way to see more
        if debug and not interrupted:
            raise
        what = f"{e.__class__.__name__}: {e}"
        return 1, f"gpt2-onnx: internal error: {what} (rerun with --debug for the traceback)"


def setup_logging(args: argparse.Namespace) -> None:
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


def interrupt(signum, frame) -> None:
    """The first Ctrl-C: a KeyboardInterrupt, so that the work in progress cleans up as it
    unwinds; the next one does not wait for that."""
    global interrupted
    interrupted = True
    signal.signal(signal.SIGINT, interrupt_again)
    raise KeyboardInterrupt


def interrupt_again(signum, frame) -> NoReturn:
    leave(130, INTERRUPTED)


def leave(code: int, line: str) -> NoReturn:
    """End the process now with `code`, after what stdout holds and `line` on stderr. os._exit
    and not an interpreter exit: that aborts on the engine's decode thread if it is inside
    onnxruntime (see the module's docstring); the interrupted work has cleaned up already."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one line, however many more Ctrl-C come
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed file
            stream.flush()
    if line:
        with contextlib.suppress(OSError):
            os.write(2, f"{line}\n".encode())
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
