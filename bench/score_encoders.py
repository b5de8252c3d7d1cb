"""Score trained encoders on a prepared dataset in one process: the numbers behind the Stage 2 variant
tables (Home Depot, dev to choose, test to report).

Each encoder's catalog vectors come from the embedding cache (mr_ray.embeddings; embedded through Ray
Data once per encoder and catalog), and the encoder is scored by the one scoring path every report uses
(`mr_ray.evaluate.score_encoder`): NDCG@10, exact Recall@100 and P@10 of full-catalog retrieval, the grade
separation of the split's judged pairs, and with --hybrid its fusion with BM25 (`lexical` of --config).

    python bench/score_encoders.py --prepared runs/homedepot/prepare --split dev [--hybrid] [--bm25] NAME=FOLDER [NAME=FOLDER ...]

An empty FOLDER (`pretrained=`) is the untrained encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import ray

from mr_ray.config import load_config
from mr_ray.embeddings import catalog_vectors
from mr_ray.evaluate import load_split, score_bm25, score_encoder
from mr_ray.retriever.encoder import load_encoder, resolve_precision

SHOWN = ("ndcg@10", "judged@10", "condensed_ndcg@10", "recall@100_exact", "precision@10_exact", "auc_2_over_1", "auc_1_over_0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="a prepare output folder")
    parser.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    parser.add_argument("--config", type=Path, default=None, help="run config for its encoder and lexical sections (default: the defaults)")
    parser.add_argument("--hybrid", action="store_true", help="also each encoder's fusion with BM25 (RRF, and the weighted fusion tuned on dev)")
    parser.add_argument("--bm25", action="store_true", help="also BM25 alone (`lexical` of --config)")
    parser.add_argument("encoders", nargs="+", metavar="NAME=FOLDER")
    args = parser.parse_args()
    config = load_config(args.config, {"evaluate.split": args.split, "evaluate.hybrid": args.hybrid})
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    split = load_split(args.prepared, config.evaluate, config.lexical)
    precision = resolve_precision(config.encoder.precision, config.encoder.device)
    print(f"{args.split}: {len(split.queries)} queries, {len(split.products)} products, {precision}; load average {os.getloadavg()}; "
          f"columns: {', '.join(SHOWN)}")
    if args.bm25:
        show("bm25", score_bm25(split, config.evaluate)[0], time.time())
    for name, _, folder in (item.partition("=") for item in args.encoders):
        start = time.time()
        catalog = catalog_vectors(args.prepared / "products", split.products, config.encoder, folder or None, name)
        model = load_encoder(folder or None, config.encoder.device, config.encoder.max_seq_length)
        systems, _, _ = score_encoder(name, split, model, catalog.vectors, config.evaluate, config.encoder.batch_size)
        for system, metrics in systems.items():
            show(system, metrics, start)
    ray.shutdown()


def show(system: str, metrics: dict, start: float) -> None:
    print(system, json.dumps({key: round(metrics[key], 4) for key in SHOWN if isinstance(metrics.get(key), float)}), f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
