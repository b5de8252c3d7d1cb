"""The sample catalog's rules, shopper wordings, determinism and click model."""

import re

import numpy as np
import pandas as pd

from mr_ray.config import EvaluateConfig, SampleConfig
from mr_ray.data.augment import augment_queries, misspell
from mr_ray.data.sample import (
    ACCESSORY_WORDING,
    INTENTS,
    SYNONYMS,
    TYPE_BY_NAME,
    TYPES,
    generate_products,
    generate_queries,
    generate_sample,
    gold_grade,
    model_code,
    phenomenon_shares,
    size_wordings,
    title_name,
    word_query,
)
from mr_ray.evaluate import ndcg_by_phenomenon
from mr_ray.metrics import PER_QUERY_NDCG, evaluate_retrieval
from mr_ray.report.markdown import render_phenomena, render_stage_gains


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


# ---------------------------------------------------------------- shopper wordings


def catalog(rows):
    return pd.DataFrame(rows, columns=["type", "brand", "color", "material", "size"])


def query(type_name, **stated):
    return {"type": type_name, "brand": None, "color": None, "material": None, "size": None, **stated}


def test_every_phenomenon_is_present_in_its_documented_share():
    rng = np.random.default_rng(3)
    products = generate_products(1500, rng)
    queries = generate_queries(1500, rng, 0.1, products)
    observed = queries["phenomenon"].value_counts(normalize=True)
    for phenomenon, share in phenomenon_shares(0.1).items():
        # Duplicate wordings are skipped, which thins the phenomena with few wordings (brand-only: 38 brands).
        assert abs(observed.get(phenomenon, 0.0) - share) < 0.25 * share + 0.01, (phenomenon, observed.get(phenomenon), share)
    # Every phenomenon reaches each split, so a retriever can learn it from train queries and be scored on test.
    assert (queries.groupby("phenomenon")["split"].nunique() == 3).all()
    # The same synonym / intent wordings recur across splits with other attributes.
    for phenomenon, table in (("synonym", SYNONYMS), ("intent", INTENTS)):
        rows = queries[queries["phenomenon"] == phenomenon]
        wording = rows["text"].map(lambda text: next(w for w in sorted(sum(table.values(), ()), key=len, reverse=True) if w in text))
        shared = set(wording[rows["split"] == "train"]) & set(wording[rows["split"] == "test"])
        assert len(shared) >= 0.5 * wording[rows["split"] == "test"].nunique()
    # Spanish queries are tagged, and every query states what some product has: it has an exact product.
    assert set(queries.loc[queries["locale"] == "es_ES", "phenomenon"]) == {"second_locale"}
    assert all((gold_grade(q, products) == 2).any() for q in queries.head(300).to_dict("records"))


def test_gold_rules_on_hand_made_cases_of_each_phenomenon():
    rng = np.random.default_rng(0)
    sofas = catalog(
        [
            ["sofa", "nestwell", "red", "leather", "3 seat"],  # exact for "crimson leather couch"
            ["sofa", "lumora", "red", "linen", "3 seat"],  # same type, other material: partial
            ["loveseat", "nestwell", "red", "leather", "2 seat"],  # sibling: partial
            ["throw pillow", "nestwell", "red", "velvet", "18 inch"],  # complement: partial
            ["cordless drill", "torqmax", "red", "plastic", "20v"],  # unrelated
        ]
    )
    # synonym + paraphrase: the wording changes, the stated type and attributes grade
    text, stated, _ = word_query("synonym", TYPE_BY_NAME["sofa"], sofas.iloc[0].to_dict(), rng)
    assert "sofa" not in text and any(w in text for w in SYNONYMS["sofa"])
    assert gold_grade(query("sofa", color="red", material="leather"), sofas).tolist() == [2, 1, 1, 1, 0]
    text, stated, _ = word_query("paraphrase", TYPE_BY_NAME["sofa"], sofas.iloc[0].to_dict(), rng)
    assert text != " ".join(v for v in (stated["color"], stated["material"], "sofa", stated["size"]) if v)
    assert gold_grade({**stated, "type": "sofa"}, sofas)[0] == 2
    # intent: "shoes for a marathon" is a running-shoes query
    shoes = catalog([["running shoes", "nimbus", "red", "mesh", "size 9"], ["running shoes", "nimbus", "red", "mesh", "size 10"], ["sneakers", "nimbus", "red", "leather", "size 9"], ["frying pan", "culina", "red", "nonstick", "10 inch"]])
    assert gold_grade(query("running shoes", size="size 9"), shoes).tolist() == [2, 1, 1, 0]
    # complement: "case for a 6.7 inch phone" wants a 6.7-inch case; the phone itself is partial
    phones = catalog([["phone case", "orbix", "black", "silicone", "6.7 inch"], ["phone case", "orbix", "black", "silicone", "6.1 inch"], ["smartphone", "orbix", "black", "glass", "128gb"], ["laptop", "orbix", "black", "aluminum", "13 inch"]])
    text, stated, _ = word_query("complement", TYPE_BY_NAME["phone case"], phones.iloc[0].to_dict(), np.random.default_rng(5))
    assert re.search(r"\bfor (a|my)\b.*\bphone$", text), text
    assert gold_grade(query("phone case", size="6.7 inch"), phones).tolist() == [2, 1, 1, 0]
    # model-style: the code states brand, type and size
    drills = catalog([["cordless drill", "torqmax", "red", "plastic", "20v"], ["cordless drill", "torqmax", "red", "plastic", "18v"], ["cordless drill", "boltline", "red", "plastic", "20v"]])
    text, stated, _ = word_query("model", TYPE_BY_NAME["cordless drill"], drills.iloc[0].to_dict(), rng)
    assert text == f"torqmax {model_code('torqmax', 'cordless drill', '20v').lower()}"
    assert gold_grade({**stated, "type": "cordless drill"}, drills).tolist() == [2, 1, 1]
    # brand-only: every product of the brand is exact, nothing is partial
    assert gold_grade(query(None, brand="torqmax"), drills).tolist() == [2, 2, 0]
    # misspelt / second locale: the text changes, the grade follows what the query states
    text, stated, _ = word_query("second_locale", TYPE_BY_NAME["sofa"], sofas.iloc[0].to_dict(), rng)
    assert text.startswith("sofá") and gold_grade({**stated, "type": "sofa"}, sofas)[0] == 2


def test_wordings_are_consistent_with_the_catalog():
    names = {t.name for t in TYPES}
    assert not {w for words in SYNONYMS.values() for w in words} & names
    for accessory, (_, goes_with, _, _) in ACCESSORY_WORDING.items():
        assert goes_with in TYPE_BY_NAME[accessory].complements, accessory
    assert size_wordings("20v")[0] == "20 volt" and "six foot" in size_wordings("6 ft") and '6.7"' in size_wordings("6.7 inch")
    codes = {(b, t.name, s): model_code(b, t.name, s) for t in TYPES for b in {"torqmax", "nimbus", "nestwell"} for s in t.sizes}
    assert len(set(codes.values())) == len(codes)
    products = generate_products(400, np.random.default_rng(0))
    for row in products.itertuples():
        assert model_code(row.brand, row.type, row.size) in row.title
    names = [title_name(t, b) for t, b in zip(products["type"], products["brand"])]
    renamed = [(t, n, title) for t, n, title in zip(products["type"], names, products["title"]) if n != t]
    assert 0.2 < len(renamed) / len(products) < 0.5
    assert all(n in SYNONYMS[t] and n in title and t not in title for t, n, title in renamed)


def test_ndcg_by_phenomenon_groups_per_query_ndcg():
    queries = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "phenomenon": ["synonym", "synonym", "intent"]})
    truth = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "product_id": ["a", "b", "c"], "grade": [2, 2, 2]})
    runs = {"bm25": {"q1": {"a": 1.0}, "q2": {"x": 1.0}, "q3": {"c": 1.0}}, "stage1": {"q1": {"a": 1.0}, "q2": {"b": 1.0}, "q3": {"x": 1.0}}}
    per_query = {name: evaluate_retrieval(run, truth, EvaluateConfig())[PER_QUERY_NDCG] for name, run in runs.items()}
    table = ndcg_by_phenomenon(per_query, queries)
    assert table == {"synonym": {"n_queries": 2, "bm25": 0.5, "stage1": 1.0}, "intent": {"n_queries": 1, "bm25": 1.0, "stage1": 0.0}}
    assert "| synonym | 2 | 0.5000 | 1.0000 |" in render_phenomena(table)
    assert ndcg_by_phenomenon(per_query, queries.drop(columns="phenomenon")) == {}


def test_stage_gains_name_each_step_and_its_relative_change():
    systems = {"bm25": {"ndcg@10": 0.7}, "pretrained": {"ndcg@10": 0.6, "auc_2_over_1": 0.6}, "stage1": {"ndcg@10": 0.75, "auc_2_over_1": 0.7}, "stage2": {"ndcg@10": 0.77, "auc_2_over_1": 0.8}}
    text = render_stage_gains(systems)
    assert "- stage1 over pretrained: NDCG@10 0.6000 -> 0.7500 (+25.0%), AUC(2 over 1) 0.6000 -> 0.7000" in text
    assert "- stage2 over bm25: NDCG@10 0.7000 -> 0.7700 (+10.0%)\n" in text and "st-mnrl" not in text
    assert render_stage_gains({"bm25": {"ndcg@10": 0.7}}) == ""
