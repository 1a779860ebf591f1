"""The `gpt2-onnx` command: one subcommand per job, each in its own package's cli module.

Errors from bad input (UserError, ValueError) print as one line on stderr with a non-zero
exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .contract import UserError


def build_parser() -> argparse.ArgumentParser:
    from gpt2onnx.export import cli as export_cli

    parser = argparse.ArgumentParser(prog="gpt2-onnx", description="Export and run GPT-2 models on ONNX Runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    export_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="gpt2-onnx: %(message)s", stream=sys.stderr)
    try:
        return args.run(args)
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
        print(f"gpt2-onnx: internal error: {e.__class__.__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
