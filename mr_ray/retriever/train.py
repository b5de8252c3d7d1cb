"""Contrastive training of the shared encoder: Stage 1 (SupCon) and Stage 2 (circle).

Training data is one row per query: its text and its graded products (judged,
and in Stage 2 also mined). A step takes `queries_per_batch` rows, samples
`products_per_query` products of each (at least one positive when it has one)
and scores every query against every product of the step, so the other
queries' products are in-batch negatives.

`train_encoder` runs the loop on Ray Train (`TorchTrainer`, data-parallel
workers: CPU here, GPU by config), with a checkpoint per epoch, automatic
resume from the latest checkpoint of the same run, and metrics reported to Ray
Train and to MLflow. `run_epoch` is the loop itself; Ray Tune trials
(`tune/`) call it in-process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mr_ray.config import Stage1Config, Stage2Config, TrainLoopConfig
from mr_ray.retriever.losses import UNJUDGED, LabelAwareSupConLoss, MultiClassCircleLoss

TRAIN_STATE = "train_state.pt"


# ---------------------------------------------------------------- data


def combine_judgments(frames: list[pd.DataFrame], sources: list[str]) -> pd.DataFrame:
    """One grade per (query, product): judgments of the listed sources, later sources winning."""
    judgments = pd.concat(frames, ignore_index=True)
    unknown = set(sources) - set(judgments["source"].unique())
    kept = judgments[judgments["source"].isin(sources)].copy()
    if kept.empty:
        raise ValueError(f"no judgments from sources {sources}; found {sorted(judgments['source'].unique())} (missing {sorted(unknown)})")
    kept["priority"] = kept["source"].map({source: i for i, source in enumerate(sources)})
    kept = kept.sort_values("priority", kind="stable").drop_duplicates(["query_id", "product_id"], keep="last")
    return kept[["query_id", "product_id", "grade"]].reset_index(drop=True)


def select_queries(queries: pd.DataFrame, split: str, max_queries: int | None, seed: int) -> pd.DataFrame:
    chosen = queries[queries["split"] == split]
    if chosen.empty:
        raise ValueError(f"no queries in split {split!r}")
    if max_queries and len(chosen) > max_queries:
        chosen = chosen.sample(max_queries, random_state=seed)
    return chosen.reset_index(drop=True)


def with_mined(judgments: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """Judgments plus re-annotated mined pairs (their grade wins), mined pairs flagged `hard`."""
    combined = combine_judgments([judgments.assign(source="judged"), mined], ["judged", "mined"])
    keys = pd.MultiIndex.from_frame(mined[["query_id", "product_id"]])
    combined["hard"] = pd.MultiIndex.from_frame(combined[["query_id", "product_id"]]).isin(keys)
    return combined


def build_examples(queries: pd.DataFrame, judgments: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """One row per query with a judged product: query_id, text, product_ids, titles, grades, hard (lists)."""
    if "hard" not in judgments.columns:
        judgments = judgments.assign(hard=False)
    pairs = judgments.merge(queries[["query_id", "text"]], on="query_id").merge(products[["product_id", "title"]], on="product_id")
    if pairs.empty:
        raise ValueError("no judged pairs left for training after joining queries, judgments and products")
    grouped = pairs.groupby("query_id", sort=True).agg(
        text=("text", "first"), product_ids=("product_id", list), titles=("title", list), grades=("grade", list), hard=("hard", list)
    )
    return grouped.reset_index()


def sample_batch(rows: pd.DataFrame, products_per_query: int, rng: np.random.Generator) -> tuple[list[str], list[str], torch.Tensor]:
    """(query texts, product titles, grades [Q, P]) of one step.

    Per query, `products_per_query` products: one positive (if any), then mined
    hard samples, then random others. Grades come from each query's own
    judgments; a product it has not judged is UNJUDGED (an in-batch negative).
    """
    chosen: dict[str, str] = {}
    for product_ids, titles, grades, hard in zip(rows["product_ids"], rows["titles"], rows["grades"], rows["hard"]):
        grades, hard = np.asarray(grades), np.asarray(hard, dtype=bool)
        order = rng.permutation(len(grades))
        first = order[grades[order] >= 1][:1]
        rest = order[~np.isin(order, first)]
        picked = np.concatenate([first, rest[hard[rest]], rest[~hard[rest]]])
        for i in picked[:products_per_query]:
            chosen.setdefault(str(product_ids[i]), str(titles[i]))
    column = {pid: j for j, pid in enumerate(chosen)}
    matrix = torch.full((len(rows), len(chosen)), UNJUDGED, dtype=torch.long)
    for row, (product_ids, grades) in enumerate(zip(rows["product_ids"], rows["grades"])):
        for pid, grade in zip(product_ids, grades):
            j = column.get(str(pid))
            if j is not None:
                matrix[row, j] = int(grade)
    return [str(t) for t in rows["text"]], list(chosen.values()), matrix


def iter_frames(examples: pd.DataFrame, batch_size: int, seed: int) -> Iterable[pd.DataFrame]:
    """Shuffled batches of rows, the in-process twin of a Ray Data shard's iter_batches."""
    shuffled = examples.sample(frac=1.0, random_state=seed)
    for start in range(0, len(shuffled), batch_size):
        yield shuffled.iloc[start : start + batch_size]


# ---------------------------------------------------------------- losses and optimiser


def stage_loss(config: TrainLoopConfig, temperature: float | None = None, partial_weight: float | None = None) -> list[tuple[float, torch.nn.Module]]:
    """The weighted loss terms of a stage: SupCon for Stage 1; circle (+ SupCon) for Stage 2.

    Stage 2's SupCon term uses the Stage-1 temperature and partial weight, passed in.
    """
    if isinstance(config, Stage1Config):
        return [(1.0, LabelAwareSupConLoss(config.temperature, config.partial_weight))]
    if not isinstance(config, Stage2Config):
        raise TypeError(f"no loss for config {type(config).__name__}")
    terms: list[tuple[float, torch.nn.Module]] = []
    c = config.circle
    if config.circle_weight > 0:
        terms.append(
            (
                config.circle_weight,
                MultiClassCircleLoss(
                    c.scale,
                    (c.margin_exact_partial, c.margin_partial_irrelevant),
                    (c.centre_exact_partial, c.centre_partial_irrelevant),
                    (c.weight_exact_partial, c.weight_partial_irrelevant),
                ),
            )
        )
    if config.supcon_weight > 0:
        terms.append((config.supcon_weight, LabelAwareSupConLoss(temperature or 0.05, partial_weight or 0.0)))
    if not terms:
        raise ValueError("stage2: circle_weight and supcon_weight are both 0, nothing to train on")
    return terms


def make_optimizer(model: torch.nn.Module, config: TrainLoopConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    # The fused kernel (CPU and CUDA) is what transformers' Trainer uses by default, so
    # bench/train_throughput.py compares like with like.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), max(total_steps, 1))
    return optimizer, scheduler


class TwoTower(torch.nn.Module):
    """The shared encoder over a step's queries and its products: normalised embeddings with gradients.

    Two passes inside one forward: each side is padded to its own longest text
    (one joint pass padded every query to product-title length, ~40% more tokens
    a step), and DDP still sees one forward per step.
    """

    def __init__(self, encoder, precision: str = "fp32"):
        super().__init__()
        self.encoder = encoder
        self.precision = precision

    def forward(self, queries: list[str], products: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.encoder.parameters()).device
        return tuple(self._embed(texts, device) for texts in (queries, products))

    def _embed(self, texts: list[str], device) -> torch.Tensor:
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.encoder.preprocess(texts).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            embeddings = self.encoder(features)["sentence_embedding"]
        # Normalised and scored in fp32: bf16 keeps ~3 significant digits, too coarse for similarities over a temperature.
        return F.normalize(embeddings.float(), dim=-1)


def run_epoch(towers, frames: Iterable[pd.DataFrame], terms, optimizer, scheduler, products_per_query: int, rng, device) -> dict:
    """One pass over `frames` (batches of query rows) with a `TwoTower` (or its DDP wrapper); returns mean loss, steps, pairs/s.

    pairs/s counts from the first batch in hand, as mr_ray.retriever.st_baseline's StepTimer times
    the peer's Trainer; the wait for that first batch (the data pipeline starting) is `first_batch_s`.
    """
    towers.train()
    losses, pairs, entered, started = [], 0, time.perf_counter(), None
    for frame in frames:
        started = started or time.perf_counter()
        frame = pd.DataFrame(frame) if not isinstance(frame, pd.DataFrame) else frame
        queries, titles, grades = sample_batch(frame, products_per_query, rng)
        grades = grades.to(device)
        q, p = towers(queries, titles)
        loss = sum(weight * term(q, p, grades) for weight, term in terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(towers.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        pairs += sum(min(products_per_query, len(g)) for g in frame["grades"])  # (query, product) samples drawn
    started = started or time.perf_counter()
    elapsed = time.perf_counter() - started
    return {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "steps": len(losses),
        "pairs": pairs,
        "pairs_per_s": pairs / elapsed if elapsed > 0 else 0.0,
        "first_batch_s": started - entered,
    }


# ---------------------------------------------------------------- Ray Train


def _worker_config(loop: dict) -> TrainLoopConfig:
    kind = {"Stage1Config": Stage1Config, "Stage2Config": Stage2Config}[loop["config_class"]]
    return kind.model_validate(loop["config"])


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train worker: load, resume, train `epochs`, report + checkpoint each epoch."""
    import ray.train
    import ray.train.torch

    from mr_ray.retriever.encoder import load_encoder

    config = _worker_config(loop)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    checkpoint = ray.train.get_checkpoint()
    start_epoch, state = 0, None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAIN_STATE, weights_only=False)
            model = load_encoder(str(Path(folder) / "model"), str(device), config.max_seq_length)
        start_epoch = state["epoch"] + 1
    else:
        model = load_encoder(loop["init_model"], str(device), config.max_seq_length)
    towers = ray.train.torch.prepare_model(TwoTower(model, config.precision))
    steps_per_epoch = -(-loop["n_rows"] // (config.queries_per_batch * world))
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch * config.epochs)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    terms = [(w, t.to(device)) for w, t in stage_loss(config, loop.get("temperature"), loop.get("partial_weight"))]
    tracker = _MlflowTracker(loop.get("mlflow_uri"), loop["run_name"], state) if rank == 0 else None
    if tracker and state is None:
        tracker.log_params({"stage": loop["run_name"], **_flat(config.model_dump(mode="json"))})
    history = state["history"] if state is not None else []
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config.epochs):
        rng = np.random.default_rng([config.seed, epoch, rank])
        # Dropout's torch generator is seeded per epoch too, so a run resumed at this epoch
        # trains exactly as an uninterrupted one (tests/test_drills.py kills a worker to check).
        torch.manual_seed(int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0]))
        frames = shard.iter_batches(
            batch_size=config.queries_per_batch,
            batch_format="pandas",
            local_shuffle_buffer_size=min(loop["n_rows"], 10_000),
            local_shuffle_seed=config.seed * 1000 + epoch,
        )
        metrics = {
            "epoch": epoch,
            "started_at_epoch": start_epoch,  # > 0 when this run resumed from a checkpoint
            **run_epoch(towers, frames, terms, optimizer, scheduler, config.products_per_query, rng, device),
        }
        history.append(metrics)
        if tracker:
            tracker.log_metrics(metrics, step=epoch)
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                model.save(str(Path(folder) / "model"))  # the encoder inside the (DDP-wrapped) towers
                torch.save(
                    {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "history": history, "mlflow_run_id": tracker.run_id if tracker else None},
                    Path(folder) / TRAIN_STATE,
                )
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)
    if tracker:
        tracker.end()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _MlflowTracker:
    """MLflow run of one training job (rank 0), continued across resumes."""

    def __init__(self, uri: str | None, run_name: str, state: dict | None):
        import mlflow

        self.mlflow = mlflow if uri else None
        self.run_id = None
        if self.mlflow is None:
            return
        # The design asks for a local file store; MLflow 3 keeps it behind this opt-in
        # (its database backend needs sqlalchemy, which mlflow-skinny does not ship).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("mr-ray")
        previous = (state or {}).get("mlflow_run_id")
        run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        if self.mlflow:
            self.mlflow.log_params({k: str(v)[:250] for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def end(self) -> None:
        if self.mlflow:
            self.mlflow.end_run()


def train_encoder(
    examples: pd.DataFrame,
    config: Stage1Config | Stage2Config,
    init_model: str,
    out_model: Path,
    storage: Path,
    run_name: str,
    mlflow_uri: str | None = None,
    temperature: float | None = None,
    partial_weight: float | None = None,
) -> dict:
    """Train on Ray Train and save the final encoder (sentence-transformers folder) at `out_model`.

    `storage/run_name` holds Ray Train's checkpoints: calling again with the same
    storage and name resumes from the latest epoch checkpoint. Returns the last
    epoch's metrics plus per-epoch history and wall time.
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config_class": type(config).__name__,
            "config": config.model_dump(mode="json"),
            "init_model": init_model,
            "n_rows": len(examples),
            "run_name": run_name,
            "mlflow_uri": mlflow_uri,
            "temperature": temperature,
            "partial_weight": partial_weight,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=1)
        ),
        datasets={"train": ray.data.from_pandas(examples)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "model", out_model)
        history = torch.load(Path(folder) / TRAIN_STATE, weights_only=False)["history"]
    return {
        **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "history": history,
        "train_rows": len(examples),
        "wall_s": round(time.perf_counter() - started, 2),
    }


# ---------------------------------------------------------------- pipeline stages


def read_frame(stage_dir: Path, kind: str) -> pd.DataFrame:
    from mr_ray.data.prepare import read_table

    table = read_table(stage_dir, kind)
    if table is None:
        raise FileNotFoundError(f"{stage_dir}: no {kind}/ table")
    return table.to_pandas()


LABELER_STAGES = ("label", "audit", "synthesize")  # their judgments/ (and synthesize's queries/) feed training


def labeler_outputs(ctx) -> list[Path]:
    return [ctx.input(name) for name in LABELER_STAGES if name in ctx.stage.inputs]


def training_set(prepared: Path, config: Stage1Config, max_queries: int | None, labeled: list[Path] = ()) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(products, train queries, one grade per judged pair of those queries).

    Human judgments come from the prepare output; LLM, audited and synthetic
    ones (and synthetic queries) from the labeler stages' outputs in `labeled`.
    """
    products = read_frame(prepared, "products")
    queries = [read_frame(prepared, "queries")]
    judgments = [read_frame(prepared, "judgments")]
    for folder in labeled:
        judgments.append(read_frame(folder, "judgments"))
        if (folder / "queries").exists():
            queries.append(read_frame(folder, "queries"))
    queries = select_queries(pd.concat(queries, ignore_index=True), "train", max_queries, config.seed)
    judgments = combine_judgments(judgments, config.judgment_sources)
    return products, queries, judgments[judgments["query_id"].isin(set(queries["query_id"]))]


def retriever_stages(with_judge: bool = True) -> tuple:
    """The pipeline's retriever stages (prepare first); `with_judge=False` drops the LLM judge's
    stages from their inputs, for data the judge has not labelled (set mine.annotator=grades)."""
    from dataclasses import replace

    from mr_ray.pipeline import STAGES

    names = ("prepare", "stage1", "mine", "stage2", "sweep")
    stages = tuple(stage for stage in STAGES if stage.name in names)
    if with_judge:
        return stages
    return tuple(replace(stage, inputs=tuple(i for i in stage.inputs if i in names)) for stage in stages)


def examples_with_augmentation(queries: pd.DataFrame, judgments: pd.DataFrame, products: pd.DataFrame, config: Stage1Config) -> pd.DataFrame:
    """Training rows for the clean queries plus their typo copies (same judgments)."""
    from mr_ray.data.augment import augment_queries

    augment = config.augment
    if augment.rate > 0:
        queries, judgments = augment_queries(queries, judgments, augment.rate, augment.seed, augment.copies)
    return build_examples(queries, judgments, products)


def checkpoint_storage(ctx) -> tuple[Path, str]:
    """Ray Train storage outside the stage's temp folder (so a crashed stage resumes), keyed by identity."""
    from mr_ray.config import section_hash
    from mr_ray.pipeline import expected_identity

    identity = section_hash(expected_identity(ctx.stage, ctx.config, ctx.run_dir))
    return (ctx.run_dir / "checkpoints").resolve(), f"{ctx.stage.name}-{identity}"


def mlflow_uri(ctx) -> str:
    return (ctx.run_dir / "mlruns").resolve().as_uri()


def stage1_stage(ctx) -> dict:
    """Stage 1: label-aware SupCon from the pretrained (or configured) encoder; model at out/model."""
    from mr_ray.retriever.encoder import pretrained_model_path

    config = ctx.config.stage1
    products, queries, judgments = training_set(ctx.input("prepare"), config, config.max_train_queries, labeler_outputs(ctx))
    examples = examples_with_augmentation(queries, judgments, products, config)
    storage, name = checkpoint_storage(ctx)
    metrics = train_encoder(
        examples, config, ctx.config.encoder.model or pretrained_model_path(), ctx.out / "model", storage, name, mlflow_uri(ctx)
    )
    return {**metrics, "clean_queries": len(queries), "typo_queries": int((~examples["query_id"].isin(set(queries["query_id"]))).sum())}


def stage2_stage(ctx) -> dict:
    """Stage 2: refine the Stage-1 encoder on judged + mined samples; model at out/model."""
    stage1, config = ctx.config.stage1, ctx.config.stage2
    products, queries, judgments = training_set(ctx.input("prepare"), stage1, config.max_train_queries, labeler_outputs(ctx))
    mined_count = 0
    if config.use_mined:
        mined = read_frame(ctx.input("mine"), "mined")
        mined = mined[mined["query_id"].isin(set(queries["query_id"]))]
        mined_count = len(mined)
        judgments = with_mined(judgments, mined)
    examples = examples_with_augmentation(queries, judgments, products, stage1)
    storage, name = checkpoint_storage(ctx)
    metrics = train_encoder(
        examples, config, str(ctx.input("stage1") / "model"), ctx.out / "model", storage, name, mlflow_uri(ctx),
        temperature=stage1.temperature, partial_weight=stage1.partial_weight,
    )
    return {**metrics, "mined_pairs_used": mined_count}
