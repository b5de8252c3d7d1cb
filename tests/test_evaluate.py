"""Metrics: graded (not binary) NDCG, exact-only recall/precision, separation AUCs."""

import math

import numpy as np
import pandas as pd
import pytest

from mr_ray.config import EvaluateConfig, LexicalConfig
from mr_ray.metrics import evaluate_retrieval, separation_metrics
from mr_ray.search.retrieval import LexicalIndex, lexical_search


def judgments(rows):
    return pd.DataFrame(rows, columns=["query_id", "product_id", "grade"])


def dcg(gains):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_ndcg_uses_graded_gains():
    # q1 has one exact (e) and one partial (p) product; the run puts the partial first.
    truth = judgments([("q1", "e", 2), ("q1", "p", 1), ("q1", "x", 0)])
    run = {"q1": {"p": 0.9, "e": 0.8, "x": 0.1}}
    metrics = evaluate_retrieval(run, truth, EvaluateConfig())
    expected = dcg([1, 2, 0]) / dcg([2, 1, 0])
    assert metrics["ndcg@10"] == pytest.approx(expected, abs=1e-6)
    # Binary gains would call this ranking perfect (both relevant items on top).
    assert metrics["ndcg@10"] < 0.95
    assert metrics["recall@100_exact"] == pytest.approx(1.0)
    assert metrics["precision@10_exact"] == pytest.approx(0.1)


def test_exact_recall_ignores_partials():
    truth = judgments([("q1", "e1", 2), ("q1", "e2", 2), ("q1", "p", 1)])
    run = {"q1": {"p": 0.9, "e1": 0.8}}
    metrics = evaluate_retrieval(run, truth, EvaluateConfig())
    assert metrics["recall@100_exact"] == pytest.approx(0.5)


def test_judged_share_and_condensed_ndcg_see_past_unjudged_finds():
    # q1's pool holds e (exact), p (partial), x (irrelevant); the run puts two unjudged products (u1, u2) on top.
    truth = judgments([("q1", "e", 2), ("q1", "p", 1), ("q1", "x", 0), ("q2", "e2", 2)])
    run = {"q1": {"u1": 0.99, "u2": 0.98, "p": 0.9, "x": 0.85, "e": 0.8}, "q2": {"e2": 0.5, "u3": 0.4}}
    metrics = evaluate_retrieval(run, truth, EvaluateConfig())
    assert metrics["judged@10"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    # condensed: u1, u2 removed, q1 ranks p, x, e; full-catalog NDCG counts u1, u2 as irrelevant
    q1_condensed = dcg([1, 0, 2]) / dcg([2, 1, 0])
    assert metrics["condensed_ndcg@10"] == pytest.approx((q1_condensed + 1.0) / 2, abs=1e-6)
    q1_full = dcg([0, 0, 1, 0, 2]) / dcg([2, 1, 0])
    assert metrics["ndcg@10"] == pytest.approx((q1_full + 1.0) / 2, abs=1e-6)
    assert metrics["ndcg@10"] < metrics["condensed_ndcg@10"]


def test_separation_metrics_hand_case():
    grades = np.array([2, 2, 1, 1, 0, 0])
    cosines = np.array([0.9, 0.6, 0.7, 0.4, 0.5, 0.1])
    out = separation_metrics(grades, cosines)
    # pairs (2 over 1): 0.9>0.7, 0.9>0.4, 0.6<0.7, 0.6>0.4 -> 3/4
    assert out["auc_2_over_1"] == pytest.approx(0.75)
    # pairs (1 over 0): 0.7>0.5, 0.7>0.1, 0.4<0.5, 0.4>0.1 -> 3/4
    assert out["auc_1_over_0"] == pytest.approx(0.75)
    assert out["mean_cos_grade2"] == pytest.approx(0.75)


def bm25_run(products: pd.DataFrame, queries: pd.DataFrame, k: int, config: LexicalConfig) -> dict:
    return lexical_search(LexicalIndex.build(products["title"].tolist(), config), products["product_id"].to_numpy(), queries, k)


def test_bm25_finds_the_matching_title():
    products = pd.DataFrame({"product_id": ["a", "b", "c"], "title": ["cordless drill 18v", "red running shoes", "drill bits set"]})
    queries = pd.DataFrame({"query_id": ["q"], "text": ["running shoes"]})
    run = bm25_run(products, queries, 3, LexicalConfig())
    assert max(run["q"], key=run["q"].get) == "b"
    assert "a" not in run["q"]  # no shared term, no score


def test_bm25_stems_titles_and_queries_alike_and_keeps_its_analyzer_when_saved(tmp_path):
    products = pd.DataFrame({"product_id": ["a", "b"], "title": ["cordless drill 18v", "red running shoes"]})
    queries = pd.DataFrame({"query_id": ["q"], "text": ["drills"]})
    assert list(bm25_run(products, queries, 2, LexicalConfig())["q"]) == ["a"]  # drills -> drill
    assert bm25_run(products, queries, 2, LexicalConfig(stemmer=None))["q"] == {}
    LexicalIndex.build(products["title"].tolist(), LexicalConfig()).save(tmp_path / "bm25")
    loaded = LexicalIndex.load(tmp_path / "bm25")
    assert loaded.stemmer == "english" and loaded.scores(["drills"])[0, 0] > 0 == loaded.scores(["drills"])[0, 1]
    # An index saved before the analyzer was stored was built without stemming, and reads queries the same way.
    LexicalIndex.build(products["title"].tolist(), LexicalConfig(stemmer=None)).save(tmp_path / "old")
    (tmp_path / "old" / LexicalIndex.ANALYZER_FILE).unlink()
    old = LexicalIndex.load(tmp_path / "old")
    assert old.stemmer is None and old.scores(["drills"]).max() == 0 and old.scores(["drill"])[0, 0] > 0


def test_a_stemmed_index_survives_ray_serialization_and_reads_queries_the_same():
    # The sweep ships the dev split's BM25 index to every Tune trial; PyStemmer's C stemmer does not pickle.
    import ray.cloudpickle

    index = LexicalIndex.build(["cordless drill 18v", "red running shoes"], LexicalConfig())
    copied = ray.cloudpickle.loads(ray.cloudpickle.dumps(index))
    assert copied.stemmer == "english"
    np.testing.assert_array_equal(copied.scores(["drills", "shoe"]), index.scores(["drills", "shoe"]))
    assert copied.scores(["drills"])[0, 0] > 0


def test_an_unknown_stemmer_is_a_config_error():
    with pytest.raises(ValueError, match="unknown stemmer 'klingon'"):
        LexicalConfig(stemmer="klingon")


def test_the_sweeps_trial_catalog_keeps_every_judged_product_and_samples_the_rest():
    from mr_ray.evaluate import ScoredSplit
    from mr_ray.pipeline import Limit
    from mr_ray.retriever.sweep import trial_catalog

    products = pd.DataFrame({"product_id": [f"p{i}" for i in range(100)], "title": [f"t{i}" for i in range(100)]})
    pairs = pd.DataFrame({"query_id": ["q1", "q1", "q2"], "product_id": ["p3", "p97", "p50"], "grade": [2, 0, 1]})
    split = ScoredSplit(products, pd.DataFrame({"query_id": ["q1", "q2"], "text": ["a", "b"]}), pairs, pairs)
    small = trial_catalog(split, Limit("sweep.max_dev_products", 10), seed=0)
    ids = small.products["product_id"].tolist()
    assert len(ids) == 10 and {"p3", "p97", "p50"} <= set(ids)
    assert ids == sorted(ids, key=lambda p: int(p[1:]))  # catalog order kept
    assert trial_catalog(split, Limit("sweep.max_dev_products", 10), seed=0).products.equals(small.products)  # seeded
    assert trial_catalog(split, Limit("sweep.max_dev_products", None), seed=0) is split
    assert trial_catalog(split, Limit("sweep.max_dev_products", 2), seed=0).products["product_id"].tolist() == ["p3", "p50", "p97"]
