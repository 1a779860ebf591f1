"""`gpt2-onnx serve --ray`: replicas of the server behind one endpoint, on Ray Serve.

Each replica is a Ray Serve replica (its own process, on any node of the cluster) that owns one
Engine with its continuous-batching scheduler, and serves the app of `gpt2-onnx serve` over it
(`server.create_app`: the same routes, request checks and error shapes, the same code). Ray
Serve's proxy is the one HTTP endpoint; its router sends each request to a replica with room (at
most max_batch + max_queue requests in flight per replica, `max_ongoing_requests`; the rest wait
in the proxy), restarts a replica whose process dies or whose health check fails (the engine's
loop has not turned for `server.STUCK_S` while it has work), and on shutdown gives each replica
the drain timeout to finish (the app's lifespan closes its engine). Every response says which
replica answered (`x-gpt2onnx-replica: <replica id> <pid>`).

Needs the `[ray]` extra (`pip install 'gpt2-onnx[ray]'`): imported only by `gpt2-onnx serve --ray`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ray import serve

from gpt2onnx import server
from gpt2onnx.engine.engine import Engine

APP_NAME = "gpt2-onnx"
REPLICA_HEADER = b"x-gpt2onnx-replica"


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


class Replica:
    """One replica: an Engine loaded from `folder` with `load` (Engine.load's keywords) and the
    server's app over it."""

    def __init__(self, folder: str, model_name: str, load: dict, drain_timeout: float):
        self.engine = Engine.load(folder, **load)
        replica = f"{serve.get_replica_context().replica_id.unique_id} {os.getpid()}"
        self.server_app = tagged(server.create_app(self.engine, model_name, drain_timeout), replica)

    def __serve_build_asgi_app__(self):  # Ray Serve: the replica's ASGI app, built after __init__
        return self.server_app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose loop is stuck is restarted."""
        if self.engine.stuck(server.STUCK_S):
            raise RuntimeError(f"the engine has had work but no step for over {server.STUCK_S:g} s")


def tagged(app, replica: str):
    """`app` with the replica's header on every HTTP response (a plain ASGI wrapper: streaming and
    disconnects pass through untouched)."""
    value = replica.encode()

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, value)]}
            await send(message)

        return await app(scope, receive, send_tagged)

    return asgi


def application(folder: str, model_name: str, load: dict, drain_timeout: float, scaling: Scaling,
                replica_cpus: float, replica_gpus: float) -> serve.Application:  # fmt: skip
    """The Ray Serve application: the Replica deployment with its routing, health and drain settings."""
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name=APP_NAME,
        max_ongoing_requests=load["max_batch"] + load["max_queue"],  # what one replica's engine takes
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        health_check_period_s=10,
        health_check_timeout_s=server.STUCK_S,
        graceful_shutdown_timeout_s=drain_timeout + 5,
        **scaling.options(),
    )
    return deployment.bind(folder, model_name, load, drain_timeout)
