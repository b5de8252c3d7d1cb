"""The sample catalog's rules, determinism and click model."""

import numpy as np
import pandas as pd

from mr_ray.config import SampleConfig
from mr_ray.data.augment import augment_queries, misspell
from mr_ray.data.sample import generate_sample, gold_grade


def test_gold_rules():
    products = pd.DataFrame(
        {
            "type": ["running shoes", "running shoes", "sneakers", "shoe insoles", "frying pan"],
            "brand": ["stridex", "nimbus", "stridex", "stridex", "stridex"],
            "color": ["red", "red", "red", "red", "red"],
            "material": ["mesh"] * 5,
            "size": ["size 9"] * 5,
        }
    )
    query = {"type": "running shoes", "brand": "stridex", "color": None, "material": None, "size": None}
    # exact; same type other brand = substitute; sibling type; complement; unrelated
    assert gold_grade(query, products).tolist() == [2, 1, 1, 1, 0]


def test_sample_is_seeded_and_consistent():
    config = SampleConfig(n_products=300, n_queries=60)
    a, b = generate_sample(config), generate_sample(config)
    pd.testing.assert_frame_equal(a["judgments"], b["judgments"])
    assert set(a["queries"]["split"]) == {"train", "dev", "test"}
    assert (a["queries"]["locale"] == "es_ES").any()
    # Human labels are noisy but mostly right.
    merged = a["judgments"].merge(a["gold"], on=["query_id", "product_id"], suffixes=("", "_gold"))
    agreement = (merged["grade"] == merged["grade_gold"]).mean()
    assert 0.75 < agreement < 0.97


def test_engagement_tracks_grade_with_noise():
    s = generate_sample(SampleConfig(n_products=600, n_queries=150))
    e = s["engagement"].merge(s["gold"], on=["query_id", "product_id"])
    sums = e.groupby("grade")[["impressions", "clicks", "add_to_cart"]].sum()
    ctr = sums["clicks"] / sums["impressions"]
    assert ctr[2] > 2 * ctr[1] > 2 * ctr[0] > 0
    # Noise: some irrelevant pairs still get clicks, and exact pairs' click rates vary widely.
    assert 0.01 < (e[e["grade"] == 0]["clicks"] > 0).mean() < 0.5
    exact = e[(e["grade"] == 2) & (e["impressions"] > 0)]
    exact_ctr = exact["clicks"] / exact["impressions"]
    assert exact_ctr.std() / exact_ctr.mean() > 0.3


def test_misspell_changes_text_and_augmentation_is_additive():
    rng = np.random.default_rng(0)
    assert misspell("cordless drill", rng) != "cordless drill"
    queries = pd.DataFrame({"query_id": ["q1", "q2"], "text": ["running shoes", "yoga mat"], "split": ["train", "train"]})
    judged = pd.DataFrame({"query_id": ["q1", "q2"], "product_id": ["p1", "p2"], "grade": [2, 1]})
    out_q, out_j = augment_queries(queries, judged, rate=1.0, seed=0)
    assert set(queries["query_id"]) <= set(out_q["query_id"]) and len(out_q) == 4
    typo = out_j[out_j["query_id"] == "q1~typo0"]
    assert typo["product_id"].tolist() == ["p1"] and typo["grade"].tolist() == [2]
