"""Sharded ANN quality and speed: recall@10 of each index_factory choice against exact search.

On the Home Depot catalog (54,667 product titles) with the pretrained encoder:
every choice is built per shard with the index stage's own code
(`build_faiss_index`, `write_shard`, `ShardIndex`, `search_shards`) and compared with one
exact inner-product index over the whole catalog, on the release's query texts.
Printed per choice: recall@10, build time, batch throughput, one-query latency,
size on disk. Skips (exit 0) when the data folder is absent.

    python bench/ann_quality.py [--data /work/shared/data/homedepot] [--shards 4] [--threads 1] [--cache /tmp/hd_vectors.npz]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mr_ray.config import EncoderConfig
from mr_ray.retriever.encoder import embed_dataset
from mr_ray.search.build import shard_bounds, write_shard
from mr_ray.search.retrieval import build_faiss_index
from mr_ray.search.shards import ShardIndex, search_shards

CHOICES = (
    ("Flat", ""),
    ("HNSW32", "efSearch=32"),
    ("HNSW32", "efSearch=128"),
    ("IVF256,Flat", "nprobe=8"),
    ("IVF256,Flat", "nprobe=32"),
    ("IVF256,SQ8", "nprobe=32"),
    ("IVF256,PQ48", "nprobe=32"),
    ("IVF256,PQ48x4fs,RFlat", "nprobe=32"),
)


def embed(data: Path, n_queries: int, cache: Path | None):
    if cache is not None and cache.exists():
        saved = np.load(cache, allow_pickle=False)
        return saved["product_ids"], saved["titles"], saved["products"], saved["queries"]
    import ray

    products = pq.read_table(data / "products.parquet", columns=["product_id", "title"])
    texts = pq.read_table(data / "queries.parquet", columns=["text"]).column("text").to_pylist()
    texts = sorted(set(texts))
    texts = [texts[i] for i in np.random.default_rng(0).choice(len(texts), min(n_queries, len(texts)), replace=False)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = EncoderConfig()
        ids, vectors = embed_dataset(ray.data.from_arrow(products), "product_id", "title", config)
        order = np.argsort(ids)  # a fixed catalog order, so shards are the same on every run
        ids, vectors = ids[order], vectors[order]
        title_of = dict(zip(products.column("product_id").to_pylist(), products.column("title").to_pylist()))
        titles = np.array([title_of[i] for i in ids])
        query_ids = np.array([str(i) for i in range(len(texts))])
        _, queries = embed_dataset(ray.data.from_items([{"qid": q, "text": t} for q, t in zip(query_ids, texts)]), "qid", "text", config)
    finally:
        ray.shutdown()
    if cache is not None:
        np.savez(cache, product_ids=ids, titles=titles, products=vectors, queries=queries)
    return ids, titles, vectors, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/homedepot"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=None, help="npz file to keep the embeddings between runs")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (1 = per-core numbers, stable on a shared machine)")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if not (args.data / "products.parquet").exists():
        print(f"skipped: no Home Depot catalog at {args.data}")
        return

    started = time.perf_counter()
    ids, titles, vectors, queries = embed(args.data, args.queries, args.cache)
    print(f"{len(ids)} products, {len(queries)} queries embedded in {time.perf_counter() - started:.0f} s; "
          f"{args.shards} shards, recall@{args.k} against one exact IndexFlatIP, {args.threads} FAISS thread(s)")

    exact = build_faiss_index(vectors, "Flat")
    _, truth = exact.search(queries, args.k)
    truth_ids = ids[truth]

    print(f"{'index_factory':<24} {'params':<13} {'recall@10':>9} {'build s':>8} {'batch q/s':>10} {'1-query ms':>10} {'MB':>7}")
    for factory, params in CHOICES:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            for number, (start, stop) in enumerate(shard_bounds(len(ids), args.shards)):
                index = build_faiss_index(vectors[start:stop], factory, params, seed=number)
                write_shard(Path(tmp) / f"shard-{number}", index, ids[start:stop].tolist(), titles[start:stop].tolist())
            build_s = time.perf_counter() - t
            size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("index.faiss")) / 1e6
            shards = [ShardIndex.open(Path(tmp) / f"shard-{n}", params) for n in range(args.shards)]
            t = time.perf_counter()
            found = search_shards(shards, queries, args.k)
            batch_qps = len(queries) / (time.perf_counter() - t)
            single = []
            for query in queries[:200]:
                t = time.perf_counter()
                search_shards(shards, query, args.k)
                single.append(time.perf_counter() - t)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found.product_ids.tolist(), truth_ids.tolist())])
        print(f"{factory:<24} {params or '-':<13} {recall:>9.4f} {build_s:>8.2f} {batch_qps:>10.0f} {np.median(single) * 1000:>10.3f} {size_mb:>7.1f}")


if __name__ == "__main__":
    sys.exit(main())
