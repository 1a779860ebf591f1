"""OpenAI's completions API, in and out: a request body checked into engine arguments, and the
response, stream chunk, usage and error objects shaped the way OpenAI's clients read them; and
the tokenizer routes that OpenAI-compatible servers add (vLLM's /tokenize, /detokenize and
/tokenizer_info), which evaluation harnesses use.

Plain functions over dicts, no web framework: serve/server.py does the HTTP. Every parameter
goes through the engine's own input gate (engine/inputs.py) under its OpenAI name, so a bad
value is an ApiError (400) whose message names the parameter; nothing unchecked reaches the
engine, and nothing a client sends can end in a 500.

Where GPT-2 and OpenAI differ, the engine's convention wins and the README says so: text
prompts get <|endoftext|> prepended (so an empty or missing prompt generates from nothing, as
OpenAI's own default prompt does), and prompt_tokens counts it.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gpt2onnx.engine import inputs
from gpt2onnx.engine.contract import InputError

MAX_CHOICES = 128  # prompts x n in one request (OpenAI's own limit on n)
MAX_LOGPROBS = 5  # OpenAI's limit on the completions API's logprobs
MAX_TOKENIZE_CHARS = 1 << 20  # /tokenize's text: a whole document (harnesses split it), not a body's worth
# max_tokens 0 only scores the prompt (with echo): the engine runs one step, whose token is dropped
MAX_TOKENS = inputs.Count(0, inputs.MAX_IDS, "a non-negative integer (0 only with echo: score the prompt)")

# The body's parameters: OpenAI's, then the engine's own sampling settings as extensions
# (vLLM takes the same names), then `truncate` ("left": drop a too-long prompt's oldest tokens) and
# `ignore_eos` (always max_tokens tokens: load benchmarks; vLLM's and llama.cpp's name).
OPENAI_PARAMS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "presence_penalty",
    "frequency_penalty", "logit_bias", "echo", "logprobs", "stream", "stream_options", "user",
    "best_of", "suffix",
}  # fmt: skip
EXTENSIONS = {
    "top_k", "min_p", "repetition_penalty", "truncate", "ignore_eos",
    "use_beam_search", "length_penalty", "early_stopping",  # beam search: vLLM's names
    "prompt_lookup", "draft_tokens",  # speculative decoding: drafts a step proposes (lookup; serve --draft-model)
}  # fmt: skip
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty")  # fmt: skip
DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's: sampled unless temperature is 0
# Sampling settings beam search takes only at a value that changes nothing (transformers ignores a
# temperature without do_sample; 0 and 1 are the values clients send for "none").
BEAM_NEUTRAL = {"temperature": (0, 1), "top_p": (1,), "top_k": (0,), "min_p": (0,), "repetition_penalty": (1,),
                "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}  # fmt: skip

FLAG = inputs.Flag()  # true or false, not 0/1 or a string
# The engine's finish reasons in OpenAI's words: an EOS is a natural stop. "cancelled" (the server
# shut down before the request ended) has no OpenAI word and is passed on as it is.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}


class ApiError(Exception):
    """An error answered in OpenAI's error-object shape, with its HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class CompletionParams:
    """One checked /v1/completions body. Each prompt is run `n` times; choice i*n + j is prompt
    i's j-th run, whose seed is seed + j (so a prompt's choices do not depend on its neighbours)."""

    prompts: list[str | list[int]]
    max_tokens: int = 16
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    truncate: str | None = None
    ignore_eos: bool = False
    sampling: dict = field(default_factory=dict)  # the engine's sampling keywords, seed and logit_bias
    beams: dict | None = None  # use_beam_search: Engine.submit's num_beams, length_penalty, ...
    prompt_lookup: int | None = (
        None  # Engine.submit's: speculative decoding by prompt lookup (None: the server's)
    )
    draft_tokens: int | None = None  # Engine.submit's: the draft model's tokens a step (None: its default)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def scoring(self) -> bool:
        """max_tokens 0 with echo: the prompt and its logprobs, no new token."""
        return self.max_tokens == 0

    def submissions(self) -> list[tuple[str | list[int], dict]]:
        """(prompt, Engine.submit keywords) for every choice, in choice order; with beam search,
        for every prompt (its n choices are its n best hypotheses)."""
        keywords = dict(
            max_new_tokens=self.max_tokens,  # 0 with echo: the prompt scored alone (Engine.submit)
            stop=self.stop,
            truncate=self.truncate,
            logprobs=self.logprobs,
            # echo: the prompt's tokens' too; scoring asks for them always (one pass, no new token)
            prompt_logprobs=(self.logprobs or 0) if self.scoring else self.logprobs if self.echo else None,
            ignore_eos=self.ignore_eos,
            stream=self.stream,
            prompt_lookup=self.prompt_lookup,
            draft_tokens=self.draft_tokens,
        )
        if self.beams is not None:
            return [(prompt, {**keywords, **self.beams}) for prompt in self.prompts]
        out = []
        for prompt in self.prompts:
            for j in range(self.n):
                seed = self.sampling.get("seed")
                sampling = {**self.sampling, "seed": None if seed is None else seed + j}
                out.append((prompt, {**keywords, **sampling}))
        return out


def parse_completion(body, model_name: str, vocab_size: int, n_positions: int) -> CompletionParams:
    """A /v1/completions JSON body, checked. Raises ApiError: 400 naming the parameter, 404 for
    another model than the one served."""
    given = fields_of(body, OPENAI_PARAMS | EXTENSIONS, "/v1/completions", model_name)
    beams = parse_beams(given)
    refuse_unsupported(given)
    echo = checked("echo", FLAG, given.get("echo", False))
    max_tokens = checked("max_tokens", MAX_TOKENS, given.get("max_tokens", 16))
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "max_tokens 0 generates nothing: it is for scoring a prompt with echo=true (the "
                                "prompt's tokens and their logprobs, no new token); ask for at least 1 token")  # fmt: skip
    if max_tokens >= n_positions:
        raise bad(
            "max_tokens",
            f"max_tokens {max_tokens} leaves no room for a prompt in the {n_positions}-token context; ask for fewer",
        )
    n = checked("n", inputs.Count(1, MAX_CHOICES, f"an integer from 1 to {MAX_CHOICES}"), given.get("n", 1))
    prompts = parse_prompts(given.get("prompt", ""), vocab_size)
    if len(prompts) * n > MAX_CHOICES:
        raise bad(
            "n", f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices; send fewer at a time"
        )
    logprobs = checked("logprobs", inputs.Count(0, MAX_LOGPROBS, f"an integer from 0 to {MAX_LOGPROBS}", True),
                       given.get("logprobs"))  # fmt: skip
    stream = checked("stream", FLAG, given.get("stream", False))
    usage_chunk = include_usage(given.get("stream_options", {}))
    return CompletionParams(
        prompts=prompts, max_tokens=max_tokens, n=n, stream=stream,
        include_usage=stream and usage_chunk, echo=echo, logprobs=logprobs,
        stop=checked("stop", lambda label, value: inputs.stop_strings(value, label), given.get("stop", ())),
        truncate=checked("truncate", "truncate", given.get("truncate")),
        ignore_eos=checked("ignore_eos", FLAG, given.get("ignore_eos", False)),
        sampling=parse_sampling(given, vocab_size), beams=beams and {**beams, "num_return_sequences": n},
        prompt_lookup=given.get("prompt_lookup"), draft_tokens=given.get("draft_tokens"),
    )  # fmt: skip


def parse_beams(given: dict) -> dict | None:
    """use_beam_search (vLLM's name): the beam width is best_of when given, else n, and the n best
    hypotheses are the choices; length_penalty and early_stopping (true, false or "never") as
    transformers takes them. Without it, length_penalty and early_stopping are refused, and so is
    best_of (OpenAI's sampled best_of is not implemented). Pops best_of when it is the width."""
    if not checked("use_beam_search", FLAG, given.get("use_beam_search", False)):
        for name in ("length_penalty", "early_stopping"):
            if name in given:
                raise bad(name, f'{name} applies to beam search only; add "use_beam_search": true or drop it')
        return None
    for name, why in (("stream", "the best beams are known at the end"), ("logprobs", "a beam has a score, not "
                      "per-token logprobs"), ("echo", "the choices are hypotheses of one search")):  # fmt: skip
        if given.get(name) not in (None, False):
            raise bad(name, f"{name} does not apply to beam search ({why}); drop it or use_beam_search")
    for name, neutral in BEAM_NEUTRAL.items():
        if name in given and given[name] not in neutral:
            raise bad(
                name, f"beam search ranks the model's own log-probabilities: drop {name} (or use_beam_search)"
            )
    width = given.pop("best_of", None)
    n = given.get("n", 1)
    width = n if width is None else width
    if not inputs.is_int(width) or not inputs.is_int(n) or not 1 <= n <= width:
        raise bad("best_of", f"with use_beam_search, best_of is the beam width, an integer at least n ({n}); got "
                             f"{inputs.shown(width)}")  # fmt: skip
    early = given.get("early_stopping", False)
    if early not in (True, False, "never") or type(early) not in (bool, str):
        raise bad(
            "early_stopping", f'early_stopping must be true, false or "never", got {inputs.shown(early)}'
        )
    penalty = given.get("length_penalty", 1.0)
    if type(penalty) not in (int, float) or not math.isfinite(penalty):
        raise bad("length_penalty", f"length_penalty must be a finite number, got {inputs.shown(penalty)}")
    return {"num_beams": int(width), "length_penalty": float(penalty), "early_stopping": early}


def fields_of(body, allowed: set[str], route: str, model_name: str) -> dict:
    """A JSON object's parameters, all of them known to `route`, with JSON nulls left out (null
    asks for the default), its `model` checked."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {inputs.shown(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(unknown[0], f"unknown parameter {inputs.abbreviated(unknown[0])}; {route} takes "
                              f"{', '.join(sorted(allowed))}")  # fmt: skip
    check_model(body.get("model"), model_name)
    return {key: value for key, value in body.items() if value is not None}


def check_model(model, model_name: str) -> None:
    """`model` must name the served model; absent or null, it is the one served (as vLLM takes it
    when it serves one model: lm-evaluation-harness sends null unless told a name)."""
    if model is None:
        return
    if not isinstance(model, str):
        raise bad(
            "model", f"model must be the served model's name, {model_name!r}; got {inputs.shown(model)}"
        )
    if model != model_name:
        raise ApiError(
            404,
            f"the model {inputs.abbreviated(model)} does not exist; this server serves {model_name!r} "
            "(GET /v1/models lists it)",
            param="model",
            code="model_not_found",
        )


def refuse_unsupported(given: Mapping) -> None:
    """OpenAI parameters this server takes only at their neutral value."""
    if given.get("best_of", 1) != 1:
        raise bad("best_of", f"best_of {inputs.shown(given['best_of'])} is not supported without "
                             "\"use_beam_search\": true, where it is the beam width (the n best beams are the "
                             "choices); for several sampled completions use n and pick among them")  # fmt: skip
    if given.get("suffix", "") != "":
        raise bad("suffix", "suffix is not supported: GPT-2 only continues text, it cannot fill in before a "
                            "suffix; drop it")  # fmt: skip
    if not isinstance(given.get("user", ""), str):
        raise bad("user", f"user must be a str, got {inputs.shown(given['user'])}")


def include_usage(options) -> bool:
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", f"stream_options must be {{\"include_usage\": true|false}}, "
                                    f"got {inputs.shown(options)}")  # fmt: skip
    return checked("stream_options", FLAG, options.get("include_usage", False))


def checked(param: str, rule: str | Callable, value, label: str | None = None):
    """value through the engine's input gate (a rule's name in inputs.RULES, or a callable taking
    (label, value)), with InputError turned into a 400 that names the OpenAI parameter. label:
    what the message calls the value (prompt[2]); the parameter by default."""
    label = label or param
    try:
        if isinstance(rule, str):
            return inputs.check(rule, value, label)
        return rule(label, value)
    except InputError as e:
        raise bad(param, str(e)) from None


def parse_prompts(prompt, vocab_size: int) -> list[str | list[int]]:
    """OpenAI's four prompt forms (a str, a list of str, a list of token ids, a list of lists of
    ids) are the engine's own (inputs.prompts); an id list must not be empty."""
    prompts = checked(
        "prompt", lambda label, value: inputs.prompts(value, vocab_size, label, MAX_CHOICES), prompt
    )
    for i, p in enumerate(prompts):  # one list of ids is never empty here: [] is no prompt at all
        if isinstance(p, list) and not p:
            raise bad("prompt", f"prompt[{i}] is empty; pass at least one token id, or a string prompt")
    return prompts


def parse_sampling(given: Mapping, vocab_size: int) -> dict:
    """The engine's sampling keywords under their OpenAI names, defaults OpenAI's."""
    sampling = {name: checked(name, name, given.get(name, DEFAULTS.get(name))) for name in SAMPLING
                if name in given or name in DEFAULTS}  # fmt: skip
    sampling["seed"] = checked("seed", "seed", given.get("seed"))
    sampling["logit_bias"] = parse_logit_bias(given.get("logit_bias", {}), vocab_size)
    return sampling


def parse_logit_bias(bias, vocab_size: int) -> dict[int, float]:
    """JSON object keys are strings: {"50256": -100} means token 50256."""
    if not isinstance(bias, dict):
        raise bad("logit_bias", f"logit_bias must be an object of token id -> bias, e.g. {{\"50256\": -100}}; "
                                f"got {inputs.shown(bias)}")  # fmt: skip
    ids = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise bad("logit_bias", f"logit_bias key {inputs.abbreviated(key)} is not a token id; keys are token "
                                    "ids written as strings, e.g. \"50256\"")  # fmt: skip
        ids[int(key)] = value
    return checked("logit_bias", lambda label, value: inputs.logit_bias(value, vocab_size, label), ids)


# the engine's names -> OpenAI's (the beam width is best_of, or n without it)
ENGINE_PARAMS = {
    "max_new_tokens": "max_tokens",
    "prompt": "prompt",
    "num_beams": "best_of",
    "draft_tokens": "draft_tokens",
    "prompt_lookup": "prompt_lookup",
}


def param_of(error: InputError) -> str | None:
    """The OpenAI parameter an engine InputError concerns (the engine checks the prompt's length
    against the context at submission, after this module's checks)."""
    return ENGINE_PARAMS.get(error.param)


# A JSON \u escape of a UTF-16 surrogate: the only way a body's str can hold one (UTF-8 bytes cannot)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def check_text(raw: bytes, body) -> None:
    """Refuse a body whose strings (parameter names too) hold a lone surrogate: JSON's \\ud800
    escape can write one, but it is not Unicode text, so it could be neither tokenized nor written
    back in a response. A pair (\\ud83d\\ude00) is one character and welcome. Only a body whose
    bytes hold such an escape is searched. Raises ApiError 400 naming the parameter."""
    if not SURROGATE_ESCAPE.search(raw):
        return
    stack = [(None, None, body)]  # (the parameter, where in it, a value)
    while stack:
        param, label, value = stack.pop()
        if isinstance(value, str) and not is_text(value):
            raise bad(param, f"{label or 'the body'} holds a lone surrogate ({_surrogate_at(value)}); JSON strings "
                             "must be Unicode text: write the character itself, or both halves of a surrogate pair")  # fmt: skip
        if isinstance(value, dict):
            for key, item in value.items():
                if not is_text(key):
                    name = key.encode("utf-8", "backslashreplace").decode()
                    where = f'the parameter name "{name}"' if label is None else f'{label} key "{name}"'
                    raise bad(
                        param or name, f"{where} holds a lone surrogate; JSON strings must be Unicode text"
                    )
                where = key if label is None else f"{label}[{key!r}]"
                stack.append((param or key, where, item))
        elif isinstance(value, list):
            stack.extend((param, f"{label or 'the body'}[{i}]", item) for i, item in enumerate(value)
                         if isinstance(item, (str, list, dict)))  # fmt: skip


def is_text(value: str) -> bool:
    """Whether a str is Unicode text (no lone surrogate), as UTF-8 can write it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_at(value: str) -> str:
    at = next(i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff")
    return f"{ascii(value[at])[1:-1]} at character {at}"


# -- how many choices fit ------------------------------------------------------------------------
def capacity_error(request: CompletionParams, stats: Mapping[str, int]) -> ApiError | None:
    """Why the engine cannot take the request's choices now (Engine.stats(): its slots, queue
    and room): 400 when they are more than it can ever hold (all its slots and queue places),
    429 when they do not fit beside what already runs and waits. None when they fit."""
    slots, places, k = stats["max_batch"], stats["max_queue"], request.choices
    if k > slots + places:
        param = "n" if request.n > 1 else "prompt"
        return bad(param, f"this request has {k} choices (prompts x n), more than this server can ever hold: "
                          f"{slots} slots (--max-batch) and {places} queue places (--max-queue); send fewer at "
                          "a time, or start the server with a larger --max-queue")  # fmt: skip
    if k > stats["room"]:
        return ApiError(429, f"the queue is full: there is room for {max(stats['room'], 0)} more requests now "
                             f"({slots} slots, and {places} queue places beyond them: --max-queue) and this "
                             f"request has {k} choices; retry later", code="queue_full")  # fmt: skip
    return None


# -- the tokenizer routes (vLLM's) ---------------------------------------------------------------
TOKENIZE_PARAMS = {"model", "prompt", "add_special_tokens", "return_token_strs"}
DETOKENIZE_PARAMS = {"model", "tokens"}


@dataclass(frozen=True)
class TokenizeParams:
    prompt: str
    add_special_tokens: bool = True  # the BOS first, as the engine puts it before a text prompt
    return_token_strs: bool = False


def parse_tokenize(body, model_name: str) -> TokenizeParams:
    """A /tokenize body: {"prompt": str, "add_special_tokens"?: bool, "return_token_strs"?: bool}."""
    given = fields_of(body, TOKENIZE_PARAMS, "/tokenize", model_name)
    prompt = checked("prompt", inputs.text, given.get("prompt"))
    if len(prompt) > MAX_TOKENIZE_CHARS:
        raise bad(
            "prompt", f"prompt has {len(prompt)} characters, more than {MAX_TOKENIZE_CHARS}; send it in parts"
        )
    return TokenizeParams(prompt, checked("add_special_tokens", FLAG, given.get("add_special_tokens", True)),
                           checked("return_token_strs", FLAG, given.get("return_token_strs", False)))  # fmt: skip


def parse_detokenize_request(body, model_name: str, vocab_size: int) -> list[int]:
    """A /detokenize body: {"tokens": [ids]}; its ids."""
    given = fields_of(body, DETOKENIZE_PARAMS, "/detokenize", model_name)
    return checked(
        "tokens", lambda label, value: inputs.token_ids(label, value, vocab_size), given.get("tokens")
    )


def tokenize_object(ids: list[int], max_model_len: int, token_strs: list[str] | None) -> dict:
    out = {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}
    return out if token_strs is None else {**out, "token_strs": token_strs}


def tokenizer_info(model_name: str, tokenizer, n_positions: int, vocab_size: int) -> dict:
    """GET /tokenizer_info: what vLLM gives (the tokenizer's tokenizer_config.json, with its
    class), for the model folder's tokenizer.json: transformers reads one with
    PreTrainedTokenizerFast. add_bos_token: the engine puts the BOS before every text prompt."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"tokenizer_class": "PreTrainedTokenizerFast", "name_or_path": model_name,
            "bos_token": tokenizer.id_to_token(bos), "eos_token": tokenizer.id_to_token(eos),
            "bos_token_id": bos, "eos_token_id": eos, "pad_token": None, "add_bos_token": True,
            "model_max_length": n_positions, "max_model_len": n_positions, "vocab_size": vocab_size}  # fmt: skip


# -- responses ---------------------------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_object(
    response_id: str, created: int, model: str, choices: list[dict], usage: dict | None
) -> dict:
    """The whole response (usage given), or one stream chunk (usage None: OpenAI's chunks say null)."""
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}  # fmt: skip


def logprobs_object(str_tokens: list[str], token_logprobs: list[float], tops: list[dict[str, float]],
                    text_offset: int) -> dict:  # fmt: skip
    """OpenAI's legacy logprobs: per token its text, its logprob, the top alternatives by text, and
    where it starts in the choice's text (echoed prompt included)."""
    offsets = []
    for token in str_tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": str_tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def top_logprobs(
    tops: list[dict[int, float]], k: int, to_str: Callable[[list[int]], list[str]]
) -> list[dict]:
    """The engine's top entries (token id -> logprob) as OpenAI's (token text -> logprob), best k."""
    out = []
    for entry in tops:
        best = sorted(entry.items(), key=lambda item: -item[1])[:k]
        texts = to_str([token for token, _ in best])
        out.append({text: logprob for text, (_, logprob) in zip(texts, best)})
    return out


def finish_reason(engine_reason: str) -> str:
    return FINISH_REASONS.get(engine_reason, engine_reason)


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {json}` and a blank line (`data: [DONE]` ends the stream)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
