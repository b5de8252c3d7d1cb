"""Evaluation: every system scored on a prepared split, one way, and the evaluate stage's report.

`load_split` reads a split (queries, truth, judged pairs, the catalog and its BM25); `score_encoder`
scores one encoder on it (full-catalog retrieval, grade separation, hybrid rows with BM25), with the
metrics of mr_ray.metrics. The evaluate stage, `mr-ray evaluate`, the sweep's trials and the benches
all score through these two, so a number means the same wherever it is printed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.config import EncoderConfig, EvaluateConfig, LexicalConfig
from mr_ray.data.prepare import read_table
from mr_ray.embeddings import catalog_vectors
from mr_ray.metrics import PER_QUERY_NDCG, evaluate_retrieval, separation_metrics
from mr_ray.pipeline import Limit, note_limit
from mr_ray.report.plots import plot_histograms
from mr_ray.retriever.encoder import encode_queries, load_encoder
from mr_ray.search.fusion import normalise_lexical, weighted_fusion
from mr_ray.search.retrieval import (
    LexicalIndex,
    RunDict,
    build_faiss_index,
    lexical_search,
    pair_scores,
    run_from_rows,
)
from mr_ray.search.shards import ShardIndex, search_shards_both
from mr_ray.search.thresholds import choose_fusion_weight


def judged_pairs(prepared: Path, query_ids: set[str]) -> pd.DataFrame:
    """The judged pairs of the evaluated queries, with texts and titles.

    The sample catalog's truth is its rule grades on the judged pool; a real
    dataset's truth is its human judgments.
    """
    gold = read_table(prepared, "gold")
    pool = read_table(prepared, "pool")
    if gold is not None and pool is not None:
        pairs = gold.to_pandas().merge(pool.to_pandas(), on=["query_id", "product_id"])
    else:
        judgments = read_table(prepared, "judgments").to_pandas()
        pairs = judgments[judgments["source"] == "human"]
    return pairs[pairs["query_id"].isin(query_ids)][["query_id", "product_id", "grade"]]


def truth_table(prepared: Path) -> pd.DataFrame:
    """Evaluation qrels: the sample's rule grades if present, else human judgments."""
    gold = read_table(prepared, "gold")
    if gold is not None:
        return gold.to_pandas()
    judgments = read_table(prepared, "judgments").to_pandas()
    return judgments[judgments["source"] == "human"]


def eval_queries(prepared: Path, config: EvaluateConfig, limit_setting: str = "evaluate.max_queries") -> pd.DataFrame:
    """The split's queries, or a seeded subset of `config.max_queries` (said in the stage's log as `limit_setting`)."""
    queries = read_table(prepared, "queries").to_pandas()
    chosen = queries[queries["split"] == config.split]
    if chosen.empty:
        raise ValueError(f"no queries in split {config.split!r} to evaluate")
    if config.max_queries and len(chosen) > config.max_queries:
        note_limit(Limit(limit_setting, config.max_queries), config.max_queries, len(chosen), f"{config.split} queries")
        chosen = chosen.sample(config.max_queries, random_state=config.seed)
    return chosen.reset_index(drop=True)


def tuning_queries(prepared: Path, config: EvaluateConfig) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The dev queries (and their truth) the hybrid rows' fusion weight is tuned on; None without dev judgments."""
    dev = config.model_copy(update={"split": "dev"})
    try:
        queries = eval_queries(prepared, dev)
    except ValueError:
        return None
    truth = truth_table(prepared)
    truth = truth[truth["query_id"].isin(set(queries["query_id"]))]
    return (queries, truth) if not truth.empty else None


def hybrid_rows(name: str, split: "ScoredSplit", shard, query_vectors: np.ndarray, dev_query_vectors: np.ndarray | None, cosines: np.ndarray, config: EvaluateConfig, k: int) -> tuple[dict, dict]:
    """An encoder's two hybrid rows with BM25: reciprocal-rank fusion (k=60) of the two top-k lists, and
    the weighted fusion of cosine and normalised BM25 with its weight tuned on dev (its grade separation too)."""
    queries = split.queries
    candidates = search_shards_both([shard], query_vectors, queries["text"].tolist(), k)
    runs = {f"{name}+bm25 rrf": {str(q): dict(c.rrf(k)) for q, c in zip(queries["query_id"], candidates)}}
    systems = {f"{name}+bm25 rrf": evaluate_retrieval(runs[f"{name}+bm25 rrf"], split.truth, config)}
    if split.tuning is not None:
        dev_queries, dev_truth = split.tuning
        dev_candidates = search_shards_both([shard], dev_query_vectors, dev_queries["text"].tolist(), k)
        weight, _ = choose_fusion_weight(dict(zip(dev_queries["query_id"].astype(str), dev_candidates)), dev_truth)
        hybrid = f"{name}+bm25 weighted"
        runs[hybrid] = {str(q): {r["product_id"]: r["score"] for r in c.ranked("hybrid", weight, k)} for q, c in zip(queries["query_id"], candidates)}
        fused = weighted_fusion(cosines, split.pair_lexical, weight)
        systems[hybrid] = {**evaluate_retrieval(runs[hybrid], split.truth, config), **separation_metrics(split.pairs["grade"].to_numpy(), fused), "fusion_weight": weight}
    return systems, runs


@dataclass
class ScoredSplit:
    """What every system is scored against: a prepared split's queries, their truth and judged pairs (with
    texts and titles), the catalog, and, for hybrid rows, the BM25 index of the catalog's titles (row i =
    products row i), each judged pair's normalised BM25, and the dev queries the fusion weight is tuned on."""

    products: pd.DataFrame
    queries: pd.DataFrame
    truth: pd.DataFrame
    pairs: pd.DataFrame
    lexical: LexicalIndex | None = None
    pair_lexical: np.ndarray | None = None
    tuning: tuple[pd.DataFrame, pd.DataFrame] | None = None

    def with_queries(self, queries: pd.DataFrame) -> "ScoredSplit":
        """The same split asked with other texts of the same query ids (say, typo'd copies)."""
        pairs = self.pairs.drop(columns="text").merge(queries[["query_id", "text"]], on="query_id")
        return replace(self, queries=queries, pairs=pairs, pair_lexical=None if self.pair_lexical is None else split_pair_lexical(self.lexical, self.products, pairs))


def load_split(
    prepared: Path, config: EvaluateConfig, lexical_config: LexicalConfig | None = None, products: pd.DataFrame | None = None,
    limit_setting: str = "evaluate.max_queries",
) -> ScoredSplit:
    """The split `config.split` of a prepared dataset to score systems on; with `lexical_config`, BM25 too
    (for the bm25 row and, with `config.hybrid`, every encoder's hybrid rows). `products`: the catalog if
    already read; `limit_setting`: the setting `config.max_queries` came from, for the log."""
    products = read_table(prepared, "products").to_pandas() if products is None else products
    queries = eval_queries(prepared, config, limit_setting)
    truth = truth_table(prepared)
    truth = truth[truth["query_id"].isin(set(queries["query_id"]))]
    pairs = judged_pairs(prepared, set(queries["query_id"]))
    pairs = pairs.merge(queries[["query_id", "text"]], on="query_id").merge(products[["product_id", "title"]], on="product_id")
    split = ScoredSplit(products, queries, truth, pairs)
    if lexical_config is not None:
        split.lexical = LexicalIndex.build(products["title"].tolist(), lexical_config)
        if config.hybrid:
            split.pair_lexical = split_pair_lexical(split.lexical, products, pairs)
            split.tuning = tuning_queries(prepared, config)
    return split


def split_pair_lexical(lexical: LexicalIndex, products: pd.DataFrame, pairs: pd.DataFrame) -> np.ndarray:
    """Each judged pair's BM25 over its query's best BM25 in the catalog (the hybrid's lexical half)."""
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"])
    return normalise_lexical(*lexical.pair_scores(pairs["text"].tolist(), row_of[pairs["product_id"]].to_numpy()))


def score_bm25(split: ScoredSplit, config: EvaluateConfig) -> tuple[dict, RunDict]:
    """BM25's row and run on the split (its index: `load_split` with a lexical config)."""
    run = lexical_search(split.lexical, split.products["product_id"].to_numpy(), split.queries, scored_depth(config))
    return evaluate_retrieval(run, split.truth, config), run


def scored_depth(config: EvaluateConfig) -> int:
    return max(config.ndcg_k, config.recall_k, config.precision_k)


def score_encoder(name: str, split: ScoredSplit, model, catalog: np.ndarray, config: EvaluateConfig, batch_size: int = 128) -> tuple[dict[str, dict], dict[str, RunDict], np.ndarray]:
    """Score one encoder on a split: full-catalog retrieval (exact inner product over `catalog`, its vectors of
    the split's products in their row order), the grade separation of the judged pairs and, when the split has
    BM25 and `config.hybrid`, its hybrid rows. Queries are encoded by `model` in fp32 (`encode_queries`), as served.
    Returns ({row name: metrics}, {row name: run}, the judged pairs' cosines). The one scoring path: the
    evaluate stage, `mr-ray evaluate`, the sweep's trials and the benches all call it."""
    k = scored_depth(config)
    queries = split.queries
    product_ids = split.products["product_id"].astype(str).to_numpy()
    query_vectors = encode_queries(model, queries["text"].tolist(), batch_size)
    index = build_faiss_index(np.ascontiguousarray(catalog, dtype=np.float32), "Flat")
    scores, rows = index.search(query_vectors, min(k, len(product_ids)))
    runs = {name: run_from_rows(product_ids, queries["query_id"], rows, scores)}
    cosines = pair_scores(model, split.pairs, batch_size, dict(zip(product_ids, catalog)))
    systems = {name: {**evaluate_retrieval(runs[name], split.truth, config), **separation_metrics(split.pairs["grade"].to_numpy(), cosines)}}
    if config.hybrid and split.lexical is not None:
        shard = ShardIndex("catalog", index, product_ids.tolist(), split.products["title"].tolist(), split.lexical)
        dev_vectors = encode_queries(model, split.tuning[0]["text"].tolist(), batch_size) if split.tuning is not None else None
        rows_, hybrid_runs = hybrid_rows(name, split, shard, query_vectors, dev_vectors, cosines, config, k)
        systems.update(rows_)
        runs.update(hybrid_runs)
    return systems, runs, cosines


def query_changes(before: str, after: str, runs: dict[str, RunDict], systems: dict[str, dict], truth: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame, n: int = 10, top: int = 5) -> dict:
    """The `n` queries whose NDCG gained most and lost most from system `before` to `after` (their per-query
    NDCG from `evaluate_retrieval`, in `systems`), with both top lists and grades."""
    ndcg_before, ndcg_after = (systems[system][PER_QUERY_NDCG] for system in (before, after))
    delta = sorted(((ndcg_after[q] - ndcg_before[q], q) for q in ndcg_before if q in ndcg_after), key=lambda item: (item[0], item[1]))
    grades = {(str(q), str(p)): int(g) for q, p, g in zip(truth["query_id"], truth["product_id"], truth["grade"])}
    titles = dict(zip(products["product_id"].astype(str), products["title"]))
    texts = dict(zip(queries["query_id"].astype(str), queries["text"]))

    def top_list(system: str, query: str) -> list[dict]:
        ranked = sorted(runs[system][query].items(), key=lambda item: -item[1])[:top]
        return [{"title": titles.get(p, p), "grade": grades.get((query, p), 0), "score": round(s, 4)} for p, s in ranked]

    def entry(change: float, query: str) -> dict:
        return {"query": texts.get(query, query), "ndcg_before": ndcg_before[query], "ndcg_after": ndcg_after[query], "change": change,
                "before": top_list(before, query), "after": top_list(after, query)}

    return {"before": before, "after": after, "gained": [entry(d, q) for d, q in reversed(delta[-n:]) if d > 0], "lost": [entry(d, q) for d, q in delta[:n] if d < 0]}


def evaluate_systems(
    prepared: Path, models: dict[str, str | None], config: EvaluateConfig, encoder: EncoderConfig, lexical_config: LexicalConfig, plot_path: Path | None = None
) -> dict:
    """Metrics of BM25 (if asked) and of every encoder in `models` (name -> folder; None = pretrained), each
    encoder with its hybrid rows (config.hybrid), and the queries the last encoder changed most. Catalog
    vectors come from the embedding cache (mr_ray.embeddings): an encoder another stage embedded is not embedded again."""
    needs_lexical = "bm25" in config.baselines or config.hybrid
    split = load_split(prepared, config, lexical_config if needs_lexical else None)
    systems: dict[str, dict] = {}
    runs: dict[str, RunDict] = {}
    if "bm25" in config.baselines:
        systems["bm25"], runs["bm25"] = score_bm25(split, config)
    cosines_by_system = {}
    for name, path in models.items():
        catalog = catalog_vectors(prepared / "products", split.products, encoder, path, name)
        model = load_encoder(path, encoder.device, encoder.max_seq_length)
        rows, system_runs, cosines_by_system[name] = score_encoder(name, split, model, catalog.vectors, config, encoder.batch_size)
        systems.update(rows)
        runs.update(system_runs)
    if plot_path is not None and cosines_by_system:
        plot_histograms(cosines_by_system, split.pairs["grade"].to_numpy(), plot_path)
    result = {"split": config.split, "n_eval_queries": len(split.queries), "n_judged_pairs": len(split.pairs), "systems": systems}
    result["phenomena"] = ndcg_by_phenomenon({name: row[PER_QUERY_NDCG] for name, row in systems.items()}, split.queries)
    # The queries the final encoder changed most: against the pretrained encoder, or BM25 when that is the only encoder.
    encoders = list(models)
    before = "pretrained" if "pretrained" in encoders[:-1] else "bm25" if "bm25" in runs else None
    if encoders and before:
        result["query_changes"] = query_changes(before, encoders[-1], runs, systems, split.truth, split.queries, split.products)
    return result


def ndcg_by_phenomenon(per_query: dict[str, dict[str, float]], queries: pd.DataFrame) -> dict[str, dict]:
    """Mean NDCG@k of every system on the queries of each phenomenon (the queries' optional `phenomenon`
    tag), from each system's per-query NDCG ({system: {query_id: NDCG}}, `evaluate_retrieval`'s
    PER_QUERY_NDCG): {phenomenon: {"n_queries": n, system: NDCG}}, largest group first; {} untagged."""
    if "phenomenon" not in queries.columns or queries["phenomenon"].isna().all():
        return {}
    groups = queries.dropna(subset=["phenomenon"]).groupby("phenomenon")["query_id"].agg(lambda ids: [str(q) for q in ids])
    table = {}
    for phenomenon in sorted(groups.index, key=lambda tag: (-len(groups[tag]), tag)):
        table[phenomenon] = {"n_queries": len(groups[phenomenon])}
        for name, scores in per_query.items():
            values = [scores[q] for q in groups[phenomenon] if q in scores]
            table[phenomenon][name] = float(np.mean(values)) if values else None
    return table
