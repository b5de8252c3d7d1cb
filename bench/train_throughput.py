"""Training throughput: our Stage-1 loop (Ray Train, label-aware SupCon) against
sentence-transformers' own trainer with MultipleNegativesRankingLoss.

Same model (all-MiniLM-L6-v2), same machine, same batch: 64 queries with one
product each (128 texts a step, in-batch negatives), same max_seq_length, on
the embedded sample catalog's training queries and their exact products.
Throughput is (query, product) training pairs per second of the training loop
(model loading and Ray start-up excluded on both sides). One run; prints the ratio.
`--precision bf16` runs both in bfloat16 autocast (ours: `precision: bf16`; the
peer: the Trainer's `bf16=True`).

Run:  .venv/bin/python bench/train_throughput.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1500, help="sample catalog size (about 70% are train queries)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=48)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both sides")
    args = parser.parse_args()

    import ray

    from mr_ray.config import SampleConfig, Stage1Config
    from mr_ray.data.sample import generate_sample
    from mr_ray.retriever.encoder import pretrained_model_path
    from mr_ray.retriever.examples import build_examples
    from mr_ray.retriever.ray_train import train_encoder
    from mr_ray.retriever.st_baseline import exact_pairs, train_mnrl

    tables = generate_sample(SampleConfig(n_products=3000, n_queries=args.queries, seed=0))
    queries = tables["queries"][tables["queries"]["split"] == "train"]
    examples = build_examples(queries, tables["gold"], tables["products"])
    pairs = exact_pairs(examples)
    # our loop draws one product per query (the positive first): the same 2 x batch texts a step as MNRL
    examples = examples[examples["grades"].map(lambda g: max(g) == 2)].reset_index(drop=True)
    config = Stage1Config(
        epochs=1, queries_per_batch=args.batch_size, products_per_query=1, max_seq_length=args.max_seq_length,
        augment={"rate": 0.0}, learning_rate=2e-5, precision=args.precision,
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = train_encoder(examples, config, pretrained_model_path(), tmp / "ours", tmp / "ckpt", "throughput")
        ray.shutdown()
        steps = -(-len(examples) // args.batch_size)
        peer = train_mnrl(None, pairs, tmp / "peer", batch_size=args.batch_size, max_seq_length=args.max_seq_length, max_steps=steps,
                          bf16=args.precision == "bf16")
    print(f"load average before/after: {os.getloadavg()}; precision {args.precision}")
    print(f"ours (Ray Train, SupCon):       {ours['pairs_per_s']:8.1f} pairs/s  ({ours['pairs']} pairs, {ours['steps']} steps of {args.batch_size})")
    print(f"sentence-transformers (MNRL):   {peer['pairs_per_s']:8.1f} pairs/s  ({peer['pairs']} pairs, {peer['steps']} steps of {args.batch_size})")
    print(f"ratio ours / sentence-transformers: {ours['pairs_per_s'] / peer['pairs_per_s']:.2f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
