"""The loss choice of each contrastive stage: SupCon for Stage 1; circle (+ SupCon) for Stage 2."""

from __future__ import annotations

import torch

from mr_ray.config import Stage1Config, Stage2Config, TrainLoopConfig
from mr_ray.retriever.losses import LabelAwareSupConLoss, MultiClassCircleLoss


def stage_loss(config: TrainLoopConfig) -> list[tuple[float, torch.nn.Module]]:
    """The weighted loss terms of a stage, each from the stage's own config."""
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
        terms.append((config.supcon_weight, LabelAwareSupConLoss(config.temperature, config.partial_weight)))
    if not terms:
        raise ValueError("stage2: circle_weight and supcon_weight are both 0, nothing to train on")
    return terms
