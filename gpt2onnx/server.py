"""The HTTP server of `gpt2-onnx serve`: OpenAI's completions API over one Engine, on FastAPI
and uvicorn.

    POST /v1/completions        OpenAI's completions (gpt2onnx/openai_api.py checks and shapes)
    POST /v1/chat/completions   400: GPT-2 has no chat template
    GET  /v1/models             the one model served
    GET  /health                200 while serving, 503 while draining or stuck (no step for STUCK_S)
    GET  /metrics               Prometheus text: requests, tokens, queue, slots, latencies

Every request's choices are Engine.submit handles; the engine's scheduler batches them with
everyone else's. A client that goes away (mid-stream or while waiting) cancels its handles, so
their slots are freed at the next step. Errors are OpenAI's error objects: 400 bad parameter,
404 unknown model or route, 429 queue full, 503 shutting down; a 500 is a bug of ours.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections and the engine is closed at
once in a thread (Drain): new requests on open connections get 503, running ones finish within
the drain timeout or end with finish_reason "cancelled", then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gpt2onnx import openai_api as api
from gpt2onnx.engine.contract import InputError
from gpt2onnx.engine.scheduler import EngineClosedError, QueueFullError
from gpt2onnx.metrics import Metrics

log = logging.getLogger("gpt2onnx")

MAX_BODY_BYTES = 16 << 20  # a request body; 128 prompts of 1024 tokens as JSON ids are ~1 MB
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


def submit_all(engine, request: api.CompletionRequest) -> list:
    """One handle per choice; all or none (a refusal cancels those already submitted). Raises
    ApiError: 400 for a prompt the engine refuses, 429 queue full, 503 shutting down."""
    handles = []
    try:
        for prompt, keywords in request.submissions():
            handles.append(engine.submit(prompt, **keywords))
    except QueueFullError as e:
        full = (
            f"the queue is full: {engine.stats()['max_queue']} requests already wait for a slot (--max-queue)"
        )
        raise api.ApiError(429, f"{full}; retry later", code="queue_full") from e
    except EngineClosedError as e:
        raise api.ApiError(503, f"{e}; the server is shutting down", code="shutting_down") from None
    except InputError as e:
        raise api.bad(api.param_of(str(e)), str(e)) from None
    finally:
        if len(handles) < len(request.prompts) * request.n:
            for handle in handles:
                handle.cancel()
    return handles


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
    """The text, tokens and logprobs of a request's choices as they come, and its usage."""

    def __init__(self, engine, request: api.CompletionRequest, handles: list, submitted_at: float, metrics):
        self.engine, self.request, self.handles, self.metrics = engine, request, handles, metrics
        self.submitted_at = submitted_at
        self.prompt_tokens = sum(len(h.prompt_token_ids) for h in handles[:: request.n])
        self.echoed = [self.prompt_text(i) if request.echo else "" for i in range(len(handles))]
        self.offsets = [
            len(text) for text in self.echoed
        ]  # where each choice's next token starts in its text
        self.logprobs: list[list[dict]] = [[] for _ in handles]  # a logprobs object per piece
        self.new_tokens = [0] * len(handles)
        self.echo_logprobs = request.echo and request.logprobs is not None

    def prompt_text(self, index: int) -> str:
        prompt = self.request.prompts[index // self.request.n]
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.to_string(prompt)

    def echoed_logprobs(self, index: int) -> dict | None:
        """With echo and logprobs, the logprobs object of the echoed prompt's tokens (the first
        one's logprob is null, as OpenAI's: nothing comes before it; a text prompt's BOS, which
        the engine put before it, is not in the text and not listed). Call after a first piece or
        the end: the engine sets the prompt's logprobs before."""
        handle = self.handles[index]
        if not self.echo_logprobs or handle.prompt_logprobs is None:
            return None
        ids, logprobs, tops = handle.prompt_token_ids, handle.prompt_logprobs, handle.prompt_top_logprobs
        if isinstance(self.request.prompts[index // self.request.n], str):
            ids, logprobs, tops = ids[1:], [None, *logprobs[2:]], [None, *tops[2:]]
        to_str = self.engine.tokenizer.to_str_tokens
        tokens = to_str(ids)
        shown = [None] + api.top_logprobs(tops[1:], self.request.logprobs, to_str) if tops else []
        out = api.logprobs_object(tokens, logprobs, shown, 0)
        self.logprobs[index].insert(0, out)
        return out

    def piece(self, index: int, piece) -> dict | None:
        """The piece's logprobs object (None unless logprobs were asked for)."""
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
        self.metrics.choice_done(
            self.submitted_at, list(self.handles[index].token_times), self.new_tokens[index]
        )
        return api.finish_reason(completion.finish_reason)

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
                reasons[index], texts[index] = choices.done(index, item), item.text
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
                    yield chunk(api.choice(index, item.text, None, choices.piece(index, item)))
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
    """The body as JSON; ApiError 413 past MAX_BODY_BYTES, 400 when it is not JSON."""
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise api.ApiError(
                413, f"the request body is over {MAX_BODY_BYTES} bytes; send fewer prompts at a time"
            )
        chunks.append(part)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise api.bad(None, f"the request body is not valid JSON ({e}); send a JSON object") from None


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
            body = api.parse_completion_request(await read_json(request), model_name, engine.vocab_size,
                                                engine.n_positions)  # fmt: skip
            choices = Choices(engine, body, submit_all(engine, body), submitted_at, metrics)
            metrics.prompt_tokens += choices.prompt_tokens
        except api.ApiError as e:
            metrics.request(e.status)
            return error(e)
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


def serve(engine, sock: socket.socket, model_name: str, drain_timeout: float, log_level: str) -> None:
    """Serve `engine` on a bound socket until SIGTERM or Ctrl-C, then drain and return."""
    app = create_app(engine, model_name, drain_timeout)
    # uvicorn's own wait for open connections ends a little after the engine's drain has.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5)
    DrainingServer(config, app.state.drain).run(sockets=[sock])
