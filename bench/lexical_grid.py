"""BM25 alone under each analyzer and parameter setting (`lexical.stemmer`, `lexical.k1`, `lexical.b`) on a
prepared dataset: the numbers behind the README's stemmed-index table. Tune on dev; report on test.

One line per setting: NDCG@10, exact Recall@100 and P@10 (`mr_ray.evaluate.evaluate_retrieval`) of
`mr_ray.search.retrieval.lexical_search` over every product title, and the seconds it took (index and search).

    python bench/lexical_grid.py --prepared runs/homedepot/prepare --split dev
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from mr_ray.config import EvaluateConfig, LexicalConfig
from mr_ray.data.prepare import read_table
from mr_ray.evaluate import eval_queries, evaluate_retrieval, truth_table
from mr_ray.search.retrieval import LexicalIndex, lexical_search

SHOWN = ("ndcg@10", "recall@100_exact", "precision@10_exact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="a prepare stage's folder (or `mr-ray data import --out`)")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--stemmers", default="none,english", help="comma-separated Snowball languages; none = no stemming")
    parser.add_argument("--k1", default="1.5", help="comma-separated")
    parser.add_argument("--b", default="0.75", help="comma-separated")
    args = parser.parse_args()

    config = EvaluateConfig(split=args.split)
    products = read_table(args.prepared, "products").to_pandas()
    queries = eval_queries(args.prepared, config)
    truth = truth_table(args.prepared)
    truth = truth[truth["query_id"].isin(set(queries["query_id"]))]
    print(f"{args.split}: {len(queries)} queries, {len(products)} products", flush=True)
    grid = itertools.product(args.stemmers.split(","), map(float, args.k1.split(",")), map(float, args.b.split(",")))
    for stemmer, k1, b in grid:
        lexical = LexicalConfig(stemmer=None if stemmer == "none" else stemmer, k1=k1, b=b)
        started = time.perf_counter()
        index = LexicalIndex.build(products["title"].tolist(), lexical)
        metrics = evaluate_retrieval(lexical_search(index, products["product_id"].to_numpy(), queries, config.recall_k), truth, config)
        shown = {name: round(metrics[name], 4) for name in SHOWN}
        print(json.dumps({"stemmer": stemmer, "k1": k1, "b": b, **shown, "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
