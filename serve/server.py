"""The HTTP server of `gpt2-onnx serve`: OpenAI's completions API over one Engine, on FastAPI
and uvicorn.

    POST /v1/completions        OpenAI's completions (serve/openai_api.py checks and shapes)
    POST /v1/chat/completions   400: GPT-2 has no chat template
    GET  /v1/models             the one model served
    POST /tokenize, /detokenize vLLM's tokenizer routes; GET /tokenizer_info its tokenizer's settings
    GET  /health                200 while serving, 503 while draining or stuck (no step for STUCK_S)
    GET  /metrics               Prometheus text: requests, tokens, queue, slots, latencies

Every request's choices are Engine.submit handles; the engine's scheduler batches them with
everyone else's. A client that goes away (mid-stream, while waiting, or while still sending its
request) cancels its handles, so their slots are freed at the next step; that is a debug line,
not an error. Errors are OpenAI's error objects: 400 bad parameter, 404 unknown model or route,
408 a request not whole within the read timeout, 429 no room now, 503 shutting down; a 500 is a
bug of ours.

Connections are bounded (Limits): a request must arrive whole within the read timeout, an idle
connection is closed after the keep-alive timeout, and past max_connections a request gets 503.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections and the engine is closed at
once in a thread (Drain): new requests on open connections get 503, running ones finish within
the drain timeout or end with finish_reason "cancelled", then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from gpt2onnx.engine.contract import InputError
from gpt2onnx.engine.requests import EngineClosedError, Piece, QueueFullError
from gpt2onnx.serve import openai_api as api
from gpt2onnx.serve.metrics import Metrics

log = logging.getLogger("gpt2onnx")

MAX_BODY_BYTES = 16 << 20  # a request body; 128 prompts of 1024 tokens as JSON ids are ~1 MB
MAX_HEADER_BYTES = 64 << 10  # a request's line and headers (nginx takes 32 KiB, h11 16 KiB)
STUCK_S = 60.0  # /health fails when requests wait or run but no step has ended for this long
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (logged, never sent)


# -- shutdown ----------------------------------------------------------------------------------
class Drain:
    """Closes the engine once, in a thread: on SIGTERM at once, at the latest when uvicorn's
    shutdown ends the app's lifespan (which waits for it)."""

    def __init__(self, engine, timeout: float):
        self.engine, self.timeout = engine, timeout
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    @property
    def draining(self) -> bool:
        return self.thread is not None

    def start(self) -> None:
        with self.lock:
            if self.thread is None:
                log.warning("draining: running requests get %gs to finish", self.timeout)
                self.thread = threading.Thread(target=self.engine.close, args=(self.timeout,), name="drain")
                self.thread.start()

    def wait(self) -> None:
        self.start()
        self.thread.join()


# -- one request's choices ---------------------------------------------------------------------
class ClientGone(Exception):
    """The client closed its connection before its response was complete."""


def submit_all(engine, request: api.CompletionParams) -> list:
    """One handle per choice; all or none (a refusal cancels those already submitted). Raises
    ApiError: 400 for a prompt the engine refuses or more choices than it can ever hold, 429 when
    they do not fit now, 503 shutting down."""
    refusal = api.capacity_error(request, engine.stats())  # nothing submitted for a request that cannot fit
    if refusal is not None:
        raise refusal
    handles, submissions = [], request.submissions()
    try:
        for prompt, keywords in submissions:
            handles.append(engine.submit(prompt, **keywords))
    except QueueFullError as e:  # the room shrank since (another thread submitted)
        raise api.ApiError(429, f"the queue is full: {e}", code="queue_full") from e
    except EngineClosedError as e:
        raise api.ApiError(503, f"{e}; the server is shutting down", code="shutting_down") from None
    except InputError as e:
        raise api.bad(api.param_of(e), str(e)) from None
    finally:
        if len(handles) < len(submissions):
            for handle in handles:
                handle.cancel()
    if request.beams is not None:  # a beam search per prompt: its n best hypotheses are n choices
        return [BeamChoice(handle, j) for handle in handles for j in range(request.n)]
    return handles


class BeamChoice:
    """The j-th best hypothesis of a beam search request, as a choice: it stands in for a handle
    (events and Choices read it as one). No pieces while the search runs: one at the end with
    the hypothesis' tokens (for the usage), then its Completion."""

    def __init__(self, handle, j: int):
        self.handle, self.j = handle, j
        self.prompt_token_ids, self.prompt_logprobs, self.token_times = handle.prompt_token_ids, None, []

    def cancel(self) -> None:
        self.handle.cancel()

    async def __aiter__(self):
        completion = await self.handle
        if completion.beams and self.j < len(completion.beams):
            beam = completion.beams[self.j]
            yield Piece(beam.text, list(beam.token_ids))

    async def result(self):
        completion = await self.handle
        if not completion.beams or self.j >= len(completion.beams):
            return dataclasses.replace(completion, token_ids=[], text="", beams=None)
        beam = completion.beams[self.j]
        return dataclasses.replace(completion, token_ids=list(beam.token_ids), text=beam.text,
                                   finish_reason=beam.finish_reason, beams=None)  # fmt: skip

    def __await__(self):
        return self.result().__await__()


async def events(request: Request, handles: list) -> AsyncIterator[tuple[str, int, object]]:
    """("piece", choice index, Piece) as tokens come, ("done", index, Completion) as choices end,
    from all handles at once. Raises ClientGone when the client disconnects; leaving early, for any
    reason, cancels every handle still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle) -> None:
        try:
            async for piece in handle:
                queue.put_nowait(("piece", index, piece))
            queue.put_nowait(("done", index, await handle))
        except Exception as e:  # handed to the reader below, which raises it
            queue.put_nowait(("error", index, e))

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(("error", -1, ClientGone()))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    tasks.append(asyncio.create_task(watch()))
    try:
        running = len(handles)
        while running:
            kind, index, item = await queue.get()
            if kind == "error":
                raise item
            running -= kind == "done"
            yield kind, index, item
    finally:
        for handle in handles:
            handle.cancel()  # nothing for a handle that has ended
        for task in tasks:
            task.cancel()


class Choices:
    """The text, tokens and logprobs of a request's choices as they come, and its usage. A
    scoring request (max_tokens 0, echo) drops the one token the engine made for each choice."""

    def __init__(self, engine, request: api.CompletionParams, handles: list, submitted_at: float, metrics):
        self.engine, self.request, self.handles, self.metrics = engine, request, handles, metrics
        self.submitted_at = submitted_at
        self.prompt_tokens = sum(len(h.prompt_token_ids) for h in handles[:: request.n])
        echoes = [self.echo(handle, prompt) if request.echo else ("", False)
                  for handle, prompt in zip(handles[:: request.n], request.prompts)]  # fmt: skip
        self.echoed = [echoes[i // request.n][0] for i in range(len(handles))]
        self.skip_bos = [echoes[i // request.n][1] for i in range(len(handles))]
        self.offsets = [
            len(text) for text in self.echoed
        ]  # where each choice's next token starts in its text
        self.logprobs: list[list[dict]] = [[] for _ in handles]  # a logprobs object per piece
        self.new_tokens = [0] * len(handles)
        self.echo_logprobs = request.echo and request.logprobs is not None

    def echo(self, handle, prompt: str | list[int]) -> tuple[str, bool]:
        """A prompt as echoed: what the engine kept of it and scored (truncate="left" may have
        dropped its start), and whether its first id is the BOS the engine put before a text
        prompt (not in the text, so not listed)."""
        ids, to_string = handle.prompt_token_ids, self.engine.tokenizer.to_string
        if isinstance(prompt, str):
            bos = self.engine.tokenizer.bos_token_id
            if self.request.truncate is None or ids[0] == bos and to_string(ids[1:]) == prompt:
                return prompt, True
        return to_string(ids), False

    def echoed_logprobs(self, index: int) -> dict | None:
        """With echo and logprobs, the logprobs object of the echoed prompt's tokens (the first
        one's logprob is null, as OpenAI's: nothing comes before it; a text prompt's BOS, which
        the engine put before it, is not in the text and not listed). Call after a first piece or
        the end: the engine sets the prompt's logprobs before."""
        handle = self.handles[index]
        if not self.echo_logprobs or handle.prompt_logprobs is None:
            return None
        ids, logprobs, tops = handle.prompt_token_ids, handle.prompt_logprobs, handle.prompt_top_logprobs
        if self.skip_bos[index]:
            ids, logprobs, tops = ids[1:], [None, *logprobs[2:]], [None, *tops[2:]]
            if not ids:  # an empty text: nothing to list
                logprobs = tops = []
        to_str = self.engine.tokenizer.to_str_tokens
        tokens = to_str(ids)
        shown = [None] + api.top_logprobs(tops[1:], self.request.logprobs, to_str) if tops else []
        out = api.logprobs_object(tokens, logprobs, shown, 0)
        self.logprobs[index].insert(0, out)
        return out

    def piece(self, index: int, piece) -> dict | None:
        """The piece's logprobs object (None unless logprobs were asked for, or when scoring)."""
        if self.request.scoring:
            return None
        self.new_tokens[index] += len(piece.token_ids)
        if self.request.logprobs is None:
            return None
        to_str = self.engine.tokenizer.to_str_tokens  # one string per id
        tokens = to_str(piece.token_ids)
        tops = api.top_logprobs(piece.top_logprobs or [{}] * len(tokens), self.request.logprobs, to_str)
        out = api.logprobs_object(tokens, list(piece.token_logprobs or []), tops, self.offsets[index])
        self.offsets[index] += sum(map(len, tokens))
        self.logprobs[index].append(out)
        return out

    def done(self, index: int, completion) -> str:
        """The choice's finish_reason, once it has ended (scoring: "length", its token dropped)."""
        times = [] if self.request.scoring else list(self.handles[index].token_times)
        self.metrics.choice_done(self.submitted_at, times, self.new_tokens[index])
        if self.request.scoring and completion.finish_reason != "cancelled":
            return "length"
        return api.finish_reason(completion.finish_reason)

    def text(self, completion) -> str:
        return "" if self.request.scoring else completion.text

    def usage(self) -> dict:
        return api.usage(self.prompt_tokens, sum(self.new_tokens))

    def joined_logprobs(self, index: int) -> dict | None:
        if self.request.logprobs is None:
            return None
        parts = self.logprobs[index]
        return {key: [x for part in parts for x in part[key]] for key in
                ("tokens", "token_logprobs", "top_logprobs", "text_offset")}  # fmt: skip


async def whole_response(request: Request, choices: Choices, model: str) -> dict:
    texts, reasons = {}, {}
    async with contextlib.aclosing(events(request, choices.handles)) as stream:
        async for kind, index, item in stream:
            if kind == "piece":
                choices.piece(index, item)
            else:
                reasons[index], texts[index] = choices.done(index, item), choices.text(item)
    for i in range(len(choices.handles)):
        choices.echoed_logprobs(i)
    body = [api.choice(i, choices.echoed[i] + texts[i], reasons[i], choices.joined_logprobs(i))
            for i in range(len(choices.handles))]  # fmt: skip
    return api.completion_object(api.completion_id(), api.now(), model, body, choices.usage())


async def stream_response(request: Request, choices: Choices, model: str) -> AsyncIterator[str]:
    """Server-sent events: the echoed prompts, a chunk per piece, a chunk per finished choice with
    its finish_reason, the usage when stream_options asked for it, then `data: [DONE]`."""
    response_id, created = api.completion_id(), api.now()

    def chunk(*choice_list: dict, usage: dict | None = None) -> str:
        return api.sse(api.completion_object(response_id, created, model, list(choice_list), usage))

    answered = False
    try:
        echoes = {i for i, text in enumerate(choices.echoed) if text}
        if not choices.echo_logprobs:  # at once; with logprobs, each before its choice's first piece
            for i in sorted(echoes):
                yield chunk(api.choice(i, choices.echoed[i], None))
            echoes.clear()
        async with contextlib.aclosing(events(request, choices.handles)) as stream:
            async for kind, index, item in stream:
                if index in echoes:  # the prompt's logprobs are in by its first piece
                    echoes.discard(index)
                    yield chunk(
                        api.choice(index, choices.echoed[index], None, choices.echoed_logprobs(index))
                    )
                if kind == "piece":
                    logprobs = choices.piece(index, item)
                    if not choices.request.scoring:
                        yield chunk(api.choice(index, item.text, None, logprobs))
                else:
                    yield chunk(api.choice(index, "", choices.done(index, item)))
        if choices.request.include_usage:
            yield chunk(usage=choices.usage())
        yield api.sse("[DONE]")
        answered = True
    except ClientGone:  # seen by events(); or else Starlette cancels this generator
        pass
    except Exception as e:  # a bug of ours after the 200 went out: an error event ends the stream
        log.exception("a streamed completion failed")
        yield api.sse(api.ApiError(500, f"internal error: {type(e).__name__}: {e}").body())
        answered = True
    finally:
        for handle in choices.handles:
            handle.cancel()  # nothing for a handle that has ended
        choices.metrics.disconnects += not answered


# -- the app -----------------------------------------------------------------------------------
def error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request):
    """The body as JSON. Raises ApiError 413 past MAX_BODY_BYTES, 400 when it is not JSON or not
    Unicode text; ClientGone when the client leaves (or its read timeout closes the connection)
    before the body is whole."""
    chunks, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY_BYTES:
                raise api.ApiError(
                    413, f"the request body is over {MAX_BODY_BYTES} bytes; send fewer prompts at a time"
                )
            chunks.append(part)
    except ClientDisconnect:
        raise ClientGone() from None
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise api.bad(None, f"the request body is not valid JSON ({e}); send a JSON object") from None
    api.check_text(raw, body)
    return body


def gone(request: Request) -> Response:
    """The answer to a client that left before its request was read: never sent, logged at debug."""
    log.debug("%s %s: the client went away before its request was whole", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED)


def create_app(engine, model_name: str, drain_timeout: float = 30.0) -> FastAPI:
    """The app over `engine` (an Engine with submit/stats/close), serving it as `model_name`.
    The app's lifespan closes the engine when uvicorn shuts down (app.state.drain)."""
    drain, metrics, started = Drain(engine, drain_timeout), Metrics(), api.now()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(drain.wait)

    app = FastAPI(title="gpt2-onnx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.drain, app.state.metrics = drain, metrics

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return error(api.ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return error(api.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        submitted_at = time.perf_counter()
        try:
            if drain.draining:
                raise api.ApiError(503, "the server is shutting down; send the request elsewhere",
                                   code="shutting_down")  # fmt: skip
            body = api.parse_completion(await read_json(request), model_name, engine.vocab_size,
                                                engine.n_positions)  # fmt: skip
            choices = Choices(engine, body, submit_all(engine, body), submitted_at, metrics)
            metrics.prompt_tokens += choices.prompt_tokens
        except api.ApiError as e:
            metrics.request(e.status)
            return error(e)
        except ClientGone:
            metrics.disconnects += 1
            metrics.request(CLIENT_CLOSED)
            return gone(request)
        if body.stream:
            metrics.request(200)
            return StreamingResponse(stream_response(request, choices, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            response = JSONResponse(await whole_response(request, choices, model_name))
        except ClientGone:
            metrics.disconnects += 1
            metrics.request(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        metrics.request(200)
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        return error(api.bad("messages", "GPT-2 has no chat template, so this server has no chat completions; "
                                         "send a text prompt to POST /v1/completions"))  # fmt: skip

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "gpt2-onnx"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        try:
            api.check_model(model, model_name)
        except api.ApiError as e:
            return error(e)
        return JSONResponse(model_card())

    async def answer(request: Request, respond: Callable[[object], dict]) -> Response:
        """respond(the request's JSON body) as JSON; an ApiError as OpenAI's error object."""
        try:
            return JSONResponse(respond(await read_json(request)))
        except api.ApiError as e:
            return error(e)
        except ClientGone:
            return gone(request)

    def tokenized(asked: api.TokenizeParams) -> dict:
        ids = engine.to_tokens(asked.prompt, prepend_bos=asked.add_special_tokens)
        strs = engine.tokenizer.to_str_tokens(ids) if asked.return_token_strs else None
        return api.tokenize_object(ids, engine.n_positions, strs)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await answer(request, lambda body: tokenized(api.parse_tokenize(body, model_name)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        def respond(body) -> dict:
            return {
                "prompt": engine.to_string(api.parse_detokenize_request(body, model_name, engine.vocab_size))
            }

        return await answer(request, respond)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return api.tokenizer_info(model_name, engine.tokenizer, engine.n_positions, engine.vocab_size)

    @app.get("/health")
    async def health() -> JSONResponse:
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if engine.stuck(STUCK_S):
            return JSONResponse({"status": "stuck", "seconds": STUCK_S}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(engine.stats()), media_type="text/plain; version=0.0.4")

    return app


# -- connections -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server. uvicorn closes an idle connection between requests,
    but has no deadline inside one: a client that trickles its headers or body (slowloris) would
    hold its connection for ever."""

    read_timeout: float = 30.0  # seconds to send a whole request, headers and body, from its first byte
    keep_alive: float = 5.0  # seconds an idle connection stays open between requests (uvicorn's own default)
    # connections served at once, past which a request gets 503; None: 256, or twice the engine's
    # slots and queue places when that is more (clients keep idle connections in their pools)
    max_connections: int | None = None


class HeadersTooLarge(Exception):
    """A request line and headers past MAX_HEADER_BYTES (raised inside httptools' parser, which
    uvicorn then answers with 400 and a closed connection)."""


def guarded(protocol: type, read_timeout: float, metrics: Metrics) -> type:
    """uvicorn's HTTP protocol class with a deadline on each request: from the connection's opening
    or the request's first byte, its headers and body must be whole within `read_timeout` seconds,
    else the client gets a 408 (when no answer has started) and the connection is closed. With
    httptools, the request line and headers are capped at MAX_HEADER_BYTES (h11 caps its own)."""
    expired = api.ApiError(408, f"the request was not whole within {read_timeout:g} s (--read-timeout); "
                                "send its headers and body at once").body()  # fmt: skip
    body = json.dumps(expired).encode()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip

    class Guarded(protocol):
        deadline: asyncio.TimerHandle | None = None
        header_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.watch(receiving=True)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = self.cycle  # the request being answered, or the last one
            self.watch(receiving=cycle is None or cycle.response_complete or cycle.more_body)

        def connection_lost(self, exc: Exception | None) -> None:
            self.watch(receiving=False)
            super().connection_lost(exc)

        def watch(self, receiving: bool) -> None:
            """A deadline while a request is coming in (from its first byte on), none otherwise."""
            if receiving and not self.transport.is_closing():
                if self.deadline is None:
                    self.deadline = asyncio.get_running_loop().call_later(read_timeout, self.timed_out)
            elif self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def timed_out(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            log.debug("closing a connection whose request was not whole within %gs", read_timeout)
            metrics.read_timeouts += 1
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(timeout_response)
            self.transport.close()  # a request still being read sees a disconnect (ClientGone)

        # httptools' parser calls these for a request's start, its URL in parts and each header
        def on_message_begin(self) -> None:
            self.header_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self.count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.count(len(name) + len(value))
            super().on_header(name, value)

        def count(self, n: int) -> None:
            self.header_bytes += n
            if self.header_bytes > MAX_HEADER_BYTES:
                raise HeadersTooLarge(f"request line and headers over {MAX_HEADER_BYTES} bytes")

    return Guarded


# -- running it --------------------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT also starts closing the engine (so running
    requests end within the drain timeout instead of holding the shutdown), and which does not
    raise the caught signal again after a clean shutdown, so that the process exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.drain.start()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread has signals
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def config(app: FastAPI, engine, drain_timeout: float, log_level: str = "info",
           limits: Limits = Limits()) -> uvicorn.Config:  # fmt: skip
    """uvicorn's settings for the app over `engine`: its HTTP protocol with the read deadline, the
    keep-alive timeout and the connection limit."""
    stats = engine.stats()
    return uvicorn.Config(app, log_level=log_level, **connection_settings(
        limits, app.state.metrics, stats["max_batch"] + stats["max_queue"], drain_timeout))  # fmt: skip


def connection_settings(limits: Limits, metrics: Metrics, places: int, drain_timeout: float) -> dict:
    """uvicorn.Config's settings for `limits`, for an endpoint whose engines hold `places`
    requests (slots and queue places): also the Ray front's."""
    connections = limits.max_connections or max(256, 2 * places)
    return {
        "timeout_graceful_shutdown": drain_timeout + 5,  # uvicorn's wait for connections ends after the drain
        "http": guarded(AutoHTTPProtocol, limits.read_timeout, metrics),
        "timeout_keep_alive": limits.keep_alive,
        "limit_concurrency": connections + 1,  # uvicorn counts the new request's own connection
    }


def serve(engine, sock: socket.socket, model_name: str, drain_timeout: float, log_level: str,
          limits: Limits = Limits()) -> None:  # fmt: skip
    """Serve `engine` on a bound socket until SIGTERM or Ctrl-C, then drain and return."""
    app = create_app(engine, model_name, drain_timeout)
    DrainingServer(config(app, engine, drain_timeout, log_level, limits), app.state.drain).run(sockets=[sock])
