"""Training examples and batches of the contrastive stages (the data path, top-down).

Training data is one row per query: its text and its graded products (judged,
and in Stage 2 also mined). `training_set` reads the prepared tables and the
labeler stages' judgments, `build_examples` groups them per query (with typo
copies: `examples_with_augmentation`), and a step's batch (`sample_batch`)
takes `queries_per_batch` rows, samples `products_per_query` products of each
(at least one positive when it has one) and scores every query against every
product of the step, so the other queries' products are in-batch negatives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from mr_ray.config import Stage1Config, Stage2Config
from mr_ray.data.augment import augment_queries
from mr_ray.data.prepare import read_table
from mr_ray.pipeline import Limit, note_limit
from mr_ray.retriever.losses import UNJUDGED
from mr_ray.retriever.mining import SOFT_COLUMNS


def combine_judgments(frames: list[pd.DataFrame], sources: list[str]) -> pd.DataFrame:
    """One grade per (query, product): judgments of the listed sources, later sources winning (with its
    per-grade probabilities, where a frame has them: SOFT_COLUMNS)."""
    judgments = pd.concat(frames, ignore_index=True)
    unknown = set(sources) - set(judgments["source"].unique())
    kept = judgments[judgments["source"].isin(sources)].copy()
    if kept.empty:
        raise ValueError(f"no judgments from sources {sources}; found {sorted(judgments['source'].unique())} (missing {sorted(unknown)})")
    kept["priority"] = kept["source"].map({source: i for i, source in enumerate(sources)})
    kept = kept.sort_values("priority", kind="stable").drop_duplicates(["query_id", "product_id"], keep="last")
    return kept[["query_id", "product_id", "grade", *(c for c in SOFT_COLUMNS if c in kept.columns)]].reset_index(drop=True)


def select_queries(queries: pd.DataFrame, split: str, limit: Limit | None, seed: int) -> pd.DataFrame:
    """The `split` queries, or a seeded subset of `limit.value` of them (said in the stage's log and manifest)."""
    chosen = queries[queries["split"] == split]
    if chosen.empty:
        raise ValueError(f"no queries in split {split!r}")
    if limit is not None and limit.value and len(chosen) > limit.value:
        note_limit(limit, limit.value, len(chosen), f"{split} queries")
        chosen = chosen.sample(limit.value, random_state=seed)
    return chosen.reset_index(drop=True)


def mined_labels(mined: pd.DataFrame, config: Stage2Config) -> pd.DataFrame:
    """The mined pairs as `config.mined_labels` trains on them: the judge's grade (hard), its per-grade
    probabilities (soft), or its grade where its confidence reaches `config.min_confidence` (confident).
    Pairs graded from a table (no probabilities) are hard grades in every mode."""
    if config.mined_labels == "confident" and "confidence" in mined.columns:
        mined = mined[mined["confidence"].isna() | (mined["confidence"] >= config.min_confidence)]
    if config.mined_labels != "soft":
        mined = mined.drop(columns=[c for c in SOFT_COLUMNS if c in mined.columns])
    return mined


def with_mined(judgments: pd.DataFrame, mined: pd.DataFrame, keep_judged_grades: bool = False) -> pd.DataFrame:
    """Judgments plus re-annotated mined pairs, mined pairs flagged `hard`. Where a mined pair was already
    judged, the judge's re-annotation wins (the method), or with `keep_judged_grades` the grade it had."""
    order = ["mined", "judged"] if keep_judged_grades else ["judged", "mined"]
    combined = combine_judgments([judgments.assign(source="judged"), mined], order)
    keys = pd.MultiIndex.from_frame(mined[["query_id", "product_id"]])
    combined["hard"] = pd.MultiIndex.from_frame(combined[["query_id", "product_id"]]).isin(keys)
    return combined


def build_examples(queries: pd.DataFrame, judgments: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """One row per query with a judged product: query_id, text, product_ids, titles, grades, hard (lists), and
    where some judgments carry per-grade probabilities (SOFT_COLUMNS), `soft` (per product [p0, p1, p2]; a hard
    grade's one-hot for the others)."""
    if "hard" not in judgments.columns:
        judgments = judgments.assign(hard=False)
    pairs = judgments.merge(queries[["query_id", "text"]], on="query_id").merge(products[["product_id", "title"]], on="product_id")
    if pairs.empty:
        raise ValueError("no judged pairs left for training after joining queries, judgments and products")
    columns = {"text": ("text", "first"), "product_ids": ("product_id", list), "titles": ("title", list), "grades": ("grade", list), "hard": ("hard", list)}
    if set(SOFT_COLUMNS) <= set(pairs.columns):
        one_hot = np.eye(3)[pairs["grade"].to_numpy(dtype=int)]
        given = pairs[list(SOFT_COLUMNS)].to_numpy(dtype=float)
        pairs["soft"] = list(np.where(np.isnan(given).any(axis=1, keepdims=True), one_hot, given))
        columns["soft"] = ("soft", list)
    return pairs.groupby("query_id", sort=True).agg(**columns).reset_index()


def sample_batch(rows: pd.DataFrame, products_per_query: int, rng: np.random.Generator) -> tuple[list[str], list[str], torch.Tensor]:
    """(query texts, product titles, grades [Q, P], or soft labels [Q, P, 3] for rows with `soft`) of one step.

    Per query, `products_per_query` products: one positive (if any), then mined
    hard samples, then random others. Grades come from each query's own
    judgments; a product it has not judged is UNJUDGED (an in-batch negative;
    certainly grade 0 as a soft label).
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
    texts = [str(t) for t in rows["text"]]
    if "soft" in rows.columns:
        soft = torch.zeros((len(rows), len(chosen), 3))
        soft[..., 0] = 1.0
        for row, (product_ids, labels) in enumerate(zip(rows["product_ids"], rows["soft"])):
            for pid, label in zip(product_ids, labels):
                j = column.get(str(pid))
                if j is not None:
                    soft[row, j] = torch.as_tensor(np.asarray(label, dtype=np.float32))
        return texts, list(chosen.values()), soft
    matrix = torch.full((len(rows), len(chosen)), UNJUDGED, dtype=torch.long)
    for row, (product_ids, grades) in enumerate(zip(rows["product_ids"], rows["grades"])):
        for pid, grade in zip(product_ids, grades):
            j = column.get(str(pid))
            if j is not None:
                matrix[row, j] = int(grade)
    return texts, list(chosen.values()), matrix


def iter_frames(examples: pd.DataFrame, batch_size: int, seed: int) -> Iterable[pd.DataFrame]:
    """Shuffled batches of rows, the in-process twin of a Ray Data shard's iter_batches."""
    shuffled = examples.sample(frac=1.0, random_state=seed)
    for start in range(0, len(shuffled), batch_size):
        yield shuffled.iloc[start : start + batch_size]


def read_frame(stage_dir: Path, kind: str) -> pd.DataFrame:
    table = read_table(stage_dir, kind)
    if table is None:
        raise FileNotFoundError(f"{stage_dir}: no {kind}/ table")
    return table.to_pandas()


def training_set(prepared: Path, config: Stage1Config, limit: Limit | None, labeled: list[Path] = ()) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(products, train queries, one grade per judged pair of those queries).

    Human judgments come from the prepare output; LLM, audited and synthetic
    ones (and synthetic queries) from the labeler stages' outputs in `labeled`.
    `limit` caps the train queries (a seeded subset).
    """
    products = read_frame(prepared, "products")
    queries = [read_frame(prepared, "queries")]
    judgments = [read_frame(prepared, "judgments")]
    for folder in labeled:
        judgments.append(read_frame(folder, "judgments"))
        if (folder / "queries").exists():  # synthesize's new queries
            queries.append(read_frame(folder, "queries"))
    queries = select_queries(pd.concat(queries, ignore_index=True), "train", limit, config.seed)
    judgments = combine_judgments(judgments, config.judgment_sources)
    return products, queries, judgments[judgments["query_id"].isin(set(queries["query_id"]))]


def stage2_examples(
    prepared: Path, config: Stage1Config, limit: Limit | None, labeled: list[Path], mined: pd.DataFrame | None, stage2: Stage2Config
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Stage 2's training rows: the train queries' judgments with their mined samples (None: no mining) labelled
    as `stage2` says (`mined_labels`), plus typo copies (`config`: Stage 1's, whose data the rows extend).
    Returns (products, examples, mined pairs used)."""
    products, queries, judgments = training_set(prepared, config, limit, labeled)
    mined_count = 0
    if mined is not None:
        mined = mined_labels(mined[mined["query_id"].isin(set(queries["query_id"]))], stage2)
        mined_count = len(mined)
        judgments = with_mined(judgments, mined, stage2.keep_judged_grades)
    return products, examples_with_augmentation(queries, judgments, products, config), mined_count


def examples_with_augmentation(queries: pd.DataFrame, judgments: pd.DataFrame, products: pd.DataFrame, config: Stage1Config) -> pd.DataFrame:
    """Training rows for the clean queries plus their typo copies (same judgments)."""
    augment = config.augment
    if augment.rate > 0:
        queries, judgments = augment_queries(queries, judgments, augment.rate, augment.seed, augment.copies)
    return build_examples(queries, judgments, products)
