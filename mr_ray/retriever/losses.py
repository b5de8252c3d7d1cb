"""The two training losses over graded (query, product) similarities.

Both take L2-normalised query embeddings `q` [Q, d], product embeddings `p`
[P, d] (every product in the batch) and the pairs' labels: a grade matrix
`grades` [Q, P] with 0/1/2 for a judged pair and -1 where the product was not
judged for that query (another query's product: an in-batch negative, treated
as grade 0), or soft labels [Q, P, 3], each pair's probability of every grade
(a judge's re-annotation kept as it judged it; one-hot for a hard grade, so
hard grades as probabilities give exactly the hard loss).
s(q, p) is the cosine similarity, a dot product here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNJUDGED = -1


def grade_probabilities(labels: torch.Tensor) -> torch.Tensor:
    """Soft labels [Q, P, 3] of a grade matrix (one-hot; UNJUDGED as grade 0), or soft labels unchanged."""
    if labels.is_floating_point():
        return labels
    return F.one_hot(labels.clamp(min=0), num_classes=3).float()


class LabelAwareSupConLoss(nn.Module):
    """Label-aware supervised contrastive loss (Khosla et al., NeurIPS 2020,
    adapted to graded query-product labels as in Mine and Refine, arXiv 2602.17654).

    For a query anchor q with positives p of weight w_p (1 for grade 2,
    `partial_weight` for grade 1; with soft labels P(2) + partial_weight * P(1))
    and batch candidates C (all products in the batch):

        L_q = -(1 / sum_p w_p) * sum_p w_p * log( exp(s(q,p)/tau) / sum_{c in C} exp(s(q,c)/tau) )

    Judged-irrelevant, unjudged and in-batch products are negatives through the
    denominator. With `partial_weight == 0` the query's grade-1 products are
    left out of C too: neither pulled nor pushed. The loss is the mean of L_q
    over queries that have at least one positive.
    """

    def __init__(self, temperature: float = 0.05, partial_weight: float = 0.3):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= partial_weight < 1.0:
            raise ValueError(f"partial_weight must be in [0, 1), got {partial_weight}")
        self.temperature = temperature
        self.partial_weight = partial_weight

    def forward(self, q: torch.Tensor, p: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
        logits = q @ p.T / self.temperature
        probabilities = grade_probabilities(grades).to(logits.dtype)
        weights = probabilities[..., 2] + self.partial_weight * probabilities[..., 1]
        total = weights.sum(dim=1)
        has_positive = total > 0
        if not has_positive.any():
            return (logits * 0.0).sum()  # no anchor: a zero that keeps the graph (DDP needs every step to backprop)
        if self.partial_weight == 0.0:  # products most likely partial: neither pulled nor pushed
            logits = logits.masked_fill((probabilities.argmax(dim=-1) == 1) & (weights == 0) & has_positive[:, None], float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        # where() keeps the -inf of excluded candidates out of the sum (0 * -inf is nan).
        weighted = torch.where(weights > 0, weights * log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        return (-weighted[has_positive] / total[has_positive]).mean()


def circle_term(sim: torch.Tensor, pos_weight: torch.Tensor, neg_weight: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """Per-row circle loss over weighted positives and negatives (Sun et al., CVPR 2020):

        L = log(1 + sum_n exp(gamma * v_n * a_n * (s_n - D_n)) * sum_p exp(-gamma * u_p * a_p * (s_p - D_p)))
        a_p = relu(O_p - s_p), a_n = relu(s_n - O_n), O_p = 1 + m, O_n = -m, D_p = 1 - m, D_n = m

    computed as softplus(logsumexp_n + logsumexp_p) for stability. u and v are each pair's weight as a
    positive and as a negative, scaling the paper's self-paced weights a: 0/1 masks for hard grades (the
    paper's loss), a soft label's probability mass on either side of the boundary otherwise, so a pair the
    judge is unsure of moves less (a weight outside the exponent would not: the loss saturates, and log
    w only shifts it). Rows without a positive or without a negative give 0. The self-paced weights a are
    constants (detached), as in the paper's gradient analysis.
    """
    a_p = torch.relu(1 + margin - sim.detach())
    a_n = torch.relu(sim.detach() + margin)
    # A finite "minus infinity": rows with no positive (or negative) must still have a
    # finite logsumexp, or their zero gradient turns into nan through torch.where.
    never = torch.full_like(sim, -1e6)
    pos_mask, neg_mask = pos_weight > 0, neg_weight > 0
    logit_p = torch.where(pos_mask, -scale * pos_weight * a_p * (sim - (1 - margin)), never)
    logit_n = torch.where(neg_mask, scale * neg_weight * a_n * (sim - margin), never)
    both = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    lse = torch.logsumexp(logit_p, dim=1) + torch.logsumexp(logit_n, dim=1)
    return torch.where(both, F.softplus(lse), torch.zeros_like(lse))


class MultiClassCircleLoss(nn.Module):
    """Circle loss extended to ordered grades (Mine and Refine's multi-class circle loss).

    One circle term per grade boundary b in {2|1, 1|0}: positives are the query's
    products graded above b, negatives those graded below it (unjudged in-batch
    and mined products count as grade 0). Each boundary has its own margin m_b,
    weight w_b and similarity centre c_b; the centre shifts similarities,
    s' = s - (c_b - 0.5), so the boundary's decision line sits around c_b
    instead of the original's 0.5 (exact grades pushed above the 2|1 line,
    partial ones between the lines, irrelevant ones below the 1|0 line):

        L = mean_q sum_b w_b * circle(s'_b(q, P_b), s'_b(q, N_b); gamma, m_b)

    Queries that lack either side of a boundary add nothing to that boundary's
    term; each term is averaged over the queries that have both sides. With one
    boundary, c_b = 0.5 and w_b = 1 this is exactly circle loss. A soft label
    enters both sides of a boundary, its pull and push scaled by its
    probability mass above and below it (`circle_term`'s u and v).
    """

    def __init__(
        self,
        scale: float = 32.0,
        margins: tuple[float, float] = (0.25, 0.25),
        centres: tuple[float, float] = (0.75, 0.25),
        weights: tuple[float, float] = (1.0, 1.0),
    ):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        # boundary = the lowest grade counted as positive: 2 for 2|1, 1 for 1|0
        self.boundaries = [
            (lowest_positive, margin, centre, weight)
            for lowest_positive, margin, centre, weight in zip((2, 1), margins, centres, weights)
            if weight > 0
        ]
        self.scale = scale

    def forward(self, q: torch.Tensor, p: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
        sim = q @ p.T
        probabilities = grade_probabilities(grades).to(sim.dtype)
        total = (sim * 0.0).sum()  # keeps the graph when no query spans a boundary
        for lowest_positive, margin, centre, weight in self.boundaries:
            shifted = sim - (centre - 0.5)
            above = probabilities[..., lowest_positive:].sum(dim=-1)
            below = probabilities[..., :lowest_positive].sum(dim=-1)
            per_query = circle_term(shifted, above, below, self.scale, margin)
            counted = (above > 0).any(dim=1) & (below > 0).any(dim=1)
            if counted.any():
                total = total + weight * per_query[counted].mean()
        return total
