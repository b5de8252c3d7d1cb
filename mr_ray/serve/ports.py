"""Ports: a free one for the servers the tests and benches start, and the checks `mr-ray serve` makes before
it starts Ray (a run folder with an index, a port it can listen on), so a mistake is one line, not a traceback."""

import errno
import os
import random
import socket
from itertools import islice
from pathlib import Path

from mr_ray.schema import DataError
from mr_ray.search.shards import read_index_manifest

# Free ports are picked below the kernel's ephemeral range (32768-60999 here), where it gives outgoing
# connections their local ports: a port picked there and bound later (Serve binds its side ports when it starts,
# a minute on) can meanwhile be taken by any connection, and HAProxy then fails to start (a test run saw it).
# Above Ray's worker ports (10002-19999), below its direct-ingress ports (30000-31000). MR_RAY_PORT_RANGE
# ("LOW-HIGH") narrows it, so processes started side by side pick apart (each test worker: tests/conftest.py).
PORT_RANGE = "20000-29999"


def free_ports(count: int) -> list[int]:
    """`count` different ports, in a random order from MR_RAY_PORT_RANGE, that nothing holds right now."""
    low, high = (int(end) for end in os.environ.get("MR_RAY_PORT_RANGE", PORT_RANGE).split("-"))
    candidates = random.sample(range(low, high + 1), high + 1 - low)
    ports = list(islice((port for port in candidates if port_is_free(port)), count))
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports in {low}-{high} (MR_RAY_PORT_RANGE)")
    return ports


def free_port() -> int:
    """A port nothing holds right now (see free_ports)."""
    return free_ports(1)[0]


def port_is_free(port: int) -> bool:
    """Nothing holds `port` on any address (a bind without SO_REUSEPORT fails even beside a socket that set it)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def check_serve_target(run_dir: Path, host: str, port: int) -> None:
    """Refuse, in one line, a --run-dir that is not a finished run's folder or a --port something already holds."""
    if not run_dir.is_dir():
        raise DataError("not a folder; give --run-dir a finished run's folder" if run_dir.exists() else "no such folder", file=str(run_dir))
    try:
        read_index_manifest(run_dir / "index")
    except (OSError, ValueError):
        raise DataError("holds no finished index/ (its manifest is missing or unreadable); run the pipeline through the `index` stage first", file=str(run_dir)) from None
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            why = "in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise DataError(f"cannot listen on {host}:{port} ({why}); give --port another or stop what holds it") from None
