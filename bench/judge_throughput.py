"""Judge labeling throughput: Ray Data + vLLM (`ray.data.llm`) against plain transformers batched forward passes.

Same model (the packaged SmolLM2-135M-Instruct, dequantized), same
guideline-prefixed prompts (pool pairs of the embedded sample catalog), same
machine, one run. Printed as pairs per second and a ratio.

- vLLM: `mr_ray.labeler.label.label_pairs`, wall time end to end, *including*
  the engine start (conservative for vLLM).
- transformers (the peer): the full prompts, batched and left-padded, one
  forward pass per batch, grade-token logits at the last position; model
  load excluded (generous to the peer).
- transformers + prefix reuse (for reference): our `PrefixScorer`, the
  guideline computed once per batch and shared through the KV cache.

    python bench/judge_throughput.py --pairs 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mr_ray.config import JudgeEngineConfig, SampleConfig
from mr_ray.data.sample import generate_sample
from mr_ray.labeler.finetune import PrefixScorer
from mr_ray.labeler.label import label_pairs, pair_texts, render_prompts
from mr_ray.labeler.model import base_model_folder
from mr_ray.labeler.prompt import chat_frame, grade_token_ids


def transformers_plain(model, tokenizer, prompts: list[str], batch_size: int) -> np.ndarray:
    ids = grade_token_ids(tokenizer)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            out.append(model(**batch).logits[:, -1, ids].numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers batch size")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "mr-ray-bench")
    args = parser.parse_args()

    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    model_path = base_model_folder(None, args.work_dir)
    sample = generate_sample(SampleConfig())
    pairs = sample["pool"].head(args.pairs)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    frame = chat_frame(tokenizer)
    prompts, _ = render_prompts(pair_texts(pairs, sample["queries"], sample["products"]), frame)
    texts = list(prompts["prompt"])
    user_turns = [t[len(frame[0]) : len(t) - len(frame[1])] for t in texts]
    tokens = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    prefix_tokens = len(tokenizer(frame[0], add_special_tokens=False).input_ids)
    print(f"{len(texts)} prompts, mean {np.mean(tokens):.0f} tokens, of which {prefix_tokens} shared guideline prefix")

    shard_dir = args.work_dir / f"throughput-shards-{time.time_ns()}"
    started = time.perf_counter()
    judged, bad = label_pairs(pairs, sample["queries"], sample["products"], model_path, JudgeEngineConfig(), shard_dir, shard_rows=128, log=lambda *_: None)
    vllm_s = time.perf_counter() - started
    assert len(judged) == len(texts) and bad.empty

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    started = time.perf_counter()
    plain = transformers_plain(model, tokenizer, texts, args.batch_size)
    plain_s = time.perf_counter() - started
    scorer = PrefixScorer(model, tokenizer, frame)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(user_turns), args.batch_size):
            scorer.grade_logits(user_turns[start : start + args.batch_size])
    prefix_s = time.perf_counter() - started

    rate = {name: len(texts) / seconds for name, seconds in (("vllm", vllm_s), ("plain", plain_s), ("prefix", prefix_s))}
    aligned = prompts[["query_id", "product_id"]].merge(judged, on=["query_id", "product_id"], how="left")
    agree = float((plain.argmax(axis=1) == aligned["grade"].to_numpy()).mean())
    print(f"Ray Data + vLLM (incl. engine start): {rate['vllm']:7.2f} pairs/s ({vllm_s:.1f} s)")
    print(f"transformers batched forward (peer):  {rate['plain']:7.2f} pairs/s ({plain_s:.1f} s, batch {args.batch_size})")
    print(f"transformers + shared-prefix KV:      {rate['prefix']:7.2f} pairs/s ({prefix_s:.1f} s)")
    print(f"grade agreement vLLM vs transformers: {agree:.3f}")
    print(f"RATIO vLLM / transformers = {rate['vllm'] / rate['plain']:.2f}x (target >= 3x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
