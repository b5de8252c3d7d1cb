"""Real Ray Train and Ray Tune runs on a tiny sample catalog (CPU, local Ray)."""

import json

import numpy as np
import pandas as pd
import pytest

from mr_ray.config import SampleConfig, Stage1Config, load_config
from mr_ray.data.sample import generate_sample
from mr_ray.retriever.encoder import encode, load_encoder, pretrained_model_path
from mr_ray.retriever.examples import build_examples, sample_batch
from mr_ray.retriever.ray_train import train_encoder
from mr_ray.retriever.stage_loss import stage_loss
from mr_ray.retriever.two_tower import TwoTower

TINY_TRAIN = {"queries_per_batch": 8, "products_per_query": 2, "learning_rate": 2e-4, "warmup_fraction": 0.0}
SEQ = 24  # encoder.max_seq_length of these tiny runs


@pytest.fixture(scope="module")
def tiny_tables():
    return generate_sample(SampleConfig(n_products=200, n_queries=40, seed=1))


@pytest.fixture(scope="module")
def tiny_examples(tiny_tables):
    queries = tiny_tables["queries"][tiny_tables["queries"]["split"] == "train"].head(16)
    return build_examples(queries, tiny_tables["judgments"], tiny_tables["products"])


def fixed_batch_loss(model_path, examples, config) -> float:
    import torch

    model = load_encoder(model_path, "cpu", SEQ)
    model.eval()
    queries, titles, grades = sample_batch(examples, products_per_query=4, rng=np.random.default_rng(0))
    with torch.no_grad():
        q, p = TwoTower(model)(queries, titles)
        return sum(w * term(q, p, grades) for w, term in stage_loss(config)).item()


def test_ray_train_lowers_the_loss_saves_a_loadable_encoder_and_resumes(ray_local, tiny_examples, tmp_path):
    config = Stage1Config(epochs=3, augment={"rate": 0.0}, **TINY_TRAIN)
    out = tmp_path / "model"
    metrics = train_encoder(tiny_examples, config, SEQ, pretrained_model_path(), out, tmp_path / "ckpt", "tiny", (tmp_path / "mlruns").as_uri())
    assert [row["epoch"] for row in metrics["history"]] == [0, 1, 2]
    # the loss on one fixed batch of the training rows, before and after training
    before, after = fixed_batch_loss(None, tiny_examples, config), fixed_batch_loss(str(out), tiny_examples, config)
    assert after < 0.8 * before, (before, after)

    # sentence-transformers loads the saved folder and gives the vectors our encoder gives
    from sentence_transformers import SentenceTransformer

    texts = ["cordless drill 20v", "red running shoes size 9"]
    ours = encode(load_encoder(str(out), "cpu", 24), texts)
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, encode(load_encoder(None, "cpu", 24), texts), atol=1e-3)

    # same storage and name: Ray Train resumes from the epoch-2 checkpoint and runs only epoch 3
    more = train_encoder(tiny_examples, config.model_copy(update={"epochs": 4}), SEQ, pretrained_model_path(), tmp_path / "model2", tmp_path / "ckpt", "tiny")
    assert [row["epoch"] for row in more["history"]] == [0, 1, 2, 3]
    assert [row["started_at_epoch"] for row in more["history"]] == [0, 0, 0, 3]

    # MLflow (local file store) got the per-epoch metrics
    runs = list((tmp_path / "mlruns").glob("*/*/metrics/loss"))
    assert len(runs) == 1 and len(runs[0].read_text().splitlines()) == 3


def test_bf16_towers_train_with_fp32_weights_and_fp32_embeddings(tiny_examples, tmp_path):
    """precision bf16: autocast forward, but the weights, the embeddings and the loss stay fp32, and the loss falls."""
    import torch

    from mr_ray.retriever.examples import iter_frames
    from mr_ray.retriever.loop import make_optimizer, run_epoch

    config = Stage1Config(epochs=1, augment={"rate": 0.0}, precision="bf16", **TINY_TRAIN)
    model = load_encoder(None, "cpu", SEQ)
    towers, plain = TwoTower(model, config.precision), TwoTower(model)
    texts = ["cordless drill 20v", "red running shoes size 9", "black leather sofa"]
    with torch.no_grad():
        (q16, _), (q32, _) = towers(texts, texts[:1]), plain(texts, texts[:1])
    assert q16.dtype == torch.float32 and torch.allclose(q16.norm(dim=-1), torch.ones(3))
    assert (q16 * q32).sum(-1).min() > 0.99  # the same directions as fp32, to bf16's precision
    assert not torch.equal(q16, q32)  # autocast did run

    loss_before = fixed_batch_loss(None, tiny_examples, config)
    optimizer, scheduler = make_optimizer(model, config, total_steps=6)
    for epoch in range(3):
        frames = iter_frames(tiny_examples, config.queries_per_batch, seed=epoch)
        run_epoch(towers, frames, stage_loss(config), optimizer, scheduler, config.products_per_query, np.random.default_rng(epoch), torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save(str(tmp_path / "model"))
    loss_after = fixed_batch_loss(str(tmp_path / "model"), tiny_examples, config)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)


def mlflow_params(run_dir, run_name_prefix: str) -> dict[str, str]:
    """The parameters MLflow recorded for the training run whose name starts with `run_name_prefix`."""
    for run in run_dir.glob("mlruns/*/*"):
        name = run / "tags" / "mlflow.runName"
        if name.exists() and name.read_text().startswith(run_name_prefix):
            return {p.name: p.read_text() for p in (run / "params").iterdir()}
    raise AssertionError(f"no MLflow run named {run_name_prefix}* under {run_dir / 'mlruns'}")


def test_without_a_judge_the_sweep_runs_before_stage2_and_its_best_params_train_it(ray_local, tmp_path):
    from mr_ray.pipeline import read_manifest, run_pipeline

    config = load_config(
        None,
        {
            "data.sample": {"n_products": 200, "n_queries": 60, "seed": 2},
            "judge.kind": "none",  # human labels only; mining falls back to the human grades
            "encoder.max_seq_length": SEQ,
            "stage1": {"max_train_queries": 16, **TINY_TRAIN},
            "stage2": {"max_train_queries": 16, **TINY_TRAIN},
            "mine": {"k": 20, "unjudged_per_query": 2, "boundary_per_query": 2, "max_queries": 16, "sources": ["dense", "lexical"]},
            # values unlike Stage 2's own (scale 32, margins 0.25, temperature 0.05), its first trial: the trained params show which won
            "sweep": {"trials": 2, "epochs": 2, "max_train_queries": 8, "max_dev_queries": 8, "max_dev_products": 120,
                      "temperatures": [0.07, 0.1], "margins": [0.2, 0.3], "scales": [16.0, 24.0]},
        },
    )
    log: list[str] = []
    outcome = run_pipeline(config, tmp_path, until="stage2", log=log.append)
    assert list(outcome) == ["prepare", "stage1", "mine", "sweep", "stage2"] and set(outcome.values()) == {"ran"}
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "model" / "model.safetensors").exists()
    mined = pd.read_parquet(tmp_path / "mine" / "mined")
    products = pd.read_parquet(tmp_path / "prepare" / "products")
    assert len(mined) > 0 and set(mined["product_id"]) <= set(products["product_id"])
    assert mined["grade"].isin([0, 1, 2]).all()
    mine = read_manifest(tmp_path / "mine")["metrics"]
    assert mine["annotator"] == "grades:judgments" and "no judge ran" in mine["annotator_why"]
    # hard samples from BM25's top-k too, each kept once, tagged with the source that found it
    assert mine["unjudged_by_source"]["dense"] > 0 and mine["unjudged_by_source"]["lexical"] > 0
    # Without a judge nobody grades the unjudged finds: only the judged boundary pairs are kept (each source's
    # finds reaching the table, deduplicated: tests/test_mining.py).
    assert set(mined["reason"]) == {"boundary"} and not mined.duplicated(["query_id", "product_id"]).any()

    # The limits that dropped train queries say so, in the log and in the manifest.
    queries = pd.read_parquet(tmp_path / "prepare" / "queries")
    n_train = int((queries["split"] == "train").sum())
    n_dev = int((queries["split"] == "dev").sum())
    assert n_train > 16 and n_dev > 8
    note = f"16 of {n_train} train queries (stage1.max_train_queries)"
    assert f"[mr-ray] stage stage1: {note}" in log
    assert read_manifest(tmp_path / "stage1")["metrics"]["limits"] == [note]
    assert read_manifest(tmp_path / "sweep")["metrics"]["limits"] == [
        f"8 of {n_train} train queries (sweep.max_train_queries)", f"8 of {n_dev} dev queries (sweep.max_dev_queries)",
        "120 of 200 products in the trials' catalog (sweep.max_dev_products)"]

    best = json.loads((tmp_path / "sweep" / "best_params.json").read_text())
    params = best["params"]
    # One trial is Stage 2's own config, the other a draw from the lists; the best is the one with the top dev score.
    own = {"margin_exact_partial": 0.25, "margin_partial_irrelevant": 0.25, "scale": 32.0, "temperature": 0.05}
    tried = [trial["params"] for trial in best["trials"]]
    assert len(tried) == 2 and own in tried
    drawn = next(trial for trial in tried if trial != own)
    assert drawn["temperature"] in (0.07, 0.1) and drawn["scale"] in (16.0, 24.0)
    assert drawn["margin_exact_partial"] in (0.2, 0.3) and drawn["margin_partial_irrelevant"] in (0.2, 0.3)
    top = max(best["trials"], key=lambda trial: trial["ndcg@10"])
    assert params == top["params"] and 0.0 < best["ndcg@10"] <= 1.0
    assert best["objective"] == "dev NDCG@10 of the hybrid (encoder + BM25, weighted fusion)"  # serve.retrieval: hybrid
    # Stage 2 took the sweep's result as an input and trained with its best values: its manifest says so,
    # and so does the config its Ray Train worker logged to MLflow.
    stage2 = read_manifest(tmp_path / "stage2")
    assert "sweep" in stage2["input_hashes"]
    assert stage2["metrics"]["trained_with"]["params"] == params
    assert stage2["metrics"]["trained_with"]["source"].startswith("sweep (best of 2 trials")
    logged = mlflow_params(tmp_path, "stage2-")
    assert float(logged["circle.scale"]) == params["scale"] and float(logged["temperature"]) == params["temperature"]
    assert float(logged["circle.margin_exact_partial"]) == params["margin_exact_partial"]

    # Nothing changed: every stage is current. (A new sweep result reruns Stage 2 as any changed input
    # reruns its readers: tests/test_pipeline.py; the sweep is among Stage 2's input hashes, above.)
    assert set(run_pipeline(config, tmp_path, until="stage2", log=log.append).values()) == {"skipped"}


def test_without_the_sweep_stage2_trains_with_its_own_config(tmp_path):
    from mr_ray.pipeline import StageContext, stage_graph
    from mr_ray.retriever.sweep import BEST_PARAMS
    from mr_ray.stages.train import stage2_settings

    tables = {"products", "queries", "judgments"}
    config = load_config(None, {"sweep": None, "stage2.circle.scale": 20.0})
    graph = {s.name: s for s in stage_graph(config, tables).stages}
    assert "sweep" not in graph and "sweep" not in graph["stage2"].inputs
    settings, trained_with = stage2_settings(StageContext(config, tmp_path, tmp_path, graph["stage2"], {}))
    assert settings == config.stage2
    assert trained_with == {"source": "config (stage2)", "params": {"margin_exact_partial": 0.25, "margin_partial_irrelevant": 0.25, "scale": 20.0, "temperature": 0.05}}

    # With the sweep in the graph, its result folder overrides exactly the tuned values.
    swept = tmp_path / "sweep"
    swept.mkdir()
    best = {"params": {"margin_exact_partial": 0.15, "margin_partial_irrelevant": 0.35, "scale": 64.0, "temperature": 0.1}, "ndcg@10": 0.5, "trials": [{}, {}]}
    (swept / BEST_PARAMS).write_text(json.dumps(best))
    stage2 = {s.name: s for s in stage_graph(load_config(), tables).stages}["stage2"]
    settings, trained_with = stage2_settings(StageContext(config, tmp_path, tmp_path, stage2, {"sweep": swept}))
    assert trained_with == {"source": "sweep (best of 2 trials, dev NDCG@10 0.5000)", "params": best["params"]}
    assert (settings.circle.scale, settings.circle.margin_partial_irrelevant, settings.temperature) == (64.0, 0.35, 0.1)
    assert settings.circle.centre_exact_partial == config.stage2.circle.centre_exact_partial and settings.partial_weight == config.stage2.partial_weight


def test_batches_take_a_positive_then_hard_samples_and_mark_in_batch_negatives():
    rows = pd.DataFrame(
        {
            "query_id": ["q1", "q2"],
            "text": ["drill", "pan"],
            "product_ids": [["a", "b", "c", "d", "e"], ["x", "a"]],
            "titles": [["A", "B", "C", "D", "E"], ["X", "A"]],
            "grades": [[0, 0, 2, 0, 1], [2, 0]],
            "hard": [[False, True, False, False, False], [False, False]],
        }
    )
    for seed in range(5):
        queries, titles, grades = sample_batch(rows, products_per_query=2, rng=np.random.default_rng(seed))
        assert queries == ["drill", "pan"]
        # q1: one positive (c or e), then its only hard sample b; q2: its positive x, then a
        assert titles[1] == "B" and titles[0] in ("C", "E") and set(titles[2:]) == {"X", "A"}
        column = {t: j for j, t in enumerate(titles)}
        assert grades[0, column["B"]] == 0 and grades[0, column["X"]] == -1  # x: q2's product, in-batch negative
        assert grades[0, column["A"]] == 0 and grades[1, column["A"]] == 0  # a is judged by both queries
        assert grades[1, column["X"]] == 2


def test_sweep_trials_run_in_their_own_working_directory_with_a_relative_data_path(ray_local, tiny_tables, tiny_examples, tmp_path, monkeypatch):
    from mr_ray.evaluate import ScoredSplit
    from mr_ray.retriever.sweep import run_sweep

    # Tune runs each trial in a working directory of its own; the run's relative data.path is the driver's.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "catalog").mkdir()
    config = load_config(None, {"data": {"source": "canonical", "path": "catalog"}, "stage2": TINY_TRAIN, "sweep": {"trials": 1, "epochs": 1}})
    queries = tiny_tables["queries"]
    dev_queries = queries[queries["split"] == "dev"].head(6)
    products = tiny_tables["products"][["product_id", "title"]]
    truth = tiny_tables["gold"][tiny_tables["gold"]["query_id"].isin(set(dev_queries["query_id"]))]
    pairs = truth.merge(dev_queries[["query_id", "text"]], on="query_id").merge(products, on="product_id")
    dev = ScoredSplit(products, dev_queries, truth, pairs)
    best = run_sweep(config, str(pretrained_model_path()), tiny_examples, dev, tmp_path / "tune")
    assert len(best["trials"]) == 1 and 0.0 < best["ndcg@10"] <= 1.0
