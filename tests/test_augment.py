"""Additive spelling augmentation: typo copies next to the clean queries, same labels."""

import numpy as np
import pandas as pd
import pytest

from mr_ray.config import Stage1Config
from mr_ray.data.augment import augment_queries, misspell
from mr_ray.retriever.examples import build_examples, examples_with_augmentation

QUERIES = pd.DataFrame(
    {
        "query_id": ["q1", "q2", "q3", "q4"],
        "text": ["cordless drill battery", "running shoes", "tv", "stainless frying pan"],
        "split": "train",
    }
)
JUDGMENTS = pd.DataFrame(
    {"query_id": ["q1", "q1", "q2", "q3", "q4"], "product_id": ["p1", "p2", "p1", "p3", "p2"], "grade": [2, 0, 1, 2, 2]}
)
PRODUCTS = pd.DataFrame({"product_id": ["p1", "p2", "p3"], "title": ["Drill battery 20v", "Cast iron pan", "Smart TV"]})


def test_misspell_makes_one_typing_error_in_long_words_only():
    rng = np.random.default_rng(0)
    for _ in range(50):
        typo = misspell("tv usb cordless", rng)
        assert typo.startswith("tv usb ")  # words under 4 letters are left alone
        assert abs(len(typo) - len("tv usb cordless")) <= 1
    assert misspell("tv usb", rng) == "tv usb"


def test_augmentation_adds_copies_and_never_drops_clean_queries():
    queries, judgments = augment_queries(QUERIES, JUDGMENTS, rate=1.0, seed=0)
    clean = queries[~queries["query_id"].str.contains("~typo")]
    pd.testing.assert_frame_equal(clean.reset_index(drop=True), QUERIES)
    pd.testing.assert_frame_equal(judgments.iloc[: len(JUDGMENTS)].reset_index(drop=True), JUDGMENTS)
    copies = queries[queries["query_id"].str.contains("~typo")]
    # "tv" has no word of 4+ letters, so its copy would equal the clean text and is dropped
    assert set(copies["query_id"]) == {"q1~typo0", "q2~typo0", "q4~typo0"}
    for row in copies.itertuples():
        origin = row.query_id.split("~")[0]
        assert row.text != QUERIES.set_index("query_id").loc[origin, "text"]
        own = judgments[judgments["query_id"] == row.query_id][["product_id", "grade"]].reset_index(drop=True)
        want = JUDGMENTS[JUDGMENTS["query_id"] == origin][["product_id", "grade"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(own, want)


def test_rate_zero_leaves_training_rows_unchanged_and_bad_rate_is_an_error():
    config = Stage1Config(augment={"rate": 0.0})
    plain = build_examples(QUERIES, JUDGMENTS, PRODUCTS)
    pd.testing.assert_frame_equal(examples_with_augmentation(QUERIES, JUDGMENTS, PRODUCTS, config), plain)
    with pytest.raises(ValueError, match="rate"):
        augment_queries(QUERIES, JUDGMENTS, rate=1.5)


def test_training_rows_keep_every_clean_query_next_to_its_copies():
    config = Stage1Config(augment={"rate": 1.0, "copies": 2, "seed": 3})
    examples = examples_with_augmentation(QUERIES, JUDGMENTS, PRODUCTS, config)
    assert set(QUERIES["query_id"]) <= set(examples["query_id"])
    assert {"q1~typo0", "q1~typo1"} <= set(examples["query_id"])
    by_id = examples.set_index("query_id")
    assert list(by_id.loc["q1~typo1", "grades"]) == list(by_id.loc["q1", "grades"])
