"""Build the sharded FAISS index of the catalog, and the `index` pipeline stage.

The catalog streams once through Ray Data encoder actors (`iter_embedded`);
every `n_products / n_shards` embedded rows become one shard: its own FAISS
index (any `index_factory` string, inner product) and product-id map, written
out before the next shard fills, so build memory is bounded by one shard's
vectors, not the catalog's.
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


def write_shard(folder: Path, index, product_ids: list[str], titles: list[str]) -> None:
    """One shard folder: the FAISS index and its product-id map (row i = FAISS id i)."""
    import faiss

    folder.mkdir(parents=True)
    faiss.write_index(index, str(folder / SHARD_INDEX_FILE))
    pq.write_table(pa.table({"product_id": product_ids, "title": titles}), folder / SHARD_PRODUCTS_FILE)


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


def pair_scores(pairs: pd.DataFrame, product_vectors: dict[str, np.ndarray], encoder_cfg: EncoderConfig, model_path: str | None) -> np.ndarray:
    """Cosine score of each judged pair under the encoder that built the index.

    The split's few queries are encoded in the driver; the products' vectors
    come from the index build.
    """
    missing = sorted(set(pairs["product_id"]) - product_vectors.keys())
    if missing:
        raise ValueError(f"judged product(s) not in the catalog, e.g. product_id {missing[0]!r} ({len(missing)} in all)")
    texts = pairs["text"].drop_duplicates().tolist()
    model = load_encoder(model_path, "auto", encoder_cfg.max_seq_length)
    query_vectors = dict(zip(texts, encode(model, texts, encoder_cfg.batch_size)))
    q = np.stack([query_vectors[text] for text in pairs["text"]])
    p = np.stack([product_vectors[pid] for pid in pairs["product_id"]])
    return np.einsum("ij,ij->i", q, p)


def index_stage(ctx) -> dict:
    """Pipeline stage `index`: sharded FAISS index of the prepared catalog + grade thresholds."""
    import ray

    config, prepared = ctx.config, ctx.input("prepare")
    model_path, encoder_source = choose_encoder(ctx.run_dir, config.encoder)
    pairs = calibration_pairs(prepared, config.index.calibration_split)
    products = ray.data.read_parquet(str(prepared / "products"), columns=["product_id", "title"])
    started = time.perf_counter()
    shards, kept = build_index(products, ctx.out, config.index, config.encoder, model_path, set(pairs["product_id"]))
    n_products = sum(shard["products"] for shard in shards)
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
        "products": n_products,
        "encoder": {"source": encoder_source, "path": stored_path, "max_seq_length": config.encoder.max_seq_length},
        "shards": shards,
    }
    (ctx.out / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {
        "products": n_products,
        "shards": len(shards),
        "factory": config.index.factory,
        "encoder": encoder_source,
        "build_s": round(time.perf_counter() - started, 2),
        "threshold_exact": round(thresholds.exact, 4),
        "threshold_partial": round(thresholds.partial, 4),
        **{f"calibration_bacc_{b}": v for b, v in report["balanced_accuracy"].items()},
    }
