"""`gpt2-onnx serve --ray`: replicas of the server on Ray Serve, behind one endpoint of our own.

Each replica (its own process, on any node of the cluster) owns one Engine with its
continuous-batching scheduler and the app of `gpt2-onnx serve` over it (`server.create_app`: the
same routes, request checks and error shapes, the same code). Ray's router hands each request to
a replica with room (at most max_batch + max_queue in flight per replica, `max_ongoing_requests`;
the rest wait), restarts a replica whose process dies or whose health check fails (the engine's
loop has not turned for `server.STUCK_S` while it has work), and on shutdown lets each replica
finish its requests before its engine is closed.

The endpoint is `Front`, an ASGI app served by uvicorn in the `gpt2-onnx serve --ray` process
itself; Ray Serve's own HTTP proxy is off. Front reads a request, hands it to a replica through a
DeploymentHandle (`Replica.request`, which runs the app on it in the replica's process) and relays
the app's ASGI messages. It is there for what Ray's proxy does badly when a replica's process dies
(a plain-text 500, or a stream cut without `[DONE]`): a request whose answer had not started is
sent again to a live replica (RETRIES times); one that still has none gets OpenAI's error object,
a 503 with Retry-After; a stream already under way ends with an error event and `data: [DONE]`.
Every answer from a replica names it (`x-gpt2onnx-replica: <replica id> <pid>`).

A cluster that `serve --ray` starts itself (`connect`) is a private one on this machine with every
port on loopback: Ray's ports run arbitrary code for whoever reaches them (ShadowRay,
CVE-2023-48022), and nothing outside this machine needs them.

Needs the `[ray]` extra (`pip install 'gpt2-onnx[ray]'`): imported only by `gpt2-onnx serve --ray`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import ray
import uvicorn
from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

from gpt2onnx.engine.engine import Engine
from gpt2onnx.serve import openai_api as api
from gpt2onnx.serve import server
from gpt2onnx.serve.metrics import Metrics

log = logging.getLogger("gpt2onnx")

APP_NAME = "gpt2-onnx"
REPLICA_HEADER = b"x-gpt2onnx-replica"
RETRIES = 2  # a request whose replica died before answering is sent again this many times
RETRY_AFTER_S = 2  # what a 503 for a dead replica tells clients: Ray starts a new one within seconds
REPLICA_FAILED = (RayActorError, WorkerCrashedError, ReplicaUnavailableError)  # its process died
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Scaling:
    """A fixed number of replicas, or autoscaling between min and max replicas at a target of
    ongoing requests per replica."""

    replicas: int | None = 1
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0

    def __str__(self) -> str:
        if self.replicas is not None:
            return f"{self.replicas} replica{'s' * (self.replicas > 1)}"
        return (f"{self.min_replicas}-{self.max_replicas} replicas, autoscaled at "
                f"{self.target_ongoing_requests:g} ongoing requests each")  # fmt: skip

    def options(self) -> dict:
        if self.replicas is not None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                       "target_ongoing_requests": self.target_ongoing_requests}}  # fmt: skip


# -- the replicas ------------------------------------------------------------------------------
class Replica:
    """One replica: an Engine loaded from `folder` with `load` (Engine.load's keywords) and the
    server's app over it, run on the requests Front hands it."""

    def __init__(self, folder: str, model_name: str, load: dict, drain_timeout: float):
        if ray.util.get_node_ip_address() == LOOPBACK:
            keep_serve_grpc_on_loopback()
        self.engine = Engine.load(folder, **load)
        self.name = f"{serve.get_replica_context().replica_id.unique_id} {os.getpid()}".encode()
        self.app = server.create_app(self.engine, model_name, drain_timeout)

    async def request(self, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
        """One HTTP request (its scope, and its body already read) through the app: the app's ASGI
        messages in batches as they come, the response's start naming this replica. Cancelling
        the call (Front's client went away) is a client disconnect to the app."""
        async for batch in run_app(self.app, scope, body):
            for message in batch:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.name)]
            yield batch

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose loop is stuck is restarted."""
        if self.engine.stuck(server.STUCK_S):
            raise RuntimeError(f"the engine has had work but no step for over {server.STUCK_S:g} s")

    async def __del__(self) -> None:
        """Ray Serve stops the replica (after its requests ended, or its graceful timeout): close
        the engine as the app's lifespan does under uvicorn."""
        await asyncio.to_thread(self.app.state.drain.wait)


def keep_serve_grpc_on_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on every interface ("[::]:0")
    whatever the node's address; on a loopback-only node (the cluster `connect` starts) bind it to
    loopback as well. Ray's private name: tests/serve/test_ray.py lists every listening socket of the
    cluster, so a Ray that renames it fails there, not silently."""
    from ray.serve._private import replica as serve_replica

    add_port = serve_replica.add_port_to_grpc_server
    if getattr(add_port, "loopback", False):
        return

    def add_loopback_port(grpc_server, address: str) -> int:
        return add_port(grpc_server, address.replace("[::]:", f"{LOOPBACK}:", 1))

    add_loopback_port.loopback = True
    serve_replica.add_port_to_grpc_server = add_loopback_port


async def run_app(app, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
    """`app` (ASGI) on one HTTP request whose body has been read, in this process: its messages in
    batches, as they come. Leaving early (the caller was cancelled) tells the app that its client
    disconnected, which cancels the request's work, as under uvicorn. Raises what the app raised."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    unread = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if unread:
            return unread.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("the client went away")  # what ASGI servers do for a closed connection
        sent.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            sent.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        ended = False
        while not ended:
            batch = [await sent.get()]
            while not sent.empty():
                batch.append(sent.get_nowait())
            ended = batch[-1] is None
            if batch := [message for message in batch if message is not None]:
                yield batch
        await task
    finally:
        gone.set()  # the app sees the disconnect and ends; its outcome is no one's to read then
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def application(folder: str, model_name: str, load: dict, drain_timeout: float, scaling: Scaling,
                replica_cpus: float, replica_gpus: float) -> serve.Application:  # fmt: skip
    """The Ray Serve application: the Replica deployment with its routing, health and drain settings."""
    deployment = serve.deployment(
        Replica,
        name=APP_NAME,
        max_ongoing_requests=load["max_batch"] + load["max_queue"],  # what one replica's engine takes
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        health_check_period_s=10,
        health_check_timeout_s=server.STUCK_S,
        graceful_shutdown_timeout_s=drain_timeout + 5,
        **scaling.options(),
    )
    return deployment.bind(folder, model_name, load, drain_timeout)


# -- the endpoint ------------------------------------------------------------------------------
SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
              "headers", "client", "server")  # fmt: skip


class NotStarted(Exception):
    """The replica died before any of its answer went out: the request can be sent again."""


class Call:
    """One request on its way through Front: the replica's answer it awaits, and why it was
    cancelled ("gone": its client left; "drain": the server's drain timeout ran out)."""

    def __init__(self) -> None:
        self.response = None  # a DeploymentResponseGenerator
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason
        if self.response is not None:
            self.response.cancel()


class Front:
    """The endpoint (ASGI): each request relayed to a replica through `handle` (the Replica
    deployment's), sent again when its replica died before answering. On drain (SIGTERM or
    Ctrl-C, through server.DrainingServer) new requests get 503 and running ones `drain_timeout`
    seconds to finish, after which they are cancelled."""

    def __init__(self, handle, drain_timeout: float, retries: int = RETRIES):
        self.handle = handle.options(stream=True)
        self.drain_timeout, self.retries = drain_timeout, retries
        self.calls: set[Call] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start draining (DrainingServer calls it from its signal handler)."""
        if not self.draining:
            self.draining = True
            log.warning("draining: running requests get %gs to finish", self.drain_timeout)
            if self.loop is not None:  # else no request has come in
                self.loop.call_soon_threadsafe(self.loop.call_later, self.drain_timeout, self.cancel_all)

    def cancel_all(self) -> None:
        for call in list(self.calls):
            call.cancel("drain")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":  # no websockets here
            return
        if self.draining:
            return await answer(send, shutting_down())
        try:
            body = await read_body(receive)
        except api.ApiError as e:
            return await answer(send, e)
        if body is None:  # the client left before its request was whole
            return
        call = Call()
        self.calls.add(call)
        watcher = asyncio.create_task(watch(receive, call))
        try:
            await self.relay(call, {**{k: scope[k] for k in SCOPE_KEYS if k in scope},
                                    "asgi": {"version": "3.0", "spec_version": "2.3"}}, body, send)  # fmt: skip
        finally:
            watcher.cancel()
            self.calls.discard(call)

    async def lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def relay(self, call: Call, scope: dict, body: bytes, send: Callable) -> None:
        """The request to a replica, and again to another while none had started answering; when
        none did, OpenAI's error object (nothing for a client that left)."""
        for attempt in range(self.retries + 1):
            if call.reason is not None:
                break
            call.response = self.handle.request.remote(scope, body)
            try:
                return await relay_answer(call, send)
            except NotStarted as e:
                if attempt < self.retries and call.reason is None:
                    log.warning("%s %s: its replica died before answering (%s); sending it to another",
                                scope["method"], scope["path"], e)  # fmt: skip
        if call.reason == "drain":
            await answer(send, shutting_down())
        elif call.reason is None:
            await answer(send, api.ApiError(503, f"no replica answered this request: the {self.retries + 1} "
                                                 "that took it in turn died first; Ray starts new ones within "
                                                 "seconds, so send it again", code="replica_unavailable"),
                         headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])  # fmt: skip


async def relay_answer(call: Call, send: Callable) -> None:
    """The replica's answer relayed as it comes. Its start is held back until its first body part,
    so that a replica dying before any of it was sent raises NotStarted (the request can go to
    another); a stream it cut later ends with an error event and `data: [DONE]`."""
    start, sse = None, False
    started = False
    try:
        async for batch in call.response:
            for message in batch:
                if message["type"] == "http.response.start":
                    start = message
                    continue
                if start is not None:
                    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in start.get("headers", []))  # fmt: skip
                    await send(start)
                    start, started = None, True
                await send(message)
    except REPLICA_FAILED as e:
        if not started:
            raise NotStarted(type(e).__name__) from e
        log.warning("a replica died while streaming a response (%s): ending it with an error event",
                    type(e).__name__)  # fmt: skip
        await end_stream(send, sse, api.ApiError(503, "the replica serving this stream died before it ended; "
                                                      "the text so far is incomplete: send the request again",
                                                 code="replica_failed"))  # fmt: skip
    except RequestCancelledError:
        if call.reason == "gone":
            return
        if not started:
            raise NotStarted("cancelled") from None
        await end_stream(send, sse, shutting_down())
    except OSError:  # a send to a client that left
        call.cancel("gone")
    except Exception as e:  # a bug of ours, here or in the replica: still OpenAI's error shape
        log.exception("relaying a replica's answer failed")
        error = api.ApiError(500, f"internal error: {type(e).__name__}: {e}")
        await (end_stream(send, sse, error) if started else answer(send, error))


async def end_stream(send: Callable, sse: bool, error: api.ApiError) -> None:
    """The end of an answer already under way: for a stream, an error event and `data: [DONE]`."""
    text = api.sse(error.body()) + api.sse("[DONE]") if sse else ""
    try:
        await send({"type": "http.response.body", "body": text.encode(), "more_body": False})
    except OSError:
        pass  # the client left as well: nothing to end


def shutting_down() -> api.ApiError:
    return api.ApiError(503, "the server is shutting down; send the request elsewhere", code="shutting_down")


async def answer(send: Callable, error: api.ApiError, headers: list | None = None) -> None:
    """An answer from Front itself: OpenAI's error object."""
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def read_body(receive: Callable) -> bytes | None:
    """The request's body; None when the client left first. Raises ApiError 413 past
    server.MAX_BODY_BYTES, as the app would (it is read here to be sent again on a retry)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > server.MAX_BODY_BYTES:
            raise api.ApiError(
                413, f"the request body is over {server.MAX_BODY_BYTES} bytes; send fewer prompts at a time"
            )
        if not message.get("more_body", False):
            return b"".join(parts)


async def watch(receive: Callable, call: Call) -> None:
    """Cancel the call when its client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.cancel("gone")


# -- the cluster and the command ---------------------------------------------------------------
def connect(address: str | None, level: int) -> bool:
    """Join the Ray cluster at `address` (or RAY_ADDRESS; "auto": the one `ray start` runs on this
    machine); without either, start a private one for this server. Returns whether it was started
    here (and so is stopped at the end)."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=level, include_dashboard=False)
        return False
    start_local_cluster(level)
    return True


def start_local_cluster(level: int) -> None:
    """A new single-machine cluster with every port on loopback (GCS, raylet, object manager,
    workers, dashboard and runtime-env agents, metrics), no dashboard. Ray's daemons listen on
    loopback when the node's address is 127.0.0.1, but ray.init replaces 127.0.0.1 with the
    machine's outward address except in Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    off, Ray's default on Windows and macOS), which is set for this call. Raises RuntimeError when
    the cluster is not on loopback after all (a Ray that changed how it picks its address)."""
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False,
                 dashboard_host=LOOPBACK, logging_level=level)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster came up on {node}, not on loopback; refusing to serve on it: "
                           "start one yourself (ray start --head, firewalled) and pass --ray-address auto")  # fmt: skip


def serve_replicas(sock: socket.socket, folder: str, model_name: str, load: dict, drain_timeout: float,
                   scaling: Scaling, replica_cpus: float, replica_gpus: float, ray_address: str | None,
                   ray_log_level: int, log_level: str, announce: Callable[[], None],
                   limits: server.Limits) -> None:  # fmt: skip
    """Deploy the replicas, serve Front on the bound socket until SIGTERM or Ctrl-C (announce()
    once the replicas are up), then drain, take the application down and leave the cluster (a
    cluster started here stops)."""
    started_here = connect(ray_address, ray_log_level)
    try:
        serve.start(proxy_location="Disabled")  # Front is the endpoint
        app = application(folder, model_name, load, drain_timeout, scaling, replica_cpus, replica_gpus)
        handle = serve.run(app, name=APP_NAME, route_prefix=None)  # returns when the replicas are up
        front = Front(handle, drain_timeout)
        replicas = scaling.replicas or scaling.max_replicas
        places = (load.get("max_batch", 8) + load.get("max_queue", 64)) * replicas
        settings = server.connection_settings(limits, Metrics(), places, drain_timeout)
        config = uvicorn.Config(front, log_level=log_level, lifespan="on", **settings)
        announce()
        server.DrainingServer(config, front).run(sockets=[sock])
        serve.delete(APP_NAME)  # each replica closes its engine
    finally:
        if started_here:
            serve.shutdown()
        ray.shutdown()
