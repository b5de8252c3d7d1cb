"""Real Ray Train and Ray Tune runs on a tiny sample catalog (CPU, local Ray)."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from mr_ray.config import RunConfig, SampleConfig, Stage1Config, load_config
from mr_ray.data.sample import generate_sample
from mr_ray.retriever.encoder import encode, load_encoder, pretrained_model_path
from mr_ray.retriever.train import TwoTower, build_examples, sample_batch, stage_loss, train_encoder

TINY_TRAIN = {"queries_per_batch": 8, "products_per_query": 2, "learning_rate": 2e-4, "max_seq_length": 24, "warmup_fraction": 0.0}


@pytest.fixture(scope="module")
def tiny_examples():
    tables = generate_sample(SampleConfig(n_products=200, n_queries=40, seed=1))
    queries = tables["queries"][tables["queries"]["split"] == "train"].head(16)
    return build_examples(queries, tables["judgments"], tables["products"])


def fixed_batch_loss(model_path, examples, config) -> float:
    import torch

    model = load_encoder(model_path, "cpu", config.max_seq_length)
    model.eval()
    queries, titles, grades = sample_batch(examples, products_per_query=4, rng=np.random.default_rng(0))
    with torch.no_grad():
        q, p = TwoTower(model)(queries, titles)
        return sum(w * term(q, p, grades) for w, term in stage_loss(config)).item()


def test_ray_train_lowers_the_loss_saves_a_loadable_encoder_and_resumes(ray_local, tiny_examples, tmp_path):
    config = Stage1Config(epochs=3, augment={"rate": 0.0}, **TINY_TRAIN)
    out = tmp_path / "model"
    metrics = train_encoder(tiny_examples, config, pretrained_model_path(), out, tmp_path / "ckpt", "tiny", (tmp_path / "mlruns").as_uri())
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
    more = train_encoder(tiny_examples, config.model_copy(update={"epochs": 4}), pretrained_model_path(), tmp_path / "model2", tmp_path / "ckpt", "tiny")
    assert [row["epoch"] for row in more["history"]] == [0, 1, 2, 3]
    assert [row["started_at_epoch"] for row in more["history"]] == [0, 0, 0, 3]

    # MLflow (local file store) got the per-epoch metrics
    runs = list((tmp_path / "mlruns").glob("*/*/metrics/loss"))
    assert len(runs) == 1 and len(runs[0].read_text().splitlines()) == 3


def test_bf16_towers_train_with_fp32_weights_and_fp32_embeddings(tiny_examples, tmp_path):
    """precision bf16: autocast forward, but the weights, the embeddings and the loss stay fp32, and the loss falls."""
    import torch

    from mr_ray.retriever.train import iter_frames, make_optimizer, run_epoch

    config = Stage1Config(epochs=1, augment={"rate": 0.0}, precision="bf16", **TINY_TRAIN)
    model = load_encoder(None, "cpu", config.max_seq_length)
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


def test_pipeline_stages_and_a_tiny_tune_sweep_write_best_params(ray_local, tmp_path):
    from mr_ray.pipeline import run_pipeline
    from mr_ray.retriever.train import retriever_stages

    config = load_config(
        None,
        {
            "data.sample": {"n_products": 200, "n_queries": 60, "seed": 2},
            "stage1": {"max_train_queries": 16, **TINY_TRAIN},
            "stage2": {"max_train_queries": 16, **TINY_TRAIN},
            # the LLM judge's stages are issue 3's and slow on CPU: the sample's rule grades re-annotate
            "mine": {"k": 20, "unjudged_per_query": 2, "boundary_per_query": 2, "annotator": "grades", "max_queries": 16},
            "sweep": {"trials_per_stage": 2, "epochs": 2, "max_train_queries": 8, "max_dev_queries": 8,
                      "temperatures": [0.05, 0.1], "margins": [0.2, 0.3], "scales": [16.0, 32.0]},
        },
    )
    outcome = run_pipeline(config, tmp_path, stages=retriever_stages(with_judge=False))
    assert set(outcome.values()) == {"ran"}
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "model" / "model.safetensors").exists()
    mined = pd.read_parquet(tmp_path / "mine" / "mined")
    products = pd.read_parquet(tmp_path / "prepare" / "products")
    assert len(mined) > 0 and set(mined["product_id"]) <= set(products["product_id"])
    assert mined["grade"].isin([0, 1, 2]).all()

    best = json.loads((tmp_path / "sweep" / "best_params.json").read_text())
    assert best["stage1"]["params"]["temperature"] in (0.05, 0.1)
    assert best["stage2"]["params"]["scale"] in (16.0, 32.0)
    assert 0.0 < best["stage1"]["ndcg@10"] <= 1.0
    assert len(best["stage1"]["trials"]) == 2
    tuned = load_config(tmp_path / "sweep" / "best_config.yaml")
    assert isinstance(tuned, RunConfig)
    assert tuned.stage1.temperature == best["stage1"]["params"]["temperature"]
    assert tuned.stage2.circle.margin_exact_partial == best["stage2"]["params"]["margin_exact_partial"]
    assert tuned.stage2.circle.scale == best["stage2"]["params"]["scale"]
    assert yaml.safe_load((tmp_path / "sweep" / "best_config.yaml").read_text())["data"] == config.data.model_dump(mode="json")


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
