"""index: the served search index of the run's final encoder (mr_ray.search.build): FAISS + BM25 shards, the fusion
weight and grade thresholds calibrated on dev, and each tier's precision and recall on the held-out test split (tiers.md)."""

from __future__ import annotations

import json
import logging
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
    catalog_pairs,
    choose_encoder,
    open_searcher,
    tiers_on_shards,
)
from mr_ray.search.shards import (
    INDEX_MANIFEST,
)
from mr_ray.search.thresholds import (
    save_retrieval_thresholds,
)

log = logging.getLogger(__name__)

# The split each tier's precision and recall is measured on: the queries `evaluate` reports on, never calibrated on by default.
TIERS_SPLIT = "test"
TIERS_FILE = "tiers.md"


def index_stage(ctx) -> dict:
    """Pipeline stage `index`: sharded FAISS + BM25 index of the prepared catalog, fusion weight and grade thresholds,
    and the tiers' precision and recall on the test split (manifest metrics `tiers`, tiers.md)."""
    config, prepared = ctx.config, ctx.input("prepare")
    model_path, encoder_source = choose_encoder(ctx.inputs_of("encoder"), config.encoder)
    pairs, calibration = calibration_pairs(prepared, config.index)
    held_out, held_out_summary = catalog_pairs(prepared, TIERS_SPLIT, config.index)
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
    scored = set(pairs["product_id"]) | set(held_out["product_id"])
    kept = {pid: by_id[pid] for pid in scored if pid in by_id}  # an unknown product is refused by pair_scores
    opened, model = open_searcher(ctx.out, config.encoder, model_path)
    exact_precision = config.index.exact_precision
    by_mode, weight, report = calibrate_on_shards(opened, model, pairs, kept, config.encoder, exact_precision)
    save_retrieval_thresholds(ctx.out, by_mode, weight, {mode: {**calibration, **r} if mode in by_mode else r for mode, r in report.items()})
    unreached = {mode: report[mode]["exact_precision"]["precision"] for mode in by_mode if not report[mode].get("exact_precision", {}).get("reached", True)}
    if unreached:
        best = ", ".join(f"{mode} {value}" for mode, value in unreached.items())
        log.warning(f"[mr-ray] stage index: no exact cut reaches index.exact_precision {exact_precision} on {calibration['split']} ({best}); those modes' exact tier is cut at its highest precision")
    tiers = {
        **{key: held_out_summary[key] for key in ("split", "truth", "queries", "judged_pairs", "unjudged_pairs")},
        "calibrated_on": calibration["split"],
        "exact_precision": exact_precision,
        "fusion_weight": weight,
        "modes": tiers_on_shards(opened, model, held_out, kept, config.encoder, by_mode, weight) if len(held_out) else None,
    }
    (ctx.out / TIERS_FILE).write_text(tiers_markdown(tiers, unreached))
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
        "tiers": tiers,
    }


def tiers_markdown(tiers: dict, unreached: dict[str, float]) -> str:
    """tiers.md: each mode's tiers on the held-out split, as a merchandiser reads them."""
    split, cut = tiers["split"], tiers["calibrated_on"]
    exact_rule = "max F1" if tiers["exact_precision"] is None else f"the lowest score reaching weighted precision {tiers['exact_precision']} (`index.exact_precision`)"
    lines = [
        f"# Search tiers on the {split} split",
        "",
        f"What a shopper meets: of the products a tier shows, the share truly in it (precision), and of the products truly in it, "
        f"the share it shows (recall). Thresholds calibrated on {cut} (exact: {exact_rule}; exact+partial: max F1; hybrid fusion "
        f"weight {tiers['fusion_weight']}), measured on {tiers['queries']} {split} queries against {tiers['truth']}, catalog-wide: "
        f"their {tiers['judged_pairs']} judged pairs plus {tiers['unjudged_pairs']} sampled catalog products not judged for them, "
        "counted as grade 0 and weighted to stand for all of them.",
        "",
    ]
    if split == cut:
        lines += [f"Not held out: the thresholds were calibrated on these {split} queries (`index.calibration_split`).", ""]
    if tiers["modes"] is None:
        return "\n".join(lines + [f"No judged {split} queries: nothing to measure.", ""])
    lines += ["| mode | tier | precision | recall | threshold |", "|---|---|---|---|---|"]
    for mode, by_tier in tiers["modes"].items():
        for tier, quality in by_tier.items():
            shown = ["-" if quality[key] is None else f"{quality[key]:.4f}" for key in ("precision", "recall", "threshold")]
            lines.append(f"| {mode} | {tier} | {' | '.join(shown)} |")
    if unreached:
        best = ", ".join(f"{mode} {value}" for mode, value in unreached.items())
        lines += ["", f"No exact cut reached precision {tiers['exact_precision']} on {cut} for {best} (its best): that exact tier is cut at its highest precision."]
    return "\n".join(lines + [""])
