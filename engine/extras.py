"""Optional dependencies: a missing one is one line naming the pip extra that installs it.

`pip install gpt2-onnx` gives the engine (onnxruntime, tokenizers, numpy). Exporting needs
torch and onnx_ir (`[export]`); the benchmark's transformers baselines and its plots need
transformers and matplotlib (`[bench]`). Without these helpers a command that needs one of
them ends in a ModuleNotFoundError, which the CLI can only report as an internal error.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from .contract import UserError


class MissingExtraError(UserError, ImportError):
    """A third-party module that an optional feature needs is not installed; the message names
    the module and the `pip install 'gpt2-onnx[EXTRA]'` that installs it."""


def missing_extra_message(module: str, extra: str, purpose: str) -> str:
    return f"{purpose} needs {module}, which is not installed: pip install 'gpt2-onnx[{extra}]'"


@contextmanager
def needs_extra(extra: str, purpose: str) -> Iterator[None]:
    """Turn a ModuleNotFoundError for a third-party module inside the block into a
    MissingExtraError. A missing gpt2onnx module is a broken install, not a missing extra,
    and stays what it is."""
    try:
        yield
    except ModuleNotFoundError as e:
        if not e.name or e.name.partition(".")[0] == "gpt2onnx":
            raise
        raise MissingExtraError(missing_extra_message(e.name.partition(".")[0], extra, purpose)) from e


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`; raises MissingExtraError when it, or a module it imports, is not installed."""
    with needs_extra(extra, purpose):
        return importlib.import_module(module)


def check_installed(module: str, extra: str, purpose: str, or_else: str = "") -> None:
    """Fail early, without importing it, for a module that a worker process will import later.
    `or_else` is another way out, added to the message. Raises MissingExtraError."""
    if importlib.util.find_spec(module) is None:
        alternative = f", or {or_else}" if or_else else ""
        raise MissingExtraError(missing_extra_message(module, extra, purpose) + alternative)
