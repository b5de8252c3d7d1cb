"""Per-grade logit offsets for the judge's decision, fit on held-out human labels.

Class-weighted training moves the judge's decision away from the best one for
the labels it will grade: on Home Depot it predicted grade 2 for 58% of
held-out pairs (humans: 47%) and found a third of the grade-1 pairs. Adding an
offset b_g to each grade's logit (logit adjustment: Menon et al., "Long-tail
learning via logit adjustment", ICLR 2021),

    grade = argmax_g (z_g + b_g),   p = softmax(z + b),

with b fit on labels the judge did not train on, moves the decision without
retraining. b_1 = 0 (only differences matter); b_0 and b_2 are searched on a
grid for the highest macro-F1 among the offsets that keep every grade's recall
at least `min_recall` (a judge that never says 0 cannot re-annotate mined
pairs, most of which are 0), or, when none does, the highest lowest recall.
Ties go to the smallest offsets. The cross-encoder folds b into its classifier
bias (`mr_ray.labeler.cross_encoder.fold_grade_offsets`), so `transformers`
and vLLM both return the adjusted probabilities.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

OFFSET_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 1)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=float), 1e-12, None))


def adjusted(probabilities: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """softmax(log p + offsets): what the classifier with the offsets folded into its bias returns."""
    return softmax(log_probabilities(probabilities) + offsets, axis=1)


def decision_score(truth: np.ndarray, predicted: np.ndarray, min_recall: float) -> float:
    """Macro-F1 when every present grade's recall reaches `min_recall`; otherwise below any such (lowest recall - 1).

    From the confusion counts directly: the grid scores 3,721 decisions, and sklearn's checks cost
    26 s of that on 5,000 pairs (its metrics give the same numbers: tests/test_judge_calibration.py)."""
    confusion = np.bincount(3 * truth + predicted, minlength=9).reshape(3, 3)
    hits, true, said = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    lowest_recall = (hits[true > 0] / true[true > 0]).min()
    f1 = np.divide(2 * hits, true + said, out=np.zeros(3), where=true + said > 0)
    return float(f1.mean()) if lowest_recall >= min_recall else float(lowest_recall) - 1.0


def fit_grade_offsets(probabilities: np.ndarray, truth: np.ndarray, min_recall: float) -> np.ndarray:
    """Offsets (b_0, 0, b_2) on the log-probabilities that best decide `truth` (see the module docstring)."""
    logits, truth = log_probabilities(probabilities), np.asarray(truth, dtype=int)
    best = (-np.inf, 0.0, np.zeros(3))
    for b0 in OFFSET_GRID:
        for b2 in OFFSET_GRID:
            offsets = np.array([b0, 0.0, b2])
            candidate = (decision_score(truth, (logits + offsets).argmax(axis=1), min_recall), -(abs(b0) + abs(b2)), offsets)
            if candidate[:2] > best[:2]:
                best = candidate
    return best[2]
