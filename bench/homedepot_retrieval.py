"""The Home Depot table: BM25, pretrained, the sentence-transformers MNRL recipe,
Stage 1, Stage 2 and three ablations, on ../shared/data/homedepot.

Train on `train` judgments (all the train queries by default, or a seeded
subset: --train-queries N; --precision bf16
trains Stage 1 and 2 under bfloat16 autocast), tune nothing here (the pipeline
defaults), report on `test` with full-catalog retrieval (all 54,667
products). Every system is evaluated on the clean test queries and on a typo'd
copy of them (one seeded keyboard/typing error per query,
mr_ray.data.augment.misspell).

Rows:
- bm25, pretrained;
- st-mnrl: SentenceTransformerTrainer + MultipleNegativesRankingLoss on
  (query, exact product) pairs of the same training queries, 1 epoch, batch 64,
  lr 2e-5;
- stage1, stage2: the pipeline's stages (prepare, stage1, mine, stage2) in the
  run graph of `judge.kind: none` (human grades only) and `sweep: null`;
- ablations: no-augmentation (stage1 + mine + stage2 with augment.rate 0),
  no-mining (stage2 without mined samples), stage2-supcon (SupCon instead of
  circle loss in stage 2);
- hybrids (`NAME+bm25` in --systems): an encoder fused with BM25, by
  reciprocal rank (k = 60) and by the weighted fusion of cosine and normalised
  BM25 whose weight is tuned on the dev queries (mr_ray.evaluate.hybrid_rows).

Results are cached per system in <out>/results.json, so a rerun only does what
is missing, and catalog vectors and the st-mnrl model come from mr_ray's cache. Run:
nice -n 10 .venv/bin/python bench/homedepot_retrieval.py --out runs/hd-bench
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

# name -> config overrides on top of the base Home Depot config (None: a baseline)
VARIANTS = {
    "main": {},
    "no-augmentation": {"stage1.augment.rate": 0.0},
    "no-mining": {"stage2.use_mined": False},
    "stage2-supcon": {"stage2.circle_weight": 0.0, "stage2.supcon_weight": 1.0},
}
SHARED_STAGES = {"no-mining": ("prepare", "stage1", "mine"), "stage2-supcon": ("prepare", "stage1", "mine"), "no-augmentation": ("prepare",)}
COLUMNS = ["ndcg@10", "judged@10", "condensed_ndcg@10", "recall@100_exact", "precision@10_exact", "auc_2_over_1", "auc_1_over_0"]


def variant_config(data: Path, train_queries: int | None, variant: str, precision: str):
    """The Home Depot run config of a variant (train_queries None: all of them)."""
    from mr_ray.config import load_config

    return load_config(
        REPO / "jobs" / "configs" / "homedepot.yaml",
        {
            "data.path": str(data),
            "stage1.max_train_queries": train_queries,
            "stage2.max_train_queries": train_queries,
            "mine.max_queries": train_queries,
            "stage1.precision": precision,
            "stage2.precision": precision,
            # No judge on this data here (CPU): the graph has no judge stages, and mined pairs are
            # re-annotated from the human judgments. Nothing is tuned: no sweep stage.
            "judge.kind": "none",
            "mine.annotator": "grades",
            "mine.grades_source": "judgments",
            "sweep": None,
            **VARIANTS[variant],
        },
    )


def run_variant(name: str, out: Path, data: Path, train_queries: int | None, precision: str) -> Path:
    """Run the variant's graph up to stage2 (prepare, stage1, mine, stage2), reusing the main run's unchanged stage outputs."""
    from mr_ray.pipeline import run_pipeline

    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for shared in SHARED_STAGES.get(name, ()):
        if not (run_dir / shared).exists():
            os.symlink(out / "runs" / "main" / shared, run_dir / shared)
    run_pipeline(variant_config(data, train_queries, name, precision), run_dir, until="stage2")
    return run_dir


def train_query_count(value: str) -> int | None:
    """--train-queries: a positive count, or 'all' (None)."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of train queries or 'all', got {value!r}")
    return int(value)


def typo_queries(queries: pd.DataFrame, seed: int) -> pd.DataFrame:
    from mr_ray.data.augment import misspell

    rng = np.random.default_rng(seed)
    return queries.assign(text=[misspell(text, rng) for text in queries["text"]])


def score_sets(name: str, path: str | None, split, query_sets: dict, prepared: Path, config, hybrid: bool) -> dict:
    """An encoder's rows on each query set through the one scoring path (mr_ray.evaluate.score_encoder), its
    catalog vectors from the embedding cache: its own row, or with `hybrid` its two rows with BM25 (RRF k=60,
    and the weighted fusion tuned on dev). Returns {system: {query set: metrics}}."""
    from mr_ray.embeddings import catalog_vectors
    from mr_ray.evaluate import score_encoder
    from mr_ray.retriever.encoder import load_encoder

    catalog = catalog_vectors(prepared / "products", split.products, config.encoder, path, name)
    model = load_encoder(path, config.encoder.device, config.encoder.max_seq_length)
    scoring = config.evaluate.model_copy(update={"hybrid": hybrid})
    out: dict[str, dict] = {}
    for set_name, queries in query_sets.items():
        systems, _, _ = score_encoder(name, split.with_queries(queries), model, catalog.vectors, scoring, config.encoder.batch_size)
        for system, metrics in systems.items():
            if hybrid == (system != name):
                out.setdefault(system, {})[set_name] = metrics
    return out


def table(results: dict, query_set: str) -> str:
    lines = ["| system | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, by_set in results.items():
        metrics = by_set.get(query_set, {})
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else "-" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "hd-bench")
    parser.add_argument("--train-queries", type=train_query_count, default=None,
                        help="a seeded subset of the 7,978 train queries (default: all)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="Stage 1 and Stage 2 (the st-mnrl peer keeps its fp32 recipe)")
    parser.add_argument("--systems", default="bm25,pretrained,stage1,stage2,st-mnrl,stage2-supcon,no-mining,no-augmentation,pretrained+bm25,st-mnrl+bm25,stage2+bm25",
                        help="comma-separated; NAME+bm25 adds an encoder's hybrid rows (RRF, and weighted fusion tuned on dev)")
    args = parser.parse_args()
    if not (args.data / "judgments.parquet").exists():
        raise SystemExit(f"Home Depot data not found at {args.data}")

    import ray

    from mr_ray.evaluate import load_split, score_bm25
    from mr_ray.pipeline import Limit
    from mr_ray.retriever.st_baseline import st_baseline

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    timings = results.pop("_timings", {})
    data = args.data.resolve()
    config = variant_config(data, args.train_queries, "main", args.precision)

    def record(name: str, started: float, value: dict) -> None:
        results[name] = value
        timings[name] = round(time.perf_counter() - started, 1)
        results_file.write_text(json.dumps({**results, "_timings": timings}, indent=2))
        print(f"[bench] {name}: {json.dumps({s: {c: m.get(c) for c in COLUMNS} for s, m in value.items()})} ({timings[name]} s)", flush=True)

    main_run = run_variant("main", out, data, args.train_queries, args.precision)
    prepared = main_run / "prepare"
    split = load_split(prepared, config.evaluate.model_copy(update={"hybrid": True}), config.lexical)  # BM25 built once, for every row
    query_sets = {"test": split.queries, "test-typo": typo_queries(split.queries, seed=1)}
    st_mnrl = functools.cache(lambda: st_baseline(prepared, None, config.encoder.max_seq_length, config.stage1.seed, Limit.of(config, "stage1.max_train_queries")))

    def model_path(name: str) -> str | None:
        if name == "pretrained":
            return None
        if name == "st-mnrl":
            return str(st_mnrl()[0])
        variant, stage = {"stage1": ("main", "stage1"), "stage2": ("main", "stage2")}.get(name, (name, "stage2"))
        return str(run_variant(variant, out, data, args.train_queries, args.precision) / stage / "model")

    for name in args.systems.split(","):
        if name in results or f"{name} rrf" in results:
            continue
        started = time.perf_counter()
        if name == "bm25":
            record(name, started, {set_name: score_bm25(split.with_queries(queries), config.evaluate)[0] for set_name, queries in query_sets.items()})
            continue
        encoder_name = name.removesuffix("+bm25")  # NAME+bm25: the encoder's hybrid rows
        for system, metrics in score_sets(encoder_name, model_path(encoder_name), split, query_sets, prepared, config, name.endswith("+bm25")).items():
            record(system, started, {**metrics, **({"training": st_mnrl()[1]} if system == "st-mnrl" else {})})

    report = [
        "# Home Depot retrieval (test split, full catalog)",
        "",
        f"Training: {args.train_queries or 'all'} of the 7,978 train queries (human judgments, a seeded subset when fewer), "
        f"1 epoch per stage, Stage 1 and 2 in {args.precision}; "
        "mined pairs re-annotated from the human judgments (no LLM judge on CPU here).",
        "",
        "## Clean test queries",
        table(results, "test"),
        "",
        "## Typo'd test queries (one typing error per query)",
        table(results, "test-typo"),
        "",
        f"Wall time per system (s): {json.dumps(timings)}",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    ray.shutdown()


if __name__ == "__main__":
    main()
