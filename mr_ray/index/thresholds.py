"""Per-grade score thresholds: turn a cosine score into a predicted grade tier.

The point of training with separated grades is that one score threshold per
grade boundary works for every query: "show exact, then substitutes, cut the
irrelevant". Each boundary (2|1 and 1|0) gets the threshold that maximises
Youden's J (true-positive rate minus false-positive rate, i.e. balanced
accuracy) on judged pairs of a held-out split, with the encoder that serves.

Under hybrid retrieval the score is the weighted fusion of cosine and
normalised BM25 (mr_ray.index.fusion): its weight is the one with the best
held-out NDCG@10, and each retrieval mode (dense: cosine, lexical: normalised
BM25, hybrid: fused) gets its own thresholds on the score it returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from mr_ray.grades import GRADE_NAMES, Grade

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


def boundary_threshold(scores: np.ndarray, above: np.ndarray, boundary: str) -> tuple[float, float]:
    """Threshold separating `above` pairs from the rest, and its balanced accuracy.

    The cut lies halfway between the lowest score counted as above and the
    next lower score, so it does not sit on a judged pair.
    """
    if above.all() or not above.any():
        side = "below" if above.all() else "above"
        raise ValueError(f"cannot calibrate boundary {boundary}: no judged pair {side} it ({len(scores)} pairs)")
    fpr, tpr, cuts = roc_curve(above, scores)
    best = 1 + int(np.argmax((tpr - fpr)[1:]))  # cuts[0] is +inf, "nothing above": not a threshold
    cut = float(cuts[best])
    lower = scores[scores < cut]
    threshold = (cut + float(lower.max())) / 2 if lower.size else cut
    return threshold, float((tpr[best] + 1.0 - fpr[best]) / 2)


def calibrate_thresholds(scores, grades) -> tuple[GradeThresholds, dict]:
    """Thresholds for the boundaries 2|1 and 1|0 from judged (score, grade) pairs.

    The 1|0 threshold is capped at the 2|1 one so the tiers stay ordered even
    for an encoder that does not separate grades.
    """
    scores = np.asarray(scores, dtype=np.float64)
    grades = np.asarray(grades)
    if scores.shape != grades.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and grades {grades.shape} must be equal-length vectors")
    exact, exact_bacc = boundary_threshold(scores, grades >= Grade.EXACT, "2|1")
    partial, partial_bacc = boundary_threshold(scores, grades >= Grade.PARTIAL, "1|0")
    partial = min(partial, exact)
    report = {
        "pairs": int(len(scores)),
        "balanced_accuracy": {"2|1": round(exact_bacc, 4), "1|0": round(partial_bacc, 4)},
        "per_grade": {
            GRADE_NAMES[g]: {"count": int((grades == g).sum()), "mean_score": round(float(scores[grades == g].mean()), 4)}
            for g in Grade
            if (grades == g).any()
        },
    }
    return GradeThresholds(exact=exact, partial=partial), report


FUSION_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))


def choose_fusion_weight(candidates: dict, judgments, weights=FUSION_WEIGHTS) -> tuple[float, dict[float, float]]:
    """The weight whose hybrid ranking has the best NDCG@10 on judged queries ({query_id: Candidates});
    ties go to the larger weight (more dense). Returns it and every weight's NDCG@10."""
    from mr_ray.config import EvaluateConfig
    from mr_ray.evaluate import evaluate_retrieval

    config = EvaluateConfig()
    ndcg = {}
    for weight in weights:
        run = {qid: {row["product_id"]: row["score"] for row in c.ranked("hybrid", weight, config.recall_k)} for qid, c in candidates.items()}
        ndcg[weight] = evaluate_retrieval(run, judgments, config)["ndcg@10"]
    best = max(weights, key=lambda w: (round(ndcg[w], 6), w))
    return best, ndcg


def calibrate_retrieval(dense, lexical_normalised, grades, weight: float) -> tuple[dict[str, GradeThresholds], dict]:
    """Thresholds of every retrieval mode on its own score of the same judged pairs."""
    from mr_ray.index.fusion import weighted_fusion

    scores = {"dense": np.asarray(dense, dtype=np.float64), "lexical": np.asarray(lexical_normalised, dtype=np.float64)}
    scores["hybrid"] = weighted_fusion(scores["dense"], scores["lexical"], weight)
    calibrated = {mode: calibrate_thresholds(values, grades) for mode, values in scores.items()}
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
