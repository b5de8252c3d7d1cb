"""Ray Tune sweep of Stage 2 on dev: circle margins and scale, and the SupCon term's temperature.

The `sweep` stage runs after `mine`. Each trial trains a copy of the Stage-1
encoder in-process with the same `run_epoch` as Ray Train's workers, on the
judged + mined samples of the training queries (a seeded subset:
`sweep.max_train_queries`), and reports dev NDCG@10 (full-catalog retrieval,
graded gains) after every epoch; ASHA stops the weak trials early. The NDCG
is the served mode's (`serve.retrieval`): under hybrid, the encoder fused with
BM25 as the `index` stage fuses them (weight chosen on the same dev queries),
so the sweep picks what helps the system a shop deploys.

The result, `best_params.json` (the best values, their dev NDCG@10, every
trial), is an input of `stage2`, which trains with those values
(`tuned_stage2`), so a changed sweep retrains Stage 2.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import (
    SWEPT_STAGE2_FIELDS,
    EncoderConfig,
    EvaluateConfig,
    RunConfig,
    Stage2Config,
    SweepConfig,
)
from mr_ray.evaluate import ScoredSplit, load_split, score_encoder, split_pair_lexical
from mr_ray.pipeline import Limit, config_section, note_limit
from mr_ray.retriever.encoder import encode, load_encoder, resolve_precision
from mr_ray.retriever.examples import iter_frames, stage2_examples
from mr_ray.retriever.loop import make_optimizer, run_epoch
from mr_ray.retriever.stage_loss import stage_loss
from mr_ray.retriever.two_tower import TwoTower
from mr_ray.search.retrieval import LexicalIndex

OBJECTIVE = "ndcg@10"
BEST_PARAMS = "best_params.json"
CIRCLE_PARAMS = ("margin_exact_partial", "margin_partial_irrelevant", "scale")  # Stage2Config.circle's
TUNED = (*CIRCLE_PARAMS, "temperature")  # every Stage 2 setting the sweep tunes


def search_space(sweep: SweepConfig) -> dict:
    """The Tune search space, from the sweep config's value lists."""
    from ray import tune

    return {
        "margin_exact_partial": tune.choice(sweep.margins),
        "margin_partial_irrelevant": tune.choice(sweep.margins),
        "scale": tune.choice(sweep.scales),
        "temperature": tune.choice(sweep.temperatures),
    }


def tuned_stage2(config: Stage2Config, params: dict) -> Stage2Config:
    """Stage 2's config with the tuned values in `params` set (validated)."""
    circle = {k: v for k, v in params.items() if k in CIRCLE_PARAMS}
    rest = {k: v for k, v in params.items() if k not in CIRCLE_PARAMS}
    return Stage2Config.model_validate({**config.model_dump(), **rest, "circle": {**config.circle.model_dump(), **circle}})


def stage2_params(config: Stage2Config) -> dict:
    """The values of the settings the sweep tunes, as Stage 2's config has them."""
    return {name: getattr(config.circle if name in CIRCLE_PARAMS else config, name) for name in TUNED}


def read_best_params(sweep_dir: Path) -> dict:
    """A `sweep` stage's result: {"params", OBJECTIVE, "trials"}."""
    return json.loads((sweep_dir / BEST_PARAMS).read_text())


# A trial's score: NDCG@10 (recall at 10 keeps the search as shallow as the metric); hybrid rows when the split has BM25.
TRIAL_SCORING = EvaluateConfig(split="dev", recall_k=10, hybrid=True)
HYBRID_TRIAL = "trial+bm25 weighted"  # score_encoder's weighted-fusion row of an encoder named "trial"


def dev_ndcg(model, dev: ScoredSplit, batch_size: int, precision: str) -> float:
    """Dev NDCG@10 of an in-memory encoder in the served mode (hybrid when `dev` carries BM25, see
    `served_split`), through the one scoring path (mr_ray.evaluate.score_encoder)."""
    model.eval()
    catalog = encode(model, dev.products["title"].tolist(), batch_size, precision)
    systems, _, _ = score_encoder("trial", dev, model, catalog, TRIAL_SCORING, batch_size)
    return systems[HYBRID_TRIAL if dev.lexical is not None else "trial"][OBJECTIVE]


def trial(params: dict, *, stage2: dict, epochs: int, encoder: dict, init_model: str, examples: pd.DataFrame, dev: ScoredSplit) -> None:
    """One Tune trial: train Stage 2 (`stage2`, its config) with `params` for `epochs`, report dev NDCG@10 each epoch."""
    import torch
    from ray import tune

    train_config = tuned_stage2(Stage2Config.model_validate(stage2), params)
    encoder_config = EncoderConfig.model_validate(encoder)
    device = "cuda" if train_config.use_gpu else "cpu"
    torch.manual_seed(train_config.seed)
    model = load_encoder(init_model, device, encoder_config.max_seq_length)
    steps = -(-len(examples) // train_config.queries_per_batch) * epochs
    optimizer, scheduler = make_optimizer(model, train_config, steps)
    terms = stage_loss(train_config)
    for epoch in range(epochs):
        frames = iter_frames(examples, train_config.queries_per_batch, seed=train_config.seed + epoch)
        rng = np.random.default_rng([train_config.seed, epoch])
        metrics = run_epoch(TwoTower(model, train_config.precision), frames, terms, optimizer, scheduler, train_config.products_per_query, rng, device)
        score = dev_ndcg(model, dev, encoder_config.batch_size, resolve_precision(encoder_config.precision, device))
        tune.report({OBJECTIVE: score, "epoch": epoch + 1, "loss": metrics["loss"]})


def trial_stage2(config: RunConfig) -> Stage2Config:
    """Stage 2's config as the trials train with it: its SWEPT_STAGE2_FIELDS (all the sweep declares), the rest default."""
    return Stage2Config.model_validate({name: config_section(config, f"stage2.{name}") for name in SWEPT_STAGE2_FIELDS})


def run_sweep(config: RunConfig, init_model: str, examples: pd.DataFrame, dev: dict, storage: Path) -> dict:
    """ASHA sweep of Stage 2 (its config's values first, then `sweep.trials - 1` random draws); returns the best
    parameters, their dev NDCG@10 and every trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep, stage2 = config.sweep, trial_stage2(config)
    # Only what a trial uses: a whole RunConfig would re-check its data paths from the trial's working directory.
    trainable = tune.with_parameters(
        trial, stage2=stage2.model_dump(mode="json"), epochs=sweep.epochs, encoder=config.encoder.model_dump(mode="json"),
        init_model=init_model, examples=examples, dev=dev,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": 1 if stage2.use_gpu else 0}),
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            num_samples=sweep.trials,
            # The first trial is Stage 2's own config, so the sweep can only hand stage2 values that beat it on dev.
            search_alg=BasicVariantGenerator(points_to_evaluate=[stage2_params(stage2)], random_state=sweep.seed),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=sweep.epochs, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(name="sweep-stage2", storage_path=str(storage), verbose=0),
    )
    results = tuner.fit()
    errors = [str(r.error) for r in results if r.error]
    if len(errors) == len(results):
        raise RuntimeError(f"every sweep trial failed; first error: {errors[0]}")
    best = results.get_best_result(metric=OBJECTIVE, mode="max", scope="all")
    trials = [
        {"params": r.config, OBJECTIVE: float(r.metrics_dataframe[OBJECTIVE].max()), "epochs": r.metrics.get("epoch")}  # best epoch, as get_best_result(scope="all")
        for r in results
        if r.error is None
    ]
    return {"params": best.config, OBJECTIVE: float(best.metrics_dataframe[OBJECTIVE].max()), "objective": objective_name(config), "trials": trials}


def sweep_data(prepared: Path, config: RunConfig, mined: pd.DataFrame | None, labeled: list[Path]) -> dict:
    """Stage 2's training rows (judged, with mined samples) and the dev split the trials are scored on."""
    sweep = config.sweep
    products, examples, _ = stage2_examples(
        prepared, config.stage1, Limit.of(config, "sweep.max_train_queries"), labeled, mined, trial_stage2(config)
    )
    scoring = TRIAL_SCORING.model_copy(update={"max_queries": sweep.max_dev_queries, "seed": sweep.seed})
    dev = load_split(prepared, scoring, products=products[["product_id", "title"]], limit_setting="sweep.max_dev_queries")
    dev = trial_catalog(dev, Limit.of(config, "sweep.max_dev_products"), sweep.seed)
    return {"examples": examples, "dev": served_split(dev, config) if config.serve.retrieval == "hybrid" else dev}


def served_split(dev: ScoredSplit, config: RunConfig) -> ScoredSplit:
    """The trials' split with BM25 over its catalog, so trials score the hybrid the index serves; the
    fusion weight is chosen on the same dev queries, as the index chooses it."""
    lexical = LexicalIndex.build(dev.products["title"].tolist(), config.lexical)
    return replace(dev, lexical=lexical, pair_lexical=split_pair_lexical(lexical, dev.products, dev.pairs), tuning=(dev.queries, dev.truth))


def objective_name(config: RunConfig) -> str:
    """What the sweep maximises, in words (for its result and the stage's log)."""
    return f"dev NDCG@10 of the {'hybrid (encoder + BM25, weighted fusion)' if config.serve.retrieval == 'hybrid' else 'encoder alone'}"


def trial_catalog(dev: ScoredSplit, limit: Limit, seed: int) -> ScoredSplit:
    """The split with a catalog of at most `limit` products: every product judged for its queries (all the
    graded truth stays) plus a seeded sample of the rest as distractors. Trials only rank settings against
    each other, so a smaller catalog serves them as well as the whole one at a fraction of the embedding."""
    products = dev.products
    if limit.value is None or len(products) <= limit.value:
        return dev
    judged = products["product_id"].isin(set(dev.pairs["product_id"])).to_numpy()
    rest = np.flatnonzero(~judged)
    extra = np.random.default_rng(seed).choice(rest, size=max(0, min(len(rest), limit.value - int(judged.sum()))), replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(judged), extra]))
    note_limit(limit, len(keep), len(products), "products in the trials' catalog")
    return replace(dev, products=products.iloc[keep].reset_index(drop=True))
