"""Many replicas of one engine on Ray Serve (`pip install ember[ray]`; `ember serve CONFIG --backend ray
--replicas N`).

Each replica is a Ray actor that builds the engine `ember serve` would build from the same config and serves
ember's own FastAPI app (every OpenAI route, streaming included) as the deployment's ASGI ingress; Ray Serve's
HTTP proxy spreads requests over the replicas (power of two choices on queue length) and, with `autoscaling`,
adds and removes replicas on ongoing requests per replica. Tensor parallelism stays inside a replica, as with
one `ember serve`. Every response names the replica that served it in an `x-ember-replica` header.

A replica that dies is replaced by Serve's controller; requests it held fail with a 5xx or a dropped
connection and are retried by the client (the openai SDK retries those by default), landing on a live replica.
Prefix-aware routing is not done here: Serve's default router balances on queue length only.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from dataclasses import dataclass

logger = logging.getLogger("ember.deploy.ray")

REPLICA_HEADER = "x-ember-replica"
DEPLOYMENT_NAME = "ember"


@dataclass
class RayServeOptions:
    """How the application is laid out on the cluster."""

    num_replicas: int = 1
    num_cpus_per_replica: float = 1.0  # Ray's CPU resource per replica actor (a scheduling label, not a cap)
    autoscaling: bool = False  # scale between min_replicas and num_replicas on ongoing requests
    min_replicas: int = 1
    target_ongoing_requests: float = 8.0  # per replica, what the autoscaler aims for
    max_ongoing_requests: int = 64  # per replica, beyond which the proxy queues (the engine batches these)


def _deployment_config(opts: RayServeOptions) -> dict:
    cfg = {"ray_actor_options": {"num_cpus": opts.num_cpus_per_replica},
           "max_ongoing_requests": opts.max_ongoing_requests, "health_check_period_s": 2.0}
    if opts.autoscaling:
        cfg["autoscaling_config"] = {"min_replicas": opts.min_replicas, "max_replicas": opts.num_replicas,
                                     "target_ongoing_requests": opts.target_ongoing_requests}
    else:
        cfg["num_replicas"] = opts.num_replicas
    return cfg


def build_application(config: dict, opts: RayServeOptions):
    """A Ray Serve application serving `config` (an EngineConfig dumped to JSON-able dict) from replicas."""
    from ray import serve

    @serve.ingress()
    class EmberReplica:
        """One engine and its OpenAI app, built inside the replica's actor."""

        def __init__(self, config: dict):
            self.config = config

        def __serve_build_asgi_app__(self):
            from ember.config import load_config
            from ember.server.app import build_engine, create_app

            cfg = load_config(self.config)
            engine = build_engine(cfg)
            app = create_app(engine, cfg)
            tag = serve.get_replica_context().replica_id.unique_id

            @app.middleware("http")
            async def name_the_replica(request, call_next):
                response = await call_next(request)
                response.headers[REPLICA_HEADER] = tag
                return response

            return app

    deployment = serve.deployment(name=DEPLOYMENT_NAME, **_deployment_config(opts))(EmberReplica)
    return deployment.bind(config)


def start(config: dict, opts: RayServeOptions, *, host: str, port: int, ray_address: str | None = None,
          num_cpus: float | None = None) -> None:
    """Start (or join, with `ray_address`) a Ray cluster, run the application behind Serve's proxy on
    host:port and wait until every replica is up."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=None if ray_address else 200 * 1024 * 1024)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config, opts), name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)
    logger.info("ember on Ray Serve: %s replica(s) at http://%s:%d", opts.num_replicas, host, port)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run(config: dict, opts: RayServeOptions, *, host: str, port: int, ray_address: str | None = None) -> None:
    """`ember serve --backend ray`: serve until SIGINT/SIGTERM, then shut the application and Ray down."""
    done = threading.Event()
    cpus = None if ray_address else math.ceil(opts.num_cpus_per_replica * opts.num_replicas)  # a whole number
    start(config, opts, host=host, port=port, ray_address=ray_address, num_cpus=cpus)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        stop()
