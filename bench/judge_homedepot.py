"""The judge on real human labels: Home Depot (../shared/data/homedepot), train on `train`, test on `test`.

Prints 3-class accuracy and within-one accuracy of
- the majority-class baseline (most common train grade),
- the zero-shot base judge (packaged SmolLM2-135M-Instruct, guideline prompt),
- the judge fine-tuned with Ray Train on a class-balanced subsample of the train labels,
each labeling the same seeded subsample of test pairs through Ray Data + vLLM.
CPU sizes are small by default and printed; pass larger ones on a GPU cluster.

    python bench/judge_homedepot.py --train-examples 960 --test-pairs 400
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import JudgeEngineConfig, JudgeFinetuneConfig
from mr_ray.labeler.finetune import balanced_subsample, finetune_judge, training_examples
from mr_ray.labeler.label import label_pairs
from mr_ray.labeler.model import base_model_folder
from mr_ray.labeler.prompt import within_one_accuracy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "homedepot"


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    return {"accuracy": float((predicted == truth).mean()), "within_one": within_one_accuracy(predicted, truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-examples", type=int, default=960, help="class-balanced subsample of train labels")
    parser.add_argument("--test-pairs", type=int, default=400, help="seeded subsample of test pairs")
    parser.add_argument("--train-layers", type=int, default=4, help="top blocks trained; 0 = full fine-tune")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "mr-ray-judge-homedepot")
    args = parser.parse_args()
    if not (args.data / "judgments.parquet").exists():
        raise SystemExit(f"Home Depot data not found at {args.data}")

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    products = pd.read_parquet(args.data / "products.parquet")
    queries = pd.read_parquet(args.data / "queries.parquet")
    judgments = pd.read_parquet(args.data / "judgments.parquet")
    split = judgments.merge(queries[["query_id", "split"]], on="query_id")
    train, test = split[split["split"] == "train"], split[split["split"] == "test"]
    test = test.sample(n=min(args.test_pairs, len(test)), random_state=args.seed).reset_index(drop=True)
    truth = test["grade"].to_numpy().astype(int)
    engine = JudgeEngineConfig()
    base = base_model_folder(None, args.work_dir)
    results, timings = {}, {}

    majority = int(train["grade"].mode()[0])
    results["majority class"] = scores(np.full(len(truth), majority), truth)

    def judge(model: Path, name: str) -> None:
        started = time.perf_counter()
        judged, bad = label_pairs(test, queries, products, model, engine, args.work_dir / f"shards-{name}-{args.seed}-{len(test)}", log=lambda *_: None)
        timings[name] = round(time.perf_counter() - started, 1)
        aligned = test[["query_id", "product_id"]].merge(judged, on=["query_id", "product_id"], how="left")
        if aligned["grade"].isna().any():
            raise RuntimeError(f"{name}: {int(aligned['grade'].isna().sum())} test pairs were not judged: {bad.head()}")
        results[name] = scores(aligned["grade"].to_numpy().astype(int), truth)
        results[name]["predicted_counts"] = np.bincount(aligned["grade"].astype(int), minlength=3).tolist()

    judge(base, "zero-shot base")

    cfg = JudgeFinetuneConfig(
        max_examples=args.train_examples, train_layers=args.train_layers or None, epochs=args.epochs,
        learning_rate=args.learning_rate, seed=args.seed, checkpoint_every=20, max_holdout=None,
    )
    examples = balanced_subsample(training_examples(train, queries, products), cfg.max_examples, cfg.seed)
    tag = f"{args.train_examples}-{args.train_layers}-{args.epochs}-{args.learning_rate}-{args.seed}"
    started = time.perf_counter()
    training = finetune_judge(examples, base, cfg, args.work_dir / f"train-{tag}", args.work_dir / f"judge-{tag}")
    timings["fine-tune"] = round(time.perf_counter() - started, 1)
    judge(args.work_dir / f"judge-{tag}", "fine-tuned")

    print(f"Home Depot judge, test pairs {len(test)} (seeded subsample of {int((split['split'] == 'test').sum())}),")
    print(f"fine-tuned on {len(examples)} class-balanced train labels (of {len(train)}), grade counts {training['train_grade_counts']},")
    print(f"top {args.train_layers or 'all'} blocks trained, {training['steps']} steps, final loss {training['final_loss']:.3f}")
    print(f"test grade counts {np.bincount(truth, minlength=3).tolist()}")
    print(f"{'judge':<16} {'accuracy':>9} {'within-one':>11}")
    for name, row in results.items():
        print(f"{name:<16} {row['accuracy']:9.3f} {row['within_one']:11.3f}   {row.get('predicted_counts', '')}")
    print("paper bar (fine-tuned, ESCI-like data): 0.876 accuracy, 0.988 within-one")
    print(json.dumps({"results": results, "timings_s": timings, "training": training}, default=str))
    ray.shutdown()


if __name__ == "__main__":
    main()
