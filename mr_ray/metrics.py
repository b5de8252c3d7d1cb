"""Retrieval metrics with graded gains, and score separation per grade (the numbers every report row holds).

Retrieval metrics come from `ranx`:
- NDCG@10 with graded gains (gain = grade: exact 2, partial 1), so ranking an
  exact item above a partial one counts;
- Recall@100 and Precision@10 of *exact* items (grade 2).
Unjudged products count as grade 0. Where the judged pairs came from another
system's results (a shop's own search, Home Depot), that full-catalog figure
scores down a system for the relevant products it finds that were never judged
(pool bias), so every row also carries judged@10 (the share of its top 10 that
has a judgment) and condensed NDCG@10 (its ranking with the unjudged products
removed; Sakai, SIGIR 2007). Score separation uses the judged pairs:
mean score per grade and the AUCs of grade 2 over grade 1 and grade 1 over
grade 0 (sklearn's ROC AUC), the quantities a search team thresholds on.

A judge is scored from its per-grade probabilities (`judge_metrics`): the grade is their argmax, the
ranking score the expected grade sum_g g*p_g (what reranking and the AUCs use), the expected rating
1 + that (Home Depot's 1..3 scale).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from ranx import Qrels, Run, evaluate
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from mr_ray.config import EvaluateConfig
from mr_ray.search.retrieval import RunDict

PER_QUERY_NDCG = "ndcg_per_query"  # evaluate_retrieval's {query_id: NDCG} (ranx), for the per-query tables


def qrels_dict(judgments: pd.DataFrame, min_grade: int = 1) -> dict[str, dict[str, int]]:
    """{query_id: {product_id: grade}} of the pairs graded at least `min_grade`."""
    kept = judgments[judgments["grade"] >= min_grade]
    out: dict[str, dict[str, int]] = {}
    for qid, pid, grade in zip(kept["query_id"], kept["product_id"], kept["grade"]):
        out.setdefault(str(qid), {})[str(pid)] = int(grade)
    return out


def judged_only(run: RunDict, judgments: pd.DataFrame) -> RunDict:
    """The run with every product that has no judgment for its query removed, order kept (a condensed list)."""
    judged = judgments.groupby(judgments["query_id"].astype(str))["product_id"].agg(lambda ids: set(ids.astype(str))).to_dict()
    return {q: {p: s for p, s in docs.items() if p in judged.get(q, ())} for q, docs in run.items()}


def judged_at(run: RunDict, condensed: RunDict, query_ids: list[str], k: int) -> float:
    """Mean over `query_ids` of the share of the run's top k that is judged (of what it returned, if fewer)."""
    shares = []
    for q in query_ids:
        top = sorted(run[q].items(), key=lambda item: -item[1])[:k]
        shares.append(sum(p in condensed[q] for p, _ in top) / len(top) if top else 0.0)
    return float(np.mean(shares)) if shares else 0.0


def evaluate_retrieval(run: RunDict, judgments: pd.DataFrame, config: EvaluateConfig) -> dict:
    """Graded NDCG, exact-item recall and precision of a run (ranx), judged@k and condensed NDCG@k
    (`judgments`: every judged pair of the run's queries, grade 0 included)."""
    graded = qrels_dict(judgments, min_grade=1)
    exact = qrels_dict(judgments, min_grade=2)
    results = {}
    for name, qrels, metrics in (
        ("graded", graded, [f"ndcg@{config.ndcg_k}"]),
        ("exact", exact, [f"recall@{config.recall_k}", f"precision@{config.precision_k}"]),
    ):
        query_ids = [q for q in qrels if q in run]
        if not query_ids:
            raise ValueError(f"no query of the run has {name} judgments to evaluate against")
        ranx_run = Run({q: run[q] if run[q] else {"__none__": 0.0} for q in query_ids})
        scores = evaluate(Qrels({q: qrels[q] for q in query_ids}), ranx_run, metrics, make_comparable=True)
        scores = scores if isinstance(scores, dict) else {metrics[0]: scores}
        if name == "graded":
            per_query = {str(q): float(v) for q, v in ranx_run.scores[metrics[0]].items()}
            condensed = judged_only({q: run[q] for q in query_ids}, judgments)
            results["judged"] = judged_at(run, condensed, query_ids, config.ndcg_k)
            condensed_run = Run({q: docs or {"__none__": 0.0} for q, docs in condensed.items()})
            results["condensed"] = float(evaluate(Qrels({q: qrels[q] for q in query_ids}), condensed_run, metrics[0], make_comparable=True))
        results.update({metric: float(value) for metric, value in scores.items()})
        results[f"n_queries_{name}"] = len(query_ids)
    return {
        "ndcg@10" if config.ndcg_k == 10 else f"ndcg@{config.ndcg_k}": results[f"ndcg@{config.ndcg_k}"],
        f"judged@{config.ndcg_k}": results["judged"],
        f"condensed_ndcg@{config.ndcg_k}": results["condensed"],
        f"recall@{config.recall_k}_exact": results[f"recall@{config.recall_k}"],
        f"precision@{config.precision_k}_exact": results[f"precision@{config.precision_k}"],
        "n_queries": results["n_queries_graded"],
        PER_QUERY_NDCG: per_query,
    }


def separation_metrics(grades: np.ndarray, cosines: np.ndarray) -> dict:
    """Mean cosine per grade and AUC(2 over 1), AUC(1 over 0)."""
    out = {f"mean_cos_grade{g}": float(cosines[grades == g].mean()) if (grades == g).any() else None for g in (0, 1, 2)}
    for hi, lo in ((2, 1), (1, 0)):
        mask = (grades == hi) | (grades == lo)
        labels = grades[mask] == hi
        out[f"auc_{hi}_over_{lo}"] = float(roc_auc_score(labels, cosines[mask])) if 0 < labels.sum() < len(labels) else None
    return out


GRADES = [0, 1, 2]


def _auc(truth: np.ndarray, score: np.ndarray, upper: int) -> float | None:
    """AUC of grade `upper` over grade `upper - 1` by `score` (None when either grade is absent)."""
    keep = (truth == upper) | (truth == upper - 1)
    if len(np.unique(truth[keep])) < 2:
        return None
    return float(roc_auc_score(truth[keep] == upper, score[keep]))


def judge_metrics(truth, probabilities: np.ndarray, rating_mean=None) -> dict:
    """Accuracy, within-one, macro-F1, per-grade recall, confusion matrix (rows true, columns predicted),
    AUC(2 over 1), AUC(1 over 0) and, where `rating_mean` is given, the RMSE of the expected rating."""
    truth = np.asarray(truth, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities.argmax(axis=1)
    expected = probabilities @ np.array(GRADES, dtype=float)
    recall = recall_score(truth, predicted, labels=GRADES, average=None, zero_division=0)
    metrics = {
        "pairs": int(len(truth)),
        "accuracy": float(accuracy_score(truth, predicted)),
        "within_one": float(np.mean(np.abs(predicted - truth) <= 1)),
        "macro_f1": float(f1_score(truth, predicted, labels=GRADES, average="macro", zero_division=0)),
        "recall": {g: float(r) for g, r in zip(GRADES, recall)},
        "auc_2_over_1": _auc(truth, expected, 2),
        "auc_1_over_0": _auc(truth, expected, 1),
        "confusion": confusion_matrix(truth, predicted, labels=GRADES).tolist(),
        "predicted_counts": np.bincount(predicted, minlength=3).tolist(),
    }
    if rating_mean is not None:
        rating = np.asarray(rating_mean, dtype=float)
        has = ~np.isnan(rating)
        metrics["rmse_expected_rating"] = float(np.sqrt(np.mean((1.0 + expected[has] - rating[has]) ** 2))) if has.any() else None
    return metrics


def label_error(judgments: pd.DataFrame | None, gold: pd.DataFrame) -> tuple[float | None, int]:
    """Share of pairs whose grade differs from gold (over the pairs in both), and that count."""
    if judgments is None or judgments.empty:
        return None, 0
    merged = judgments[["query_id", "product_id", "grade"]].merge(
        gold[["query_id", "product_id", "grade"]].rename(columns={"grade": "gold"}), on=["query_id", "product_id"]
    )
    if merged.empty:
        return None, 0
    return float((merged["grade"].astype(int) != merged["gold"].astype(int)).mean()), int(len(merged))
