"""Build the sharded FAISS + BM25 index of the catalog, and the `index` pipeline stage.

The catalog streams once through Ray Data encoder actors (`iter_embedded`);
every `n_products / n_shards` embedded rows become one shard: its own FAISS
index (any `index_factory` string, inner product), product-id map and BM25
index of the same titles, written out before the next shard fills, so build
memory is bounded by one shard's vectors, not the catalog's. Then the fusion
weight and every retrieval mode's grade thresholds are calibrated on the
held-out split, searched on the shards just built.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mr_ray.config import EncoderConfig, IndexConfig
from mr_ray.data.prepare import read_table
from mr_ray.index.shards import INDEX_MANIFEST, SHARD_INDEX_FILE, SHARD_LEXICAL_DIR, SHARD_PRODUCTS_FILE, open_shards, search_shards_both
from mr_ray.index.thresholds import save_retrieval_thresholds
from mr_ray.pipeline import read_manifest
from mr_ray.retrieval import LexicalIndex, build_faiss_index, pair_scores
from mr_ray.retriever.encoder import encode, iter_embedded, load_encoder

# Trained encoders in the order they are preferred: Stage 2 refines Stage 1.
TRAINED_ENCODER_STAGES = ("stage2", "stage1")


def choose_encoder(run_dir: Path, encoder: EncoderConfig) -> tuple[str | None, str]:
    """The best encoder this run has: (model folder or None for pretrained, where it came from)."""
    for stage in TRAINED_ENCODER_STAGES:
        model = run_dir / stage / "model"
        if read_manifest(run_dir / stage) is not None and model.is_dir():
            return str(model), stage
    return encoder.model, "config" if encoder.model else "pretrained"


def shard_bounds(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges of near-equal size."""
    if n_shards > n_rows:
        raise ValueError(f"index.n_shards={n_shards} is more than the {n_rows} products to index")
    edges = np.linspace(0, n_rows, n_shards + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def write_shard(folder: Path, index, product_ids: list[str], titles: list[str]) -> None:
    """One shard folder: the FAISS index, its product-id map (row i = FAISS id i) and a BM25 index of the same titles."""
    import faiss

    folder.mkdir(parents=True)
    faiss.write_index(index, str(folder / SHARD_INDEX_FILE))
    pq.write_table(pa.table({"product_id": product_ids, "title": titles}), folder / SHARD_PRODUCTS_FILE)
    LexicalIndex.build(titles).save(folder / SHARD_LEXICAL_DIR)


def build_index(
    products,
    out: Path,
    index_cfg: IndexConfig,
    encoder_cfg: EncoderConfig,
    model_path: str | None,
    keep_vectors_of: set[str] = frozenset(),
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Write one folder per shard into `out` from a Ray Dataset of (product_id, title).

    The catalog streams through the encoder actors once; a shard is built and
    written as soon as enough embedded rows have arrived, so at most one shard
    (plus one batch) of vectors is held. Returns the shard list and the vectors
    of the products in `keep_vectors_of`.
    """
    sizes = [stop - start for start, stop in shard_bounds(products.count(), index_cfg.n_shards)]
    kept: dict[str, np.ndarray] = {}
    shards: list[dict] = []
    pending: list[dict] = []  # embedded batches not yet in a shard
    pending_rows = 0
    for batch in iter_embedded(products, "product_id", "title", encoder_cfg, model_path):
        ids = batch["product_id"].astype(str)
        kept.update((pid, vec) for pid, vec in zip(ids, batch["embedding"]) if pid in keep_vectors_of)
        pending.append({"product_id": ids, "title": batch["title"], "embedding": batch["embedding"]})
        pending_rows += len(ids)
        while len(shards) < len(sizes) and pending_rows >= sizes[len(shards)]:
            size = sizes[len(shards)]
            rows = {column: np.concatenate([b[column] for b in pending]) for column in ("product_id", "title", "embedding")}
            shards.append(build_shard(out, len(shards), rows, size, index_cfg))
            pending = [{column: values[size:] for column, values in rows.items()}]
            pending_rows -= size
    if len(shards) != len(sizes) or pending_rows:
        raise RuntimeError(f"the catalog changed while it was indexed: expected {sum(sizes)} products")
    return shards, kept


def build_shard(out: Path, number: int, rows: dict[str, np.ndarray], size: int, index_cfg: IndexConfig) -> dict:
    """Index the first `size` embedded rows as shard `number`; returns its manifest entry."""
    started = time.perf_counter()
    index = build_faiss_index(rows["embedding"][:size], index_cfg.factory, index_cfg.search_params, index_cfg.train_size, seed=number)
    name = f"shard-{number:03d}"
    write_shard(out / name, index, rows["product_id"][:size].tolist(), [str(t) for t in rows["title"][:size]])
    return {"name": name, "path": name, "products": size, "build_s": round(time.perf_counter() - started, 3)}


def calibration_pairs(prepared: Path, split: str) -> pd.DataFrame:
    """Judged (query text, product id, grade) pairs of one split's queries."""
    queries = read_table(prepared, "queries").to_pandas()
    judgments = read_table(prepared, "judgments").to_pandas()[["query_id", "product_id", "grade"]]
    pairs = judgments.merge(queries[queries["split"] == split][["query_id", "text"]], on="query_id")
    if pairs.empty:
        raise ValueError(f"{prepared / 'judgments'}: no judged pairs for {split!r} queries to calibrate grade thresholds on")
    return pairs


def calibrate_on_shards(index_dir: Path, pairs: pd.DataFrame, product_vectors: dict[str, np.ndarray], encoder_cfg: EncoderConfig, model_path: str | None) -> tuple[dict, float, dict]:
    """Fusion weight and per-mode grade thresholds from the held-out split's judged pairs, searched on the built shards.

    The weight maximises the split's hybrid NDCG@10 over the dense and lexical
    top-100; the thresholds sit on each mode's score of the judged pairs
    (BM25 from each product's own shard, over the query's best BM25 in the index).
    """
    from mr_ray.index.fusion import normalise_lexical
    from mr_ray.index.thresholds import calibrate_retrieval, choose_fusion_weight

    shards = open_shards(index_dir)
    model = load_encoder(model_path, "auto", encoder_cfg.max_seq_length)
    queries = pairs[["query_id", "text"]].drop_duplicates("query_id")
    texts = queries["text"].tolist()
    candidates = dict(zip(queries["query_id"], search_shards_both(shards, encode(model, texts, encoder_cfg.batch_size), texts, 100)))
    weight, weights_ndcg = choose_fusion_weight(candidates, pairs)
    dense = pair_scores(model, pairs, encoder_cfg.batch_size, product_vectors)  # also refuses products not in the catalog
    lexical, best = np.zeros(len(pairs)), np.zeros(len(pairs))
    for shard in shards:  # each pair's BM25 in its product's shard, over its query's best BM25 in any shard
        product_row = pairs["product_id"].map({pid: i for i, pid in enumerate(shard.product_ids[:-1])}).fillna(-1).astype(int).to_numpy()
        here, best_here = shard.lexical.pair_scores(pairs["text"].tolist(), product_row)
        lexical, best = lexical + here, np.maximum(best, best_here)
    lexical_norm = normalise_lexical(lexical, best)
    by_mode, report = calibrate_retrieval(dense, lexical_norm, pairs["grade"].to_numpy(), weight)
    return by_mode, weight, {**report, "weights_ndcg@10": {str(w): round(v, 4) for w, v in weights_ndcg.items()}}


def index_stage(ctx) -> dict:
    """Pipeline stage `index`: sharded FAISS + BM25 index of the prepared catalog, fusion weight and grade thresholds."""
    import ray

    config, prepared = ctx.config, ctx.input("prepare")
    model_path, encoder_source = choose_encoder(ctx.run_dir, config.encoder)
    pairs = calibration_pairs(prepared, config.index.calibration_split)
    products = ray.data.read_parquet(str(prepared / "products"), columns=["product_id", "title"])
    started = time.perf_counter()
    shards, kept = build_index(products, ctx.out, config.index, config.encoder, model_path, set(pairs["product_id"]))
    n_products = sum(shard["products"] for shard in shards)
    # The stage folder is renamed to run_dir/index when it finishes: store trained
    # encoders relative to that final place.
    stored_path = model_path
    if model_path is not None and Path(model_path).resolve().is_relative_to(ctx.run_dir.resolve()):
        stored_path = os.path.relpath(Path(model_path).resolve(), (ctx.run_dir / ctx.stage.name).resolve())
    dim = int(next(iter(kept.values())).shape[0])
    manifest = {
        "factory": config.index.factory,
        "search_params": config.index.search_params,
        "metric": "inner_product",
        "dim": dim,
        "products": n_products,
        "encoder": {"source": encoder_source, "path": stored_path, "max_seq_length": config.encoder.max_seq_length},
        "shards": shards,
    }
    (ctx.out / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
    by_mode, weight, report = calibrate_on_shards(ctx.out, pairs, kept, config.encoder, model_path)
    save_retrieval_thresholds(ctx.out, by_mode, weight, {mode: {"split": config.index.calibration_split, **r} if mode in by_mode else r for mode, r in report.items()})
    thresholds = by_mode["dense"]
    return {
        "products": n_products,
        "shards": len(shards),
        "factory": config.index.factory,
        "encoder": encoder_source,
        "build_s": round(time.perf_counter() - started, 2),
        "threshold_exact": round(thresholds.exact, 4),
        "threshold_partial": round(thresholds.partial, 4),
        **{f"calibration_bacc_{b}": v for b, v in report["dense"]["balanced_accuracy"].items()},
        "fusion_weight": weight,
        "dev_ndcg@10": {"dense": report["weights_ndcg@10"]["1.0"], "lexical": report["weights_ndcg@10"]["0.0"], "hybrid": report["weights_ndcg@10"][str(weight)]},
        **{f"hybrid_calibration_bacc_{b}": v for b, v in report["hybrid"]["balanced_accuracy"].items()},
    }
