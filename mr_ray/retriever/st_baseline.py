"""The standard recipe every user tries first, as a baseline: sentence-transformers' own
trainer with MultipleNegativesRankingLoss on (query, exact product) pairs, one epoch.

The evaluate stage trains it on the human labels of the train queries
(`evaluate.baselines: [..., st-mnrl]`) so every report compares the method with
it, once per training data and recipe (`st_baseline` caches it);
bench/train_throughput.py and bench/homedepot_retrieval.py use the same
functions. Needs the `datasets` package (the trainer reads a `datasets.Dataset`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from mr_ray.cache import cache_entry, cache_root
from mr_ray.config import Stage1Config, section_hash
from mr_ray.pipeline import Limit, tree_hash
from mr_ray.retriever.encoder import load_encoder, pretrained_model_path
from mr_ray.retriever.examples import build_examples, training_set

STATS = "training.json"

# The recipe's settings: sentence-transformers' documented MNRL defaults at our batch size.
BATCH_SIZE = 64
LEARNING_RATE = 2e-5
EPOCHS = 1.0


def exact_pairs(examples: pd.DataFrame) -> pd.DataFrame:
    """(anchor, positive) pairs: each training query with each of its grade-2 products."""
    rows = [
        (text, title)
        for text, titles, grades in zip(examples["text"], examples["titles"], examples["grades"])
        for title, grade in zip(titles, grades)
        if grade == 2
    ]
    return pd.DataFrame(rows, columns=["anchor", "positive"])


def train_mnrl(
    model_path: str | None,
    pairs: pd.DataFrame,
    out_dir: Path,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    epochs: float = EPOCHS,
    max_seq_length: int = 48,
    max_steps: int = -1,
    seed: int = 0,
    bf16: bool = False,
) -> dict:
    """Train with SentenceTransformerTrainer + MNRL; save at out_dir/model; returns wall time and pairs/s."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    if pairs.empty:
        raise ValueError("st-mnrl: no (query, exact product) pairs to train on")
    model = load_encoder(model_path, "cpu", max_seq_length)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_ratio=0.1,
        batch_sampler="no_duplicates",
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        use_cpu=True,
        bf16=bf16,
        seed=seed,
        dataloader_drop_last=False,
    )
    timer = StepTimer()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_pandas(pairs, preserve_index=False),
        loss=MultipleNegativesRankingLoss(model), callbacks=[timer],
    )
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    model.save(str(out_dir / "model"))
    trained_pairs = min(output.global_step * batch_size, len(pairs) * epochs)
    # throughput of the training steps only (trainer set-up excluded), like our loop's pairs/s
    return {"wall_s": wall, "pairs": trained_pairs, "pairs_per_s": trained_pairs / timer.elapsed, "steps": output.global_step}


class StepTimer(TrainerCallback):
    """Seconds from the first training step's start to the last step's end."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.last - self.first


def st_baseline(prepared: Path, base_model: str | None, max_seq_length: int, seed: int, limit: Limit | None, log=print) -> tuple[Path, dict]:
    """The `st-mnrl` row's model: the recipe on the human labels of the train queries (Stage 1's subset: `seed`,
    `limit`), trained once and cached by what it depends on — its training pairs, the base model's files and
    the recipe — so every later run and config on the same data reuses it. Returns (model folder, training stats)."""
    human = Stage1Config(judgment_sources=["human"], seed=seed)
    products, queries, judgments = training_set(prepared, human, limit)
    pairs = exact_pairs(build_examples(queries, judgments, products))
    recipe = {
        "pairs": hashlib.sha256(pd.util.hash_pandas_object(pairs, index=False).to_numpy().tobytes()).hexdigest()[:16],
        "base_model": tree_hash(Path(base_model or pretrained_model_path())),
        "max_seq_length": max_seq_length, "seed": seed, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "epochs": EPOCHS,
    }
    folder = cache_root() / "st-mnrl" / section_hash(recipe)
    if (folder / STATS).is_file():
        log(f"[mr-ray] st-mnrl: reusing {folder} (same training pairs, base model and recipe)")
        return folder / "model", json.loads((folder / STATS).read_text())
    with cache_entry(folder, lambda placed: (placed / STATS).is_file()) as tmp:
        stats = {**train_mnrl(base_model, pairs, tmp, max_seq_length=max_seq_length, seed=seed), "train_queries": len(queries), "recipe": recipe}
        shutil.rmtree(tmp / "trainer", ignore_errors=True)  # the trainer's scratch output; the model is tmp/model
        (tmp / STATS).write_text(json.dumps(stats, indent=2))
    return folder / "model", stats
