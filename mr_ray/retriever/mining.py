"""Stage 2, mine: hard samples for each training query from the Stage-1 encoder.

The catalog and the training queries are embedded with the Stage-1 encoder
(Ray Data actors), a FAISS index (any `index_factory` string, inner product)
is searched for the top-k products of every query, and two kinds of hard
samples are kept per query:

- unjudged products the encoder ranks highest: the likely false negatives or
  true confusers that in-batch negatives never show;
- judged products nearest a grade boundary (or on its wrong side): for each
  boundary between grades present for the query, its threshold is the midpoint
  of the mean similarities on either side, and a product's hardness is how far
  it sits on the wrong side (t - s for the upper side, s - t for the lower).

The mined pairs are then re-annotated, by the fine-tuned judge (cross-encoder
or causal LM; mr_ray.labeler, Ray Data + vLLM) that the run's graph gave mining or, for
a run without a judge, from a grades table, and written with `source=mined`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import MineConfig
from mr_ray.search.retrieval import build_faiss_index

MINED_SOURCE = "mined"


def boundary_hardness(scores: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """Per judged product: how far it sits on the wrong side of its nearest grade boundary (higher = harder)."""
    hardness = np.full(len(scores), -np.inf)
    for lowest_above in (2, 1):
        above, below = grades >= lowest_above, grades < lowest_above
        if not above.any() or not below.any():
            continue
        threshold = (scores[above].mean() + scores[below].mean()) / 2
        side = np.where(above, threshold - scores, scores - threshold)
        adjacent = (grades == lowest_above) | (grades == lowest_above - 1)
        hardness = np.where(adjacent, np.maximum(hardness, side), hardness)
    return hardness


def mine_hard_samples(
    query_ids: np.ndarray,
    query_vectors: np.ndarray,
    product_ids: np.ndarray,
    product_vectors: np.ndarray,
    judged: pd.DataFrame,
    config: MineConfig,
) -> pd.DataFrame:
    """Hard samples per query: columns query_id, product_id, reason, rank (-1: not in the top-k), score."""
    index = build_faiss_index(product_vectors, config.index_factory, setting="mine.index_factory")
    k = min(config.k, len(product_ids))
    scores, rows = index.search(query_vectors, k)
    row_of = {pid: i for i, pid in enumerate(product_ids)}
    judged_by_query = {qid: group for qid, group in judged.groupby("query_id")}
    found = []
    for qi, qid in enumerate(query_ids):
        group = judged_by_query.get(qid)
        judged_ids = set(group["product_id"]) if group is not None else set()
        kept = 0
        for rank, (row, score) in enumerate(zip(rows[qi], scores[qi])):
            if kept >= config.unjudged_per_query:
                break
            if row < 0 or product_ids[row] in judged_ids:
                continue
            found.append((qid, product_ids[row], "unjudged", rank, float(score)))
            kept += 1
        if group is None or config.boundary_per_query == 0:
            continue
        group = group[[pid in row_of for pid in group["product_id"]]]  # Series.isin(dict) walks all its keys per call
        if group.empty:
            continue
        vectors = product_vectors[[row_of[pid] for pid in group["product_id"]]]
        judged_scores = vectors @ query_vectors[qi]
        hardness = boundary_hardness(judged_scores, group["grade"].to_numpy())
        ranked = dict(zip(product_ids[rows[qi][rows[qi] >= 0]], range(k)))
        for i in np.argsort(-hardness)[: config.boundary_per_query]:
            if np.isfinite(hardness[i]):
                pid = group["product_id"].iloc[i]
                found.append((qid, pid, "boundary", ranked.get(pid, -1), float(judged_scores[i])))
    return pd.DataFrame(found, columns=["query_id", "product_id", "reason", "rank", "score"])


def annotate(mined: pd.DataFrame, grades: pd.DataFrame, unjudged_grade: int | None = None) -> pd.DataFrame:
    """Attach grades (query_id, product_id, grade) to mined pairs; pairs without one are dropped, or get `unjudged_grade`."""
    lookup = grades[["query_id", "product_id", "grade"]].drop_duplicates(["query_id", "product_id"], keep="last")
    if unjudged_grade is None:
        out = mined.merge(lookup, on=["query_id", "product_id"], how="inner")
    else:
        out = mined.merge(lookup, on=["query_id", "product_id"], how="left").fillna({"grade": unjudged_grade})
    out["grade"] = out["grade"].astype(np.int8)
    out["source"] = MINED_SOURCE
    return out


def annotator(config: MineConfig, judges: list[Path]) -> tuple[str, str]:
    """Who grades the mined pairs: ("judge", why) with the judge the graph gave mining, else
    ("grades:<table>", why); `annotator: judge` with no judge in the run falls back to the human grades."""
    if config.annotator == "grades":
        return f"grades:{config.grades_source}", "mine.annotator: grades"
    if judges:
        return "judge", "mine.annotator: judge"
    return "grades:judgments", "mine.annotator: judge, but no judge ran (judge.kind: none): the human grades instead"
