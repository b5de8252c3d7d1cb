"""index: the served search index of the run's final encoder (mr_ray.search.build): FAISS + BM25 shards, the fusion weight and grade thresholds calibrated on dev."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mr_ray.data.prepare import read_table
from mr_ray.embeddings import catalog_vectors
from mr_ray.retriever.encoder import resolve_precision
from mr_ray.search.build import (
    build_index,
    calibrate_on_shards,
    calibration_pairs,
    choose_encoder,
)
from mr_ray.search.shards import (
    INDEX_MANIFEST,
)
from mr_ray.search.thresholds import (
    save_retrieval_thresholds,
)


def index_stage(ctx) -> dict:
    """Pipeline stage `index`: sharded FAISS + BM25 index of the prepared catalog, fusion weight and grade thresholds."""
    config, prepared = ctx.config, ctx.input("prepare")
    model_path, encoder_source = choose_encoder(ctx.inputs_of("encoder"), config.encoder)
    pairs, calibration = calibration_pairs(prepared, config.index)
    products = read_table(prepared, "products").to_pandas()
    started = time.perf_counter()
    catalog = catalog_vectors(prepared / "products", products, config.encoder, model_path, encoder_source)  # evaluate embedded it
    shards = build_index(products, catalog.vectors, ctx.out, config.index, config.lexical)
    n_products = sum(shard["products"] for shard in shards)
    # The stage folder is renamed to run_dir/index when it finishes: store trained
    # encoders relative to that final place.
    stored_path = model_path
    if model_path is not None and Path(model_path).resolve().is_relative_to(ctx.run_dir.resolve()):
        stored_path = os.path.relpath(Path(model_path).resolve(), (ctx.run_dir / ctx.stage.name).resolve())
    precision = resolve_precision(config.encoder.precision, config.encoder.device)
    dim = int(catalog.vectors.shape[1])
    manifest = {
        "factory": config.index.factory,
        "search_params": config.index.search_params,
        "metric": "inner_product",
        "dim": dim,
        "products": n_products,
        "encoder": {"source": encoder_source, "path": stored_path, "max_seq_length": config.encoder.max_seq_length, "precision": precision},
        "shards": shards,
        "calibration": calibration,
    }
    (ctx.out / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
    by_id = catalog.by_id()
    kept = {pid: by_id[pid] for pid in set(pairs["product_id"]) if pid in by_id}  # an unknown product is refused by pair_scores
    by_mode, weight, report = calibrate_on_shards(ctx.out, pairs, kept, config.encoder, model_path, precision)
    save_retrieval_thresholds(ctx.out, by_mode, weight, {mode: {**calibration, **r} if mode in by_mode else r for mode, r in report.items()})
    thresholds = by_mode["dense"]
    return {
        "products": n_products,
        "shards": len(shards),
        "factory": config.index.factory,
        "encoder": encoder_source,
        "build_s": round(time.perf_counter() - started, 2),
        "threshold_exact": round(thresholds.exact, 4),
        "threshold_partial": round(thresholds.partial, 4),
        "fusion_weight": weight,
        "dev_ndcg@10": {"dense": report["weights_ndcg@10"]["1.0"], "lexical": report["weights_ndcg@10"]["0.0"], "hybrid": report["weights_ndcg@10"][str(weight)]},
        "calibration_pairs": {"judged": calibration["judged_pairs"], "unjudged_sampled": calibration["unjudged_pairs"]},
        "dev_tiers": {mode: report[mode]["tiers"] for mode in by_mode},
    }
