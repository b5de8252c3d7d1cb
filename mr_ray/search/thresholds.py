"""Per-grade score thresholds: turn a retrieval score into a predicted grade tier.

The point of training with separated grades is that one score threshold per
grade boundary works for every query: "show exact, then substitutes, cut the
irrelevant". A tier is what the service shows, so it is judged the way a
shopper meets it: against the whole catalog, where a query's few exact
products sit among thousands of irrelevant ones. Judged pairs alone are the
pool's hardest candidates and never show that bulk (a cut fitted on them sat
so low that every drill-ish product of "cordless drill" came back exact), so
the `index` stage adds, per held-out query, a seeded random sample of catalog
products not judged for it, counted as grade 0, each weighted to stand for all
of that query's unjudged products (mr_ray.search.build.calibration_pairs).

The 1|0 boundary gets the threshold that maximises F1 of "score >= threshold"
against "grade above the boundary" over those weighted pairs: the
catalog-wide precision and recall of the tier it opens. The 2|1 boundary
(the Exact tier) is cut for precision instead (`index.exact_precision`): a
merchandiser reads every product of the Exact tier as a match, and at max F1
it held about two wrong products for each right one ("black cordless drill"
listed yellow and pink drills). It is the lowest threshold whose weighted
precision reaches the target, i.e. the most recall at that precision; where
no threshold reaches it, the one of highest precision, said in the report.
With no target (null) it is cut at max F1 too.

Under hybrid retrieval the score is the weighted fusion of cosine and
normalised BM25 (mr_ray.search.fusion): its weight is the one with the best
held-out NDCG@10, and each retrieval mode (dense: cosine, lexical: normalised
BM25, hybrid: fused) gets its own thresholds on the score it returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve

from mr_ray.config import EvaluateConfig
from mr_ray.grades import GRADE_NAMES, Grade
from mr_ray.metrics import evaluate_retrieval
from mr_ray.search.fusion import weighted_fusion

THRESHOLDS_FILE = "thresholds.json"


@dataclass(frozen=True)
class GradeThresholds:
    exact: float  # score >= exact  -> grade 2
    partial: float  # score >= partial -> grade 1, below -> grade 0

    def grade(self, scores) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        return np.where(scores >= self.exact, int(Grade.EXACT), np.where(scores >= self.partial, int(Grade.PARTIAL), int(Grade.IRRELEVANT)))

    def save(self, folder: Path, report: dict | None = None) -> None:
        (Path(folder) / THRESHOLDS_FILE).write_text(json.dumps({**asdict(self), "calibration": report or {}}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "GradeThresholds":
        path = Path(folder) / THRESHOLDS_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(exact=float(raw["exact"]), partial=float(raw["partial"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: cannot read grade thresholds: {err}") from None


def weighted_curve(scores: np.ndarray, above: np.ndarray, weights: np.ndarray, boundary: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted precision, recall and F1 of `score >= cut` against `above` for every candidate cut, lowest cut first."""
    if above.all() or not above.any():
        side = "below" if above.all() else "above"
        raise ValueError(f"cannot calibrate boundary {boundary}: no judged pair {side} it ({len(scores)} pairs)")
    precision, recall, cuts = precision_recall_curve(above, scores, sample_weight=weights)
    precision, recall = precision[:-1], recall[:-1]  # the last point (precision 1, recall 0) has no threshold
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0)
    return precision, recall, f1, cuts


def threshold_below(scores: np.ndarray, cut: float) -> float:
    """Halfway between the cut (a calibration score) and the next lower score, so the threshold does not sit on a calibration pair."""
    lower = scores[scores < cut]
    return (cut + float(lower.max())) / 2 if lower.size else cut


def boundary_threshold(scores: np.ndarray, above: np.ndarray, weights: np.ndarray, boundary: str) -> tuple[float, float]:
    """The threshold with the best weighted F1 of `score >= threshold` against `above`, and that F1.

    Of equal F1 the lowest cut wins (more recall).
    """
    _, _, f1, cuts = weighted_curve(scores, above, weights, boundary)
    best = int(np.argmax(f1))
    return threshold_below(scores, float(cuts[best])), float(f1[best])


# Precision computed from float weights can land a hair under a target it meets exactly (0.8 as 0.79999...).
PRECISION_SLACK = 1e-9


def precision_target_threshold(scores: np.ndarray, above: np.ndarray, weights: np.ndarray, boundary: str, target: float) -> tuple[float, dict]:
    """The lowest threshold whose weighted precision of `score >= threshold` against `above` reaches `target`
    (of the cuts that reach it, the one with the most recall), or, if none does, the one of highest precision
    (of equals the lowest). Returns it and {target, reached, precision, recall, f1} of that cut."""
    precision, recall, f1, cuts = weighted_curve(scores, above, weights, boundary)
    reaching = np.flatnonzero(precision >= target - PRECISION_SLACK)
    reached = reaching.size > 0
    best = int(reaching[0]) if reached else int(np.argmax(precision))  # cuts ascend: the first is the lowest
    cut_quality = {"precision": round(float(precision[best]), 4), "recall": round(float(recall[best]), 4), "f1": round(float(f1[best]), 4)}
    return threshold_below(scores, float(cuts[best])), {"target": target, "reached": reached, **cut_quality}


def tier_quality(thresholds: GradeThresholds, scores, grades, weights=None) -> dict:
    """Weighted precision and recall of the "exact" tier (grade 2) and the "exact+partial" tier (grade >= 1)."""
    scores, grades = np.asarray(scores, dtype=np.float64), np.asarray(grades)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    out = {}
    for tier, cut, lowest in (("exact", thresholds.exact, Grade.EXACT), ("exact+partial", thresholds.partial, Grade.PARTIAL)):
        shown, relevant = scores >= cut, grades >= lowest
        hits = weights[shown & relevant].sum()
        out[tier] = {
            "precision": round(float(hits / weights[shown].sum()), 4) if shown.any() else None,
            "recall": round(float(hits / weights[relevant].sum()), 4) if relevant.any() else None,
        }
    return out


def calibrate_thresholds(scores, grades, weights=None, exact_precision: float | None = None) -> tuple[GradeThresholds, dict]:
    """Thresholds for the boundaries 2|1 and 1|0 from (score, grade, weight) calibration pairs (weight 1 if none).

    The 2|1 threshold reaches weighted precision `exact_precision` with the most
    recall (`precision_target_threshold`), or maximises F1 if it is None; the
    1|0 one maximises F1 and is capped at the 2|1 one so the tiers stay ordered
    even for an encoder that does not separate grades.
    """
    scores = np.asarray(scores, dtype=np.float64)
    grades = np.asarray(grades)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not scores.shape == grades.shape == weights.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape}, grades {grades.shape} and weights {weights.shape} must be equal-length vectors")
    target = {}
    if exact_precision is None:
        exact, exact_f1 = boundary_threshold(scores, grades >= Grade.EXACT, weights, "2|1")
        criterion = "max F1 per boundary"
    else:
        exact, target = precision_target_threshold(scores, grades >= Grade.EXACT, weights, "2|1", exact_precision)
        exact_f1 = target.pop("f1")
        criterion = f"2|1: the lowest cut with weighted precision >= {exact_precision} (most recall at that precision); 1|0: max F1"
        if not target["reached"]:
            target["note"] = f"no cut reaches precision {exact_precision}: the exact tier is cut at the highest precision, {target['precision']}"
    partial, partial_f1 = boundary_threshold(scores, grades >= Grade.PARTIAL, weights, "1|0")
    thresholds = GradeThresholds(exact=exact, partial=min(partial, exact))
    report = {
        "pairs": int(len(scores)),
        "criterion": f"{criterion}, each pair weighted by the catalog products it stands for",
        **({"exact_precision": target} if target else {}),
        "f1": {"2|1": round(exact_f1, 4), "1|0": round(partial_f1, 4)},
        "tiers": tier_quality(thresholds, scores, grades, weights),
        "per_grade": {
            GRADE_NAMES[g]: {"count": int((grades == g).sum()), "mean_score": round(float(scores[grades == g].mean()), 4)}
            for g in Grade
            if (grades == g).any()
        },
    }
    return thresholds, report


FUSION_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


def choose_fusion_weight(candidates: dict, judgments, weights=FUSION_WEIGHTS) -> tuple[float, dict[float, float]]:
    """The weight whose hybrid ranking has the best NDCG@10 on judged queries ({query_id: Candidates});
    ties go to the larger weight (more dense). Returns it and every weight's NDCG@10."""
    config = EvaluateConfig()
    ndcg = {}
    for weight in weights:
        run = {qid: {row["product_id"]: row["score"] for row in c.ranked("hybrid", weight, config.recall_k)} for qid, c in candidates.items()}
        ndcg[weight] = evaluate_retrieval(run, judgments, config)["ndcg@10"]
    best = max(weights, key=lambda w: (round(ndcg[w], 6), w))
    return best, ndcg


def mode_scores(dense, lexical_normalised, weight: float) -> dict[str, np.ndarray]:
    """Each retrieval mode's score of the same pairs: cosine, normalised BM25, and their weighted fusion."""
    scores = {"dense": np.asarray(dense, dtype=np.float64), "lexical": np.asarray(lexical_normalised, dtype=np.float64)}
    scores["hybrid"] = weighted_fusion(scores["dense"], scores["lexical"], weight)
    return scores


def calibrate_retrieval(dense, lexical_normalised, grades, weight: float, pair_weights=None, exact_precision: float | None = None) -> tuple[dict[str, GradeThresholds], dict]:
    """Thresholds of every retrieval mode on its own score of the same calibration pairs."""
    scores = mode_scores(dense, lexical_normalised, weight)
    calibrated = {mode: calibrate_thresholds(values, grades, pair_weights, exact_precision) for mode, values in scores.items()}
    return {mode: t for mode, (t, _) in calibrated.items()}, {mode: r for mode, (_, r) in calibrated.items()}


def tier_table(by_mode: dict[str, GradeThresholds], dense, lexical_normalised, grades, weight: float, pair_weights=None) -> dict[str, dict]:
    """{mode: {tier: {precision, recall, threshold}}}: each mode's tiers, cut by its thresholds, judged on
    (score, grade, weight) pairs that were not calibrated on (held-out queries, weighted like the calibration's)."""
    table = {}
    for mode, scores in mode_scores(dense, lexical_normalised, weight).items():
        quality = tier_quality(by_mode[mode], scores, grades, pair_weights)
        cuts = {"exact": by_mode[mode].exact, "exact+partial": by_mode[mode].partial}
        table[mode] = {tier: {**quality[tier], "threshold": round(cuts[tier], 4)} for tier in quality}
    return table


def save_retrieval_thresholds(folder: Path, by_mode: dict[str, GradeThresholds], weight: float, report: dict) -> None:
    """thresholds.json: the dense thresholds at the top (as before hybrid), every mode's and the fusion weight under `retrieval`."""
    dense = by_mode["dense"]
    payload = {
        **asdict(dense),
        "calibration": report.get("dense", {}),
        "retrieval": {"weight": weight, **{mode: {**asdict(t), "calibration": report.get(mode, {})} for mode, t in by_mode.items()}, "weights_ndcg@10": report.get("weights_ndcg@10", {})},
    }
    (Path(folder) / THRESHOLDS_FILE).write_text(json.dumps(payload, indent=2))


def load_retrieval_thresholds(folder: Path) -> tuple[dict[str, GradeThresholds], float | None]:
    """Thresholds per retrieval mode and the fusion weight; an index built before hybrid retrieval has dense only (weight None)."""
    path = Path(folder) / THRESHOLDS_FILE
    dense = GradeThresholds.load(folder)
    raw = json.loads(path.read_text()).get("retrieval")
    if raw is None:
        return {"dense": dense}, None
    try:
        modes = {mode: GradeThresholds(exact=float(raw[mode]["exact"]), partial=float(raw[mode]["partial"])) for mode in ("dense", "lexical", "hybrid")}
        return modes, float(raw["weight"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot read retrieval thresholds: {err!r}") from None
