"""Would an Exact tier graded by the judge keep a merchandiser's trust where a score threshold cannot?

The served index cuts the Exact tier with one score threshold per retrieval mode (index/tiers.md); on the sample
no hybrid threshold reaches precision 0.8 at recall 0.5. This measures the alternative issue 33 names (grade the
top k at serve time with the judge): for each query, the index's hybrid top K (the run's index, as a search
returns it), each product graded by the run's fine-tuned judge (the `judge_finetune` stage's classifier, on the
query and the product's title + fields as it was trained). The judge's Exact tier is P(exact) >= a cut chosen on
dev for `index.exact_precision` (the lowest cut reaching it over dev's top K pairs), then measured on test:
precision of what the tier shows against the truth (gold on the sample, human grades elsewhere; a product not
judged for a query is grade 0), and recall over every exact product of the query in the catalog (so a tier can
never recall what the top K missed). The index's own hybrid threshold over the same top K is the row beside it.
Also the judge's time per query (K pairs in one batch), what serving it would add.

    python bench/judge_tiers.py --run-dir runs/sample --config jobs/configs/sample.yaml [--k 20 50 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mr_ray.config import ServeConfig, load_config
from mr_ray.data.prepare import read_table
from mr_ray.evaluate import truth_table
from mr_ray.grades import Grade
from mr_ray.labeler.cross_encoder import pair_strings, probabilities_transformers
from mr_ray.labeler.prompt import pair_texts
from mr_ray.retriever.encoder import encode_queries, load_encoder
from mr_ray.search.shards import (
    index_encoder_path,
    open_shards,
    read_index_manifest,
    search_shards_both,
)
from mr_ray.search.thresholds import (
    load_retrieval_thresholds,
    precision_target_threshold,
)


def hybrid_candidates(run_dir: Path, prepared: Path, splits: tuple[str, ...], depth: int) -> dict[str, tuple[pd.DataFrame, list]]:
    """Each split's judged queries and their candidates from the run's index, each side searched to `depth` (the
    service searches to `serve.max_k`; a K above it searches deeper for every K), the encoder loaded and the
    shards opened once: every K's top list is a prefix of the same fused ranking."""
    index_dir = run_dir / "index"
    manifest = read_index_manifest(index_dir)
    model = load_encoder(index_encoder_path(index_dir, manifest), "auto", manifest["encoder"]["max_seq_length"])
    shards = open_shards(index_dir)
    queries = read_table(prepared, "queries").to_pandas().astype({"query_id": str})
    judged = set(truth_table(prepared)["query_id"].astype(str))
    found = {}
    for split in splits:
        chosen = queries[(queries["split"] == split) & queries["query_id"].isin(judged)]
        texts = chosen["text"].tolist()
        found[split] = (chosen, search_shards_both(shards, encode_queries(model, texts, 64), texts, depth))
    return found


def top_k_pairs(queries: pd.DataFrame, candidates: list, k: int, weight: float, truth: pd.DataFrame) -> pd.DataFrame:
    """(query_id, product_id, rank, score, grade) of the hybrid top k of each query's candidates."""
    rows = [
        {"query_id": query_id, "product_id": row["product_id"], "rank": rank, "score": row["score"]}
        for query_id, found in zip(queries["query_id"], candidates)
        for rank, row in enumerate(found.ranked("hybrid", weight, k))
    ]
    pairs = pd.DataFrame(rows).merge(truth, on=["query_id", "product_id"], how="left").fillna({"grade": 0})
    exact_in_catalog = truth[truth["query_id"].isin(queries["query_id"]) & (truth["grade"] >= Grade.EXACT)]
    pairs.attrs.update(exact_in_catalog=len(exact_in_catalog), queries=len(queries))
    return pairs


def judge_probabilities(pairs: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame, judge_model: Path) -> tuple[np.ndarray, float]:
    """The judge's per-grade probabilities of each pair (row order kept) and its seconds per query."""
    strings, bad = pair_strings(pair_texts(pairs, queries, products))
    if len(bad):
        raise ValueError(f"{len(bad)} pairs the judge cannot read, e.g. {bad.iloc[0].to_dict()}")
    started = time.perf_counter()
    per_query = strings.groupby("query_id", sort=False).size().max()  # one batch per query, as a search would grade its top k
    probabilities = probabilities_transformers(judge_model, strings, batch_size=int(per_query))
    seconds = (time.perf_counter() - started) / pairs["query_id"].nunique()
    return probabilities, seconds


def tier(shown: np.ndarray, pairs: pd.DataFrame) -> dict:
    exact = pairs["grade"].to_numpy() >= Grade.EXACT
    hits = int((shown & exact).sum())
    return {
        "shown": int(shown.sum()),
        "precision": round(hits / shown.sum(), 4) if shown.any() else None,
        "recall": round(hits / pairs.attrs["exact_in_catalog"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run (its prepare, judge_finetune and index)")
    parser.add_argument("--config", type=Path, default=None, help="the run's config, for index.exact_precision")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 50, 100], help="top k of a search the judge grades")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    target = load_config(args.config).index.exact_precision or 0.8
    prepared, judge_model = args.run_dir / "prepare", args.run_dir / "judge_finetune" / "model"
    print(f"load average {os.getloadavg()}; Exact tier target precision {target}; hybrid top K; truth: "
          f"{'gold' if read_table(prepared, 'gold') is not None else 'human judgments'}", flush=True)
    print("| K | Exact tier by | cut (chosen on dev) | dev precision / recall (of the top K's exact) | test precision | test recall | shown | judge s/query |")
    print("|---|---|---|---|---|---|---|---|")
    thresholds, weight = load_retrieval_thresholds(args.run_dir / "index")
    threshold = thresholds["hybrid"].exact
    truth = truth_table(prepared)[["query_id", "product_id", "grade"]].astype({"query_id": str, "product_id": str})
    products = read_table(prepared, "products").to_pandas().astype({"product_id": str})
    found = hybrid_candidates(args.run_dir, prepared, ("dev", "test"), max(*args.k, ServeConfig().max_k))
    for k in args.k:
        scored = {}
        for split, (queries, candidates) in found.items():
            pairs = top_k_pairs(queries, candidates, k, weight, truth)
            probabilities, seconds = judge_probabilities(pairs, queries, products, judge_model)
            scored[split] = (pairs, probabilities, seconds)
        dev_pairs, dev_probabilities, _ = scored["dev"]
        cut, quality = precision_target_threshold(dev_probabilities[:, Grade.EXACT], dev_pairs["grade"].to_numpy() >= Grade.EXACT, np.ones(len(dev_pairs)), "2|1", target)
        test_pairs, test_probabilities, seconds = scored["test"]
        test_exact = test_probabilities[:, Grade.EXACT]
        rows = {
            f"index threshold (hybrid score >= {threshold:.4f})": (tier(test_pairs["score"].to_numpy() >= threshold, test_pairs), "-", "-", "-"),
            "judge's grade (argmax) exact": (tier(test_probabilities.argmax(axis=1) == Grade.EXACT, test_pairs), "-", "-", f"{seconds:.3f}"),
            "judge P(exact) for the target": (tier(test_exact >= cut, test_pairs), f"{cut:.4f}", f"{quality['precision']} / {quality['recall']}", f"{seconds:.3f}"),
        }
        for name, (measured, cut_shown, dev_shown, time_shown) in rows.items():
            print(f"| {k} | {name} | {cut_shown} | {dev_shown} | {measured['precision']} | {measured['recall']} | {measured['shown']} | {time_shown} |", flush=True)
    print(json.dumps({"queries": {split: scored[split][0].attrs["queries"] for split in scored}}))


if __name__ == "__main__":
    main()
