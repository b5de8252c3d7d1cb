"""Connecting to Ray from the CLI and from `serve_run`."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a private local cluster.

    Ray would otherwise join whatever cluster last ran on this machine, even a dead one.
    Does nothing when Ray is already initialised in this process.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")
