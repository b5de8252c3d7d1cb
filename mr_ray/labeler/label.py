"""Batch labeling with the judge: Ray Data + vLLM (`ray.data.llm`), resumable by shard.

One labeling path for both judge kinds (`mr_ray.labeler.judge`): the judge
turns each pair into an engine row and gives the processor that scores it;
everything else here (shards, resume, averaging variants, the judgment table)
is shared. For the causal LM each pair becomes one guideline-prefixed prompt;
vLLM runs one decoding step and returns the log-probabilities of exactly the
three grade tokens (`SamplingParams.logprob_token_ids`), which
`prompt.normalise_logprobs` turns into a grade, per-grade probabilities and a
confidence. The guideline is the same token prefix for every prompt, so vLLM's
prefix cache computes it once. The cross-encoder's rows are token-id pairs
scored by vLLM's pooling runner (classify), whose probabilities enter as logs.

Resumability: pairs are ordered and cut into shards of `shard_rows`; a shard
is written (temp file, then rename) as soon as all its rows came back, and a
rerun skips the shards already on disk. Malformed pairs (unknown ids, blank
text) and engine failures are reported per row and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mr_ray.config import JudgeEngineConfig
from mr_ray.labeler.prompt import (
    PRODUCT_FIELDS,
    PromptError,
    grades_from_probabilities,
    normalise_logprobs,
    render_pair,
    render_prompt,
)

# Prompt variants: which product fields the judge sees. Variant 0 is the
# prompt the judge was fine-tuned on; the audit's re-judge averages several.
FIELD_VARIANTS: tuple[tuple[str, ...], ...] = (
    PRODUCT_FIELDS,
    ("title",),
    ("title", "category", "brand", "color"),
    ("title", "description"),
)
ALL_FIELDS = ("title", "brand", "color", "category", "description")
LABEL_COLUMNS = ["query_id", "product_id", "variant", "lp0", "lp1", "lp2", "error"]


def cpu_engine_env(engine: JudgeEngineConfig) -> dict[str, str]:
    """Environment of a CPU engine. vLLM's default on CPU runs the model in a worker process whose
    engine core busy-waits for each step's reply, and binds the worker's threads to all cores but one
    (kept for that spinning core): on 2 cores, one computing thread. In-process, the model gets
    `cpu_threads` threads, one process fewer starts, and nothing spins (bench/judge_throughput.py)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(engine.cpu_threads),
    }


def engine_processor(model_path: str | Path, engine: JudgeEngineConfig, preprocess, postprocess, task_type: str = "generate"):
    """A `ray.data.llm` vLLM processor over rows that already carry their prompt (text or token ids)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    on_gpu = engine.num_gpus_per_replica > 0
    bundle = {"GPU": engine.num_gpus_per_replica, "CPU": 1} if on_gpu else {"CPU": 1}
    config = vLLMEngineProcessorConfig(
        model_source=str(model_path),
        task_type=task_type,
        engine_kwargs={
            "enforce_eager": not on_gpu,  # CPU: no graph capture
            "enable_prefix_caching": task_type == "generate",  # the guideline prefix is shared by every prompt
            "max_model_len": engine.max_model_len,
            "max_num_seqs": engine.max_num_seqs,
            "tensor_parallel_size": engine.tensor_parallel_size,
            "dtype": engine.dtype,
        },
        placement_group_config={"bundles": [bundle] * engine.tensor_parallel_size},
        runtime_env={"env_vars": {} if on_gpu else cpu_engine_env(engine)},
        batch_size=engine.batch_size,
        concurrency=engine.concurrency,
        should_continue_on_error=True,  # a failing row is reported, not fatal
        log_engine_metrics=False,
        # Prompts arrive rendered; vLLM tokenizes inside the engine.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def judge_processor(model_path: str | Path, engine: JudgeEngineConfig, grade_ids: list[int]):
    """Processor: rows (query_id, product_id, variant, prompt) -> rows with lp0..lp2 (or an error)."""
    ids = list(grade_ids)

    def preprocess(row: dict) -> dict:
        return {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "variant": row["variant"],
            "prompt": row["prompt"],
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": ids},
        }

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or ""
        values = [np.nan] * len(ids)
        if not error:
            step = (row.get("logprobs") or [{}])[0] or {}
            found = {int(token): info for token, info in step.items() if info is not None}
            missing = [token for token in ids if token not in found]
            if missing:
                error = f"engine returned no logprob for grade token(s) {missing}"
            else:
                values = [float(found[token]["logprob"]) for token in ids]
        return {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "variant": int(row["variant"]),
            "lp0": values[0],
            "lp1": values[1],
            "lp2": values[2],
            "error": error,
        }

    return engine_processor(model_path, engine, preprocess, postprocess)


def pair_texts(pairs: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """Pairs joined with the query text and the product fields (left join: unknown ids stay, as nulls)."""
    fields = [c for c in ALL_FIELDS if c in products.columns]
    out = pairs[["query_id", "product_id"]].astype(str)
    out = out.merge(queries[["query_id", "text"]].rename(columns={"text": "query"}), on="query_id", how="left")
    return out.merge(products[["product_id", *fields]], on="product_id", how="left")


def render_prompts(pairs: pd.DataFrame, frame: tuple[str, str], variants: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompt rows (query_id, product_id, variant, prompt) and the malformed pairs (with the reason)."""
    rows, bad = [], []
    fields = [c for c in ALL_FIELDS if c in pairs.columns]
    for record in pairs.to_dict("records"):
        product = {f: record[f] for f in fields}
        for variant in range(variants):
            shown = {f: product.get(f) for f in FIELD_VARIANTS[variant % len(FIELD_VARIANTS)]}
            try:
                user = render_pair(record["query"], shown)
            except PromptError as err:
                bad.append({"query_id": record["query_id"], "product_id": record["product_id"], "reason": str(err)})
                break
            rows.append(
                {"query_id": record["query_id"], "product_id": record["product_id"], "variant": variant, "prompt": render_prompt(frame, user)}
            )
    prompts = pd.DataFrame(rows, columns=["query_id", "product_id", "variant", "prompt"])
    return prompts, pd.DataFrame(bad, columns=["query_id", "product_id", "reason"]).drop_duplicates()


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:6]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _prepare_shard_dir(shard_dir: Path, prompts: pd.DataFrame, model_path: str | Path, shard_rows: int) -> None:
    """Shards are only reused for the same engine rows, model and shard size; anything else starts clean."""
    digest = hashlib.sha256()
    digest.update(f"{model_path}\x1f{shard_rows}".encode())
    for column in sorted(c for c in prompts.columns if c != "shard"):
        digest.update(column.encode() + b"\x1e" + "\x1f".join(map(str, prompts[column])).encode())
    identity = {"prompts_hash": digest.hexdigest()[:16], "rows": int(len(prompts))}
    marker = shard_dir / "input.json"
    if shard_dir.exists():
        try:
            same = json.loads(marker.read_text()) == identity
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            for stale in shard_dir.glob("*.parquet"):
                stale.unlink()
    shard_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity))


def run_judge(
    prompts: pd.DataFrame, model_path: str | Path, engine: JudgeEngineConfig, shard_dir: Path, shard_rows: int, make_processor, log=print
) -> pd.DataFrame:
    """Per-grade log-probabilities (lp0..lp2) for every engine row, through Ray Data + vLLM, resumable by shard.

    `make_processor()` builds the judge's `ray.data.llm` processor (only when some shard is still to do)."""
    import ray

    shard_dir = Path(shard_dir)
    prompts = prompts.sort_values(["query_id", "product_id", "variant"], kind="stable").reset_index(drop=True)
    prompts["shard"] = np.arange(len(prompts)) // shard_rows
    _prepare_shard_dir(shard_dir, prompts, model_path, shard_rows)
    done = {int(p.stem.split("-")[1]) for p in shard_dir.glob("shard-*.parquet")}
    todo = prompts[~prompts["shard"].isin(done)]
    log(f"[label] {len(prompts)} prompts in {prompts['shard'].nunique()} shards; {len(done)} already done")
    if len(todo):
        shard_of = dict(zip(zip(todo["query_id"], todo["product_id"], todo["variant"]), todo["shard"]))
        expected = todo.groupby("shard").size().to_dict()
        pending: dict[int, list[dict]] = defaultdict(list)
        processor = make_processor()
        rows = todo.drop(columns=["shard"])
        # One block per engine batch, so finished batches stream back (and shards get written) early.
        ds = ray.data.from_pandas([rows.iloc[i : i + engine.batch_size] for i in range(0, len(rows), engine.batch_size)])
        for batch in processor(ds).iter_batches(batch_size=engine.batch_size, batch_format="pandas"):
            for row in batch[LABEL_COLUMNS].to_dict("records"):
                shard = int(shard_of[(row["query_id"], row["product_id"], int(row["variant"]))])
                pending[shard].append(row)
                if len(pending[shard]) == expected[shard]:
                    table = pa.Table.from_pandas(pd.DataFrame(pending.pop(shard), columns=LABEL_COLUMNS), preserve_index=False)
                    _write_atomic(table, shard_dir / f"shard-{shard:05d}.parquet")
    return pq.read_table(sorted(shard_dir.glob("shard-*.parquet"))).to_pandas()


def judgments_from_logprobs(scored: pd.DataFrame, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Average the variants' probabilities per pair -> judgments (grade, p0..p2, confidence) and failed rows."""
    failed = scored[scored["error"] != ""][["query_id", "product_id", "error"]].rename(columns={"error": "reason"})
    ok = scored[scored["error"] == ""]
    ok = ok[~ok.set_index(["query_id", "product_id"]).index.isin(failed.set_index(["query_id", "product_id"]).index)]
    if ok.empty:
        return pd.DataFrame(columns=["query_id", "product_id", "grade", "source", "confidence", "p0", "p1", "p2", "grade_mass"]), failed
    probabilities, mass = normalise_logprobs(ok[["lp0", "lp1", "lp2"]].to_numpy())
    per_row = pd.DataFrame(probabilities, columns=["p0", "p1", "p2"], index=ok.index).assign(
        query_id=ok["query_id"], product_id=ok["product_id"], grade_mass=mass
    )
    mean = per_row.groupby(["query_id", "product_id"], sort=True)[["p0", "p1", "p2", "grade_mass"]].mean().reset_index()
    grades, confidence = grades_from_probabilities(mean[["p0", "p1", "p2"]].to_numpy())
    judgments = mean.assign(grade=grades, source=source, confidence=confidence)
    for column in ("p0", "p1", "p2", "grade_mass"):
        judgments[column] = judgments[column].astype(np.float32)
    return judgments[["query_id", "product_id", "grade", "source", "confidence", "p0", "p1", "p2", "grade_mass"]], failed


def label_pairs(
    pairs: pd.DataFrame,
    queries: pd.DataFrame,
    products: pd.DataFrame,
    model_path: str | Path,
    engine: JudgeEngineConfig,
    shard_dir: Path,
    shard_rows: int = 128,
    variants: int = 1,
    source: str = "llm",
    log=print,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Judge (query_id, product_id) pairs with the judge in `model_path` (either kind, told by its folder):
    judgments with grade, p0..p2, confidence; and the malformed/failed pairs."""
    from mr_ray.labeler.judge import judge_of_model

    judge = judge_of_model(model_path)
    prompts, malformed = judge.engine_rows(pair_texts(pairs, queries, products), model_path, variants)
    if len(malformed):
        log(f"[label] skipped {len(malformed)} malformed pair(s), e.g. {malformed.iloc[0].to_dict()}")
    if prompts.empty:
        empty, _ = judgments_from_logprobs(pd.DataFrame(columns=LABEL_COLUMNS), source)
        return empty, malformed
    scored = run_judge(prompts, model_path, engine, shard_dir, shard_rows, lambda: judge.processor(model_path, engine), log=log)
    judgments, failed = judgments_from_logprobs(scored, source)
    if len(failed):
        log(f"[label] {len(failed)} engine failure row(s), e.g. {failed.iloc[0].to_dict()}")
    return judgments, pd.concat([malformed, failed], ignore_index=True)
