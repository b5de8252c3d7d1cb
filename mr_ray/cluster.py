"""Connecting to Ray from the CLI and from `serve_run`."""

from __future__ import annotations

import os

# Ray Serve's throughput mode (Ray >= 2.56): replica user code and routers on the
# replica's main event loop, gRPC between replicas, buffered request logs; the HTTP
# proxy stays (direct ingress off). On the 2-core dev box it cut the search app's
# p50 at concurrency 1 from 27.5 to 22.0 ms and raised its concurrency-32 throughput
# from 55.5 to 65.4 q/s (bench/serve_latency.py). Every Serve process reads these when
# it starts, so they are set where a cluster starts: here for a private local one,
# in cluster.yaml's `ray start` commands for a cluster.
# RAY_SERVE_PROXY_USE_GRPC: the proxy sends requests to the ingress over gRPC too;
# throughput mode alone leaves the proxy on Ray actor calls (Ray 2.60 reads the flag
# before throughput mode sets its defaults). c=1 p50 15.0 -> 13.4 ms on the dev box.
SERVE_ENVIRONMENT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def use_serve_environment() -> None:
    """Put SERVE_ENVIRONMENT into this process's environment (a value already set wins),
    so a local cluster started from here inherits it."""
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a private local cluster with SERVE_ENVIRONMENT.

    Ray would otherwise join whatever cluster last ran on this machine, even a dead one.
    Does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        use_serve_environment()
    ray.init(address=address or "local")
