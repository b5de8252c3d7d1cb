"""Fine-tune the judge on graded human labels with Ray Train (`TorchTrainer`).

The judge is trained exactly as it is used: the guideline prompt, then one
next-token prediction over the three grade tokens, with a class-balanced
cross-entropy. On CPU the default trains only the top transformer blocks
(the frozen lower blocks build no autograd graph, so a step costs about one
forward pass); `train_layers: null` fine-tunes everything (GPU clusters).

The guideline is the same prefix in every prompt: each step runs it once
(without gradient) and every example of the batch attends to that cached
prefix, so a step processes the short pair suffixes only. The gradient
therefore does not flow through the prefix's keys and values (a stop-gradient
on the shared context); the loss value itself is exact.

Checkpoints go to Ray Train's storage every `checkpoint_every` steps; a
rerun with the same storage folder resumes from the latest one.

A finished judge of either kind is kept in the content-addressed cache
(`cached_finetune`): any later run with the same base model files, training
examples and fine-tune settings copies it instead of training again (a
fine-tune from all-mpnet-base-v2 costs half an hour of 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mr_ray.cache import cache_entry, cache_root
from mr_ray.config import JudgeFinetuneConfig, section_hash
from mr_ray.labeler.prompt import (
    chat_frame,
    grade_token_ids,
    pair_texts,
    render_prompts,
)
from mr_ray.pipeline import tree_hash

PROMPT_COLUMNS = ["query_id", "product_id", "user", "grade"]
# Fine-tune settings that do not change the trained model once the examples are given: they choose the examples
# (whose content is in the key), act after training (on a copy), or only say when checkpoints are written.
NOT_IN_TRAINING = {"max_examples", "holdout_fraction", "max_holdout", "grade_offsets", "min_grade_recall", "checkpoint_every"}
TRAINING_RECORD = "training.json"


class GradeTokenLoss(nn.Module):
    """Class-weighted cross-entropy over the three grade tokens at the answer position.

    For example i with answer logits z_i (the LM logits of the tokens "0","1","2")
    and label y_i, with class weight w_c:
    `L = - sum_i w_{y_i} * log( exp(z_{i,y_i}) / sum_g exp(z_{i,g}) ) / sum_i w_{y_i}`.
    """

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        self.register_buffer("class_weights", class_weights.float())

    def forward(self, grade_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(grade_logits, labels, weight=self.class_weights)


def class_weights(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Inverse-frequency weights normalised to mean 1 over present classes; an absent class gets 0."""
    counts = np.bincount(np.asarray(labels, int), minlength=n_classes).astype(float)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    return weights


def balanced_subsample(examples: pd.DataFrame, max_examples: int | None, seed: int) -> pd.DataFrame:
    """At most `max_examples` rows, as equal per grade as the data allows (short classes taken whole)."""
    if max_examples is None or len(examples) <= max_examples:
        return examples.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    groups = {grade: g.sample(frac=1.0, random_state=seed) for grade, g in examples.groupby("grade")}
    quota, remaining, taken = {}, max_examples, 0
    for grade, group in sorted(groups.items(), key=lambda item: len(item[1])):
        share = remaining // (len(groups) - taken)
        quota[grade] = min(len(group), share)
        remaining -= quota[grade]
        taken += 1
    picked = pd.concat([groups[g].head(n) for g, n in quota.items()])
    return picked.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def split_holdout(labels: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole queries (a seeded `fraction` of them), so no query is in both parts."""
    query_ids = np.array(sorted(labels["query_id"].unique()))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(query_ids, size=max(1, int(round(fraction * len(query_ids)))), replace=False))
    mask = labels["query_id"].isin(held)
    return labels[~mask].reset_index(drop=True), labels[mask].reset_index(drop=True)


def training_examples(labels: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """Human labels -> (query_id, product_id, user turn, grade); pairs that cannot be rendered are dropped."""

    texts = pair_texts(labels, queries, products)
    prompts, _ = render_prompts(texts, frame=("", ""), variants=1)
    merged = prompts.merge(labels[["query_id", "product_id", "grade"]], on=["query_id", "product_id"])
    return merged.rename(columns={"prompt": "user"})[PROMPT_COLUMNS]


class PrefixScorer:
    """Grade-token logits of a batch of prompts that share the guideline prefix (prefix computed once per call)."""

    def __init__(self, model, tokenizer, frame: tuple[str, str]):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_ids = torch.tensor([tokenizer(frame[0], add_special_tokens=False).input_ids])
        self.closing = frame[1]
        self.grade_ids = grade_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def grade_logits(self, user_turns: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        suffixes = [self.tokenizer(u + self.closing, add_special_tokens=False).input_ids for u in user_turns]
        size, longest = len(suffixes), max(map(len, suffixes))
        ids = torch.full((size, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((size, longest), dtype=torch.long)
        for i, suffix in enumerate(suffixes):  # right padding: pads sit after the answer position
            ids[i, : len(suffix)] = torch.tensor(suffix)
            mask[i, : len(suffix)] = 1
        prefix = self.prefix_ids.to(device)
        with torch.no_grad():
            cache = self.model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(size)
        attention = torch.cat([torch.ones((size, prefix.shape[1]), dtype=torch.long), mask], dim=1).to(device)
        # Only the answer positions go through the LM head (its vocabulary-wide matmul
        # on every suffix token was a quarter of a CPU training step).
        answer_positions, position_of_row = torch.unique(mask.sum(dim=1) - 1, return_inverse=True)
        out = self.model(
            input_ids=ids.to(device), attention_mask=attention, past_key_values=cache, use_cache=True,
            logits_to_keep=answer_positions.to(device),
        )
        return out.logits[torch.arange(size, device=device), position_of_row.to(device)][:, self.grade_ids]


def freeze_lower_layers(model, train_layers: int | None) -> int:
    """Leave only the top `train_layers` blocks and the final norm trainable; returns trainable parameter count."""
    if train_layers is not None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        blocks = model.model.layers
        for block in blocks[max(0, len(blocks) - train_layers) :]:
            block.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def checkpointed_training(core, optimizer, cfg: JudgeFinetuneConfig, steps_per_epoch: int, batch_loss, extra_metrics: dict, trainable_only: bool = False) -> None:
    """The Ray Train worker body of both judge kinds: resume from the latest checkpoint, run the epochs over the
    "train" shard (skipping the batches a resumed epoch already trained), report and checkpoint every
    `cfg.checkpoint_every` steps and at the end. `trainable_only` checkpoints just the trained parameters."""
    import ray.train
    from ray.train import Checkpoint

    step, start_epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", weights_only=False)
        core.load_state_dict(state["model"], strict=not trainable_only)
        optimizer.load_state_dict(state["optimizer"])
        step, start_epoch = state["step"], state["epoch"]

    shard = ray.train.get_dataset_shard("train")
    core.train()
    # Losses and step times are reported once per checkpoint, averaged over its window: each
    # `ray.train.report` costs about 1.5 s on this machine, three times a CPU step.
    window_loss, window_s = [], []
    for epoch in range(start_epoch, cfg.epochs):
        skip = step - epoch * steps_per_epoch  # batches of this epoch already trained
        for index, batch in enumerate(shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas")):
            if index < skip:
                continue
            started = time.perf_counter()
            loss = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            window_loss.append(loss.item())
            window_s.append(time.perf_counter() - started)
            if step % cfg.checkpoint_every and step != steps_per_epoch * cfg.epochs:
                continue
            metrics = {"loss": float(np.mean(window_loss)), "step": step, "epoch": epoch, "step_s": float(np.mean(window_s)), **extra_metrics}
            window_loss, window_s = [], []
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if ray.train.get_context().get_world_rank() == 0:
                    names = _trainable_names(core) if trainable_only else None
                    kept = {k: v for k, v in core.state_dict().items() if names is None or k in names}
                    torch.save({"model": kept, "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch}, Path(folder) / "state.pt")
                    checkpoint = Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: class-balanced grade-token fine-tune with periodic checkpoints and resume."""
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = JudgeFinetuneConfig.model_validate(loop_config["finetune"])
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(loop_config["base_model"])
    model = AutoModelForCausalLM.from_pretrained(loop_config["base_model"], dtype=torch.float32)
    trainable = freeze_lower_layers(model, cfg.train_layers)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    scorer = PrefixScorer(model, tokenizer, chat_frame(tokenizer))
    loss_fn = GradeTokenLoss(torch.tensor(loop_config["class_weights"] if cfg.class_weighted else [1.0, 1.0, 1.0]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def batch_loss(batch: pd.DataFrame) -> torch.Tensor:
        logits = scorer.grade_logits(list(batch["user"]))
        return loss_fn(logits, torch.tensor(batch["grade"].to_numpy(), dtype=torch.long))

    checkpointed_training(core, optimizer, cfg, loop_config["steps_per_epoch"], batch_loss, {"trainable_params": trainable}, trainable_only=True)
    if ray.train.get_context().get_world_rank() == 0:
        core.save_pretrained(loop_config["output_dir"], safe_serialization=True)
        tokenizer.save_pretrained(loop_config["output_dir"])


def _trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def run_trainer(loop, examples: pd.DataFrame, base_model: Path, cfg: JudgeFinetuneConfig, storage_dir: Path, output_dir: Path, name: str) -> dict:
    """Run a judge's Ray Train loop over `examples` (resuming from `storage_dir`); returns training metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    output_dir.mkdir(parents=True, exist_ok=True)
    weights = class_weights(examples["grade"].to_numpy())
    steps_per_epoch = int(np.ceil(len(examples) / (cfg.batch_size * cfg.num_workers)))
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "finetune": cfg.model_dump(mode="json"),
            "base_model": str(base_model),
            "output_dir": str(output_dir),
            "class_weights": weights.tolist(),
            "steps_per_epoch": steps_per_epoch,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_dir).resolve())),
        datasets={"train": ray.data.from_pandas(examples)},
    )
    started = time.perf_counter()
    result = trainer.fit()
    losses = result.metrics or {}
    return {
        "train_examples": int(len(examples)),
        "train_grade_counts": {int(g): int(n) for g, n in examples["grade"].value_counts().sort_index().items()},
        "class_weights": [round(float(w), 4) for w in weights] if cfg.class_weighted else None,
        "steps": int(losses.get("step", 0)),
        "final_loss": float(losses.get("loss", float("nan"))),
        "mean_step_s": float(losses.get("step_s", float("nan"))),
        "trainable_params": int(losses.get("trainable_params", 0)),
        "train_layers": cfg.train_layers,
        "train_wall_s": round(time.perf_counter() - started, 1),
    }


def finetune_judge(examples: pd.DataFrame, base_model: Path, cfg: JudgeFinetuneConfig, storage_dir: Path, output_dir: Path) -> dict:
    """Run the Ray Train fine-tune; the model folder lands in `output_dir`. Returns training metrics."""
    return run_trainer(train_loop_per_worker, examples[PROMPT_COLUMNS], base_model, cfg, storage_dir, output_dir, "judge-finetune")


def grade_logits_transformers(model_path: Path, user_turns: list[str], batch_size: int = 16) -> np.ndarray:
    """Raw grade-token logits per user turn with plain transformers, the shared prefix computed once per batch.

    `prompt.normalise_logprobs` accepts these (the three-way softmax is shift
    invariant); only its `mass` output is meaningless for logits.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    scorer = PrefixScorer(model, tokenizer, chat_frame(tokenizer))
    with torch.no_grad():
        rows = [scorer.grade_logits(user_turns[i : i + batch_size]).float().numpy() for i in range(0, len(user_turns), batch_size)]
    return np.concatenate(rows) if rows else np.zeros((0, 3))


def finetune_key(kind: str, base_model: Path, examples: pd.DataFrame, cfg: JudgeFinetuneConfig) -> dict:
    """What a fine-tuned judge depends on: its kind, the base model's files, the training examples (in training
    order: texts, grades, targets) and the fine-tune settings that shape training."""
    rows = pd.util.hash_pandas_object(examples, index=False).to_numpy().tobytes()
    return {
        "kind": kind,
        "base_model": tree_hash(Path(base_model)),
        "examples": {"columns": list(examples.columns), "rows": len(examples), "hash": hashlib.sha256(rows).hexdigest()[:16]},
        "finetune": cfg.model_dump(mode="json", exclude=NOT_IN_TRAINING),
    }


def cached_finetune(judge, examples: pd.DataFrame, base_model: Path, cfg: JudgeFinetuneConfig, storage_dir: Path, output_dir: Path, log=print) -> dict:
    """`judge.finetune`, trained once per `finetune_key` and kept in the cache (`mr_ray.cache`): a later call with the
    same inputs, from any run folder, copies the cached model into `output_dir` instead of training. Returns the
    training metrics of when it was trained, and `judge_cache` (the entry, and whether it was reused)."""
    key = finetune_key(judge.kind, base_model, examples, cfg)
    folder = cache_root() / "judge" / section_hash(key)

    def is_complete(entry: Path) -> bool:
        return (entry / TRAINING_RECORD).is_file() and (entry / "model" / "config.json").is_file()

    reused = is_complete(folder)
    if reused:
        log(f"[mr-ray] judge_finetune: reusing the judge trained in {folder} (same base model, training examples and fine-tune settings)")
    else:
        with cache_entry(folder, is_complete) as tmp:
            training = judge.finetune(examples, base_model, cfg, storage_dir, tmp / "model")
            (tmp / TRAINING_RECORD).write_text(json.dumps({"training": training, "key": key}, indent=2))
    # A copy: later steps change the run's model (grade offsets folded into its bias), never the cached one.
    shutil.copytree(folder / "model", output_dir, dirs_exist_ok=True)
    training = json.loads((folder / TRAINING_RECORD).read_text())["training"]
    return {**training, "judge_cache": {"entry": str(folder), "reused": reused}}
