"""gpt2-onnx: GPT-2 on ONNX Runtime. The public API:

    from gpt2onnx import Engine
    engine = Engine.load("models/gpt2-fp32")
    print(engine.generate("Hello", max_new_tokens=20).completions[0].text)

Packages, each importing only those below it: `gpt2onnx.engine` (the model folder contract, the
session, sampling, tokenization, the decode loop, `Engine`), `gpt2onnx.export` (checkpoint ->
model folder), `gpt2onnx.serve` (the OpenAI-compatible server), `gpt2onnx.benchmarks`, and at the
top the `gpt2-onnx` commands (gpt2onnx/cli.py).

The names below are imported on first use (PEP 562): every `gpt2onnx.*` import runs this file
first, the command's included, and the command must take Ctrl-C over before numpy and
onnxruntime load (gpt2onnx/cli.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpt2onnx.engine.contract import InputError, ModelFolderError, UserError
    from gpt2onnx.engine.engine import Completion, Engine, Generation, Score
    from gpt2onnx.engine.requests import (
        EngineClosedError,
        Piece,
        QueueFullError,
        RequestFailedError,
        RequestHandle,
    )
    from gpt2onnx.engine.runtime import ProviderError
    from gpt2onnx.engine.sampling import SamplingConfig
    from gpt2onnx.engine.session import SessionConfig

# public name -> its module in gpt2onnx.engine
_HOME = {
    "InputError": "contract", "ModelFolderError": "contract", "UserError": "contract",
    "Completion": "engine", "Engine": "engine", "Generation": "engine", "Score": "engine",
    "EngineClosedError": "requests", "Piece": "requests", "QueueFullError": "requests",
    "RequestFailedError": "requests", "RequestHandle": "requests",
    "ProviderError": "runtime", "SamplingConfig": "sampling", "SessionConfig": "session",
}  # fmt: skip

__all__ = [
    "Completion", "Engine", "EngineClosedError", "Generation", "InputError", "ModelFolderError", "Piece",
    "ProviderError", "QueueFullError", "RequestFailedError", "RequestHandle", "SamplingConfig", "Score",
    "SessionConfig", "UserError",
]  # fmt: skip


def __getattr__(name: str):
    """A public name, imported from its module the first time it is asked for."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gpt2onnx.engine.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
