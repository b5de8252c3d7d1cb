"""Mining: FAISS top-k over the catalog, hard-sample selection, re-annotation."""

import numpy as np
import pandas as pd
import pytest
import torch

from mr_ray.config import LexicalConfig, MineConfig
from mr_ray.retriever.mining import (
    annotate,
    boundary_hardness,
    mine_hard_samples,
    top_lists,
)
from mr_ray.search.retrieval import LexicalIndex


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def mine(query_ids, query_vectors, product_ids, product_vectors, judged, config, texts=None, titles=None):
    products = pd.DataFrame({"product_id": product_ids, "title": titles if titles is not None else product_ids})
    lexical = LexicalIndex.build(products["title"].tolist(), LexicalConfig()) if titles is not None else None
    lists, weight = top_lists(query_ids, query_vectors, texts or [""] * len(query_ids), product_vectors, products, judged, config, lexical)
    return mine_hard_samples(query_ids, query_vectors, product_ids, product_vectors, judged, config, lists), weight


@pytest.fixture
def catalog():
    rng = np.random.default_rng(0)
    product_vectors = unit(rng.normal(size=(300, 16)))
    product_ids = np.array([f"p{i}" for i in range(300)])
    query_vectors = unit(product_vectors[:20] + 0.3 * rng.normal(size=(20, 16)))
    query_ids = np.array([f"q{i}" for i in range(20)])
    judged = pd.DataFrame(
        [(f"q{i}", f"p{j}", g) for i in range(20) for j, g in ((i, 2), (i + 100, 1), (i + 200, 0))],
        columns=["query_id", "product_id", "grade"],
    )
    return query_ids, query_vectors, product_ids, product_vectors, judged


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16"])
def test_mining_returns_only_index_products_and_respects_k(catalog, factory):
    query_ids, query_vectors, product_ids, product_vectors, judged = catalog
    config = MineConfig(k=10, index_factory=factory, unjudged_per_query=3, boundary_per_query=2)
    mined, _ = mine(query_ids, query_vectors, product_ids, product_vectors, judged, config)
    assert set(mined["product_id"]) <= set(product_ids)
    unjudged = mined[mined["reason"] == "unjudged"]
    assert unjudged.groupby("query_id").size().max() <= 3
    assert unjudged["rank"].between(0, 9).all()
    judged_keys = set(zip(judged["query_id"], judged["product_id"]))
    assert not any(key in judged_keys for key in zip(unjudged["query_id"], unjudged["product_id"]))
    boundary = mined[mined["reason"] == "boundary"]
    assert boundary.groupby("query_id").size().max() <= 2
    assert all(key in judged_keys for key in zip(boundary["query_id"], boundary["product_id"]))


def test_unjudged_samples_are_the_highest_ranked_ones(catalog):
    query_ids, query_vectors, product_ids, product_vectors, judged = catalog
    config = MineConfig(k=len(product_ids), unjudged_per_query=4, boundary_per_query=0)
    mined, _ = mine(query_ids[:1], query_vectors[:1], product_ids, product_vectors, judged, config)
    scores = product_vectors @ query_vectors[0]
    judged_q0 = set(judged.loc[judged["query_id"] == "q0", "product_id"])
    expected = [pid for pid in product_ids[np.argsort(-scores)] if pid not in judged_q0][:4]
    assert mined["product_id"].tolist() == expected
    np.testing.assert_allclose(mined["score"], np.sort(scores)[::-1][[list(product_ids[np.argsort(-scores)]).index(p) for p in expected]], rtol=1e-5)


def test_lexical_and_hybrid_sources_add_the_unjudged_products_bm25_and_the_fusion_rank_highest(catalog):
    query_ids, query_vectors, product_ids, product_vectors, judged = catalog
    # titles: product i and i+150 share the word "wordI"; query i asks for it, so BM25 finds both,
    # while the encoder's vectors put p(i+150) far from query i.
    titles = [f"item word{i % 150} filler{i}" for i in range(300)]
    texts = [f"word{i}" for i in range(20)]
    config = MineConfig(k=20, unjudged_per_query=2, boundary_per_query=0, sources=["dense", "lexical", "hybrid"])
    mined, weight = mine(query_ids, query_vectors, product_ids, product_vectors, judged, config, texts, titles)
    assert 0.0 <= weight <= 1.0
    assert set(mined["found_by"]) == {"dense", "lexical", "hybrid"}
    assert not mined.duplicated(["query_id", "product_id"]).any()  # a product two sources found is mined once
    lexical = mined[mined["found_by"] == "lexical"]
    # BM25's best unjudged match for query i is p(i+150), the product sharing its word
    first = lexical[lexical["rank"] == lexical.groupby("query_id")["rank"].transform("min")]
    assert all(pid == f"p{int(qid[1:]) + 150}" for qid, pid in zip(first["query_id"], first["product_id"]))
    np.testing.assert_allclose(lexical["score"], [product_vectors[int(p[1:])] @ query_vectors[int(q[1:])] for q, p in zip(lexical["query_id"], lexical["product_id"])], rtol=1e-5)
    dense_only, _ = mine(query_ids, query_vectors, product_ids, product_vectors, judged, config.model_copy(update={"sources": ["dense"]}))
    assert set(dense_only["found_by"]) == {"dense"}
    assert set(zip(dense_only["query_id"], dense_only["product_id"])) < set(zip(mined["query_id"], mined["product_id"]))


def test_boundary_hardness_prefers_products_on_the_wrong_side():
    scores = np.array([0.9, 0.4, 0.7, 0.5, 0.1])
    grades = np.array([2, 2, 1, 1, 0])
    hardness = boundary_hardness(scores, grades)
    # 2|1: threshold = (mean{0.9, 0.4} + mean{0.7, 0.5, 0.1}) / 2 = 0.5417; the exact product at 0.4
    # is 0.1417 below it, the partial at 0.7 is 0.1583 above it (both on the wrong side).
    # 1|0: threshold = (mean{0.9, 0.4, 0.7, 0.5} + 0.1) / 2 = 0.3625; the irrelevant one is 0.2625 clear.
    assert hardness[1] == pytest.approx(0.65 / 2 + 1.3 / 6 - 0.4)
    assert hardness[2] == pytest.approx(0.7 - (0.65 / 2 + 1.3 / 6))
    assert hardness[4] == pytest.approx(0.1 - 0.3625)
    assert np.argmax(hardness) == 2
    # one grade only: no boundary, nothing is hard
    assert np.isneginf(boundary_hardness(np.array([0.3, 0.5]), np.array([2, 2]))).all()


def test_bad_index_factory_is_a_clear_error(catalog):
    query_ids, query_vectors, product_ids, product_vectors, judged = catalog
    with pytest.raises(ValueError, match="index_factory 'NoSuchIndex'"):
        mine(query_ids, query_vectors, product_ids, product_vectors, judged, MineConfig(index_factory="NoSuchIndex"))


def test_annotate_takes_grades_from_the_source_and_drops_unknown_pairs():
    mined = pd.DataFrame({"query_id": ["q1", "q1", "q2"], "product_id": ["a", "b", "c"], "reason": "unjudged", "rank": [0, 1, 0], "score": [0.9, 0.8, 0.7]})
    grades = pd.DataFrame({"query_id": ["q1", "q2", "q9"], "product_id": ["a", "c", "a"], "grade": [2, 0, 1]})
    out = annotate(mined, grades)
    assert list(zip(out["product_id"], out["grade"])) == [("a", 2), ("c", 0)]
    assert (out["source"] == "mined").all()


def test_annotate_can_take_unjudged_mined_products_as_irrelevant():
    mined = pd.DataFrame({"query_id": ["q1", "q1", "q2"], "product_id": ["a", "b", "c"], "reason": "unjudged", "rank": [0, 1, 0], "score": [0.9, 0.8, 0.7]})
    grades = pd.DataFrame({"query_id": ["q1", "q2", "q9"], "product_id": ["a", "c", "a"], "grade": [2, 1, 1]})
    out = annotate(mined, grades, unjudged_grade=0)
    assert list(zip(out["query_id"], out["product_id"], out["grade"])) == [("q1", "a", 2), ("q1", "b", 0), ("q2", "c", 1)]
    assert out["grade"].dtype == np.int8


def test_unjudged_grade_is_refused_with_the_judge_annotator():
    from mr_ray.config import ConfigError, load_config

    assert load_config(None, {"mine.annotator": "grades", "mine.unjudged_grade": 0}).mine.unjudged_grade == 0
    with pytest.raises(ConfigError, match="mine: unjudged_grade applies to annotator 'grades' only"):
        load_config(None, {"mine.annotator": "judge", "mine.unjudged_grade": 0})


def test_a_mined_pair_takes_the_judges_grade_unless_judged_grades_are_kept():
    from mr_ray.retriever.examples import with_mined

    judged = pd.DataFrame({"query_id": ["q1", "q1"], "product_id": ["p1", "p2"], "grade": [2, 0], "source": ["human", "llm"]})
    mined = pd.DataFrame({"query_id": ["q1", "q1"], "product_id": ["p2", "p3"], "grade": [1, 2], "source": ["mined", "mined"]})

    def grades(frame):
        return {(row.product_id, row.grade, row.hard) for row in frame.itertuples()}

    # p2: judged 0, re-annotated 1; p3: only mined; p1: never mined.
    assert grades(with_mined(judged, mined)) == {("p1", 2, False), ("p2", 1, True), ("p3", 2, True)}
    assert grades(with_mined(judged, mined, keep_judged_grades=True)) == {("p1", 2, False), ("p2", 0, True), ("p3", 2, True)}


@pytest.mark.parametrize("mode", ["hard", "soft", "confident"])
def test_mined_pairs_train_on_the_judges_grade_probabilities_or_only_confident_grades(mode):
    from mr_ray.config import Stage2Config
    from mr_ray.retriever.examples import (
        build_examples,
        mined_labels,
        sample_batch,
        with_mined,
    )

    judged = pd.DataFrame({"query_id": ["q1", "q1"], "product_id": ["p1", "p2"], "grade": [2, 0], "source": "human"})
    mined = pd.DataFrame({"query_id": ["q1", "q1"], "product_id": ["p3", "p4"], "reason": "unjudged", "found_by": "dense", "rank": [0, 1], "score": [0.9, 0.8]})
    judge = pd.DataFrame({"query_id": ["q1", "q1"], "product_id": ["p3", "p4"], "grade": [2, 1], "p0": [0.1, 0.35], "p1": [0.2, 0.4], "p2": [0.7, 0.25], "confidence": [0.7, 0.4]})
    annotated = annotate(mined, judge)
    assert annotated[["p0", "p1", "p2", "confidence"]].notna().all().all()  # the judge's probabilities travel with the pair
    labelled = mined_labels(annotated, Stage2Config(mined_labels=mode, min_confidence=0.6))
    assert set(labelled["product_id"]) == ({"p3"} if mode == "confident" else {"p3", "p4"})
    examples = build_examples(pd.DataFrame({"query_id": ["q1"], "text": ["drill"]}), with_mined(judged, labelled),
                              pd.DataFrame({"product_id": ["p1", "p2", "p3", "p4"], "title": ["a", "b", "c", "d"]}))
    _, titles, labels = sample_batch(examples, 4, np.random.default_rng(0))
    if mode != "soft":
        assert labels.dtype == torch.long and "soft" not in examples.columns
        return
    assert labels.shape == (1, 4, 3)
    by_title = dict(zip(titles, labels[0].tolist()))
    assert by_title["a"] == [0.0, 0.0, 1.0] and by_title["b"] == [1.0, 0.0, 0.0]  # human grades: one-hot
    np.testing.assert_allclose(by_title["c"], [0.1, 0.2, 0.7], rtol=1e-6)
    np.testing.assert_allclose(by_title["d"], [0.35, 0.4, 0.25], rtol=1e-6)
