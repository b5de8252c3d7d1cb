"""The sharded FAISS index: shard merge vs one exact index, factories, thresholds, the `index` stage."""

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from mr_ray.config import EncoderConfig, load_config
from mr_ray.index.build import build_faiss_index, choose_encoder, shard_bounds, write_shard
from mr_ray.index.shards import ShardIndex, index_encoder_path, merge_hits, open_shards, read_index_manifest
from mr_ray.index.thresholds import GradeThresholds, calibrate_thresholds
from mr_ray.pipeline import MANIFEST, run_pipeline


def unit_vectors(n, dim=32, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_sharded(tmp_path, vectors, n_shards, factory="Flat", search_params=""):
    ids = [f"p{i}" for i in range(len(vectors))]
    shards = []
    for number, (start, stop) in enumerate(shard_bounds(len(vectors), n_shards)):
        index = build_faiss_index(vectors[start:stop], factory, search_params)
        write_shard(tmp_path / f"shard-{number}", index, ids[start:stop], [f"title {i}" for i in range(start, stop)])
        shards.append(ShardIndex(tmp_path / f"shard-{number}", search_params))
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
    assert report["balanced_accuracy"] == {"2|1": 1.0, "1|0": 1.0}
    assert thresholds.grade(scores).tolist() == grades
    assert thresholds.grade([0.9, 0.5, 0.39, 0.41]).tolist() == [2, 1, 0, 1]


def test_thresholds_with_overlap_pick_the_best_balanced_cut():
    # A grade-1 pair (0.75) outscores two exact ones; cutting below all exact pairs
    # (TPR 1, FPR 1/4) beats cutting above it (TPR 1/2, FPR 0).
    scores = [0.9, 0.8, 0.7, 0.4, 0.75, 0.3, 0.2, 0.1]
    grades = [2, 2, 2, 2, 1, 1, 0, 0]
    thresholds, report = calibrate_thresholds(scores, grades)
    assert thresholds.exact == pytest.approx((0.4 + 0.3) / 2)
    assert thresholds.partial == pytest.approx((0.3 + 0.2) / 2)
    assert report["balanced_accuracy"] == {"2|1": 0.875, "1|0": 1.0}


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
    assert choose_encoder(tmp_path, EncoderConfig()) == (None, "pretrained")
    assert choose_encoder(tmp_path, EncoderConfig(model="/models/base")) == ("/models/base", "config")
    for stage in ("stage1", "stage2"):
        (tmp_path / stage / "model").mkdir(parents=True)
    assert choose_encoder(tmp_path, EncoderConfig()) == (None, "pretrained")  # no manifest: the stage never finished
    (tmp_path / "stage1" / MANIFEST).write_text("{}")
    assert choose_encoder(tmp_path, EncoderConfig()) == (str(tmp_path / "stage1" / "model"), "stage1")
    (tmp_path / "stage2" / MANIFEST).write_text("{}")
    assert choose_encoder(tmp_path, EncoderConfig()) == (str(tmp_path / "stage2" / "model"), "stage2")


def test_index_stage_on_the_sample_catalog(ray_local, tmp_path):
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
    assert 0 < thresholds["partial"] < thresholds["exact"] < 1
    per_grade = thresholds["calibration"]["per_grade"]
    assert per_grade["exact"]["mean_score"] > per_grade["partial"]["mean_score"] > per_grade["irrelevant"]["mean_score"]
    stage_metrics = json.loads((index_dir / MANIFEST).read_text())["metrics"]
    assert stage_metrics["products"] == 300 and stage_metrics["shards"] == 3
