"""The two-tower model: one shared (Siamese) encoder over a step's queries and its products."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mr_ray.retriever.encoder import resolve_precision


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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(self.precision, device.type) == "bf16"):
            embeddings = self.encoder(features)["sentence_embedding"]
        # Normalised and scored in fp32: bf16 keeps ~3 significant digits, too coarse for similarities over a temperature.
        return F.normalize(embeddings.float(), dim=-1)
