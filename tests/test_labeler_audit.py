"""Audit rules on a hand-made engagement table; engagement aggregation and join on Ray Data."""

import numpy as np
import pandas as pd

from mr_ray.config import AuditRulesConfig
from mr_ray.labeler import audit

RULES = AuditRulesConfig(min_impressions=20, irrelevant_max_cart_rate=0.01, irrelevant_max_click_rate=0.08, exact_min_click_rate=0.02, min_confidence=0.5)


def table():
    # query, product, grade, confidence, impressions, clicks, carts -> rules expected to fire
    rows = [
        ("q1", "a", 0, 0.9, 100, 5, 3, {"irrelevant_but_carted"}),  # 3 % carts on an "irrelevant" product
        ("q1", "b", 0, 0.9, 100, 12, 0, {"irrelevant_but_clicked"}),  # 12 % clicks
        ("q1", "c", 0, 0.9, 100, 20, 5, {"irrelevant_but_carted", "irrelevant_but_clicked"}),
        ("q1", "d", 0, 0.9, 10, 9, 9, set()),  # too few impressions to judge by rates
        ("q2", "e", 2, 0.9, 200, 1, 0, {"exact_but_ignored"}),  # 0.5 % clicks on an "exact" product
        ("q2", "f", 2, 0.9, 200, 30, 5, set()),
        ("q2", "g", 1, 0.3, 200, 1, 0, {"low_confidence"}),  # grade 1 is never contradicted by rates
        ("q2", "h", 2, 0.4, 0, 0, 0, {"low_confidence"}),
        ("q2", "i", 0, 0.9, 100, 8, 1, set()),  # exactly at both thresholds: rules use strict >
    ]
    frame = pd.DataFrame(
        [r[:7] for r in rows], columns=["query_id", "product_id", "grade", "confidence", "impressions", "clicks", "add_to_cart"]
    )
    frame["orders"] = 0
    return frame, [r[7] for r in rows]


def test_each_rule_fires_exactly_where_engagement_contradicts_the_grade():
    frame, expected = table()
    flagged = audit.flag_contradictions(frame, RULES)
    for row, want in zip(flagged.to_dict("records"), expected):
        fired = {rule for rule in audit.RULES if row[rule]}
        assert fired == want, row["product_id"]
        assert row["flagged"] == bool(want)
        assert set(filter(None, row["reasons"].split(","))) == want


def test_rules_follow_the_config():
    frame, _ = table()
    loose = RULES.model_copy(update={"min_impressions": 5, "min_confidence": 0.0})
    flagged = audit.flag_contradictions(frame, loose).set_index("product_id")
    assert flagged.loc["d", "irrelevant_but_carted"] and flagged.loc["d", "irrelevant_but_clicked"]
    assert not flagged.loc[["g", "h"], "low_confidence"].any()


def test_engagement_rates_and_likelihood_prefer_the_grade_that_explains_the_clicks():
    labelled = pd.DataFrame(
        {"grade": [0, 0, 1, 2, 2], "impressions": [1000, 1000, 1000, 1000, 1000], "clicks": [20, 20, 100, 300, 300], "add_to_cart": [0, 0, 10, 90, 90]}
    )
    rates = audit.engagement_rates(labelled)
    np.testing.assert_allclose(rates.loc[0, "click_rate"], 41 / 2002)
    np.testing.assert_allclose(rates.loc[2, "cart_rate"], 181 / 602)
    pairs = pd.DataFrame({"impressions": [100, 100], "clicks": [30, 2], "add_to_cart": [9, 0]})
    loglik = audit.engagement_log_likelihood(pairs, rates)
    assert loglik[0].argmax() == 2 and loglik[1].argmax() == 0
    # Fusion: an undecided judge follows the engagement; the result is a distribution.
    posterior = audit.fuse_with_engagement(np.array([[0.34, 0.33, 0.33], [0.33, 0.33, 0.34]]), loglik)
    assert posterior.argmax(axis=1).tolist() == [2, 0]
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0)


def test_error_rate_counts_only_pairs_with_truth():
    judged = pd.DataFrame({"query_id": ["q", "q", "q"], "product_id": ["a", "b", "c"], "grade": [0, 1, 2]})
    truth = pd.DataFrame({"query_id": ["q", "q", "z"], "product_id": ["a", "b", "c"], "grade": [0, 2, 2]})
    assert audit.error_rate(judged, truth) == (0.5, 2)


def test_ray_data_aggregates_engagement_per_pair_and_joins_it(ray_local, monkeypatch):
    ray = ray_local
    monkeypatch.setattr(audit, "ROWS_PER_PARTITION", 2)  # two hash partitions: a pair's rows still meet in one
    logs = pd.DataFrame(
        {"query_id": ["q1", "q1", "q2"], "product_id": ["a", "a", "e"], "impressions": [60, 40, 200], "clicks": [3, 2, 1], "add_to_cart": [2, 1, 0], "orders": [1, 0, 0]}
    )
    summed = audit.pair_engagement(ray.data.from_pandas(logs)).to_pandas().sort_values("query_id").reset_index(drop=True)
    assert summed[["impressions", "clicks", "add_to_cart", "orders"]].to_numpy().tolist() == [[100, 5, 3, 1], [200, 1, 0, 0]]
    judged = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "product_id": ["a", "e", "x"], "grade": [0, 2, 1], "confidence": [0.9, 0.9, 0.9]})
    joined = audit.join_engagement(ray.data.from_pandas(judged), summed).to_pandas().set_index("product_id")
    assert joined.loc["a", "add_to_cart"] == 3 and joined.loc["x", "impressions"] == 0  # never shown -> zeros
    flagged = audit.flag_contradictions(joined.reset_index(), RULES).set_index("product_id")
    assert flagged["flagged"].to_dict() == {"a": True, "e": True, "x": False}
