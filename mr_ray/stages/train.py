"""The contrastive stages of the pipeline: Stage 1 (SupCon) and Stage 2 (circle, on judged + mined samples).

Plumbing only: the training set from the inputs the graph gave the stage, the
Ray Train run (`train_encoder`), the model at out/model.
"""

from __future__ import annotations

from pathlib import Path

from mr_ray.pipeline import Limit, StageContext
from mr_ray.retriever.encoder import pretrained_model_path
from mr_ray.retriever.examples import (
    examples_with_augmentation,
    read_frame,
    stage2_examples,
    training_set,
)
from mr_ray.retriever.ray_train import train_encoder
from mr_ray.retriever.sweep import (
    OBJECTIVE,
    read_best_params,
    stage2_params,
    tuned_stage2,
)


def checkpoint_storage(ctx: StageContext) -> tuple[Path, str]:
    """Ray Train storage outside the stage's temp folder (so a crashed stage resumes), keyed by identity."""
    return (ctx.run_dir / "checkpoints").resolve(), f"{ctx.stage.name}-{ctx.identity()}"


def mlflow_uri(ctx: StageContext) -> str:
    return (ctx.run_dir / "mlruns").resolve().as_uri()


def stage1_stage(ctx: StageContext) -> dict:
    """Stage 1: label-aware SupCon from the pretrained (or configured) encoder, on every judgments table
    the graph gave it; model at out/model."""
    config = ctx.config.stage1
    products, queries, judgments = training_set(ctx.input("prepare"), config, Limit.of(ctx.config, "stage1.max_train_queries"), ctx.inputs_of("judgments"))
    examples = examples_with_augmentation(queries, judgments, products, config)
    storage, name = checkpoint_storage(ctx)
    metrics = train_encoder(
        examples, config, ctx.config.encoder.max_seq_length, ctx.config.encoder.model or pretrained_model_path(), ctx.out / "model", storage, name, mlflow_uri(ctx)
    )
    return {**metrics, "clean_queries": len(queries), "typo_queries": int((~examples["query_id"].isin(set(queries["query_id"]))).sum())}


def stage2_settings(ctx: StageContext) -> tuple:
    """(Stage 2's config, where its tuned settings come from): the sweep's best values when the graph gave
    it the sweep's result, else its own config."""
    config = ctx.config.stage2
    swept = ctx.inputs_of("tuned")
    if not swept:
        return config, {"source": "config (stage2)", "params": stage2_params(config)}
    best = read_best_params(swept[0])
    config = tuned_stage2(config, best["params"])
    source = f"sweep (best of {len(best['trials'])} trials, {best.get('objective', 'dev NDCG@10')} {best[OBJECTIVE]:.4f})"
    return config, {"source": source, "params": stage2_params(config)}


def stage2_stage(ctx: StageContext) -> dict:
    """Stage 2: refine the Stage-1 encoder on judged + mined samples, with the sweep's best settings when
    it ran; model at out/model."""
    stage1 = ctx.config.stage1
    config, trained_with = stage2_settings(ctx)
    mined = read_frame(ctx.input("mine"), "mined") if config.use_mined else None
    _, examples, mined_count = stage2_examples(
        ctx.input("prepare"), stage1, Limit.of(ctx.config, "stage2.max_train_queries"), ctx.inputs_of("judgments"), mined, config
    )
    storage, name = checkpoint_storage(ctx)
    metrics = train_encoder(
        examples, config, ctx.config.encoder.max_seq_length, str(ctx.input("stage1") / "model"), ctx.out / "model", storage, name, mlflow_uri(ctx)
    )
    return {**metrics, "mined_pairs_used": mined_count, "trained_with": trained_with}
