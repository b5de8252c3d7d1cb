"""Ports: a free one for the servers the tests and benches start, and the checks `mr-ray serve` makes before
it starts Ray (a run folder with an index, a port it can listen on), so a mistake is one line, not a traceback."""

import errno
import socket
from contextlib import ExitStack
from pathlib import Path

from mr_ray.schema import DataError
from mr_ray.search.shards import read_index_manifest


def free_ports(count: int) -> list[int]:
    """`count` different ports on 127.0.0.1 that nothing listens on right now (the OS picks them; all are held
    until all are picked, so none is given twice)."""
    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
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
