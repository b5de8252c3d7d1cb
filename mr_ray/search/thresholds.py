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

Each boundary (2|1 and 1|0) gets the threshold that maximises F1 of
"score >= threshold" against "grade above the boundary" over those weighted
pairs: the catalog-wide precision and recall of the tier it opens.

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


def boundary_threshold(scores: np.ndarray, above: np.ndarray, weights: np.ndarray, boundary: str) -> tuple[float, float]:
    """The threshold with the best weighted F1 of `score >= threshold` against `above`, and that F1.

    The cut lies halfway between the lowest score counted as above and the
    next lower score, so it does not sit on a calibration pair; of equal F1
    the lowest cut wins (more recall).
    """
    if above.all() or not above.any():
        side = "below" if above.all() else "above"
        raise ValueError(f"cannot calibrate boundary {boundary}: no judged pair {side} it ({len(scores)} pairs)")
    precision, recall, cuts = precision_recall_curve(above, scores, sample_weight=weights)
    precision, recall = precision[:-1], recall[:-1]  # the last point (precision 1, recall 0) has no threshold
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0)
    best = int(np.argmax(f1))
    cut = float(cuts[best])
    lower = scores[scores < cut]
    threshold = (cut + float(lower.max())) / 2 if lower.size else cut
    return threshold, float(f1[best])


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
            "recall": round(float(hits / weights[relevant].sum()), 4),
        }
    return out


def calibrate_thresholds(scores, grades, weights=None) -> tuple[GradeThresholds, dict]:
    """Thresholds for the boundaries 2|1 and 1|0 from (score, grade, weight) calibration pairs (weight 1 if none).

    The 1|0 threshold is capped at the 2|1 one so the tiers stay ordered even
    for an encoder that does not separate grades.
    """
    scores = np.asarray(scores, dtype=np.float64)
    grades = np.asarray(grades)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not scores.shape == grades.shape == weights.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape}, grades {grades.shape} and weights {weights.shape} must be equal-length vectors")
    exact, exact_f1 = boundary_threshold(scores, grades >= Grade.EXACT, weights, "2|1")
    partial, partial_f1 = boundary_threshold(scores, grades >= Grade.PARTIAL, weights, "1|0")
    thresholds = GradeThresholds(exact=exact, partial=min(partial, exact))
    report = {
        "pairs": int(len(scores)),
        "criterion": "max F1 per boundary, each pair weighted by the catalog products it stands for",
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


def calibrate_retrieval(dense, lexical_normalised, grades, weight: float, pair_weights=None) -> tuple[dict[str, GradeThresholds], dict]:
    """Thresholds of every retrieval mode on its own score of the same calibration pairs."""

    scores = {"dense": np.asarray(dense, dtype=np.float64), "lexical": np.asarray(lexical_normalised, dtype=np.float64)}
    scores["hybrid"] = weighted_fusion(scores["dense"], scores["lexical"], weight)
    calibrated = {mode: calibrate_thresholds(values, grades, pair_weights) for mode, values in scores.items()}
    return {mode: t for mode, (t, _) in calibrated.items()}, {mode: r for mode, (_, r) in calibrated.items()}


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
