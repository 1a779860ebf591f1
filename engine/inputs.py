"""The gate for API input: every argument of a public Engine method, and every CLI flag (the CLI
reaches the Engine through these same checks), is checked here before anything is tokenized,
allocated or run.

Why one place: numpy and onnxruntime take almost anything without a word (a float id is
truncated, a bool is an id, a NaN penalty makes every step pick token 0, `{1.5: 100}` biases
token 1), so a bad value must be stopped before it reaches them. Every refusal is an InputError
(a ValueError) whose message names the argument, shows the bad value (abbreviated when huge)
and says what it must be. Integers are Python or numpy integers, never bool; numbers are int,
float or numpy numbers, never bool or str, and always finite. Values come back as plain Python
types (int, float, bool, list), so nothing numpy-specific travels further.
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import InputError

MAX_IDS = 1 << 20  # token ids in one sequence (prompt, logits row, to_string): 4 MB of text
MAX_PROMPTS = 4096  # prompts in one generate call (run max_batch at a time)
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # stop strings: each is searched for after every token
MAX_BIAS = 1e4  # |logit bias|: -100 already bans a token (OpenAI stops there); far from float32 overflow
MAX_VOCAB = 1 << 20  # the largest vocabulary a manifest may declare
MAX_PATH_CHARS = 4096

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def abbreviated(value) -> str:
    """A value's repr for a message, cut short when long (a 10 MB prompt is not echoed back)."""
    return _repr.repr(value)


def shown(value) -> str:
    """A bad value for a message: its repr, cut short when long, and its type."""
    return f"{abbreviated(value)} ({type(value).__name__})"


def is_int(value) -> bool:
    """A real integer: int or numpy integer, not bool (True is not token 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number: int, float or numpy number, not bool or str."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Count:
    """An integer in [low, high]; `want` says so in words, with what the values mean."""

    low: int
    high: int
    want: str
    optional: bool = False  # None is accepted too

    def __call__(self, label: str, value) -> int | None:
        if value is None and self.optional:
            return None
        if not is_int(value) or not self.low <= value <= self.high:
            raise InputError(f"{label} must be {self.want}, got {shown(value)}", param=param_of(label))
        return int(value)


@dataclass(frozen=True)
class Real:
    """A finite number in [low, high] (or (low, high] when low_open); nonzero values below
    `floor`, when given, are refused too (a temperature of 1e-300 turns the logits into inf)."""

    low: float
    high: float
    want: str
    low_open: bool = False
    optional: bool = False
    floor: float = 0.0

    def __call__(self, label: str, value) -> float | None:
        if value is None and self.optional:
            return None
        x = _finite(value)
        low_ok = x is not None and (x > self.low or x == self.low and not self.low_open)
        if not low_ok or x > self.high or 0 < x < self.floor:
            raise InputError(f"{label} must be {self.want}, got {shown(value)}", param=param_of(label))
        return x


def _finite(value) -> float | None:
    """value as a finite float, or None when it is not a real number or not finite."""
    if not is_number(value):
        return None
    try:
        x = float(value)
    except OverflowError:  # an int past float's range
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Flag:
    """True or False (numpy bools too); not 0/1 or a string, which would be taken as truthy."""

    optional: bool = False

    def __call__(self, label: str, value) -> bool | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, (bool, np.bool_)):
            either = "True, False or None" if self.optional else "True or False"
            raise InputError(f"{label} must be {either}, got {shown(value)}", param=param_of(label))
        return bool(value)


@dataclass(frozen=True)
class Choice:
    """One of a few strings (or None, when listed)."""

    choices: tuple

    def __call__(self, label: str, value):
        if not (value is None or isinstance(value, str)) or value not in self.choices:
            raise InputError(
                f"{label} must be one of {', '.join(map(repr, self.choices))}, got {shown(value)}",
                param=param_of(label),
            )
        return value


# Every scalar argument of the public API, by name. Ranges: OpenAI's for the penalties; the others
# wide enough for any real use and narrow enough that nothing overflows or allocates without end.
RULES: dict[str, Callable] = {
    "max_new_tokens": Count(1, MAX_IDS, "a positive integer (at most the context minus the prompt)"),
    "top_k": Count(0, 2**31 - 1, ">= 0, an integer (0 turns it off)"),
    "seed": Count(0, 2**63 - 1, "a non-negative integer below 2**63, or None (unseeded)", optional=True),
    "max_batch": Count(1, 1024, "a positive integer (at most 1024)"),
    "max_queue": Count(1, 1 << 20, "a positive integer (at most 1048576)"),
    "logprobs": Count(0, 5, "an integer from 0 to 5, or None (none)", optional=True),
    "max_seq": Count(1, MAX_VOCAB, "a positive integer, or None (the model's n_positions)", optional=True),
    "threads": Count(0, 1024, "an integer from 1 to 1024, or 0 or None (onnxruntime chooses)", optional=True),
    "temperature": Real(
        0.0,
        100.0,
        optional=True,
        floor=1e-5,
        want=">= 0 (0 is greedy, else from 1e-05 to 100), or None (1.0 when top_k, top_p or min_p ask for "
        "sampling, else greedy)",
    ),  # fmt: skip
    "top_p": Real(0.0, 1.0, "in (0, 1] (1 turns it off)", low_open=True),
    "min_p": Real(0.0, 1.0, "in [0, 1] (0 turns it off)"),
    "repetition_penalty": Real(0.01, 100.0, "in [0.01, 100] (1 turns it off)"),
    "presence_penalty": Real(-2.0, 2.0, "in [-2, 2] (0 turns it off)"),
    "frequency_penalty": Real(-2.0, 2.0, "in [-2, 2] (0 turns it off)"),
    "bias": Real(-MAX_BIAS, MAX_BIAS, f"a finite number in [-{MAX_BIAS:g}, {MAX_BIAS:g}]"),
    "prepend_bos": Flag(),
    "ignore_eos": Flag(),
    "stream": Flag(),
    "device_sampling": Flag(optional=True),
    "cuda_graphs": Flag(optional=True),
    "spinning": Flag(),
    "signed_int8": Flag(),
    "truncate": Choice((None, "left")),
    "provider": Choice(("auto", "cuda", "cpu")),
}


def check(name: str, value, label: str | None = None):
    """`value` of the argument `name`, checked by its rule and returned as a plain Python value.
    label: what messages call it (a CLI flag such as --top-p); the name by default."""
    try:
        return RULES[name](label or name, value)
    except InputError as e:
        e.param = name
        raise


def param_of(label: str) -> str:
    """The parameter a message's label names: "prompts[3]" is one of `prompts`."""
    return label.split("[", 1)[0]


def known_keywords(method: str, given: Mapping, allowed: tuple[str, ...]) -> None:
    """Refuse keywords `method` does not take (its **sampling would pass them on as a TypeError)."""
    unknown = sorted(set(given) - set(allowed), key=str)
    if unknown:
        raise InputError(
            f"{method}() got an unknown keyword {unknown[0]!r}; "
            f"its sampling keywords are {', '.join(allowed)}",
            param=str(unknown[0]),
        )


def text(label: str, value) -> str:
    if not isinstance(value, str):
        raise InputError(f"{label} must be a str, got {shown(value)}", param=param_of(label))
    return value


def folder_path(value) -> Path:
    """Engine.load's path: a str or os.PathLike naming a folder."""
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(
            f"path must be a str or pathlib.Path naming a model folder, got {shown(value)}", param="path"
        )
    path = os.fspath(value)
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > MAX_PATH_CHARS:
        raise InputError(
            f"path must name a model folder (at most {MAX_PATH_CHARS} characters, no NUL), "
            f"got {shown(value)}",
            param="path",
        )
    return Path(path)


ID_SEQUENCES = (list, tuple, range, np.ndarray)


def token_ids(label: str, value, vocab: int) -> list[int]:
    """A flat sequence of token ids (ints in [0, vocab)) as a list of Python ints."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iuO":
            raise InputError(
                f"{label} must be a 1-D array of integer token ids, got a {value.ndim}-D {value.dtype} array",
                param=param_of(label),
            )
        _check_length(label, len(value))
        ids = value.tolist()  # Python ints (or the objects of an object array, checked below)
    elif isinstance(value, ID_SEQUENCES):
        _check_length(label, len(value))
        ids = list(value)
    else:
        raise InputError(
            f"{label} must be a list of token ids (ints in [0, {vocab})), got {shown(value)}",
            param=param_of(label),
        )
    kinds = set(map(type, ids))  # the element types, found at C speed
    if kinds - {int}:
        bad = {t for t in kinds if t is not int and not issubclass(t, np.integer)}
        if bad:
            at = next(i for i, v in enumerate(ids) if type(v) in bad)
            raise InputError(
                f"{label}[{at}] is {shown(ids[at])}; token ids must be ints in [0, {vocab})",
                param=param_of(label),
            )
        ids = [int(v) for v in ids]
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        at = next(i for i, v in enumerate(ids) if not 0 <= v < vocab)
        raise InputError(
            f"{label}[{at}] = {abbreviated(ids[at])} is outside the vocabulary [0, {vocab})",
            param=param_of(label),
        )
    return ids


def _check_length(label: str, n: int) -> None:
    if n > MAX_IDS:
        raise InputError(
            f"{label} has {n} token ids, more than {MAX_IDS}; pass it in parts", param=param_of(label)
        )


def token_rows(label: str, value, vocab: int, max_rows: int) -> list[list[int]]:
    """One sequence of ids (batch 1) or up to max_rows equal-length rows of them (a list of
    lists, a 2-D array)."""
    nested = isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], ID_SEQUENCES)
    if nested or isinstance(value, np.ndarray) and value.ndim == 2:
        if len(value) > max_rows:
            raise InputError(
                f"{label} has {len(value)} rows, more than max_batch {max_rows}; pass fewer at a time",
                param=param_of(label),
            )
        rows = [token_ids(f"{label}[{i}]", row, vocab) for i, row in enumerate(value)]
    else:
        rows = [token_ids(label, value, vocab)]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise InputError(
            f"{label} rows have different lengths {lengths[:5]}; pass rows of equal length",
            param=param_of(label),
        )
    if not rows[0]:
        raise InputError(f"{label} is empty; pass at least one token id", param=param_of(label))
    return rows


def prompt(label: str, value, vocab: int) -> str | list[int]:
    """One prompt: text, or a sequence of token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        raise InputError(
            f"{label} is bytes; decode it to str first (bytes would be taken as token ids)",
            param=param_of(label),
        )
    return token_ids(label, value, vocab)


def prompts(value, vocab: int, label: str = "prompts", most: int = MAX_PROMPTS) -> list[str | list[int]]:
    """A call's prompts as a list: one str, one sequence of ids, or a list of at most `most`
    prompts that are all str or all sequences of ids (never a mix: ["a", [5]] is refused, not
    guessed at). The server's `prompt` takes the same forms (OpenAI's four)."""
    forms = "a str, a list of token ids, or a list of prompts (all str, or all lists of token ids)"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise InputError(f"{label} must be {forms}, got {shown(value)}", param=label)
    if isinstance(value, np.ndarray) and value.ndim not in (1, 2):
        raise InputError(
            f"{label} must be a 1-D array of token ids or a 2-D array of rows of them, got {value.ndim}-D",
            param=label,
        )
    if len(value) == 0:
        raise InputError(f"{label} is empty; pass {forms}", param=label)
    if len(value) > most and not is_int(value[0]):
        raise InputError(
            f"{label} holds {len(value)} prompts, more than {most}; pass fewer at a time", param=label
        )
    if isinstance(value, np.ndarray) and value.ndim == 2:
        return [token_ids(f"{label}[{i}]", row, vocab) for i, row in enumerate(value)]
    if isinstance(value, np.ndarray) or is_int(value[0]):
        return [token_ids(label, value, vocab)]
    kind = str if isinstance(value[0], str) else ID_SEQUENCES if isinstance(value[0], ID_SEQUENCES) else None
    if kind is None:
        raise InputError(f"{label}[0] is {shown(value[0])}; {label} must be {forms}", param=label)
    for i, p in enumerate(value):
        if not isinstance(p, kind):
            first = "str" if kind is str else "a list of token ids"
            raise InputError(
                f"{label} mixes kinds: {label}[{i}] is {shown(p)} but {label}[0] is {first}; a list of "
                "prompts holds only str or only lists of token ids",
                param=label,
            )
    return list(value) if kind is str else [token_ids(f"{label}[{i}]", p, vocab) for i, p in enumerate(value)]


def stop_strings(value, label: str = "stop") -> tuple[str, ...]:
    """A stop string or a sequence of them: each a non-empty str ("" would stop at once)."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InputError(
            f"{label} must be a str or a list of str, got {shown(value)}; pass () for no stop strings",
            param=param_of(label),
        )
    if len(items) > MAX_STOPS:
        raise InputError(
            f"{label} has {len(items)} strings, more than {MAX_STOPS}; pass the ones that matter",
            param=param_of(label),
        )
    for i, s in enumerate(items):
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            where = label if isinstance(value, str) else f"{label}[{i}]"
            raise InputError(
                f"{where} must be a non-empty str of at most {MAX_STOP_CHARS} characters, got {shown(s)}",
                param=param_of(label),
            )
    return tuple(items)


def logit_bias(value, vocab: int | None = None, label: str = "logit_bias") -> dict[int, float]:
    """A dict of token id -> bias as {int: float}; ids checked against vocab when it is given
    (else against the largest vocabulary a model folder may have)."""
    if not isinstance(value, Mapping):
        raise InputError(
            f"{label} must be a dict of token id -> bias, e.g. {{50256: -100}}, got {shown(value)}",
            param=param_of(label),
        )
    limit = vocab if vocab is not None else MAX_VOCAB
    if len(value) > limit:
        raise InputError(
            f"{label} has {len(value)} entries, more than the {limit} tokens there are", param=param_of(label)
        )
    bias = {}
    for token, amount in value.items():
        if not is_int(token):
            raise InputError(
                f"{label} key {shown(token)} is not a token id; keys must be ints (token ids)",
                param=param_of(label),
            )
        if not 0 <= token < limit:
            raise InputError(
                f"{label} key {abbreviated(token)} is outside the vocabulary [0, {limit}); "
                "keys must be token ids",
                param=param_of(label),
            )
        bias[int(token)] = RULES["bias"](f"{label}[{token}]", amount)  # an error names the whole argument
    return bias
