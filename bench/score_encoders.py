"""Score trained encoders on a prepared dataset in one process: the numbers behind the README's
Stage 2 variant tables (Home Depot, dev to choose, test to report).

Each encoder embeds every product title and the split's queries (bf16 autocast, `--threads` torch
threads, no Ray: about 90 s per encoder for Home Depot on 2 cores), searches the whole catalog
exactly, and prints one line of NDCG@10, exact Recall@100 and P@10 (`mr_ray.evaluate.evaluate_retrieval`)
and the grade separation of the split's judged pairs (`pair_scores`, `separation_metrics`). `mr-ray evaluate` gives
the same dense numbers plus the hybrid rows, through Ray Data.

    python bench/score_encoders.py --prepared runs/homedepot/prepare --split dev NAME=FOLDER [NAME=FOLDER ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mr_ray.config import EvaluateConfig
from mr_ray.data.prepare import read_table
from mr_ray.evaluate import eval_queries, evaluate_retrieval, judged_pairs, separation_metrics, truth_table
from mr_ray.retrieval import dense_search, pair_scores
from mr_ray.retriever.encoder import encode, load_encoder

SHOWN = ("ndcg@10", "recall@100_exact", "precision@10_exact", "auc_2_over_1", "auc_1_over_0")


def score(model, products, queries, truth, pairs, config: EvaluateConfig, batch_size: int) -> dict:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product_vectors = encode(model, products["title"].tolist(), batch_size).astype(np.float32)
        query_vectors = encode(model, queries["text"].tolist(), batch_size).astype(np.float32)
        cosines = pair_scores(model, pairs, batch_size, dict(zip(products["product_id"], product_vectors)))
    run = dense_search(products["product_id"].to_numpy(), product_vectors, queries["query_id"], query_vectors, config.recall_k)
    return {**evaluate_retrieval(run, truth, config), **separation_metrics(pairs["grade"].to_numpy(), cosines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="a prepare output folder")
    parser.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("encoders", nargs="+", metavar="NAME=FOLDER")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = EvaluateConfig(split=args.split)
    products = read_table(args.prepared, "products").to_pandas()
    queries = eval_queries(args.prepared, config)
    truth = truth_table(args.prepared)
    truth = truth[truth["query_id"].isin(set(queries["query_id"]))]
    pairs = judged_pairs(args.prepared, set(queries["query_id"])).merge(queries[["query_id", "text"]], on="query_id")
    print(f"{args.split}: {len(queries)} queries, {len(products)} products; columns: {', '.join(SHOWN)}")
    for name, _, folder in (item.partition("=") for item in args.encoders):
        start = time.time()
        metrics = score(load_encoder(folder, "cpu"), products, queries, truth, pairs, config, args.batch_size)
        print(name, json.dumps({key: round(metrics[key], 4) for key in SHOWN}), f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
