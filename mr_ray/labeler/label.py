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
from mr_ray.labeler.judge import judge_of_model
from mr_ray.labeler.prompt import (
    grades_from_probabilities,
    normalise_logprobs,
    pair_texts,
)
from mr_ray.metrics import judge_metrics
from mr_ray.schema import DataError

LABEL_COLUMNS = ["query_id", "product_id", "variant", "lp0", "lp1", "lp2", "error"]


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


def evaluate_judge(model: Path, prepared: Path, split: str, engine, shard_dir: Path, max_pairs: int | None = None, seed: int = 0, log=print) -> dict:
    """Label the `split` queries' human-judged pairs with the judge in `model` (Ray Data + vLLM) and score it
    against the human grades (with rating_mean when the table has it) and, on the sample catalog, against gold."""

    def table(name: str) -> pd.DataFrame | None:
        return pq.read_table(prepared / name).to_pandas() if (prepared / name).exists() else None

    queries, products, judgments = table("queries"), table("products"), table("judgments")
    if queries is None or products is None or judgments is None:
        raise DataError("needs queries/, products/ and judgments/ (a prepare or `mr-ray data import` output)", file=str(prepared))
    if "split" not in queries or not (queries["split"] == split).any():
        raise DataError(f"no queries of split {split!r}", file=str(prepared / "queries"), field="split")
    human = judgments[(judgments["source"] == "human") & judgments["query_id"].isin(queries.loc[queries["split"] == split, "query_id"])]
    if human.empty:
        raise DataError(f"no human judgments on split {split!r} queries", file=str(prepared / "judgments"))
    if max_pairs is not None and len(human) > max_pairs:
        human = human.sample(n=max_pairs, random_state=seed)
    judged, bad = label_pairs(human[["query_id", "product_id"]], queries, products, model, engine, shard_dir, log=log)
    merged = human.merge(judged[["query_id", "product_id", "p0", "p1", "p2"]], on=["query_id", "product_id"])
    result = {"model": str(model), "split": split, "unjudged": int(len(human) - len(merged)),
              "human": judge_metrics(merged["grade"], merged[["p0", "p1", "p2"]].to_numpy(), merged["rating_mean"] if "rating_mean" in merged else None)}
    gold = table("gold")
    if gold is not None:
        with_gold = merged.merge(gold[["query_id", "product_id", "grade"]].rename(columns={"grade": "gold"}), on=["query_id", "product_id"])
        result["gold"] = judge_metrics(with_gold["gold"], with_gold[["p0", "p1", "p2"]].to_numpy())
        result["gold"]["human_accuracy"] = float((with_gold["grade"].astype(int) == with_gold["gold"].astype(int)).mean())
    return result
