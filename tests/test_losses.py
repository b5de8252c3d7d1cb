"""Both losses against hand-computed values, the circle-loss equivalence, and gradient directions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mr_ray.retriever.losses import (
    UNJUDGED,
    LabelAwareSupConLoss,
    MultiClassCircleLoss,
    grade_probabilities,
)


def embeddings_with_cosines(cosines):
    """A query [1, 0] and one unit product per cosine, so s(q, p_i) = cosines[i] exactly."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines], dtype=torch.float64)
    return q, p


def original_circle(s_pos, s_neg, gamma, m):
    """Sun et al. 2020, eq. (4)-(6), written out with numpy."""
    s_pos, s_neg = np.asarray(s_pos), np.asarray(s_neg)
    a_p = np.maximum(1 + m - s_pos, 0)
    a_n = np.maximum(s_neg + m, 0)
    neg = np.exp(gamma * a_n * (s_neg - m)).sum()
    pos = np.exp(-gamma * a_p * (s_pos - (1 - m))).sum()
    return math.log(1 + neg * pos)


def test_supcon_matches_hand_computation():
    cosines = [0.8, 0.5, 0.1, 0.3]
    q, p = embeddings_with_cosines(cosines)
    grades = torch.tensor([[2, 1, 0, UNJUDGED]])
    tau, w = 0.1, 0.5
    logits = np.array(cosines) / tau
    log_softmax = logits - math.log(np.exp(logits).sum())
    expected = -(1.0 * log_softmax[0] + w * log_softmax[1]) / (1.0 + w)
    loss = LabelAwareSupConLoss(temperature=tau, partial_weight=w)(q, p, grades)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_supcon_excluded_partials_leave_the_denominator():
    cosines = [0.8, 0.5, 0.1]
    q, p = embeddings_with_cosines(cosines)
    tau = 0.1
    loss = LabelAwareSupConLoss(temperature=tau, partial_weight=0.0)(q, p, torch.tensor([[2, 1, 0]]))
    expected = -(0.8 / tau - math.log(math.exp(0.8 / tau) + math.exp(0.1 / tau)))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_supcon_averages_over_queries_with_positives_only():
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1)
    p = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    grades = torch.full((3, 5), UNJUDGED)
    grades[0, 0] = 2
    grades[1, 1] = 0  # no positive: not an anchor
    loss_fn = LabelAwareSupConLoss(0.05, 0.3)
    alone = loss_fn(q[:1], p, grades[:1])
    assert loss_fn(q, p, grades).item() == pytest.approx(alone.item(), rel=1e-9)


@pytest.mark.parametrize("present, centres", [((1, 0), (0.9, 0.5)), ((2, 1), (0.5, 0.1))])
def test_circle_with_two_grades_is_the_original_circle_loss(present, centres):
    """Two grades present = one boundary active; with its centre at 0.5 it is circle loss exactly."""
    hi, lo = present
    cosines = [0.9, 0.6, 0.4, 0.7, 0.2, -0.1]
    grades = [hi, hi, hi, lo, lo, lo]
    q, p = embeddings_with_cosines(cosines)
    gamma, margins = 32.0, (0.15, 0.35)
    m = margins[0] if hi == 2 else margins[1]
    loss = MultiClassCircleLoss(scale=gamma, margins=margins, centres=centres)(q, p, torch.tensor([grades]))
    expected = original_circle(cosines[:3], cosines[3:], gamma, m)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_circle_sums_boundaries_with_weights_and_shifted_centres():
    cosines = [0.9, 0.6, 0.5, 0.3, 0.1]
    grades = [2, 2, 1, 0, 0]
    q, p = embeddings_with_cosines(cosines)
    gamma, margins, centres, weights = 16.0, (0.2, 0.3), (0.7, 0.3), (1.0, 0.5)
    s = np.array(cosines)
    upper = original_circle(s[:2] - 0.2, s[2:] - 0.2, gamma, 0.2)  # 2 | {1, 0}, centre 0.7
    lower = original_circle(s[:3] + 0.2, s[3:] + 0.2, gamma, 0.3)  # {2, 1} | 0, centre 0.3
    loss = MultiClassCircleLoss(gamma, margins, centres, weights)(q, p, torch.tensor([grades]))
    assert loss.item() == pytest.approx(upper + 0.5 * lower, rel=1e-9)


def test_circle_counts_unjudged_products_as_irrelevant():
    q, p = embeddings_with_cosines([0.8, 0.4])
    loss_fn = MultiClassCircleLoss(32.0, (0.25, 0.25), (0.5, 0.5), (0.0, 1.0))
    unjudged = loss_fn(q, p, torch.tensor([[1, UNJUDGED]]))
    assert unjudged.item() == pytest.approx(loss_fn(q, p, torch.tensor([[1, 0]])).item(), rel=1e-12)
    assert unjudged.item() == pytest.approx(original_circle([0.8], [0.4], 32.0, 0.25), rel=1e-9)


def cosine_change_after_step(loss_fn, cosines, grades, lr=1e-3):
    """How each s(q, p_i) moves after one gradient step on the products."""
    q, p = embeddings_with_cosines(cosines)
    p.requires_grad_(True)
    loss_fn(q, p, torch.tensor([grades])).backward()
    with torch.no_grad():
        moved = F.normalize(p - lr * p.grad, dim=1)
        return (moved @ q.T).squeeze(1).numpy() - np.array(cosines)


def test_circle_gradient_pushes_each_grade_toward_its_band():
    loss_fn = MultiClassCircleLoss(32.0, (0.25, 0.25), (0.75, 0.25))
    # exact up, irrelevant down; a partial above the 2|1 boundary is pushed down...
    change = cosine_change_after_step(loss_fn, [0.6, 0.95, 0.5], [2, 1, 0])
    assert change[0] > 0 and change[1] < 0 and change[2] < 0
    # ...and a partial below the 1|0 boundary is pulled up.
    change = cosine_change_after_step(loss_fn, [0.6, 0.05, 0.5], [2, 1, 0])
    assert change[0] > 0 and change[1] > 0 and change[2] < 0


def test_supcon_gradient_pulls_positives_and_pushes_negatives():
    change = cosine_change_after_step(LabelAwareSupConLoss(0.1, 0.3), [0.3, 0.2, 0.6, 0.5], [2, 1, 0, UNJUDGED])
    assert change[0] > 0 and change[1] > 0
    assert change[2] < 0 and change[3] < 0
    # the exact product is pulled harder than the partial one
    assert change[0] > change[1]


def test_losses_reject_bad_parameters():
    with pytest.raises(ValueError, match="temperature"):
        LabelAwareSupConLoss(temperature=0.0)
    with pytest.raises(ValueError, match="partial_weight"):
        LabelAwareSupConLoss(partial_weight=1.0)
    with pytest.raises(ValueError, match="scale"):
        MultiClassCircleLoss(scale=-1.0)


@pytest.mark.parametrize("loss", [LabelAwareSupConLoss(0.05, 0.0), LabelAwareSupConLoss(0.1, 0.3), MultiClassCircleLoss(32.0)], ids=["supcon", "supcon-partial", "circle"])
def test_soft_labels_of_hard_grades_give_the_hard_loss_and_a_softer_label_a_smaller_pull(loss):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1)
    p = F.normalize(torch.randn(6, 8), dim=-1)
    grades = torch.tensor([[2, 1, 0, -1, -1, -1], [-1, -1, -1, 2, 0, 1], [1, -1, 2, -1, 0, -1]])
    assert torch.allclose(loss(q, p, grade_probabilities(grades)), loss(q, p, grades))
    # The judge was only 60% sure that query 0's product 0 is exact: it is pulled up less.
    soft = grade_probabilities(grades).clone()
    soft[0, 0] = torch.tensor([0.1, 0.3, 0.6])
    pull = {}
    for name, labels in (("hard", grades), ("soft", soft)):
        sims = p.clone().requires_grad_(True)
        loss(q, sims, labels).backward()
        pull[name] = float(-(sims.grad[0] @ q[0]))  # how much a step raises s(q0, p0)
    assert 0 < pull["soft"] < pull["hard"]
