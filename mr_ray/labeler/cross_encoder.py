"""The cross-encoder judge: a BERT-family 3-label sequence classifier over (query, product text).

It reads the pair as a tokenizer text pair: `[CLS] query [SEP] product [SEP]`,
token type 0 for the query part and 1 for the product part. Training
(`transformers` inside a Ray Train worker), the reference forward pass and
labeling (vLLM's pooling runner, `task_type` classify, in Ray Data) all use
that one encoding: vLLM gets the pair's token ids plus the position where
type 1 starts (`compressed_token_type_ids`, what vLLM's own score API sends),
so the three agree to float precision.

The base model defaults to the packaged all-MiniLM-L6-v2 (a sentence-
transformers folder whose weights are a plain `BertModel`); the classifier
head starts seeded-random. An installed optional model is named by its name
(`all-mpnet-base-v2`, `mr_ray.installed_models`), and any Hugging Face encoder
path works the same way. vLLM has no MPNet: a judge whose architecture vLLM
does not serve labels with a plain `transformers` forward in Ray Data actors
(`TransformersClassifier`), on the same engine rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mr_ray.config import ConfigError, JudgeEngineConfig, JudgeFinetuneConfig
from mr_ray.grades import GRADE_NAMES
from mr_ray.installed_models import INSTALLABLE, installed_model_folder
from mr_ray.labeler.engine import engine_processor
from mr_ray.labeler.finetune import checkpointed_training, run_trainer
from mr_ray.labeler.prompt import PromptError, field_text, pair_texts
from mr_ray.retriever.encoder import pretrained_model_path, resolve_precision

ID2LABEL = {int(grade): name for grade, name in GRADE_NAMES.items()}
# Product fields after the title, in this order, when present (each as "field: value").
PRODUCT_FIELDS = ("brand", "color", "category", "description")
EXAMPLE_COLUMNS = ["query_id", "product_id", "query", "product", "grade", "t0", "t1", "t2"]


def is_cross_encoder(model_path: str | Path) -> bool:
    """True for a sequence-classification folder (this judge), False for anything else (a causal LM)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def base_model_folder(model: str | None) -> Path:
    """The encoder the judge starts from: the packaged all-MiniLM-L6-v2 (None), an installed model by name
    (`all-mpnet-base-v2`; a one-line ConfigError naming its install command when it is not installed), or a
    Hugging Face folder."""
    if model is None:
        path = Path(pretrained_model_path())
    elif model in INSTALLABLE:
        path = installed_model_folder(model)
    else:
        path = Path(model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"judge.model {path}: not a Hugging Face model folder (no config.json)")
    return path


def product_text(product: dict, fields: tuple[str, ...] = PRODUCT_FIELDS) -> str:
    """The product side of the pair: the title, then "field: value" for each non-blank field of `fields`.

    Raises PromptError on a blank title (the pair cannot be judged).
    """
    title = product.get("title")
    if not isinstance(title, str) or not title.strip():
        raise PromptError("product title is missing or blank")
    parts = [title.strip()]
    for field in fields:
        text = field_text(field, product.get(field))
        if text is not None:
            parts.append(f"{field}: {text}")
    return " ; ".join(parts)


def pair_strings(pairs: pd.DataFrame, fields: tuple[str, ...] = PRODUCT_FIELDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`prompt.pair_texts` rows -> (query_id, product_id, query, product) and the malformed pairs (with the reason)."""
    rows, bad = [], []
    for record in pairs.to_dict("records"):
        query = record.get("query")
        try:
            if not isinstance(query, str) or not query.strip():
                raise PromptError("query text is missing or blank")
            rows.append({"query_id": record["query_id"], "product_id": record["product_id"], "query": query.strip(), "product": product_text(record, fields)})
        except PromptError as err:
            bad.append({"query_id": record["query_id"], "product_id": record["product_id"], "reason": str(err)})
    return (
        pd.DataFrame(rows, columns=["query_id", "product_id", "query", "product"]),
        pd.DataFrame(bad, columns=["query_id", "product_id", "reason"]),
    )


def soft_targets(grades: np.ndarray, rating_mean: np.ndarray | None) -> np.ndarray:
    """Target distribution per pair: one-hot on the grade, or, where a mean rating (1..3) exists, split between
    the two grades around `rating_mean - 1` (2.33 -> 1/3 on grade 1, 2/3 on grade 2), so its expectation is the mean."""
    grades = np.asarray(grades, dtype=int)
    targets = np.eye(3)[grades]
    if rating_mean is None:
        return targets
    rating = np.asarray(rating_mean, dtype=float)
    has = ~np.isnan(rating)
    value = np.clip(rating[has] - 1.0, 0.0, 2.0)
    low = np.minimum(np.floor(value).astype(int), 1)
    upper_share = value - low
    soft = np.zeros((int(has.sum()), 3))
    soft[np.arange(len(low)), low] = 1.0 - upper_share
    soft[np.arange(len(low)), low + 1] += upper_share
    targets[has] = soft
    return targets


def training_examples(labels: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame, soft: bool = True) -> pd.DataFrame:
    """Human labels -> EXAMPLE_COLUMNS (query and product strings, grade, target t0..t2); unrenderable pairs dropped."""

    strings, _ = pair_strings(pair_texts(labels, queries, products))
    extra = ["rating_mean"] if soft and "rating_mean" in labels.columns else []
    merged = strings.merge(labels[["query_id", "product_id", "grade", *extra]].astype({"query_id": str, "product_id": str}), on=["query_id", "product_id"])
    targets = soft_targets(merged["grade"].to_numpy(), merged["rating_mean"].to_numpy() if extra else None)
    merged[["t0", "t1", "t2"]] = targets
    return merged[EXAMPLE_COLUMNS]


def encode(tokenizer, queries: list[str], products: list[str], padding: bool = True):
    """The one encoding of the judge: a text pair, truncated longest-first to the tokenizer's `model_max_length`
    (the fine-tune sets it to `max_seq_length` and saves it with the model, so labeling truncates the same way)."""
    return tokenizer(
        list(queries), list(products), truncation="longest_first", max_length=tokenizer.model_max_length,
        padding=padding, return_tensors="pt" if padding else None,
    )


class WeightedSoftCrossEntropy(nn.Module):
    """Cross-entropy against target distributions t_i, each pair weighted by its grade's class weight:
    `L = - sum_i w_{y_i} * sum_g t_{i,g} log softmax(z_i)_g / sum_i w_{y_i}`, y_i = argmax t_i.
    With one-hot targets this is `cross_entropy(z, y, weight=w)`."""

    def __init__(self, class_weights: torch.Tensor):
        super().__init__()
        self.register_buffer("class_weights", class_weights.float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = self.class_weights[targets.argmax(dim=1)]
        per_pair = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)
        return (weights * per_pair).sum() / weights.sum()


def load_classifier(base_model: str | Path, seed: int):
    """A 3-label sequence classifier from `base_model` (a seeded new head when the folder has none)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        str(base_model), num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
        dtype=torch.float32, ignore_mismatched_sizes=True,
    )


def freeze_lower_layers(model, train_layers: int | None) -> int:
    """Train only the top `train_layers` encoder layers, the pooler and the head; returns trainable parameter count."""
    if train_layers is not None:
        base = model.base_model
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        layers = base.encoder.layer
        for layer in layers[max(0, len(layers) - train_layers) :]:
            layer.requires_grad_(True)
        if getattr(base, "pooler", None) is not None:
            base.pooler.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: the class-weighted (soft-target) classifier fine-tune, checkpointed and resumable."""
    import ray.train
    from transformers import AutoTokenizer


    cfg = JudgeFinetuneConfig.model_validate(loop_config["finetune"])
    tokenizer = AutoTokenizer.from_pretrained(loop_config["base_model"])
    tokenizer.model_max_length = cfg.max_seq_length
    model = load_classifier(loop_config["base_model"], cfg.seed)
    trainable = freeze_lower_layers(model, cfg.train_layers)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    weights = loop_config["class_weights"] if cfg.class_weighted else [1.0, 1.0, 1.0]
    device = ray.train.torch.get_device()
    loss_fn = WeightedSoftCrossEntropy(torch.tensor(weights)).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def batch_loss(batch: pd.DataFrame) -> torch.Tensor:
        inputs = encode(tokenizer, batch["query"], batch["product"]).to(device)
        targets = torch.tensor(batch[["t0", "t1", "t2"]].to_numpy(dtype=np.float32), device=device)
        # bf16 autocast for the encoder's forward only; the softmax and loss stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(cfg.precision, device.type) == "bf16"):
            logits = model(**inputs).logits
        return loss_fn(logits.float(), targets)

    checkpointed_training(core, optimizer, cfg, loop_config["steps_per_epoch"], batch_loss, {"trainable_params": trainable})
    if ray.train.get_context().get_world_rank() == 0:
        core.save_pretrained(loop_config["output_dir"], safe_serialization=True)
        tokenizer.save_pretrained(loop_config["output_dir"])


def finetune_judge(examples: pd.DataFrame, base_model: Path, cfg: JudgeFinetuneConfig, storage_dir: Path, output_dir: Path) -> dict:
    """Run the Ray Train fine-tune; the classifier folder (transformers and vLLM load it) lands in `output_dir`."""

    return run_trainer(train_loop_per_worker, examples[EXAMPLE_COLUMNS], base_model, cfg, storage_dir, output_dir, "cross-encoder-judge")


def probabilities_transformers(model_path: str | Path, examples: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    """Per-grade probabilities of (query, product) rows with a plain `transformers` forward pass, in row order."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            part = examples.iloc[start : start + batch_size]
            out.append(torch.softmax(model(**encode(tokenizer, part["query"], part["product"])).logits, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 3))


def fold_grade_offsets(model_path: str | Path, offsets: np.ndarray) -> None:
    """Add per-grade logit offsets (`mr_ray.labeler.calibration`) to the classifier's output bias, in place:
    the saved folder then gives softmax(z + offsets) to `transformers` and vLLM alike."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_path), dtype=torch.float32)
    head = [module for module in model.modules() if isinstance(module, nn.Linear) and module.out_features == len(ID2LABEL)][-1]
    with torch.no_grad():
        head.bias += torch.as_tensor(offsets, dtype=head.bias.dtype)
    model.save_pretrained(str(model_path))


def engine_rows(strings: pd.DataFrame, model_path: str | Path) -> pd.DataFrame:
    """(query_id, product_id, variant, query, product) -> engine rows with the pair's token ids and where type 1 starts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    encoded = encode(tokenizer, strings["query"], strings["product"], padding=False)
    # A tokenizer without token types (MPNet, RoBERTa) marks the pair with separators only: all type 0.
    types_of = encoded.get("token_type_ids") or [[0] * len(ids) for ids in encoded["input_ids"]]
    type_start = [types.index(1) if 1 in types else len(types) for types in types_of]
    return strings[["query_id", "product_id", "variant"]].assign(input_ids=encoded["input_ids"], type_start=type_start)


# The sequence-classifier architectures vLLM implements itself (vllm/model_executor/models/registry.py,
# _SEQUENCE_CLASSIFICATION_MODELS, text models); read from the folder's config, not by importing vLLM (12 s).
VLLM_CLASSIFIERS = frozenset({
    "BertForSequenceClassification", "GteNewForSequenceClassification", "ModernBertForSequenceClassification",
    "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
})


def vllm_serves(model_path: str | Path) -> bool:
    """True when vLLM implements the judge folder's architecture (the BERT family); MPNet it does not."""
    architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    return bool(architectures) and set(architectures) <= VLLM_CLASSIFIERS


class TransformersClassifier:
    """Ray Data actor for a judge vLLM does not serve: engine rows -> lp0..lp2 with a plain `transformers`
    forward over the same token ids and token types that vLLM would get."""

    def __init__(self, model_path: str, threads: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.typed = "token_type_ids" in tokenizer.model_input_names
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32).eval()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = [list(map(int, row)) for row in batch["input_ids"]]
        longest = max(map(len, ids))
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):  # right padding
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self.typed:
            starts = torch.tensor(batch["type_start"].to_numpy(dtype=np.int64))[:, None]
            inputs["token_type_ids"] = (torch.arange(longest)[None, :] >= starts).long() * mask
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(**inputs).logits.float(), dim=1).numpy()
        return pd.DataFrame({
            "query_id": batch["query_id"].to_numpy(), "product_id": batch["product_id"].to_numpy(),
            "variant": batch["variant"].to_numpy(dtype=np.int64),
            "lp0": logprobs[:, 0], "lp1": logprobs[:, 1], "lp2": logprobs[:, 2], "error": "",
        })


def transformers_processor(model_path: str | Path, engine: JudgeEngineConfig):
    """Engine rows -> rows with lp0..lp2, through `engine.concurrency` Ray Data actors of `engine.cpu_threads` CPUs."""

    def process(dataset):
        return dataset.map_batches(
            TransformersClassifier, fn_constructor_kwargs={"model_path": str(model_path), "threads": engine.cpu_threads},
            batch_size=engine.batch_size, batch_format="pandas", concurrency=engine.concurrency, num_cpus=engine.cpu_threads,
        )

    return process


def classify_processor(model_path: str | Path, engine: JudgeEngineConfig):
    """`ray.data.llm` processor (vLLM pooling runner, classify): engine rows -> rows with lp0..lp2 (log-probabilities) or an error.
    A judge whose architecture vLLM does not implement (MPNet) gets `transformers_processor` instead."""
    if not vllm_serves(model_path):
        return transformers_processor(model_path, engine)

    def preprocess(row: dict) -> dict:
        return {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "variant": row["variant"],
            "tokenized_prompt": [int(t) for t in row["input_ids"]],
            # vLLM builds token_type_ids = (position >= this), as its score API does for text pairs
            "pooling_params": {"extra_kwargs": {"compressed_token_type_ids": int(row["type_start"])}},
        }

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or ""
        values = [np.nan] * 3
        if not error:
            probabilities = np.asarray(row.get("embeddings"), dtype=np.float64).reshape(-1)
            if probabilities.shape != (3,):
                error = f"engine returned {probabilities.shape} class probabilities, expected 3"
            else:
                values = np.log(np.clip(probabilities, 1e-30, 1.0)).tolist()
        return {"query_id": row["query_id"], "product_id": row["product_id"], "variant": int(row["variant"]),
                "lp0": values[0], "lp1": values[1], "lp2": values[2], "error": error}

    return engine_processor(model_path, engine_config(model_path, engine), preprocess, postprocess, task_type="classify")


def engine_config(model_path: str | Path, engine: JudgeEngineConfig) -> JudgeEngineConfig:
    """`engine` with max_model_len cut to the saved tokenizer's model_max_length (the training length): vLLM refuses more."""
    from transformers import AutoTokenizer

    longest = min(engine.max_model_len, AutoTokenizer.from_pretrained(str(model_path)).model_max_length)
    return engine.model_copy(update={"max_model_len": longest})
