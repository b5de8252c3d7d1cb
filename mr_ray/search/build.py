"""Build the sharded FAISS + BM25 index of the catalog, and the `index` pipeline stage.

The catalog's vectors come from the embedding cache (mr_ray.embeddings: the
`evaluate` stage embedded the same encoder, so nothing is embedded again);
every `n_products / n_shards` rows become one shard: its own FAISS index (any
`index_factory` string, inner product), product-id map and BM25 index of the
same titles, built from the memory-mapped vectors one shard at a time. Then the fusion
weight and every retrieval mode's grade thresholds are calibrated on the
held-out split (its judged pairs and a weighted random sample of the unjudged
catalog, `calibration_pairs`), searched on the shards just built, and each
tier's precision and recall is measured the same way on other held-out
queries (`tiers_on_shards`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mr_ray.config import EncoderConfig, IndexConfig, LexicalConfig
from mr_ray.data.prepare import read_table
from mr_ray.evaluate import truth_table
from mr_ray.retriever.encoder import encode_queries, load_encoder
from mr_ray.search.fusion import normalise_lexical
from mr_ray.search.retrieval import LexicalIndex, build_faiss_index, pair_scores
from mr_ray.search.shards import (
    SHARD_INDEX_FILE,
    SHARD_LEXICAL_DIR,
    SHARD_PRODUCTS_FILE,
    open_shards,
    search_shards_both,
)
from mr_ray.search.thresholds import (
    calibrate_retrieval,
    choose_fusion_weight,
    tier_table,
)


def choose_encoder(trained: list[Path], encoder: EncoderConfig) -> tuple[str | None, str]:
    """The best encoder this run has: (model folder or None for pretrained, where it came from).

    `trained`: the trained encoders' stage folders the graph gave the index, in graph order (Stage 2,
    which refines Stage 1, last)."""
    if trained:
        return str(trained[-1] / "model"), trained[-1].name
    return encoder.model, "config" if encoder.model else "pretrained"


def shard_bounds(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges of near-equal size."""
    if n_shards > n_rows:
        raise ValueError(f"index.n_shards={n_shards} is more than the {n_rows} products to index")
    edges = np.linspace(0, n_rows, n_shards + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def write_shard(folder: Path, index, product_ids: list[str], titles: list[str], lexical_cfg: LexicalConfig) -> None:
    """One shard folder: the FAISS index, its product-id map (row i = FAISS id i) and a BM25 index of the same titles."""
    import faiss

    folder.mkdir(parents=True)
    faiss.write_index(index, str(folder / SHARD_INDEX_FILE))
    pq.write_table(pa.table({"product_id": product_ids, "title": titles}), folder / SHARD_PRODUCTS_FILE)
    LexicalIndex.build(titles, lexical_cfg).save(folder / SHARD_LEXICAL_DIR)


def build_index(products: pd.DataFrame, vectors: np.ndarray, out: Path, index_cfg: IndexConfig, lexical_cfg: LexicalConfig) -> list[dict]:
    """Write one folder per shard into `out` from the catalog (product_id, title) and its vectors (row i =
    products row i; a memory map is read one shard at a time, so build memory is one shard's vectors)."""
    shards = []
    for number, (start, stop) in enumerate(shard_bounds(len(products), index_cfg.n_shards)):
        rows = {
            "product_id": products["product_id"].astype(str).to_numpy()[start:stop],
            "title": products["title"].to_numpy()[start:stop],
            "embedding": np.ascontiguousarray(vectors[start:stop], dtype=np.float32),
        }
        shards.append(build_shard(out, number, rows, stop - start, index_cfg, lexical_cfg))
    return shards


def build_shard(out: Path, number: int, rows: dict[str, np.ndarray], size: int, index_cfg: IndexConfig, lexical_cfg: LexicalConfig) -> dict:
    """Index the first `size` rows as shard `number`; returns its manifest entry."""
    started = time.perf_counter()
    index = build_faiss_index(rows["embedding"][:size], index_cfg.factory, index_cfg.search_params, index_cfg.train_size, seed=number)
    name = f"shard-{number:03d}"
    write_shard(out / name, index, rows["product_id"][:size].tolist(), [str(t) for t in rows["title"][:size]], lexical_cfg)
    return {"name": name, "path": name, "products": size, "build_s": round(time.perf_counter() - started, 3)}


UNJUDGED_ASSUMPTION = (
    "a catalog product not judged for a calibration query is grade 0 (exact on the sample catalog, whose gold holds every "
    "grade-1/2 product of its dev and test queries); each sampled one is weighted to stand for all of that query's unjudged products"
)


def calibration_pairs(prepared: Path, index_cfg: IndexConfig) -> tuple[pd.DataFrame, dict]:
    """The calibration split's `catalog_pairs`; a split without judged pairs is an error."""
    pairs, summary = catalog_pairs(prepared, index_cfg.calibration_split, index_cfg)
    if pairs.empty:
        raise ValueError(f"{prepared / 'judgments'}: no judged pairs for {index_cfg.calibration_split!r} queries to calibrate grade thresholds on")
    return pairs, summary


def catalog_pairs(prepared: Path, split: str, index_cfg: IndexConfig) -> tuple[pd.DataFrame, dict]:
    """A split's (query_id, text, product_id, grade, weight, judged) pairs, and what they hold (none if it has no judged pairs).

    Judged pairs come from the run's truth (gold if prepare wrote it, else human
    judgments, as `evaluate` reads them), weight 1. Each query also gets a seeded
    random sample of `calibration_unjudged` catalog products not judged for it,
    grade 0, weight (its unjudged products / sampled), so the weighted pairs
    hold the query's whole catalog: the tiers are cut (and judged) against the
    products a search meets, not the pool's hardest candidates only.
    """
    queries = read_table(prepared, "queries").to_pandas()
    judged = truth_table(prepared)[["query_id", "product_id", "grade"]].merge(queries[queries["split"] == split][["query_id", "text"]], on="query_id")
    catalog = read_table(prepared, "products").column("product_id").to_numpy(zero_copy_only=False).astype(str)
    rng = np.random.default_rng(index_cfg.calibration_seed)
    sampled = []
    for (query_id, text), group in judged.groupby(["query_id", "text"], sort=True):
        unjudged = catalog[~np.isin(catalog, group["product_id"].to_numpy().astype(str))]
        chosen = rng.choice(unjudged, min(index_cfg.calibration_unjudged, len(unjudged)), replace=False)
        if len(chosen):
            sampled.append(pd.DataFrame({"query_id": query_id, "text": text, "product_id": chosen, "grade": 0, "weight": len(unjudged) / len(chosen)}))
    pairs = pd.concat([judged.assign(weight=1.0, judged=True)] + [frame.assign(judged=False) for frame in sampled], ignore_index=True)
    summary = {
        "split": split,
        "truth": "gold" if read_table(prepared, "gold") is not None else "human judgments",
        "queries": int(judged["query_id"].nunique()),
        "judged_pairs": int(len(judged)),
        "unjudged_sampled_per_query": index_cfg.calibration_unjudged,
        "unjudged_pairs": int((~pairs["judged"]).sum()),
        "seed": index_cfg.calibration_seed,
        "assumption": UNJUDGED_ASSUMPTION,
    }
    return pairs, summary


def open_searcher(index_dir: Path, encoder_cfg: EncoderConfig, model_path: str | None) -> tuple[list, object]:
    """The built shards and the query encoder, to calibrate and measure on."""
    return open_shards(index_dir), load_encoder(model_path, "auto", encoder_cfg.max_seq_length)


def calibrate_on_shards(shards: list, model, pairs: pd.DataFrame, product_vectors: dict[str, np.ndarray], encoder_cfg: EncoderConfig,
                        exact_precision: float | None) -> tuple[dict, float, dict]:
    """Fusion weight and per-mode grade thresholds from the calibration pairs, searched on the built shards.

    The weight maximises the judged queries' hybrid NDCG@10 over the dense and
    lexical top-100; the thresholds sit on each mode's score of the weighted
    pairs (BM25 from each product's own shard, over the query's best BM25 in the index),
    the exact one at weighted precision `exact_precision` (max F1 if None).
    """
    queries = pairs[["query_id", "text"]].drop_duplicates("query_id")
    texts = queries["text"].tolist()
    candidates = dict(zip(queries["query_id"], search_shards_both(shards, encode_queries(model, texts, encoder_cfg.batch_size), texts, 100)))
    weight, weights_ndcg = choose_fusion_weight(candidates, pairs[pairs["judged"]])
    dense, lexical = pair_retrieval_scores(shards, model, pairs, product_vectors, encoder_cfg.batch_size)
    by_mode, report = calibrate_retrieval(dense, lexical, pairs["grade"].to_numpy(), weight, pairs["weight"].to_numpy(), exact_precision)
    return by_mode, weight, {**report, "weights_ndcg@10": {str(w): round(v, 4) for w, v in weights_ndcg.items()}}


def tiers_on_shards(shards: list, model, pairs: pd.DataFrame, product_vectors: dict[str, np.ndarray], encoder_cfg: EncoderConfig,
                    by_mode: dict, weight: float) -> dict[str, dict]:
    """Each mode's `tier_table` on other pairs than the calibration's (held-out queries' `catalog_pairs`), scored as it was."""
    dense, lexical = pair_retrieval_scores(shards, model, pairs, product_vectors, encoder_cfg.batch_size)
    return tier_table(by_mode, dense, lexical, pairs["grade"].to_numpy(), weight, pairs["weight"].to_numpy())


def pair_retrieval_scores(shards: list, model, pairs: pd.DataFrame, product_vectors: dict[str, np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (query `text`, product) pair's cosine and normalised BM25: its BM25 in its product's shard over its query's best BM25 in any shard."""
    dense = pair_scores(model, pairs, batch_size, product_vectors)  # also refuses products not in the catalog
    lexical, best = np.zeros(len(pairs)), np.zeros(len(pairs))
    for shard in shards:
        product_row = pairs["product_id"].map({pid: i for i, pid in enumerate(shard.product_ids[:-1])}).fillna(-1).astype(int).to_numpy()
        here, best_here = shard.lexical.pair_scores(pairs["text"].tolist(), product_row)
        lexical, best = lexical + here, np.maximum(best, best_here)
    return dense, normalise_lexical(lexical, best)
