"""The sharded FAISS index: shard merge vs one exact index, factories, thresholds, the `index` stage."""

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mr_ray.config import EncoderConfig, LexicalConfig, load_config
from mr_ray.pipeline import MANIFEST, run_pipeline
from mr_ray.search.build import choose_encoder, shard_bounds, write_shard
from mr_ray.search.retrieval import build_faiss_index
from mr_ray.search.shards import (
    ShardIndex,
    index_encoder_path,
    merge_hits,
    open_shards,
    read_index_manifest,
)
from mr_ray.search.thresholds import (
    GradeThresholds,
    calibrate_thresholds,
    load_retrieval_thresholds,
)


def unit_vectors(n, dim=32, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_sharded(tmp_path, vectors, n_shards, factory="Flat", search_params=""):
    ids = [f"p{i}" for i in range(len(vectors))]
    shards = []
    for number, (start, stop) in enumerate(shard_bounds(len(vectors), n_shards)):
        index = build_faiss_index(vectors[start:stop], factory, search_params)
        write_shard(tmp_path / f"shard-{number}", index, ids[start:stop], [f"title {i}" for i in range(start, stop)], LexicalConfig())
        shards.append(ShardIndex.open(tmp_path / f"shard-{number}", search_params))
    return shards


def test_shard_bounds_cover_every_row_once():
    bounds = shard_bounds(10, 3)
    assert bounds == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError, match="n_shards=5 is more than the 4 products"):
        shard_bounds(4, 5)


@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_merged_shards_equal_one_exact_index(tmp_path, n_shards):
    products, queries = unit_vectors(500, seed=1), unit_vectors(40, seed=2)
    shards = write_sharded(tmp_path, products, n_shards)
    merged = merge_hits([shard.search(queries, 10) for shard in shards], 10)

    exact = faiss.IndexFlatIP(products.shape[1])
    exact.add(products)
    scores, rows = exact.search(queries, 10)
    assert merged.product_ids.tolist() == [[f"p{r}" for r in row] for row in rows]
    np.testing.assert_allclose(merged.scores, scores, rtol=1e-5)
    assert merged.titles[0, 0] == f"title {rows[0, 0]}"


def test_shard_smaller_than_k_pads_and_merge_drops_padding(tmp_path):
    shards = write_sharded(tmp_path, unit_vectors(6, seed=3), 3)  # 2 products per shard
    hits = shards[0].search(unit_vectors(1, seed=4), 5)
    assert np.isinf(hits.scores[0, 2:]).all() and hits.product_ids[0, 2:].tolist() == [None] * 3
    rows = merge_hits([s.search(unit_vectors(1, seed=4), 5) for s in shards], 5).rows(0)
    assert len(rows) == 5 and len({r["product_id"] for r in rows}) == 5
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


def test_ivf_probing_every_list_is_exact_and_hnsw_is_close(tmp_path):
    products, queries = unit_vectors(2000, seed=5), unit_vectors(50, seed=6)
    exact = merge_hits([s.search(queries, 10) for s in write_sharded(tmp_path / "flat", products, 2)], 10)
    ivf = write_sharded(tmp_path / "ivf", products, 2, "IVF16,Flat", "nprobe=16")
    assert merge_hits([s.search(queries, 10) for s in ivf], 10).product_ids.tolist() == exact.product_ids.tolist()
    one_probe = write_sharded(tmp_path / "ivf1", products, 2, "IVF16,Flat", "nprobe=1")
    assert merge_hits([s.search(queries, 10) for s in one_probe], 10).product_ids.tolist() != exact.product_ids.tolist()
    hnsw = merge_hits([s.search(queries, 10) for s in write_sharded(tmp_path / "hnsw", products, 2, "HNSW32")], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw.product_ids.tolist(), exact.product_ids.tolist())])
    assert recall > 0.9


def test_factory_errors_name_the_problem():
    with pytest.raises(ValueError, match="'NotAnIndex' is not a valid faiss index_factory"):
        build_faiss_index(unit_vectors(10), "NotAnIndex")
    with pytest.raises(ValueError, match=r"'IVF64,Flat' cannot be trained on 20 vectors"):
        build_faiss_index(unit_vectors(20), "IVF64,Flat")
    with pytest.raises(ValueError, match="search_params 'nprobe=4' do not apply to 'Flat'"):
        build_faiss_index(unit_vectors(20), "Flat", "nprobe=4")


def test_thresholds_on_a_hand_made_case():
    scores = [0.91, 0.85, 0.80, 0.62, 0.55, 0.50, 0.30, 0.20, 0.10]
    grades = [2, 2, 2, 1, 1, 1, 0, 0, 0]
    thresholds, report = calibrate_thresholds(scores, grades)
    assert thresholds.exact == pytest.approx((0.80 + 0.62) / 2)
    assert thresholds.partial == pytest.approx((0.50 + 0.30) / 2)
    assert report["f1"] == {"2|1": 1.0, "1|0": 1.0}
    assert report["tiers"] == {"exact": {"precision": 1.0, "recall": 1.0}, "exact+partial": {"precision": 1.0, "recall": 1.0}}
    assert thresholds.grade(scores).tolist() == grades
    assert thresholds.grade([0.9, 0.5, 0.39, 0.41]).tolist() == [2, 1, 0, 1]


def test_thresholds_with_overlap_pick_the_best_f1_cut():
    # A grade-1 pair (0.75) outscores two exact ones; cutting below all exact pairs
    # (precision 4/5, recall 1: F1 8/9) beats cutting above it (precision 1, recall 1/2: F1 2/3).
    scores = [0.9, 0.8, 0.7, 0.4, 0.75, 0.3, 0.2, 0.1]
    grades = [2, 2, 2, 2, 1, 1, 0, 0]
    thresholds, report = calibrate_thresholds(scores, grades)
    assert thresholds.exact == pytest.approx((0.4 + 0.3) / 2)
    assert thresholds.partial == pytest.approx((0.3 + 0.2) / 2)
    assert report["f1"] == {"2|1": pytest.approx(8 / 9, abs=1e-4), "1|0": 1.0}
    assert report["tiers"]["exact"] == {"precision": 0.8, "recall": 1.0}


def test_unjudged_random_products_lift_the_exact_cut_above_lookalikes():
    """Judged pairs are the pool's hardest candidates; the catalog also holds lookalikes nobody judged
    (cordless mice for "cordless drill"), each sampled one standing for many such products."""
    judged_scores = [0.80, 0.70, 0.55, 0.60, 0.50, 0.20, 0.10]
    judged_grades = [2, 2, 2, 1, 1, 0, 0]
    alone, _ = calibrate_thresholds(judged_scores, judged_grades)
    assert alone.exact == pytest.approx((0.55 + 0.50) / 2)  # all three exact in, one partial too: F1 6/7
    # Two sampled unjudged products at 0.58 and 0.62, grade 0, each standing for 10 of the catalog's:
    # the old cut would show 3 exact among 24 products (F1 2/9); cutting above them shows 2 of 2 (F1 4/5).
    scores = judged_scores + [0.58, 0.62, 0.05]
    grades = judged_grades + [0, 0, 0]
    weights = [1.0] * len(judged_scores) + [10.0, 10.0, 10.0]
    thresholds, report = calibrate_thresholds(scores, grades, weights)
    assert thresholds.exact == pytest.approx((0.70 + 0.62) / 2)
    # The lookalikes now sit below the exact tier (and, ten of them each, below the partial one: the 1|0 cut above them
    # keeps F1 4/7 where one below them shows 5 right among 25, F1 1/3).
    assert thresholds.grade([0.62, 0.58]).tolist() == [0, 0] and thresholds.partial == thresholds.exact
    assert report["f1"]["2|1"] == pytest.approx(0.8, abs=1e-4)
    assert report["tiers"]["exact"] == {"precision": 1.0, "recall": round(2 / 3, 4)}


def test_exact_cut_at_a_precision_target_is_the_lowest_cut_reaching_it():
    # From the top: 1/1, 2/2, 2/3, 3/4, 4/5 (0.8), 4/6, 5/7, 6/8 exact products shown (of 6), then the grade-0 ones.
    scores = [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.10]
    grades = [2, 2, 1, 2, 2, 1, 2, 2, 0, 0]
    f1_cut, f1_report = calibrate_thresholds(scores, grades)
    assert f1_cut.exact == pytest.approx((0.60 + 0.50) / 2)  # max F1 (6/7) shows every exact product at precision 0.75
    assert "exact_precision" not in f1_report and f1_report["criterion"].startswith("max F1 per boundary")
    thresholds, report = calibrate_thresholds(scores, grades, exact_precision=0.8)
    # The lowest cut at precision >= 0.8 (the most recall there); 2/2 above 0.9 reaches it too, with less recall.
    assert thresholds.exact == pytest.approx((0.75 + 0.70) / 2)
    assert report["exact_precision"] == {"target": 0.8, "reached": True, "precision": 0.8, "recall": 0.6667}
    assert report["tiers"]["exact"] == {"precision": 0.8, "recall": 0.6667}
    assert report["f1"]["2|1"] == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3), abs=1e-4)
    assert "precision >= 0.8" in report["criterion"] and "1|0: max F1" in report["criterion"]
    assert thresholds.partial == pytest.approx((0.60 + 0.50) / 2)  # the 1|0 boundary stays max F1 (all 8 graded 1+ above it)
    assert thresholds.grade([0.9, 0.72, 0.6, 0.2]).tolist() == [2, 1, 1, 0]
    strict, strict_report = calibrate_thresholds(scores, grades, exact_precision=1.0)
    assert strict.exact == pytest.approx((0.90 + 0.85) / 2) and strict_report["exact_precision"]["recall"] == 0.3333


def test_exact_precision_target_counts_weights_and_says_when_out_of_reach():
    # A sampled unjudged product at 0.90 stands for 3 catalog products: from the top 1/1, 2/2, 2/5, 3/6 exact.
    scores = [0.95, 0.92, 0.90, 0.85, 0.60, 0.20]
    grades = [2, 2, 0, 2, 1, 0]
    weights = [1.0, 1.0, 3.0, 1.0, 1.0, 10.0]
    thresholds, report = calibrate_thresholds(scores, grades, weights, exact_precision=0.7)
    assert thresholds.exact == pytest.approx((0.92 + 0.90) / 2) and report["exact_precision"]["recall"] == 0.6667
    unweighted, _ = calibrate_thresholds(scores, grades, exact_precision=0.7)
    assert unweighted.exact == pytest.approx((0.85 + 0.60) / 2)  # counted once, the lookalike leaves 3/4 above 0.85
    thresholds, report = calibrate_thresholds(scores, grades, weights, exact_precision=0.5)
    assert thresholds.exact == pytest.approx((0.85 + 0.60) / 2) and report["exact_precision"]["precision"] == 0.5
    # A lookalike (weight 2) outscores every exact product: from the top 0/2, 1/3, 2/4, 3/5, 3/6; nothing reaches 0.8,
    # so the cut of highest precision (3/5) is taken and the report says so.
    scores = [0.99, 0.95, 0.92, 0.85, 0.60, 0.20]
    grades = [0, 2, 2, 2, 1, 0]
    weights = [2.0, 1.0, 1.0, 1.0, 1.0, 10.0]
    thresholds, report = calibrate_thresholds(scores, grades, weights, exact_precision=0.8)
    assert thresholds.exact == pytest.approx((0.85 + 0.60) / 2)
    target = report["exact_precision"]
    assert (target["reached"], target["precision"], target["recall"]) == (False, 0.6, 1.0)
    assert target["note"] == "no cut reaches precision 0.8: the exact tier is cut at the highest precision, 0.6"


def test_tier_table_judges_each_mode_by_its_own_thresholds():
    from mr_ray.search.thresholds import tier_table

    by_mode = {"dense": GradeThresholds(0.7, 0.4), "lexical": GradeThresholds(0.8, 0.3), "hybrid": GradeThresholds(0.6, 0.4)}
    dense = [0.9, 0.75, 0.5, 0.45, 0.2]
    lexical = [1.0, 0.2, 0.9, 0.1, 0.0]  # hybrid at weight 0.5: 0.95, 0.475, 0.7, 0.275, 0.1
    grades = [2, 2, 1, 0, 0]
    weights = [1.0, 1.0, 1.0, 3.0, 10.0]  # the grade-0 product at dense 0.45 stands for 3
    table = tier_table(by_mode, dense, lexical, grades, 0.5, weights)
    assert table == {
        "dense": {"exact": {"precision": 1.0, "recall": 1.0, "threshold": 0.7}, "exact+partial": {"precision": 0.5, "recall": 1.0, "threshold": 0.4}},
        "lexical": {"exact": {"precision": 0.5, "recall": 0.5, "threshold": 0.8}, "exact+partial": {"precision": 1.0, "recall": 0.6667, "threshold": 0.3}},
        "hybrid": {"exact": {"precision": 0.5, "recall": 0.5, "threshold": 0.6}, "exact+partial": {"precision": 1.0, "recall": 1.0, "threshold": 0.4}},
    }
    # A tier that shows nothing has no precision; a split without an exact product, no exact recall.
    empty = tier_table(by_mode, [0.1, 0.1], [0.0, 0.0], [1, 0], 0.5)
    assert empty["dense"]["exact"] == {"precision": None, "recall": None, "threshold": 0.7}


def test_tiers_markdown_says_what_it_measured_on():
    from mr_ray.stages.index import tiers_markdown

    about = {"split": "test", "truth": "human judgments", "queries": 0, "judged_pairs": 0, "unjudged_pairs": 0,
             "calibrated_on": "test", "exact_precision": None, "fusion_weight": 0.7, "modes": None}
    text = tiers_markdown(about, {})
    assert "exact: max F1" in text and "Not held out" in text and "No judged test queries: nothing to measure." in text
    assert "| mode |" not in text


def test_calibration_pairs_sample_unjudged_products_as_grade_zero(tmp_path):
    from mr_ray.config import IndexConfig
    from mr_ray.search.build import UNJUDGED_ASSUMPTION, calibration_pairs

    products = [f"p{i:02d}" for i in range(50)]
    tables = {
        "products": {"product_id": products, "title": [f"title {p}" for p in products]},
        "queries": {"query_id": ["q1", "q2", "q3"], "text": ["drill", "sofa", "lamp"], "split": ["dev", "dev", "train"]},
        "judgments": {"query_id": ["q1", "q1", "q2", "q3"], "product_id": ["p00", "p01", "p02", "p03"], "grade": [2, 1, 2, 2], "source": ["human"] * 4},
    }
    for name, columns in tables.items():
        (tmp_path / name).mkdir()
        pq.write_table(pa.table(columns), tmp_path / name / "part-00000.parquet")
    pairs, summary = calibration_pairs(tmp_path, IndexConfig(calibration_unjudged=20, calibration_seed=3))
    judged, sampled = pairs[pairs["judged"]], pairs[~pairs["judged"]]
    assert sorted(zip(judged["query_id"], judged["product_id"], judged["grade"])) == [("q1", "p00", 2), ("q1", "p01", 1), ("q2", "p02", 2)]
    assert (judged["weight"] == 1.0).all() and (sampled["grade"] == 0).all()
    for query, own_judged in (("q1", {"p00", "p01"}), ("q2", {"p02"})):
        mine = sampled[sampled["query_id"] == query]
        assert len(mine) == mine["product_id"].nunique() == 20 and not own_judged & set(mine["product_id"])
        assert mine["weight"].tolist() == [(50 - len(own_judged)) / 20] * 20  # each stands for its share of the unjudged rest
    assert "q3" not in set(pairs["query_id"])  # a train query
    assert summary == {"split": "dev", "truth": "human judgments", "queries": 2, "judged_pairs": 3, "unjudged_sampled_per_query": 20,
                       "unjudged_pairs": 40, "seed": 3, "assumption": UNJUDGED_ASSUMPTION}
    again, _ = calibration_pairs(tmp_path, IndexConfig(calibration_unjudged=20, calibration_seed=3))
    assert again.equals(pairs)  # seeded
    everything, _ = calibration_pairs(tmp_path, IndexConfig(calibration_unjudged=500))
    assert (~everything["judged"]).sum() == 48 + 49 and (everything.loc[~everything["judged"], "weight"] == 1.0).all()


def test_partial_threshold_is_capped_at_the_exact_one():
    # An encoder that ranks grade 1 above grade 2 still yields ordered tiers.
    thresholds, _ = calibrate_thresholds([0.2, 0.25, 0.9, 0.8, 0.5, 0.45], [2, 2, 1, 1, 0, 0])
    assert thresholds.exact == pytest.approx(0.2)
    assert thresholds.partial == pytest.approx(0.2)  # uncapped it would be (0.8 + 0.5) / 2


def test_thresholds_need_pairs_on_both_sides(tmp_path):
    with pytest.raises(ValueError, match="boundary 2\\|1: no judged pair above it"):
        calibrate_thresholds([0.5, 0.4], [1, 0])
    saved = GradeThresholds(exact=0.7, partial=0.4)
    saved.save(tmp_path)
    assert GradeThresholds.load(tmp_path) == saved
    with pytest.raises(ValueError, match="cannot read grade thresholds"):
        GradeThresholds.load(tmp_path / "nowhere")


def test_choose_encoder_prefers_stage2_then_stage1(tmp_path):
    assert choose_encoder([], EncoderConfig()) == (None, "pretrained")
    assert choose_encoder([], EncoderConfig(model="/models/base")) == ("/models/base", "config")
    assert choose_encoder([tmp_path / "stage1"], EncoderConfig()) == (str(tmp_path / "stage1" / "model"), "stage1")
    assert choose_encoder([tmp_path / "stage1", tmp_path / "stage2"], EncoderConfig()) == (str(tmp_path / "stage2" / "model"), "stage2")


def test_index_stage_on_the_sample_catalog(ray_local, tmp_path, caplog):
    config = load_config(
        None,
        {"data.sample.n_products": 300, "data.sample.n_queries": 80, "index.n_shards": 3, "index.factory": "HNSW16", "index.search_params": "efSearch=64"},
    )
    run_pipeline(config, tmp_path, only=["prepare", "index"])
    index_dir = tmp_path / "index"
    manifest = read_index_manifest(index_dir)
    assert manifest["factory"] == "HNSW16" and manifest["dim"] == 384 and manifest["encoder"]["source"] == "pretrained"
    assert index_encoder_path(index_dir, manifest) is None
    catalog = pq.read_table(tmp_path / "prepare" / "products").to_pandas().set_index("product_id")["title"]
    shards = open_shards(index_dir)
    assert [s.index.ntotal for s in shards] == [100, 100, 100]
    stored = [pid for s in shards for pid in s.product_ids[:-1]]
    assert sorted(stored) == sorted(catalog.index)
    assert all(catalog[pid] == title for s in shards for pid, title in zip(s.product_ids[:-1], s.titles[:-1]))
    # A product's own title vector finds that product first.
    first = shards[1]
    own = first.index.reconstruct(7).reshape(1, -1)
    assert merge_hits([s.search(own, 3) for s in shards], 3).product_ids[0, 0] == first.product_ids[7]

    thresholds = json.loads((index_dir / "thresholds.json").read_text())
    assert 0 < thresholds["partial"] <= thresholds["exact"] < 1  # equal: the 1|0 cut was capped at the 2|1 one
    per_grade = thresholds["calibration"]["per_grade"]
    assert per_grade["exact"]["mean_score"] > per_grade["partial"]["mean_score"] > per_grade["irrelevant"]["mean_score"]
    stage_metrics = json.loads((index_dir / MANIFEST).read_text())["metrics"]
    assert stage_metrics["products"] == 300 and stage_metrics["shards"] == 3
    # The sample's gold is the truth; every dev query got 200 unjudged products as grade 0, said in the index manifest.
    calibration = manifest["calibration"]
    assert calibration["truth"] == "gold" and calibration["unjudged_pairs"] == 200 * calibration["queries"]
    assert "grade 0" in calibration["assumption"] and thresholds["calibration"]["unjudged_pairs"] == calibration["unjudged_pairs"]
    for mode, tiers in stage_metrics["dev_tiers"].items():
        # A tier mostly right: far above the exact products' share of the catalog (about 1 in 100 per query).
        assert tiers["exact"]["precision"] > 0.1 and tiers["exact+partial"]["precision"] > 0.3, (mode, tiers)
    # Lexical shards beside the dense ones, and every retrieval mode calibrated on dev.
    assert [s.lexical.n_docs for s in shards] == [100, 100, 100]
    modes, weight = load_retrieval_thresholds(index_dir)
    assert set(modes) == {"dense", "lexical", "hybrid"} and weight == stage_metrics["fusion_weight"]
    assert modes["dense"] == GradeThresholds.load(index_dir)
    assert 0 < modes["hybrid"].partial <= modes["hybrid"].exact
    ndcg = {float(w): v for w, v in thresholds["retrieval"]["weights_ndcg@10"].items()}
    assert len(ndcg) == 11 and ndcg[weight] == max(ndcg.values())
    # The exact tier is cut for precision 0.8 on dev (index.exact_precision's default), and said so.
    for mode in modes:
        report = thresholds["retrieval"][mode]["calibration"]
        assert report["exact_precision"]["target"] == 0.8 and "precision >= 0.8" in report["criterion"]
        if report["exact_precision"]["reached"]:
            assert report["tiers"]["exact"]["precision"] >= 0.8
    # Each tier's precision and recall on the held-out test split, with those dev thresholds: in the manifest and tiers.md.
    tiers = stage_metrics["tiers"]
    queries = pq.read_table(tmp_path / "prepare" / "queries").to_pandas()
    gold = pq.read_table(tmp_path / "prepare" / "gold").to_pandas()
    test_gold = gold[gold["query_id"].isin(queries.loc[queries["split"] == "test", "query_id"])]
    assert {k: tiers[k] for k in ("split", "calibrated_on", "truth", "exact_precision", "fusion_weight")} == {
        "split": "test", "calibrated_on": "dev", "truth": "gold", "exact_precision": 0.8, "fusion_weight": weight}
    assert tiers["queries"] == test_gold["query_id"].nunique() > 0 and tiers["judged_pairs"] == len(test_gold)
    assert tiers["unjudged_pairs"] == 200 * tiers["queries"]
    table = (index_dir / "tiers.md").read_text()
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [(mode, tier) for mode, tier, *_ in rows] == [(m, t) for m in ("dense", "lexical", "hybrid") for t in ("exact", "exact+partial")]
    for mode, tier, precision, recall, threshold in rows:
        measured = tiers["modes"][mode][tier]
        assert (float(precision), float(recall), float(threshold)) == (measured["precision"], measured["recall"], measured["threshold"])
        assert measured["threshold"] == round(modes[mode].exact if tier == "exact" else modes[mode].partial, 4)
        assert 0 < measured["recall"] <= 1 and 0 < measured["precision"] <= 1
    assert "against gold" in table and f"{tiers['queries']} test queries" in table
    # A mode whose exact cut never reached 0.8 on dev is named in one line of the stage's log and in tiers.md.
    unreached = [mode for mode in modes if not thresholds["retrieval"][mode]["calibration"]["exact_precision"]["reached"]]
    said = [record.getMessage() for record in caplog.records if "index.exact_precision" in record.getMessage()]
    assert len(said) == (1 if unreached else 0) and all(f"{mode} 0." in said[0] for mode in unreached)
    assert ("No exact cut reached precision 0.8" in table) == bool(unreached)


# ---------------------------------------------------------------- hybrid: lexical shards and fusion


def test_rrf_on_hand_made_lists():
    from mr_ray.search.fusion import RRF_K, reciprocal_rank_fusion

    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]])
    scores = dict(fused)
    assert scores["b"] == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))  # found by both sides
    assert scores["d"] == pytest.approx(1 / (RRF_K + 2))  # found by the lexical side only
    assert [p for p, _ in fused] == ["b", "a", "d", "c"]
    # Ties (same rank on one side each) are ordered by product id, whatever the list order.
    assert reciprocal_rank_fusion([["y"], ["x"]]) == reciprocal_rank_fusion([["x"], ["y"]]) == [("x", 1 / 61), ("y", 1 / 61)]
    # k larger than either list: every product of both lists, nothing invented.
    assert len(reciprocal_rank_fusion([["a"], ["b"]], k=1000)) == 2


def test_weighted_fusion_of_candidates_found_by_one_side_only():
    from mr_ray.search.fusion import Candidates

    candidates = Candidates(
        product_ids=np.array(["dense-only", "both", "lexical-only"], dtype=object),
        titles=np.array(["t1", "t2", "t3"], dtype=object),
        dense=np.array([0.875, 0.75, 0.25], dtype=np.float32),
        lexical=np.array([0.0, 4.0, 8.0], dtype=np.float32),
        found_dense=np.array([True, True, False]),
        found_lexical=np.array([False, True, True]),
    )
    hybrid = candidates.ranked("hybrid", 0.5, k=10)  # k larger than both lists
    # 0.5 * cos + 0.5 * bm25 / 8: both 0.375 + 0.25, lexical-only 0.125 + 0.5 (a tie: by product id), dense-only 0.4375
    assert [r["product_id"] for r in hybrid] == ["both", "lexical-only", "dense-only"]
    assert [r["score"] for r in hybrid] == [0.625, 0.625, 0.4375]
    assert [r["found_by"] for r in hybrid] == [["dense", "lexical"], ["lexical"], ["dense"]]
    assert [r["product_id"] for r in candidates.ranked("dense", 0.5, 10)] == ["dense-only", "both"]
    lexical = candidates.ranked("lexical", 0.5, 10)
    assert [(r["product_id"], r["score"]) for r in lexical] == [("lexical-only", 1.0), ("both", 0.5)]
    assert [p for p, _ in candidates.rrf(10)] == ["both", "dense-only", "lexical-only"]
    with pytest.raises(ValueError, match="retrieval 'sparse' is not one of dense, lexical, hybrid"):
        candidates.ranked("sparse", 0.5, 10)


def test_thresholds_calibrated_on_fused_scores():
    from mr_ray.search.thresholds import calibrate_retrieval

    # Cosine alone cannot tell the exact product (0.60) from the partial ones (0.62, 0.58);
    # its title matches the query's words, so the fused score can.
    dense = [0.60, 0.80, 0.62, 0.58, 0.30, 0.20]
    lexical = [1.00, 0.90, 0.10, 0.20, 0.00, 0.10]
    grades = [2, 2, 1, 1, 0, 0]
    by_mode, report = calibrate_retrieval(dense, lexical, grades, weight=0.5)
    assert report["dense"]["f1"]["2|1"] < 1.0
    assert report["hybrid"]["f1"] == {"2|1": 1.0, "1|0": 1.0}
    # fused: 0.80, 0.85, 0.36, 0.39, 0.15, 0.15 -> cuts halfway between 0.80 and 0.39, and 0.36 and 0.15
    assert by_mode["hybrid"].exact == pytest.approx((0.80 + 0.39) / 2)
    assert by_mode["hybrid"].partial == pytest.approx((0.36 + 0.15) / 2)
    assert by_mode["hybrid"].grade([0.85, 0.5, 0.1]).tolist() == [2, 1, 0]


def test_shard_answers_both_halves_with_both_scores(tmp_path):
    vectors = unit_vectors(4, seed=7)
    titles = ["black leather sofa", "red running shoes", "cordless drill 18v", "drill bits set"]
    index = build_faiss_index(vectors, "Flat")
    write_shard(tmp_path / "shard", index, ["p0", "p1", "p2", "p3"], titles, LexicalConfig())
    shard = ShardIndex.open(tmp_path / "shard")
    (found,) = shard.search_both(vectors[[1]], ["drill"], k=1)
    assert found.product_ids.tolist()[0] == "p1" and found.found_dense.tolist()[0] and not found.found_lexical[0]
    lexical_only = found.product_ids.tolist().index(next(p for p, f in zip(found.product_ids, found.found_lexical) if f))
    assert found.product_ids[lexical_only] in {"p2", "p3"}
    # its cosine comes from the stored vector, the dense hit's BM25 is 0 (no shared word)
    row = int(found.product_ids[lexical_only][1])
    assert found.dense[lexical_only] == pytest.approx(float(vectors[row] @ vectors[1]), abs=1e-6)
    assert found.lexical[0] == 0.0 and found.lexical[lexical_only] > 0
