"""Latency and throughput of the Ray Serve search app against two peers, one run, same machine.

    (a) bare: the compute alone, in this process (encode one query + search every
        shard + merge; no HTTP, no Ray), one query at a time;
    (b) plain: a single-process FastAPI + sentence-transformers + FAISS server
        (bench/plain_server.py under uvicorn) over the same index.

The Serve app runs in both layouts: colocated (encoder and shards inside the
ingress replica) and replicas (a QueryEncoder and a ShardSearcher per shard),
each asked for dense and for hybrid retrieval (every shard answers both halves
of a query in one call; the ingress fuses). Each system answers the same
queries at concurrency 1, 8 and 32 over loopback HTTP (a fixed number of
requests per level); printed: p50/p99 latency, throughput, and the ratios.
Targets (issues 5 and 18): Serve p50, dense and hybrid, within 5 ms of the bare
dense compute at concurrency 1; Serve throughput at concurrency 32 >= plain.

    python bench/serve_latency.py --index-dir runs/sample/index
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import requests

from mr_ray.cluster import use_serve_environment
from mr_ray.retriever.encoder import encode, load_encoder
from mr_ray.search.shards import (
    index_encoder_path,
    open_shards,
    read_index_manifest,
    search_shards,
)
from mr_ray.serve.ports import free_port

LEVELS = (1, 8, 32)


def load_queries(index_dir: Path, n: int) -> list[str]:
    """Query texts of the run the index belongs to (its prepare output), else a fixed list."""
    folder = index_dir.parent / "prepare" / "queries"
    if folder.exists():
        import pyarrow.parquet as pq

        texts = pq.read_table(folder, columns=["text"]).column("text").to_pylist()
        return texts[:n]
    return [f"{w} {i}" for i, w in enumerate(["sofa", "drill", "running shoes", "frying pan", "lamp"] * (n // 5 + 1))][:n]


def summary(latencies_s: list[float], wall_s: float) -> dict:
    ms = np.array(latencies_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "rps": len(ms) / wall_s}


def bench_bare(index_dir: Path, queries: list[str], k: int) -> dict:
    manifest = read_index_manifest(index_dir)
    model = load_encoder(index_encoder_path(index_dir, manifest), "cpu", manifest["encoder"]["max_seq_length"])
    shards = open_shards(index_dir)
    def answer(query: str):
        vector = encode(model, [query])  # once per query, as every server does
        return search_shards(shards, vector, k)

    for query in queries[:10]:
        answer(query)
    latencies, started = [], time.perf_counter()
    for query in queries:
        t = time.perf_counter()
        answer(query)
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - started)


async def load_test(url: str, queries: list[str], concurrency: int, n_requests: int, k: int, retrieval: str | None) -> dict:
    latencies: list[float] = []
    cursor = iter(range(n_requests))

    async def worker(session):
        for i in cursor:
            t = time.perf_counter()
            params = {"query": queries[i % len(queries)], "k": k, **({"retrieval": retrieval} if retrieval else {})}
            async with session.get(f"{url}/search", params=params) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status} for {queries[i % len(queries)]!r}")
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, 8))))  # warm-up
        latencies.clear()
        cursor = iter(range(n_requests))
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - started)


def bench_http(url: str, queries: list[str], k: int, requests_per_level: int, retrieval: str | None = None) -> dict[int, dict]:
    return {c: asyncio.run(load_test(url, queries, c, max(requests_per_level, 4 * c), k, retrieval)) for c in LEVELS}


def wait_healthy(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy to answer in time
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy in {timeout_s} s")


def bench_serve(index_dir: Path, queries: list[str], k: int, requests_per_level: int, colocate: bool) -> dict[str, dict[int, dict]]:
    """Per retrieval (dense, hybrid), the results per concurrency level."""
    import ray
    from ray import serve

    from mr_ray.serve.app import APP_NAME, build_app

    use_serve_environment()  # as `mr-ray serve` starts its local cluster
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"index_dir": str(index_dir), "colocate": colocate}), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return {retrieval: bench_http(url, queries, k, requests_per_level, retrieval) for retrieval in ("dense", "hybrid")}
    finally:
        serve.shutdown()
        ray.shutdown()


def bench_plain(index_dir: Path, queries: list[str], k: int, requests_per_level: int) -> dict[int, dict]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent), "plain_server:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "MR_RAY_INDEX_DIR": str(index_dir)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return bench_http(url, queries, k, requests_per_level)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", type=Path, default=Path("runs/sample/index"), help="an `index` stage output")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level (at least 4 x concurrency)")
    parser.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS for every system's encoder")
    args = parser.parse_args()
    # Same intra-op threads everywhere (Ray gives a replica with num_cpus < 2 one thread):
    # set before torch loads here, inherited by the uvicorn peer and the Ray workers.
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    index_dir = args.index_dir.resolve()
    manifest = read_index_manifest(index_dir)
    queries = load_queries(index_dir, 500)
    print(f"index {index_dir}: {manifest['products']} products, {len(manifest['shards'])} shards, {manifest['factory']}; "
          f"{len(queries)} distinct queries, k={args.k}, {os.cpu_count()} cores, {args.torch_threads} torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f} at start")

    bare = bench_bare(index_dir, queries[: args.requests], args.k)
    plain = bench_plain(index_dir, queries, args.k, args.requests)
    layouts = {"colocated": True, "replicas": False}
    served = {layout: bench_serve(index_dir, queries, args.k, args.requests, colocate) for layout, colocate in layouts.items()}

    print(f"\nbare dense compute (in process, sequential): p50 {bare['p50_ms']:.2f} ms  p99 {bare['p99_ms']:.2f} ms  {bare['rps']:.1f} q/s")
    for layout, by_retrieval in served.items():
        for retrieval, results in by_retrieval.items():
            print(f"\nServe, {layout} (colocate: {str(layouts[layout]).lower()}), {retrieval} retrieval")
            print(f"{'conc':>4} | {'serve p50':>9} {'p99':>8} {'q/s':>7} | {'plain p50':>9} {'p99':>8} {'q/s':>7} | {'serve/plain q/s':>15} {'serve/plain p50':>15}")
            for c in LEVELS:
                s, p = results[c], plain[c]
                print(f"{c:>4} | {s['p50_ms']:>9.2f} {s['p99_ms']:>8.2f} {s['rps']:>7.1f} | {p['p50_ms']:>9.2f} {p['p99_ms']:>8.2f} {p['rps']:>7.1f} | "
                      f"{s['rps'] / p['rps']:>15.2f} {s['p50_ms'] / p['p50_ms']:>15.2f}")
            print(f"concurrency 1: serve p50 - bare dense p50 = {results[1]['p50_ms'] - bare['p50_ms']:+.2f} ms "
                  f"(x{results[1]['p50_ms'] / bare['p50_ms']:.2f}); plain p50 - bare p50 = {plain[1]['p50_ms'] - bare['p50_ms']:+.2f} ms")
            print(f"concurrency 32: serve throughput / plain = {results[32]['rps'] / plain[32]['rps']:.2f}")


if __name__ == "__main__":
    main()
