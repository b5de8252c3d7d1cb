"""The epoch loop of both contrastive stages, shared by Ray Train's workers and Ray Tune's trials."""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from mr_ray.config import TrainLoopConfig
from mr_ray.retriever.examples import sample_batch


def make_optimizer(model: torch.nn.Module, config: TrainLoopConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    # The fused kernel (CPU and CUDA) is what transformers' Trainer uses by default, so
    # bench/train_throughput.py compares like with like.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), max(total_steps, 1))
    return optimizer, scheduler


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
