"""Stage 2, mine: hard samples for each training query from the Stage-1 encoder.

The catalog and the training queries are embedded with the Stage-1 encoder
(Ray Data actors), a FAISS index (any `index_factory` string, inner product)
is searched for the top-k products of every query, and two kinds of hard
samples are kept per query:

- unjudged products ranked highest by each source in `mine.sources`: the
  encoder's own top-k (`dense`), BM25's (`lexical`) and the served hybrid's
  (`hybrid`: the weighted fusion, its weight chosen on the mined queries'
  judgments as the `index` stage chooses it on dev). Dense finds are the
  likely false negatives or true confusers that in-batch negatives never
  show; lexical and hybrid finds are where the served system errs, products
  that share the query's words, which the encoder must learn to separate;
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
from mr_ray.search.retrieval import LexicalIndex, build_faiss_index
from mr_ray.search.shards import ShardIndex, search_shards_both
from mr_ray.search.thresholds import choose_fusion_weight

MINED_SOURCE = "mined"
SOFT_COLUMNS = ("p0", "p1", "p2")  # a judge's probability of each grade (mr_ray.labeler.label)
TopLists = list[dict[str, list[tuple[int, float]]]]  # per query: {source: [(catalog row, cosine), ...] best first}


def top_lists(
    query_ids: np.ndarray, query_vectors: np.ndarray, texts: list[str], product_vectors: np.ndarray, products: pd.DataFrame,
    judged: pd.DataFrame, config: MineConfig, lexical: LexicalIndex | None = None,
) -> tuple[TopLists, float | None]:
    """Each query's top-k catalog rows by every source in `config.sources`, with their cosines, and the hybrid
    source's fusion weight (None without it). `lexical`: the catalog's BM25 (rows = `products` rows), needed
    by the lexical and hybrid sources."""
    index = build_faiss_index(product_vectors, config.index_factory, setting="mine.index_factory")
    k = min(config.k, len(products))
    if config.sources == ["dense"]:
        scores, rows = index.search(query_vectors, k)
        return [{"dense": [(int(r), float(s)) for r, s in zip(rows[q], scores[q]) if r >= 0]} for q in range(len(query_ids))], None
    if lexical is None:
        raise ValueError(f"mine.sources {config.sources} needs the catalog's BM25 index")
    shard = ShardIndex("catalog", index, list(range(len(products))), products["title"].tolist(), lexical)
    candidates = search_shards_both([shard], query_vectors, texts, k)  # product ids here are catalog rows
    weight = None
    if "hybrid" in config.sources:
        as_rows = judged.assign(product_id=judged["product_id"].map(pd.Series(range(len(products)), index=products["product_id"]).to_dict()))
        as_rows = as_rows.dropna(subset=["product_id"]).astype({"product_id": int}).astype({"product_id": str})
        weight, _ = choose_fusion_weight(dict(zip(map(str, query_ids), candidates)), as_rows)
    lists = [
        {source: [(int(row["product_id"]), row["dense_score"]) for row in c.ranked(source, weight or 0.0, k)] for source in config.sources}
        for c in candidates
    ]
    return lists, weight


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
    lists: TopLists,
) -> pd.DataFrame:
    """Hard samples per query (`lists`: `top_lists`): columns query_id, product_id, reason, found_by (the source
    whose top-k gave it; "dense" for a boundary pair), rank (in that top-k; -1: not in it), score (cosine)."""
    row_of = {pid: i for i, pid in enumerate(product_ids)}
    judged_by_query = {qid: group for qid, group in judged.groupby("query_id")}
    found = []
    for qi, qid in enumerate(query_ids):
        group = judged_by_query.get(qid)
        taken = set(group["product_id"]) if group is not None else set()
        for source, ranked in lists[qi].items():
            kept = 0
            for rank, (row, score) in enumerate(ranked):
                if kept >= config.unjudged_per_query:
                    break
                if product_ids[row] in taken:
                    continue
                taken.add(product_ids[row])
                found.append((qid, product_ids[row], "unjudged", source, rank, float(score)))
                kept += 1
        if group is None or config.boundary_per_query == 0:
            continue
        group = group[[pid in row_of for pid in group["product_id"]]]  # Series.isin(dict) walks all its keys per call
        if group.empty:
            continue
        vectors = product_vectors[[row_of[pid] for pid in group["product_id"]]]
        judged_scores = vectors @ query_vectors[qi]
        hardness = boundary_hardness(judged_scores, group["grade"].to_numpy())
        dense_rank = {product_ids[row]: rank for rank, (row, _) in enumerate(lists[qi].get("dense", []))}
        for i in np.argsort(-hardness)[: config.boundary_per_query]:
            if np.isfinite(hardness[i]):
                pid = group["product_id"].iloc[i]
                found.append((qid, pid, "boundary", "dense", dense_rank.get(pid, -1), float(judged_scores[i])))
    return pd.DataFrame(found, columns=["query_id", "product_id", "reason", "found_by", "rank", "score"])


def annotate(mined: pd.DataFrame, grades: pd.DataFrame, unjudged_grade: int | None = None) -> pd.DataFrame:
    """Attach grades (query_id, product_id, grade; and a judge's per-grade probabilities p0..p2 and confidence
    when `grades` has them) to mined pairs; pairs without one are dropped, or get `unjudged_grade`."""
    kept = ["query_id", "product_id", "grade", *(c for c in (*SOFT_COLUMNS, "confidence") if c in grades.columns)]
    lookup = grades[kept].drop_duplicates(["query_id", "product_id"], keep="last")
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
