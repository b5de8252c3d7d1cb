"""Judge labeling throughput: Ray Data + vLLM (`ray.data.llm`) against plain transformers batched forward passes.

For each judge kind (`--kinds`), the same model, the same pairs (pool pairs of
the embedded sample catalog), same machine, one run; printed as pairs per
second and a ratio.

Causal LM (the packaged SmolLM2-135M-Instruct, dequantized), guideline-prefixed prompts:

- vLLM: `mr_ray.labeler.label.label_pairs`, wall time end to end, *including*
  the engine start (conservative for vLLM).
- transformers (the peer): the full prompts, batched and left-padded, one
  forward pass per batch, grade-token logits at the last position; model
  load excluded (generous to the peer).
- transformers + prefix reuse (for reference): our `PrefixScorer`, the
  guideline computed once per batch and shared through the KV cache.

Cross-encoder (MiniLM-L6 with a 3-label head; `--cross-encoder` a fine-tuned folder, else a seeded fresh head:
the weights do not change the cost), the (query, product text) pair at the judge's sequence length, four
figures on the same pairs, each engine started once and its start reported apart from its pairs/s:
- transformers (the peer): `cross_encoder.probabilities_transformers`, padded batches of
  `--cross-encoder-batch-size`, torch's default threads; timed before and after the vLLM runs (the
  machine is shared; ratios are against the mean of the two);
- vLLM direct: `LLM.classify` on the engine rows (token ids + where token type 1 starts), no Ray, in a
  child process with the library's CPU engine environment (`engine.cpu_engine_env`);
- Ray Data + vLLM: `cross_encoder.classify_processor` (what `label_pairs` runs): start-up = time to the
  first finished batch, steady state = the pairs after it over the time after it, and end to end.

    python bench/judge_throughput.py --pairs 512 --cross-encoder-pairs 2048
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mr_ray.config import JudgeEngineConfig, SampleConfig
from mr_ray.data.sample import generate_sample
from mr_ray.labeler import cross_encoder
from mr_ray.labeler.engine import cpu_engine_env
from mr_ray.labeler.finetune import PrefixScorer
from mr_ray.labeler.label import label_pairs
from mr_ray.labeler.model import base_model_folder
from mr_ray.labeler.prompt import (
    chat_frame,
    grade_token_ids,
    pair_texts,
    render_prompts,
)


def transformers_plain(model, tokenizer, prompts: list[str], batch_size: int) -> np.ndarray:
    ids = grade_token_ids(tokenizer)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            out.append(model(**batch).logits[:, -1, ids].numpy())
    return np.concatenate(out)


def cross_encoder_folder(args) -> Path:
    """The cross-encoder to time: `--cross-encoder`, or MiniLM with a seeded 3-label head saved once."""
    from transformers import AutoTokenizer

    if args.cross_encoder is not None:
        return args.cross_encoder
    folder = args.work_dir / f"cross-encoder-{args.max_seq_length}"
    if not (folder / "config.json").exists():
        base = cross_encoder.base_model_folder(None)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        tokenizer.model_max_length = args.max_seq_length
        cross_encoder.load_classifier(base, seed=0).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def transformers_rate(model_path: Path, strings, batch_size: int) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    probabilities = cross_encoder.probabilities_transformers(model_path, strings, batch_size=batch_size)
    return len(strings) / (time.perf_counter() - started), probabilities


def vllm_direct(model_path: str, rows, engine: JudgeEngineConfig, results) -> None:
    """Child process: the library's CPU engine environment, `LLM.classify` on every row; (start s, rows/s, probabilities)."""
    import os

    os.environ.update(cpu_engine_env(engine))
    torch.set_num_threads(engine.cpu_threads)  # torch is loaded already here; the Ray actor gets OMP_NUM_THREADS before it starts
    from vllm import LLM
    from vllm.inputs import TokensPrompt
    from vllm.pooling_params import PoolingParams

    started = time.perf_counter()
    llm = LLM(model=model_path, runner="pooling", enforce_eager=True, dtype=engine.dtype, max_model_len=engine.max_model_len, max_num_seqs=engine.max_num_seqs)
    start_s = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in rows["input_ids"]]
    params = [PoolingParams(extra_kwargs={"compressed_token_type_ids": int(start)}) for start in rows["type_start"]]
    started = time.perf_counter()
    outputs = llm.classify(prompts, pooling_params=params, use_tqdm=False)
    results.put((start_s, len(prompts) / (time.perf_counter() - started), np.array([o.outputs.probs for o in outputs])))


def ray_data_vllm(model_path: Path, rows, engine: JudgeEngineConfig) -> tuple[float, float, float, np.ndarray]:
    """`classify_processor` over the rows: (start s = first batch back, steady rows/s after it, rows/s end to end, p in row order)."""
    import ray

    started = time.perf_counter()
    ds = ray.data.from_pandas([rows.iloc[i : i + engine.batch_size] for i in range(0, len(rows), engine.batch_size)])
    batches, first = [], None
    for batch in cross_encoder.classify_processor(model_path, engine)(ds).iter_batches(batch_size=engine.batch_size, batch_format="pandas"):
        batches.append(batch)
        first = first or (time.perf_counter() - started, len(batch))
    total_s = time.perf_counter() - started
    out = rows[["query_id", "product_id"]].merge(pd.concat(batches), on=["query_id", "product_id"], how="left")
    assert (out["error"] == "").all(), out["error"].unique()[:3]
    return first[0], (len(rows) - first[1]) / (total_s - first[0]), len(rows) / total_s, np.exp(out[["lp0", "lp1", "lp2"]].to_numpy(dtype=float))


def bench_cross_encoder(args, sample) -> None:
    import multiprocessing

    model_path = cross_encoder_folder(args)
    pairs = sample["pool"].head(args.cross_encoder_pairs)
    strings, _ = cross_encoder.pair_strings(pair_texts(pairs, sample["queries"], sample["products"]))
    rows = cross_encoder.engine_rows(strings.assign(variant=0), model_path)
    engine = cross_encoder.engine_config(model_path, JudgeEngineConfig())
    load = {}
    print(f"cross-encoder {model_path.name}: {len(strings)} pairs, {np.mean([len(ids) for ids in rows['input_ids']]):.1f} tokens on average (max {engine.max_model_len}); "
          f"vLLM {engine.dtype}, {engine.cpu_threads} threads, transformers {torch.get_num_threads()} threads")

    load["transformers, before"] = os.getloadavg()[0]
    plain_before, reference = transformers_rate(model_path, strings, args.cross_encoder_batch_size)
    results = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=vllm_direct, args=(str(model_path), rows, engine, results))
    load["vLLM direct"] = os.getloadavg()[0]
    child.start()
    direct_start_s, direct_rate, direct_p = results.get()
    child.join()
    load["Ray Data + vLLM"] = os.getloadavg()[0]
    ray_start_s, ray_steady, ray_total, ray_p = ray_data_vllm(model_path, rows, engine)
    load["transformers, after"] = os.getloadavg()[0]
    plain_after, _ = transformers_rate(model_path, strings, args.cross_encoder_batch_size)
    plain = (plain_before + plain_after) / 2

    print(f"transformers batched forward (peer):     {plain:7.2f} pairs/s (before {plain_before:.2f}, after {plain_after:.2f}; batch {args.cross_encoder_batch_size}, incl. model load)")
    print(f"vLLM direct LLM.classify, steady state:  {direct_rate:7.2f} pairs/s (engine start {direct_start_s:.1f} s)")
    print(f"Ray Data + vLLM classify, steady state:  {ray_steady:7.2f} pairs/s (after the first batch, {ray_start_s:.1f} s in)")
    print(f"Ray Data + vLLM classify, end to end:    {ray_total:7.2f} pairs/s (incl. start-up)")
    print(f"max |p vLLM - p transformers|: direct {np.abs(direct_p - reference).max():.2e}, Ray Data {np.abs(ray_p - reference).max():.2e}")
    print("load average (1 min) at the start of each: " + ", ".join(f"{name} {value:.1f}" for name, value in load.items()))
    for name, rate in (("vLLM direct", direct_rate), ("Ray Data + vLLM steady", ray_steady), ("Ray Data + vLLM end to end", ray_total)):
        print(f"RATIO cross-encoder {name} / transformers = {rate / plain:.2f}x (target >= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="causal_lm,cross_encoder")
    parser.add_argument("--pairs", type=int, default=512, help="causal LM pairs")
    parser.add_argument("--batch-size", type=int, default=16, help="causal LM transformers batch size")
    parser.add_argument("--cross-encoder", type=Path, default=None, help="a fine-tuned cross-encoder folder")
    parser.add_argument("--cross-encoder-pairs", type=int, default=2048)
    parser.add_argument("--cross-encoder-batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=64, help="cross-encoder pair tokens (when no --cross-encoder)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "mr-ray-bench")
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    sample = generate_sample(SampleConfig())
    kinds = args.kinds.split(",")
    if "causal_lm" in kinds:
        bench_causal_lm(args, sample)
    if "cross_encoder" in kinds:
        bench_cross_encoder(args, sample)
    ray.shutdown()


def bench_causal_lm(args, sample) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = base_model_folder(None, args.work_dir)
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


if __name__ == "__main__":
    main()
