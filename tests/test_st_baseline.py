"""The `st-mnrl` baseline: sentence-transformers' trainer with MNRL, trained and evaluated by the evaluate stage."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from mr_ray.config import RunConfig
from mr_ray.data.prepare import load_source, write_tables
from mr_ray.pipeline import STAGES, StageContext
from mr_ray.retriever.encoder import encode, load_encoder, pretrained_model_path
from mr_ray.retriever.examples import build_examples, training_set
from mr_ray.retriever.st_baseline import exact_pairs, st_baseline
from mr_ray.stages.evaluate import evaluate_stage


def test_st_mnrl_trains_on_exact_human_pairs_once_and_gets_its_report_row(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("MR_RAY_CACHE", str(tmp_path / "cache"))
    config = RunConfig.model_validate(
        {
            "data": {"sample": {"n_products": 300, "n_queries": 240, "seed": 2}},
            "evaluate": {"split": "dev", "baselines": ["st-mnrl"], "hybrid": False},
            "encoder": {"max_seq_length": 32},
        }
    )
    prepared = tmp_path / "prepare"
    write_tables(load_source(config.data), prepared)
    stage = replace(next(s for s in STAGES if s.name == "evaluate"), inputs=("prepare",))
    out = tmp_path / "evaluate"
    out.mkdir()
    metrics = evaluate_stage(StageContext(config, tmp_path, out, stage, {"prepare": prepared}))
    training = json.loads((out / "st-mnrl" / "training.json").read_text())

    # trained on each train query's exact human labels (and nothing else), one epoch of batches of 64 (a few steps:
    # the first, in warm-up, has learning rate 0)
    products, queries, judgments = training_set(prepared, config.stage1.model_copy(update={"judgment_sources": ["human"]}), None)
    pairs = exact_pairs(build_examples(queries, judgments, products))
    assert training["pairs"] == len(pairs) > 0 and training["steps"] == -(-len(pairs) // 64)
    # training pulled the pairs it saw together
    before = load_encoder(pretrained_model_path(), "cpu", 32)
    after = load_encoder(training["model"], "cpu", 32)
    anchors, positives = pairs["anchor"].tolist(), pairs["positive"].tolist()
    cosine = {name: float(np.mean((encode(m, anchors, 64) * encode(m, positives, 64)).sum(axis=1))) for name, m in (("before", before), ("after", after))}
    assert cosine["after"] > cosine["before"] + 0.01
    # its row in the report and in the per-phenomenon table
    report = json.loads((out / "report.json").read_text())
    assert 0.0 < metrics["st-mnrl"]["ndcg@10"] <= 1.0 and "auc_2_over_1" in report["systems"]["st-mnrl"]
    assert report["phenomena"] and all("st-mnrl" in row for row in report["phenomena"].values())
    assert "| st-mnrl |" in (out / "report.md").read_text()

    # trained once: another evaluate on the same data and recipe (a config that differs elsewhere) reuses the model
    # and its catalog vectors, and gives the same row
    other = config.model_copy(update={"name": "other run"})
    again = tmp_path / "evaluate-again"
    again.mkdir()
    assert evaluate_stage(StageContext(other, tmp_path, again, stage, {"prepare": prepared}))["st-mnrl"] == metrics["st-mnrl"]
    assert json.loads((again / "st-mnrl" / "training.json").read_text()) == training
    assert len(list((tmp_path / "cache" / "st-mnrl").iterdir())) == 1
    # a changed recipe (the sequence length) trains a new one
    assert st_baseline(prepared, None, 24, 0, None)[0] != Path(training["model"])
    assert len(list((tmp_path / "cache" / "st-mnrl").iterdir())) == 2
