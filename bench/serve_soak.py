"""Soak of the search service: steady traffic while Serve replicas are killed on a schedule.

Starts the search app (replicas layout: SearchIngress, QueryEncoder and a
ShardSearcher deployment per shard, two replicas of each shard) on its own
private Ray cluster, HTTP on 127.0.0.1:--port (HAProxy in front, as `mr-ray
serve` runs it), and sends /search requests at --concurrency for --duration
seconds (at most --max-requests). Every --kill-every seconds it SIGKILLs one
replica process of the next deployment in turn (a crash, not a graceful stop)
and waits until Serve has replaced it.

Every --poison-every-th request is a poison query no tokenizer takes (a lone
surrogate, sent as JSON): it must get its own 422 and leave the requests
batched beside it unharmed. Each request ends in exactly one counted outcome:
2xx (checked: the answer is for the query sent and holds k results, or names
its missing shards), poison 422, 4xx, 5xx, connection error or client timeout. A kill's window runs from the kill
until Serve reports the deployment healthy with a fresh replica, plus
--grace seconds; a request is in the window if it was in flight at any time
of it. Printed: the totals, per kill the outcomes and p50/p99 latency of the
requests before (ended in the --side seconds before), during and after
(started in the --side seconds after) its window, and what failed outside
every window.

Exit status 1 if any request is lost silently (an outcome missing, or a 2xx
that is not a valid answer) or if any request failed outside the kill windows
(a good query's 4xx and a poison query's answer other than 422 are failures).

    python bench/serve_soak.py                       # 5 minutes, concurrency 32, port 8100
    python bench/serve_soak.py --duration 60 --kill-every 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from serve_latency import (  # bench/ is on sys.path when run as a script
    load_queries,
    wait_healthy,
)

from mr_ray.cluster import private_serve_side, use_serve_environment

CLIENT_TIMEOUT_S = 30.0


@dataclass
class Outcome:
    started: float  # seconds since the traffic began
    ended: float
    kind: str  # 2xx, 4xx, 5xx, connection error, timeout, invalid 2xx
    missing_shards: bool = False
    detail: str = ""


@dataclass
class Kill:
    deployment: str
    pid: int
    at: float
    recovered: float | None = None  # None: Serve had not replaced it when the run ended

    def window(self, grace: float, end: float) -> tuple[float, float]:
        return self.at, (self.recovered if self.recovered is not None else end) + grace


@dataclass
class Soak:
    url: str
    queries: list[str]
    k: int
    concurrency: int
    duration: float
    max_requests: int
    poison_every: int = 0  # 0: no poison queries
    sent: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    t0: float = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def judge(self, query: str, status: int, body: dict | None) -> tuple[str, bool, str]:
        """(kind, missing shards?, detail) of one HTTP answer."""
        if query == POISON:
            return ("poison 422", False, "") if status == 422 else ("poison not refused", False, f"status {status}, body {str(body)[:120]}")
        if 400 <= status < 500:
            return "4xx", False, str(body)[:120]
        if status >= 500:
            return "5xx", False, f"{status} {str(body)[:120]}"
        if not (200 <= status < 300) or not isinstance(body, dict):
            return "invalid 2xx", False, f"status {status}, body {str(body)[:120]}"
        missing = bool(body.get("missing_shards"))
        results = body.get("results")
        if body.get("query") != query or not isinstance(results, list):
            return "invalid 2xx", missing, f"answer for {body.get('query')!r}, sent {query!r}"
        if len(results) != self.k and not missing:
            return "invalid 2xx", missing, f"{len(results)} results of {self.k}, no shard reported missing"
        return "2xx", missing, ""

    async def one(self, session: aiohttp.ClientSession, query: str) -> None:
        started = self.now()
        try:
            request = session.post(f"{self.url}/search", json={"query": query, "k": self.k}) if query == POISON else (
                session.get(f"{self.url}/search", params={"query": query, "k": self.k}))
            async with request as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = (await response.text())[:200]
                kind, missing, detail = self.judge(query, response.status, body)
        except asyncio.TimeoutError:
            kind, missing, detail = "timeout", False, f"no answer in {CLIENT_TIMEOUT_S} s"
        except aiohttp.ClientError as err:
            kind, missing, detail = "connection error", False, f"{type(err).__name__}: {err}"[:160]
        self.outcomes.append(Outcome(started, self.now(), kind, missing, detail))

    async def worker(self, session: aiohttp.ClientSession) -> None:
        while self.now() < self.duration and self.sent < self.max_requests:
            poison = self.poison_every and self.sent % self.poison_every == self.poison_every - 1
            query = POISON if poison else self.queries[self.sent % len(self.queries)]
            self.sent += 1
            await self.one(session, query)

    async def run(self, killer) -> list[Kill]:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self.t0 = time.monotonic()
            kills = asyncio.create_task(killer(self))
            await asyncio.gather(*(self.worker(session) for _ in range(self.concurrency)))
            kills.cancel()
            try:
                return await kills
            except asyncio.CancelledError:
                return killer.done


def replica_processes(deployment: str) -> list[psutil.Process]:
    """This cluster's replica processes of `deployment` (the cluster's processes are this process's descendants)."""
    from mr_ray.serve.app import APP_NAME

    title = f"ray::ServeReplica:{APP_NAME}:{deployment}"
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            # The title gains ".method" while the replica runs a call.
            if (process.cmdline() or [""])[0].split(".")[0] == title:
                found.append(process)
        except psutil.Error:
            pass
    return found


def deployment_healthy(deployment: str) -> bool:
    from ray import serve

    from mr_ray.serve.app import APP_NAME

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return str(getattr(status.status, "value", status.status)) == "HEALTHY"


class Killer:
    """Every `every` seconds from `first`, SIGKILL one replica of the next deployment; wait for its replacement."""

    def __init__(self, deployments: list[str], first: float, every: float):
        self.deployments, self.first, self.every = deployments, first, every
        self.done: list[Kill] = []

    async def __call__(self, soak: Soak) -> list[Kill]:
        turn = 0
        while True:
            await asyncio.sleep(max(0.0, self.first + turn * self.every - soak.now()))
            if soak.now() >= soak.duration:
                return self.done
            deployment = self.deployments[turn % len(self.deployments)]
            turn += 1
            replicas = await asyncio.to_thread(replica_processes, deployment)
            if not replicas:
                print(f"[soak] t={soak.now():.1f}s: no live replica of {deployment} to kill", flush=True)
                continue
            victim = replicas[0]
            victim.kill()
            kill = Kill(deployment, victim.pid, soak.now())
            self.done.append(kill)
            print(f"[soak] t={kill.at:.1f}s: killed {deployment} replica pid {victim.pid}", flush=True)
            while soak.now() < soak.duration + 120:
                await asyncio.sleep(0.25)
                live = await asyncio.to_thread(replica_processes, deployment)
                if len(live) >= len(replicas) and victim.pid not in {p.pid for p in live} and await asyncio.to_thread(deployment_healthy, deployment):
                    kill.recovered = soak.now()
                    print(f"[soak] t={kill.recovered:.1f}s: {deployment} healthy again ({kill.recovered - kill.at:.1f} s)", flush=True)
                    break


def latency(outcomes: list[Outcome]) -> str:
    ms = np.array([o.ended - o.started for o in outcomes if o.kind == "2xx"]) * 1000
    if not len(ms):
        return f"{'-':>8} {'-':>8}"
    return f"{np.percentile(ms, 50):>8.1f} {np.percentile(ms, 99):>8.1f}"


def counts(outcomes: list[Outcome]) -> Counter:
    tally = Counter(o.kind for o in outcomes)
    tally["missing shards"] = sum(o.missing_shards for o in outcomes)
    return tally


KINDS = ("2xx", "poison 422", "4xx", "poison not refused", "5xx", "connection error", "timeout", "invalid 2xx", "missing shards")
POISON = "\ud800 sofa"  # a lone surrogate: JSON carries it, no tokenizer takes it


def report(soak: Soak, kills: list[Kill], grace: float, side_s: float) -> int:
    """Print the soak's numbers; the exit status (1 if a request was lost silently or failed outside a kill window)."""
    end = max([o.ended for o in soak.outcomes] + [soak.duration])
    windows = [kill.window(grace, end) for kill in kills]

    def overlaps(o: Outcome, a: float, b: float) -> bool:
        return o.started <= b and o.ended >= a

    def in_any(o: Outcome) -> bool:
        return any(overlaps(o, a, b) for a, b in windows)

    total = counts(soak.outcomes)
    print(f"\nrequests sent {soak.sent}, answered or counted {len(soak.outcomes)}; "
          + ", ".join(f"{kind} {total[kind]}" for kind in KINDS))
    print(f"\n{'kill':<28} {'at s':>6} {'back s':>7} | {'before p50':>10} {'p99':>8} | {'during p50':>10} {'p99':>8} | {'after p50':>9} {'p99':>8} | during: 2xx 5xx conn t/o missing")
    for kill, (a, b) in zip(kills, windows):
        before = [o for o in soak.outcomes if a - side_s <= o.ended < a and not in_any(o)]
        during = [o for o in soak.outcomes if overlaps(o, a, b)]
        after = [o for o in soak.outcomes if b < o.started <= b + side_s and not in_any(o)]
        back = f"{kill.recovered - kill.at:7.1f}" if kill.recovered is not None else "  never"
        c = counts(during)
        print(f"{kill.deployment + ' pid ' + str(kill.pid):<28} {kill.at:>6.1f} {back} | {latency(before):>19} | {latency(during):>19} | "
              f"{latency(after):>18} | {c['2xx']:>11} {c['5xx']:>3} {c['connection error']:>4} {c['timeout']:>3} {c['missing shards']:>7}")
    outside = [o for o in soak.outcomes if not in_any(o)]
    failed_outside = [o for o in outside if o.kind not in ("2xx", "poison 422")]
    print(f"\noutside the kill windows ({len(outside)} requests): p50, p99 {' ms, '.join(latency(outside).split())} ms; "
          + ", ".join(f"{kind} {counts(outside)[kind]}" for kind in KINDS))
    details = Counter(f"{o.kind}: {o.detail}" for o in soak.outcomes if o.detail)
    if details:
        print("\nfailure details (count: kind: detail):")
        for detail, n in details.most_common(12):
            print(f"  {n:>6}: {detail}")
    lost = soak.sent - len(soak.outcomes) + total["invalid 2xx"]
    print(f"\nlost silently: {lost}; failed outside the kill windows: {len(failed_outside)}")
    return 1 if lost or failed_outside else 0


def build_index(run_dir: Path, products: int) -> None:
    """The sample catalog's index (prepare + index stages) unless `run_dir` already has one."""
    from mr_ray.config import load_config
    from mr_ray.pipeline import run_pipeline

    config = load_config(None, {"data.sample.n_products": products, "data.sample.n_queries": 200, "index.n_shards": 2})
    print(f"[soak] index: {run_pipeline(config, run_dir, only=['prepare', 'index'])}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/soak"), help="a run folder with an index (built here if missing)")
    parser.add_argument("--products", type=int, default=1000, help="sample catalog size when the index is built here")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=200_000, help="bound on the requests sent")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--poison-every", type=int, default=50, help="every n-th request is a poison query (0: none)")
    parser.add_argument("--first-kill", type=float, default=30.0, help="seconds of clean traffic before the first kill")
    parser.add_argument("--kill-every", type=float, default=45.0)
    parser.add_argument("--grace", type=float, default=2.0, help="seconds after Serve reports the replacement healthy still counted in the window")
    parser.add_argument("--side", type=float, default=10.0, help="seconds before and after each window whose latency is reported")
    args = parser.parse_args()

    import ray
    from ray import serve

    from mr_ray.config import ServeConfig
    from mr_ray.serve.app import APP_NAME, serve_run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per replica, as bench/serve_latency.py
    use_serve_environment()  # as `mr-ray serve` starts its local cluster
    haproxy_dir = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))  # short: HAProxy adds the node id to its socket path (at most 107 bytes)
    private_serve_side(haproxy_dir, keep_free_defaults=False)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        run_dir = args.run_dir.resolve()
        if not (run_dir / "index" / "manifest.json").exists():
            build_index(run_dir, args.products)
        serve_run(run_dir, ServeConfig(colocate=False, shard_replicas=2), port=args.port, blocking=False)
        url = f"http://127.0.0.1:{args.port}"
        wait_healthy(url)
        deployments = list(serve.status().applications[APP_NAME].deployments)
        # The ingress first, then the encoder, then each shard: a crash of each in turn.
        deployments.sort(key=lambda name: (not name.startswith("SearchIngress"), not name.startswith("QueryEncoder"), name))
        queries = load_queries(run_dir / "index", 500)
        print(f"[soak] {url}: deployments {deployments}; {len(queries)} queries, concurrency {args.concurrency}, "
              f"{args.duration:.0f} s, a kill every {args.kill_every:.0f} s from {args.first_kill:.0f} s; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
        soak = Soak(url, queries, args.k, args.concurrency, args.duration, args.max_requests, args.poison_every)
        killer = Killer(deployments, args.first_kill, args.kill_every)
        kills = asyncio.run(soak.run(killer))
        return report(soak, kills, args.grace, args.side)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
