"""The Ray Train driver of the contrastive stages: `train_encoder` runs the epoch loop on
`TorchTrainer` (data-parallel workers: CPU here, GPU by config), with a checkpoint per epoch,
automatic resume from the latest checkpoint of the same run, and metrics reported to Ray Train
and to MLflow."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mr_ray.config import Stage1Config, Stage2Config, TrainLoopConfig
from mr_ray.retriever.encoder import load_encoder
from mr_ray.retriever.loop import make_optimizer, run_epoch
from mr_ray.retriever.stage_loss import stage_loss
from mr_ray.retriever.two_tower import TwoTower

TRAIN_STATE = "train_state.pt"


def _worker_config(loop: dict) -> TrainLoopConfig:
    kind = {"Stage1Config": Stage1Config, "Stage2Config": Stage2Config}[loop["config_class"]]
    return kind.model_validate(loop["config"])


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train worker: load, resume, train `epochs`, report + checkpoint each epoch."""
    import ray.train
    import ray.train.torch

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
            model = load_encoder(str(Path(folder) / "model"), str(device), loop["max_seq_length"])
        start_epoch = state["epoch"] + 1
    else:
        model = load_encoder(loop["init_model"], str(device), loop["max_seq_length"])
    towers = ray.train.torch.prepare_model(TwoTower(model, config.precision))
    steps_per_epoch = -(-loop["n_rows"] // (config.queries_per_batch * world))
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch * config.epochs)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    terms = [(w, t.to(device)) for w, t in stage_loss(config)]
    tracker = _MlflowTracker(loop.get("mlflow_uri"), loop["run_name"], state) if rank == 0 else None
    if tracker and state is None:
        tracker.log_params({"stage": loop["run_name"], "max_seq_length": loop["max_seq_length"], **_flat(config.model_dump(mode="json"))})
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
    max_seq_length: int,
    init_model: str,
    out_model: Path,
    storage: Path,
    run_name: str,
    mlflow_uri: str | None = None,
) -> dict:
    """Train on Ray Train and save the final encoder (sentence-transformers folder, texts cut at
    `max_seq_length` tokens: `encoder.max_seq_length`, as index and serving cut them) at `out_model`.

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
            "max_seq_length": max_seq_length,
            "n_rows": len(examples),
            "run_name": run_name,
            "mlflow_uri": mlflow_uri,
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
