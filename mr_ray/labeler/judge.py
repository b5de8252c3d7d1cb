"""One judge interface over the two kinds (`judge.kind`): what label, audit, mine and synthesize call.

A judge kind knows how to get its base model, turn human labels into training
examples, fine-tune (Ray Train), score examples with plain `transformers`, and
turn pairs into engine rows plus the `ray.data.llm` processor that scores
them. Everything else (shards, resume, variants, the judgment table) is shared
by `mr_ray.labeler.label`. A fine-tuned folder says which kind it is (its
architecture), so the audit's stronger judge may be either kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from mr_ray.config import JudgeEngineConfig, JudgeFinetuneConfig
from mr_ray.labeler import cross_encoder, finetune
from mr_ray.labeler.engine import judge_processor
from mr_ray.labeler.model import base_model_folder
from mr_ray.labeler.prompt import (
    chat_frame,
    grade_token_ids,
    normalise_logprobs,
    render_prompts,
)

# Product fields per engine-row variant (variant 0 is what the judge was trained on;
# the audit's re-judge averages several). The title is always shown.
CROSS_ENCODER_VARIANTS: tuple[tuple[str, ...], ...] = (cross_encoder.PRODUCT_FIELDS, (), ("brand", "color", "category"), ("description",))


class Judge(Protocol):
    kind: str

    def base_model(self, model: str | None, cache_dir: Path) -> Path: ...

    def examples(self, labels: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame, cfg: JudgeFinetuneConfig) -> pd.DataFrame:
        """Training examples (query_id, product_id, grade and the kind's own columns)."""

    def finetune(self, examples: pd.DataFrame, base: Path, cfg: JudgeFinetuneConfig, storage: Path, out: Path) -> dict: ...

    def probabilities(self, model_path: Path, examples: pd.DataFrame) -> np.ndarray:
        """(n, 3) per-grade probabilities of `examples` rows with plain transformers."""

    def engine_rows(self, texts: pd.DataFrame, model_path: Path, variants: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """`prompt.pair_texts` rows -> engine rows (query_id, product_id, variant, payload) and malformed pairs."""

    def processor(self, model_path: Path, engine: JudgeEngineConfig):
        """The `ray.data.llm` processor: engine rows -> (query_id, product_id, variant, lp0, lp1, lp2, error)."""


class CausalLMJudge:
    """The guideline prompt and next-token grade (the paper's form; GPU clusters)."""

    kind = "causal_lm"

    def base_model(self, model, cache_dir):
        return base_model_folder(model, cache_dir)

    def examples(self, labels, queries, products, cfg):
        return finetune.training_examples(labels, queries, products)

    def finetune(self, examples, base, cfg, storage, out):
        return finetune.finetune_judge(examples, base, cfg, storage, out)

    def probabilities(self, model_path, examples):
        return normalise_logprobs(finetune.grade_logits_transformers(model_path, list(examples["user"])))[0]

    def engine_rows(self, texts, model_path, variants):
        from transformers import AutoTokenizer

        return render_prompts(texts, chat_frame(AutoTokenizer.from_pretrained(str(model_path))), variants)

    def processor(self, model_path, engine):
        from transformers import AutoTokenizer

        return judge_processor(model_path, engine, grade_token_ids(AutoTokenizer.from_pretrained(str(model_path))))


class CrossEncoderJudge:
    """A 3-label classifier over the (query, product text) pair (learns on CPU)."""

    kind = "cross_encoder"

    def base_model(self, model, cache_dir):
        return cross_encoder.base_model_folder(model)

    def examples(self, labels, queries, products, cfg):
        return cross_encoder.training_examples(labels, queries, products, soft=cfg.soft_targets)

    def finetune(self, examples, base, cfg, storage, out):
        return cross_encoder.finetune_judge(examples, base, cfg, storage, out)

    def probabilities(self, model_path, examples):
        return cross_encoder.probabilities_transformers(model_path, examples)

    def engine_rows(self, texts, model_path, variants):
        parts, bad = [], []
        for variant in range(variants):
            strings, malformed = cross_encoder.pair_strings(texts, CROSS_ENCODER_VARIANTS[variant % len(CROSS_ENCODER_VARIANTS)])
            parts.append(strings.assign(variant=variant))
            bad.append(malformed)
        strings = pd.concat(parts, ignore_index=True)
        rows = cross_encoder.engine_rows(strings, model_path) if len(strings) else pd.DataFrame(columns=["query_id", "product_id", "variant", "input_ids", "type_start"])
        return rows, pd.concat(bad, ignore_index=True).drop_duplicates()

    def processor(self, model_path, engine):
        return cross_encoder.classify_processor(model_path, engine)


KINDS: dict[str, Judge] = {"causal_lm": CausalLMJudge(), "cross_encoder": CrossEncoderJudge()}


def judge_of_kind(kind: str) -> Judge:
    return KINDS[kind]


def judge_of_model(model_path: str | Path) -> Judge:
    """The kind of a judge folder: a sequence classifier is the cross-encoder, anything else the causal LM."""
    return KINDS["cross_encoder" if cross_encoder.is_cross_encoder(model_path) else "causal_lm"]
