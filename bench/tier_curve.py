"""What one global score cut can make of the Exact tier: for a run's index, per split and retrieval mode, the best
weighted precision of "score >= t is exact" at each recall, and the best recall at each precision.

The pairs are those the `index` stage calibrates and measures on (`catalog_pairs`: a split's judged pairs and, per
query, a weighted sample of its unjudged catalog as grade 0), scored on the index's shards with its own encoder and
fusion weight. A precision the curve never reaches is one no `index.exact_precision` can buy.

    python bench/tier_curve.py --run-dir runs/sample --config jobs/configs/sample.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sklearn.metrics import precision_recall_curve

from mr_ray.config import load_config
from mr_ray.data.prepare import read_table
from mr_ray.embeddings import catalog_vectors
from mr_ray.grades import Grade
from mr_ray.search.build import catalog_pairs, open_searcher, pair_retrieval_scores
from mr_ray.search.shards import index_encoder_path, read_index_manifest
from mr_ray.search.thresholds import THRESHOLDS_FILE, mode_scores

RECALLS = (0.05, 0.1, 0.2, 0.3, 0.5)
PRECISIONS = (0.4, 0.5, 0.6, 0.7, 0.8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run folder with prepare and index")
    parser.add_argument("--config", type=Path, default=None, help="the run's config (its index and encoder sections)")
    parser.add_argument("--splits", nargs="+", default=["dev", "test"], choices=["train", "dev", "test"])
    args = parser.parse_args()
    config = load_config(args.config, {})
    prepared, index_dir = args.run_dir / "prepare", args.run_dir / "index"
    manifest = read_index_manifest(index_dir)
    model_path = index_encoder_path(index_dir, manifest)
    products = read_table(prepared, "products").to_pandas()
    by_id = catalog_vectors(prepared / "products", products, config.encoder, model_path, manifest["encoder"]["source"]).by_id()
    shards, model = open_searcher(index_dir, config.encoder, model_path)
    weight = json.loads((index_dir / THRESHOLDS_FILE).read_text())["retrieval"]["weight"]
    print(f"| split | mode | best precision at recall >= {', '.join(map(str, RECALLS))} | best recall at precision >= {', '.join(map(str, PRECISIONS))} |")
    print("|---|---|---|---|")
    for split in args.splits:
        pairs, _ = catalog_pairs(prepared, split, config.index)
        kept = {pid: by_id[pid] for pid in set(pairs["product_id"])}
        dense, lexical = pair_retrieval_scores(shards, model, pairs, kept, config.encoder.batch_size)
        exact = pairs["grade"].to_numpy() >= Grade.EXACT
        for mode, scores in mode_scores(dense, lexical, weight).items():
            precision, recall, _ = precision_recall_curve(exact, scores, sample_weight=pairs["weight"].to_numpy())
            precision, recall = precision[:-1], recall[:-1]  # the last point (precision 1, recall 0) has no threshold
            at_recall = [f"{precision[recall >= r].max():.3f}" for r in RECALLS]
            at_precision = [f"{recall[precision >= p].max():.3f}" if (precision >= p).any() else "-" for p in PRECISIONS]
            print(f"| {split} | {mode} | {' / '.join(at_recall)} | {' / '.join(at_precision)} |", flush=True)


if __name__ == "__main__":
    main()
