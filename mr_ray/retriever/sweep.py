"""Ray Tune sweeps: SupCon temperature (Stage 1), circle margins and scale (Stage 2).

Each trial trains a copy of the encoder in-process with the same `run_epoch`
as Ray Train's workers, on a seeded subset of the training queries, and
reports dev NDCG@10 (full-catalog retrieval, graded gains) after every epoch;
ASHA stops the weak trials early. Stage-2 trials start from the Stage-1
encoder and train on the judged + mined samples.

The result: `best_params.json` (best value per stage, every trial's score) and
`best_config.yaml`, the run config with the best values filled in, which the
pipeline reads (`mr-ray run --config <run>/sweep/best_config.yaml`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mr_ray.config import EvaluateConfig, RunConfig, Stage1Config, Stage2Config, SweepConfig

OBJECTIVE = "ndcg@10"


def search_space(stage: str, sweep: SweepConfig) -> dict:
    """The Tune search space of a stage, from the sweep config's value lists."""
    from ray import tune

    if stage == "stage1":
        return {"temperature": tune.choice(sweep.temperatures)}
    return {
        "margin_exact_partial": tune.choice(sweep.margins),
        "margin_partial_irrelevant": tune.choice(sweep.margins),
        "scale": tune.choice(sweep.scales),
    }


def apply_params(stage: str, config: RunConfig, params: dict) -> RunConfig:
    """The run config with a stage's tuned parameters set."""
    if stage == "stage1":
        return config.model_copy(update={"stage1": config.stage1.model_copy(update=params)})
    circle = config.stage2.circle.model_copy(update=params)
    return config.model_copy(update={"stage2": config.stage2.model_copy(update={"circle": circle})})


def dev_ndcg(model, products: pd.DataFrame, queries: pd.DataFrame, truth: pd.DataFrame, batch_size: int) -> float:
    """Dev NDCG@10 of an in-memory encoder: full-catalog exact search (mr_ray.evaluate)."""
    from mr_ray.evaluate import evaluate_retrieval
    from mr_ray.retrieval import dense_search
    from mr_ray.retriever.encoder import encode

    model.eval()
    product_vectors = encode(model, products["title"].tolist(), batch_size)
    query_vectors = encode(model, queries["text"].tolist(), batch_size)
    run = dense_search(products["product_id"].to_numpy(), product_vectors, queries["query_id"], query_vectors, 10)
    return evaluate_retrieval(run, truth, EvaluateConfig(split="dev", recall_k=10))[OBJECTIVE]


def trial(params: dict, *, stage: str, config: dict, init_model: str, examples: pd.DataFrame, dev: dict) -> None:
    """One Tune trial: train with `params` for `sweep.epochs`, report dev NDCG@10 each epoch."""
    import torch
    from ray import tune

    from mr_ray.retriever.encoder import load_encoder
    from mr_ray.retriever.train import TwoTower, iter_frames, make_optimizer, run_epoch, stage_loss

    run_config = apply_params(stage, RunConfig.model_validate(config), params)
    train_config: Stage1Config | Stage2Config = getattr(run_config, stage)
    epochs = run_config.sweep.epochs
    device = "cuda" if train_config.use_gpu else "cpu"
    torch.manual_seed(train_config.seed)
    model = load_encoder(init_model, device, train_config.max_seq_length)
    steps = -(-len(examples) // train_config.queries_per_batch) * epochs
    optimizer, scheduler = make_optimizer(model, train_config, steps)
    terms = stage_loss(train_config, run_config.stage1.temperature, run_config.stage1.partial_weight)
    for epoch in range(epochs):
        frames = iter_frames(examples, train_config.queries_per_batch, seed=train_config.seed + epoch)
        rng = np.random.default_rng([train_config.seed, epoch])
        metrics = run_epoch(TwoTower(model, train_config.precision), frames, terms, optimizer, scheduler, train_config.products_per_query, rng, device)
        score = dev_ndcg(model, dev["products"], dev["queries"], dev["truth"], run_config.encoder.batch_size)
        tune.report({OBJECTIVE: score, "epoch": epoch + 1, "loss": metrics["loss"]})


def run_sweep(stage: str, config: RunConfig, init_model: str, examples: pd.DataFrame, dev: dict, storage: Path) -> dict:
    """ASHA sweep of one stage; returns the best parameters, their dev NDCG@10 and every trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sweep = config.sweep
    trainable = tune.with_parameters(
        trial, stage=stage, config=config.model_dump(mode="json"), init_model=init_model, examples=examples, dev=dev
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": 1 if getattr(config, stage).use_gpu else 0}),
        param_space=search_space(stage, sweep),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            num_samples=sweep.trials_per_stage,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=sweep.epochs, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(name=f"sweep-{stage}", storage_path=str(storage), verbose=0),
    )
    results = tuner.fit()
    errors = [str(r.error) for r in results if r.error]
    if len(errors) == len(results):
        raise RuntimeError(f"every {stage} sweep trial failed; first error: {errors[0]}")
    best = results.get_best_result(metric=OBJECTIVE, mode="max", scope="all")
    trials = [
        {"params": r.config, OBJECTIVE: r.metrics.get(OBJECTIVE), "epochs": r.metrics.get("epoch")}
        for r in results
        if r.error is None
    ]
    return {"params": best.config, OBJECTIVE: float(best.metrics_dataframe[OBJECTIVE].max()), "trials": trials}


def sweep_data(prepared: Path, config: RunConfig, mined: pd.DataFrame | None, labeled: list[Path]) -> dict:
    """Training rows (Stage 1, and Stage 2 with mined samples) and the dev set of the sweep."""
    from mr_ray.evaluate import truth_table
    from mr_ray.retriever.train import examples_with_augmentation, read_frame, select_queries, training_set, with_mined

    sweep = config.sweep
    products, queries, judgments = training_set(prepared, config.stage1, sweep.max_train_queries, labeled)
    examples = {"stage1": examples_with_augmentation(queries, judgments, products, config.stage1)}
    if mined is not None:
        mined = mined[mined["query_id"].isin(set(queries["query_id"]))]
        judgments = with_mined(judgments, mined)
    examples["stage2"] = examples_with_augmentation(queries, judgments, products, config.stage1)
    dev_queries = select_queries(read_frame(prepared, "queries"), "dev", sweep.max_dev_queries, sweep.seed)
    truth = truth_table(prepared)
    dev = {"products": products[["product_id", "title"]], "queries": dev_queries, "truth": truth[truth["query_id"].isin(set(dev_queries["query_id"]))]}
    return {"examples": examples, "dev": dev}


def sweep_stage(ctx) -> dict:
    """Sweep Stage 1 (from the configured encoder) and Stage 2 (from the Stage-1 encoder); write the best config."""
    from mr_ray.retriever.encoder import pretrained_model_path
    from mr_ray.retriever.train import labeler_outputs, read_frame

    config = ctx.config
    mined = read_frame(ctx.input("mine"), "mined") if config.stage2.use_mined else None
    data = sweep_data(ctx.input("prepare"), config, mined, labeler_outputs(ctx))
    storage = (ctx.out / "tune").resolve()
    starts = {"stage1": config.encoder.model or pretrained_model_path(), "stage2": str(ctx.input("stage1") / "model")}
    best = {stage: run_sweep(stage, config, starts[stage], data["examples"][stage], data["dev"], storage) for stage in ("stage1", "stage2")}
    tuned = config
    for stage, result in best.items():
        tuned = apply_params(stage, tuned, result["params"])
    (ctx.out / "best_params.json").write_text(json.dumps(best, indent=2))
    (ctx.out / "best_config.yaml").write_text(yaml.safe_dump(tuned.model_dump(mode="json"), sort_keys=False))
    return {stage: {"params": result["params"], OBJECTIVE: result[OBJECTIVE]} for stage, result in best.items()}
