"""Build the sharded FAISS index of the catalog, and the `index` pipeline stage.

The catalog is cut into `n_shards` contiguous row ranges; each range is
embedded with Ray Data (`embed_dataset`), turned into its own FAISS index and
written out before the next one starts, so build memory is bounded by one
shard's vectors, not the catalog's.
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
from mr_ray.index.shards import INDEX_MANIFEST, SHARD_INDEX_FILE, SHARD_PRODUCTS_FILE
from mr_ray.index.thresholds import calibrate_thresholds
from mr_ray.pipeline import read_manifest
from mr_ray.retriever.encoder import embed_dataset

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


def build_faiss_index(vectors: np.ndarray, factory: str, search_params: str = "", train_size: int = 100_000, seed: int = 0):
    """An inner-product FAISS index from `faiss.index_factory`, trained (if it needs it) and filled."""
    import faiss

    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"index.factory {factory!r} is not a valid faiss index_factory string for dimension {vectors.shape[1]}: {err}") from None
    if not index.is_trained:
        train = vectors
        if len(vectors) > train_size:
            train = vectors[np.random.default_rng(seed).choice(len(vectors), train_size, replace=False)]
        try:
            index.train(train)
        except RuntimeError as err:
            raise ValueError(
                f"index.factory {factory!r} cannot be trained on {len(train)} vectors (a shard this small needs fewer "
                f"IVF lists or PQ centroids, or fewer shards): {str(err).splitlines()[-1] if str(err) else err}"
            ) from None
    index.add(vectors)
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as err:
            raise ValueError(f"index.search_params {search_params!r} do not apply to {factory!r}: {err}") from None
    return index


def build_index(
    products: pa.Table,
    out: Path,
    index_cfg: IndexConfig,
    encoder_cfg: EncoderConfig,
    model_path: str | None,
    keep_vectors_of: set[str] = frozenset(),
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Write one folder per shard into `out`; returns the shard list and the vectors of `keep_vectors_of`."""
    import faiss
    import ray

    products = products.select(["product_id", "title"])
    kept: dict[str, np.ndarray] = {}
    shards = []
    for number, (start, stop) in enumerate(shard_bounds(products.num_rows, index_cfg.n_shards)):
        part = products.slice(start, stop - start)
        ids, vectors = embed_dataset(ray.data.from_arrow(part), "product_id", "title", encoder_cfg, model_path)
        # Ray Data returns rows in its own order: the FAISS row order follows the returned ids.
        titles = pd.Series(part.column("title").to_pylist(), index=part.column("product_id").to_pylist())
        started = time.perf_counter()
        index = build_faiss_index(vectors, index_cfg.factory, index_cfg.search_params, index_cfg.train_size, seed=number)
        name = f"shard-{number:03d}"
        (out / name).mkdir(parents=True)
        faiss.write_index(index, str(out / name / SHARD_INDEX_FILE))
        pq.write_table(
            pa.table({"product_id": ids.tolist(), "title": titles.loc[ids].tolist()}), out / name / SHARD_PRODUCTS_FILE
        )
        kept.update((pid, vec) for pid, vec in zip(ids, vectors) if pid in keep_vectors_of)
        shards.append({"name": name, "path": name, "products": int(len(ids)), "build_s": round(time.perf_counter() - started, 3)})
        del index, vectors
    return shards, kept


def calibration_pairs(prepared: Path, split: str) -> pd.DataFrame:
    """Judged (query text, product id, grade) pairs of one split's queries."""
    queries = read_table(prepared, "queries").to_pandas()
    judgments = read_table(prepared, "judgments").to_pandas()[["query_id", "product_id", "grade"]]
    pairs = judgments.merge(queries[queries["split"] == split][["query_id", "text"]], on="query_id")
    if pairs.empty:
        raise ValueError(f"{prepared / 'judgments'}: no judged pairs for {split!r} queries to calibrate grade thresholds on")
    return pairs


def pair_scores(pairs: pd.DataFrame, product_vectors: dict[str, np.ndarray], encoder_cfg: EncoderConfig, model_path: str | None) -> np.ndarray:
    """Cosine score of each judged pair under the encoder that built the index."""
    import ray

    texts = pairs[["query_id", "text"]].drop_duplicates("query_id")
    qids, qvecs = embed_dataset(ray.data.from_pandas(texts), "query_id", "text", encoder_cfg, model_path)
    query_row = {qid: row for row, qid in enumerate(qids)}
    missing = sorted(set(pairs["product_id"]) - product_vectors.keys())
    if missing:
        raise ValueError(f"judged product(s) not in the catalog, e.g. product_id {missing[0]!r} ({len(missing)} in all)")
    q = qvecs[[query_row[qid] for qid in pairs["query_id"]]]
    p = np.stack([product_vectors[pid] for pid in pairs["product_id"]])
    return np.einsum("ij,ij->i", q, p)


def index_stage(ctx) -> dict:
    """Pipeline stage `index`: sharded FAISS index of the prepared catalog + grade thresholds."""
    config, prepared = ctx.config, ctx.input("prepare")
    model_path, encoder_source = choose_encoder(ctx.run_dir, config.encoder)
    pairs = calibration_pairs(prepared, config.index.calibration_split)
    products = read_table(prepared, "products")
    started = time.perf_counter()
    shards, kept = build_index(products, ctx.out, config.index, config.encoder, model_path, set(pairs["product_id"]))
    thresholds, report = calibrate_thresholds(pair_scores(pairs, kept, config.encoder, model_path), pairs["grade"].to_numpy())
    thresholds.save(ctx.out, {"split": config.index.calibration_split, **report})
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
        "products": int(products.num_rows),
        "encoder": {"source": encoder_source, "path": stored_path, "max_seq_length": config.encoder.max_seq_length},
        "shards": shards,
    }
    (ctx.out / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {
        "products": int(products.num_rows),
        "shards": len(shards),
        "factory": config.index.factory,
        "encoder": encoder_source,
        "build_s": round(time.perf_counter() - started, 2),
        "threshold_exact": round(thresholds.exact, 4),
        "threshold_partial": round(thresholds.partial, 4),
        **{f"calibration_bacc_{b}": v for b, v in report["balanced_accuracy"].items()},
    }
