"""The judge's pipeline stages: judge_finetune, label, audit, synthesize.

Plumbing only: read the upstream Parquet folders, call the labeler functions,
write Parquet + the model folder into `ctx.out`, return metrics. Work that
must survive a killed run (the converted base model, Ray Train checkpoints,
labeling shards) lives under `<run_dir>/cache/`, keyed so a changed input
never reuses it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mr_ray.config import JudgeFinetuneConfig, section_hash
from mr_ray.labeler import audit, cross_encoder, finetune, label, synthesize
from mr_ray.labeler.calibration import adjusted, fit_grade_offsets
from mr_ray.labeler.judge import judge_of_kind
from mr_ray.labeler.model import base_model_folder
from mr_ray.labeler.prompt import grades_from_probabilities, within_one_accuracy
from mr_ray.metrics import judge_metrics
from mr_ray.pipeline import Limit, StageContext, note_limit, read_manifest
from mr_ray.schema import DataError, conform


def _read(folder: Path) -> pd.DataFrame | None:
    return pq.read_table(folder).to_pandas() if Path(folder).exists() else None


def _write(frame: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / "part-00000.parquet")


def _cache(ctx: StageContext, name: str) -> Path:
    """A folder under <run_dir>/cache that outlives a killed stage; keyed by the content of the judge the stage was given."""
    judges = [read_manifest(folder)["output_hash"] for folder in ctx.inputs_of("judge")]
    return ctx.run_dir / "cache" / "-".join([name, *judges])


def _judge_model(ctx: StageContext) -> Path:
    return ctx.input("judge_finetune") / "model"


def _accuracy(judged: pd.DataFrame, truth: pd.DataFrame, prefix: str) -> dict:
    merged = judged.merge(truth[["query_id", "product_id", "grade"]].rename(columns={"grade": "truth"}), on=["query_id", "product_id"])
    if merged.empty:
        return {}
    return {
        f"{prefix}_pairs": int(len(merged)),
        f"{prefix}_accuracy": round(float((merged["grade"].astype(int) == merged["truth"].astype(int)).mean()), 4),
        f"{prefix}_within_one": round(within_one_accuracy(merged["grade"], merged["truth"]), 4),
    }


def calibration_split(holdout_labels: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Half the held-out queries fit the decision offsets, the other half report the judge; with one query, it reports."""
    if holdout_labels["query_id"].nunique() < 2:
        return holdout_labels, None
    return finetune.split_holdout(holdout_labels, 0.5, seed)


def fit_decision(judge, model: Path, calibration: pd.DataFrame, cfg: JudgeFinetuneConfig) -> dict:
    """Fit per-grade logit offsets on `calibration` (human-labelled pairs of held-out queries) and fold them into
    the classifier at `model` (`mr_ray.labeler.calibration`); returns the offsets and the pairs' metrics before and after."""
    started = time.perf_counter()
    truth = calibration["grade"].to_numpy().astype(int)
    probabilities = judge.probabilities(model, calibration)
    offsets = fit_grade_offsets(probabilities, truth, cfg.min_grade_recall)
    cross_encoder.fold_grade_offsets(model, offsets)
    before, after = judge_metrics(truth, probabilities), judge_metrics(truth, adjusted(probabilities, offsets))
    return {
        "offsets": [round(float(b), 2) for b in offsets],
        "calibration_pairs": int(len(calibration)),
        "min_grade_recall": cfg.min_grade_recall,
        **{f"{name}_{key}": before_after[key] for name, before_after in (("before", before), ("after", after)) for key in ("accuracy", "macro_f1", "recall")},
        "fit_s": round(time.perf_counter() - started, 1),
    }


def judge_finetune_stage(ctx: StageContext) -> dict:
    """Fine-tune the judge (`judge.kind`) on the train split's human labels, score the held-out queries' labels."""
    cfg = ctx.config.judge
    judge = judge_of_kind(cfg.kind)
    prep = ctx.input("prepare")
    base = judge.base_model(cfg.model, ctx.run_dir / "cache")
    queries, products, judgments = (_read(prep / name) for name in ("queries", "products", "judgments"))
    human = judgments[judgments["source"] == "human"]
    if "split" in queries and queries["split"].notna().any():
        human = human[human["query_id"].isin(queries.loc[queries["split"] == "train", "query_id"])]
    if human.empty:
        raise DataError("no human labels on train-split queries to fine-tune the judge on", file=str(prep / "judgments"))
    train_labels, holdout_labels = finetune.split_holdout(human, cfg.finetune.holdout_fraction, cfg.finetune.seed)
    available = judge.examples(train_labels, queries, products, cfg.finetune)
    examples = finetune.balanced_subsample(available, cfg.finetune.max_examples, cfg.finetune.seed)
    note_limit(Limit.of(ctx.config, "judge.finetune.max_examples"), len(examples), len(available), "training labels")
    storage = _cache(ctx, f"judge-train-{cfg.kind}-{section_hash(cfg.finetune)}-{section_hash({'model': str(base), 'pairs': sorted(examples['query_id'] + '|' + examples['product_id'])})}")
    # Trained once per (base model files, training examples, fine-tune settings); another run reuses it.
    metrics = finetune.cached_finetune(judge, examples, base, cfg.finetune, storage, ctx.out / "model")

    if cfg.finetune.grade_offsets:
        holdout_labels, calibration_labels = calibration_split(holdout_labels, cfg.finetune.seed)
        if calibration_labels is None:
            metrics["grade_offsets_skipped"] = "one held-out query, kept for the report"
        else:
            metrics["grade_offsets"] = fit_decision(judge, ctx.out / "model", judge.examples(calibration_labels, queries, products, cfg.finetune), cfg.finetune)
    holdout = judge.examples(holdout_labels, queries, products, cfg.finetune)
    if cfg.finetune.max_holdout is not None and len(holdout) > cfg.finetune.max_holdout:
        note_limit(Limit.of(ctx.config, "judge.finetune.max_holdout"), cfg.finetune.max_holdout, len(holdout), "held-out pairs")
        holdout = holdout.sample(n=cfg.finetune.max_holdout, random_state=cfg.finetune.seed)
    started = time.perf_counter()
    probabilities = judge.probabilities(ctx.out / "model", holdout)
    predicted, _ = grades_from_probabilities(probabilities)
    truth = holdout["grade"].to_numpy().astype(int)
    majority = int(train_labels["grade"].mode()[0])  # the most common human grade in the training labels
    evaluation = judge_metrics(truth, probabilities)
    gold = _read(prep / "gold")
    if gold is not None:  # the sample catalog: the same held-out pairs against their true grades
        with_gold = holdout[["query_id", "product_id"]].assign(row=np.arange(len(holdout))).merge(gold[["query_id", "product_id", "grade"]], on=["query_id", "product_id"])
        if len(with_gold):
            rows = with_gold["row"].to_numpy()
            evaluation["gold"] = judge_metrics(with_gold["grade"], probabilities[rows])
            evaluation["gold"]["human_accuracy"] = float((truth[rows] == with_gold["grade"].to_numpy()).mean())
    metrics.update(
        {
            "kind": cfg.kind,
            "holdout_eval": evaluation,
            "base_model": str(base),
            "train_labels_available": int(len(train_labels)),
            "holdout_pairs": int(len(holdout)),
            "holdout_accuracy": round(float((predicted == truth).mean()), 4),
            "holdout_within_one": round(within_one_accuracy(predicted, truth), 4),
            "holdout_majority_accuracy": round(float((truth == majority).mean()), 4),
            "holdout_predicted_counts": {int(g): int(n) for g, n in zip(*np.unique(predicted, return_counts=True))},
            "holdout_score_s": round(time.perf_counter() - started, 1),
        }
    )
    return metrics


def _pairs_to_label(ctx: StageContext) -> pd.DataFrame:
    prep, cfg = ctx.input("prepare"), ctx.config.judge.label
    pool = _read(prep / "pool")
    pairs = pool if pool is not None else _read(prep / "judgments")[["query_id", "product_id"]]
    pairs = pairs[["query_id", "product_id"]].astype(str).drop_duplicates()
    if cfg.max_queries is not None:
        query_ids = np.array(sorted(pairs["query_id"].unique()))
        chosen = np.random.default_rng(cfg.seed).choice(query_ids, size=min(cfg.max_queries, len(query_ids)), replace=False)
        note_limit(Limit.of(ctx.config, "judge.label.max_queries"), len(chosen), len(query_ids), "queries")
        pairs = pairs[pairs["query_id"].isin(set(chosen))]
    if cfg.pairs is not None:
        extra = pq.read_table(cfg.pairs).to_pandas()
        missing = [c for c in ("query_id", "product_id") if c not in extra.columns]
        if missing:
            raise DataError(f"pairs to label need columns query_id, product_id; found {list(extra.columns)}", file=cfg.pairs, field=missing[0])
        pairs = pd.concat([pairs, extra[["query_id", "product_id"]].astype(str)]).drop_duplicates()
    return pairs.reset_index(drop=True)


def label_stage(ctx: StageContext) -> dict:
    """Label the pool pairs (and any configured pairs) with the fine-tuned judge: source=llm."""
    cfg, prep = ctx.config.judge, ctx.input("prepare")
    pairs = _pairs_to_label(ctx)
    started = time.perf_counter()
    judged, malformed = label.label_pairs(
        pairs, _read(prep / "queries"), _read(prep / "products"), _judge_model(ctx), cfg.engine,
        _cache(ctx, "label-shards"), cfg.label.shard_rows,
    )
    wall = time.perf_counter() - started
    conform(pa.Table.from_pandas(judged, preserve_index=False), "judgments", "label output")
    _write(judged, ctx.out / "judgments")
    _write(malformed, ctx.out / "malformed")
    metrics = {
        "pairs": int(len(pairs)),
        "labelled": int(len(judged)),
        "malformed_or_failed": int(len(malformed)),
        "label_wall_s": round(wall, 1),
        "pairs_per_s": round(len(judged) / wall, 2) if wall else None,
        "grade_counts": {int(g): int(n) for g, n in judged["grade"].value_counts().sort_index().items()},
        "mean_grade_mass": round(float(judged["grade_mass"].mean()), 4) if len(judged) else None,
    }
    gold = _read(prep / "gold")
    if gold is not None:
        metrics.update(_accuracy(judged, gold, "gold"))
    human = _read(prep / "judgments")
    metrics.update(_accuracy(judged, human[human["source"] == "human"], "human"))
    return metrics


def audit_stage(ctx: StageContext) -> dict:
    """Flag LLM labels that engagement contradicts, re-judge them, write source=audited."""
    import ray

    cfg, prep = ctx.config.judge, ctx.input("prepare")
    judged = _read(ctx.input("label") / "judgments")
    # The graph runs the audit only when prepare wrote an engagement table.
    engagement = audit.pair_engagement(ray.data.from_pandas(_read(prep / "engagement"))).to_pandas()
    joined = audit.join_engagement(ray.data.from_pandas(judged), engagement)
    rules = cfg.audit.rules
    flagged_all = joined.map_batches(audit.flag_contradictions, fn_kwargs={"rules": rules}, batch_format="pandas").to_pandas()
    flagged = flagged_all[flagged_all["flagged"]]

    stronger = Path(cfg.audit.rejudge_model) if cfg.audit.rejudge_model else _judge_model(ctx)
    rejudged, failed = label.label_pairs(
        flagged[["query_id", "product_id"]], _read(prep / "queries"), _read(prep / "products"), stronger, cfg.engine,
        _cache(ctx, "audit-shards"), cfg.label.shard_rows, variants=cfg.audit.prompt_variants, source="audited",
    )
    rejudged = rejudged.merge(flagged[["query_id", "product_id", *audit.COUNTS, "reasons"]], on=["query_id", "product_id"])
    ensemble_grades = rejudged["grade"].to_numpy()
    human = _read(prep / "judgments")
    human = human[human["source"] == "human"].merge(engagement, on=["query_id", "product_id"])
    rates = audit.engagement_rates(human)
    if cfg.audit.use_engagement_evidence and len(rejudged):
        posterior = audit.fuse_with_engagement(rejudged[["p0", "p1", "p2"]].to_numpy(), audit.engagement_log_likelihood(rejudged, rates))
        grades, confidence = grades_from_probabilities(posterior)
        rejudged[["p0", "p1", "p2"]] = posterior.astype(np.float32)
        rejudged["grade"], rejudged["confidence"] = grades, confidence
    before = flagged[["query_id", "product_id", "grade"]].rename(columns={"grade": "llm_grade"})
    rejudged = rejudged.merge(before, on=["query_id", "product_id"])
    rejudged["changed"] = rejudged["grade"] != rejudged["llm_grade"]
    _write(rejudged, ctx.out / "judgments")
    _write(flagged_all.drop(columns=["p0", "p1", "p2"]), ctx.out / "flags")
    _write(failed, ctx.out / "malformed")

    after = judged.set_index(["query_id", "product_id"])
    after.loc[rejudged.set_index(["query_id", "product_id"]).index, "grade"] = rejudged.set_index(["query_id", "product_id"])["grade"]
    after = after.reset_index()
    metrics = {
        "labelled": int(len(judged)),
        "flagged": int(len(flagged)),
        "flagged_by_rule": {r: int(flagged_all[r].sum()) for r in audit.RULES},
        "rejudged": int(len(rejudged)),
        "changed": int(rejudged["changed"].sum()),
        "rejudge": f"{cfg.audit.prompt_variants} prompt variants of {stronger.name}"
        + (" x engagement likelihood" if cfg.audit.use_engagement_evidence else ""),
        "engagement_rates_from_human": rates.round(4).to_dict(orient="index"),
    }
    truth_name, truth = ("gold", _read(prep / "gold")) if (prep / "gold").exists() else ("human", human)
    error_before, n = audit.error_rate(judged, truth)
    error_after, _ = audit.error_rate(after, truth)
    ensemble_only = judged.set_index(["query_id", "product_id"])
    ensemble_only.loc[rejudged.set_index(["query_id", "product_id"]).index, "grade"] = ensemble_grades
    error_ensemble, _ = audit.error_rate(ensemble_only.reset_index(), truth)
    metrics.update(
        {
            "truth": truth_name,
            "truth_pairs": n,
            "error_rate_before": round(error_before, 4),
            "error_rate_after": round(error_after, 4),
            "error_rate_after_ensemble_only": round(error_ensemble, 4),
            "relative_error_reduction": round(1 - error_after / error_before, 4) if error_before else None,
            "flagged_error_rate_before": round(audit.error_rate(flagged, truth)[0], 4) if len(flagged) else None,
        }
    )
    return metrics


def synthesize_stage(ctx: StageContext) -> dict:
    """Synthetic queries for products without any, written by a causal LM (`judge.synthesize.writer`; the graph
    leaves this stage out without one), graded by the judge: source=synthetic."""
    from transformers import AutoTokenizer

    cfg, prep = ctx.config.judge, ctx.input("prepare")
    scfg = cfg.synthesize
    products, queries = _read(prep / "products"), _read(prep / "queries")
    judged_pairs = pd.concat([t for t in (_read(prep / "judgments"), _read(prep / "pool")) if t is not None])
    chosen, orphans = synthesize.products_without_queries(products, judged_pairs, scfg.max_products, scfg.seed)
    note_limit(Limit.of(ctx.config, "judge.synthesize.max_products"), len(chosen), orphans, "products without queries")
    model = _judge_model(ctx)
    writer = base_model_folder(None if scfg.writer == "packaged" else scfg.writer, ctx.run_dir / "cache")
    prompts = synthesize.writer_prompts(chosen, AutoTokenizer.from_pretrained(str(writer)), scfg.samples_per_product, scfg.seed)
    generated = synthesize.generate_queries(prompts, writer, cfg.engine, scfg)
    kept, counts = synthesize.filter_queries(generated, chosen, set(queries["text"]), scfg)
    kept["query_id"] = [synthesize.synthetic_query_id(t) for t in kept["text"]]
    graded, failed = label.label_pairs(
        kept[["query_id", "product_id"]], kept[["query_id", "text"]], products, model,
        cfg.engine, _cache(ctx, "synthesize-shards"), cfg.label.shard_rows, source="synthetic",
    )
    new_queries, new_judgments = synthesize.as_tables(kept, graded, scfg.min_confidence)
    if len(new_queries):
        conform(pa.Table.from_pandas(new_queries, preserve_index=False), "queries", "synthetic queries")
    _write(new_queries, ctx.out / "queries")
    _write(new_judgments, ctx.out / "judgments")
    _write(generated, ctx.out / "generated")
    return {
        "writer": str(writer),
        "products_without_queries": int(len(chosen)),
        **counts,
        "graded": int(len(graded)),
        "kept_confident": int(len(new_judgments)),
        "grade_counts": synthesize.grade_distribution(new_judgments),
        "examples": new_queries["text"].head(5).tolist(),
    }

