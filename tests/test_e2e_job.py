"""The README's main command, end to end: local Ray head, `ray job submit`, report, resume."""

import json
import os
import subprocess

import pytest
from conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

# Every stage runs, each sized down so the job takes a few minutes on 2 CPUs.
TINY = """
name: e2e
data:
  sample: {n_products: 400, n_queries: 100, seed: 3}
judge:
  finetune: {max_examples: 48, max_holdout: 24, train_layers: 1}
  label: {max_queries: 6}
  synthesize: {max_products: 3, samples_per_product: 1}
stage1: {max_train_queries: 60}
stage2: {max_train_queries: 60}
mine: {k: 20, max_queries: 60}
sweep: {trials: 1, epochs: 1, max_train_queries: 30, max_dev_queries: 15}
evaluate:
  split: test
  baselines: [bm25, pretrained]  # st-mnrl's training and its row: tests/test_st_baseline.py
"""


def run_main(config, run_dir):
    env = {
        **os.environ,
        "MR_RAY_CONFIG": str(config),
        "MR_RAY_RUN_DIR": str(run_dir),
        # Ports of our own, so a developer's cluster on the defaults is left alone.
        "MR_RAY_GCS_PORT": "6391",
        "MR_RAY_DASHBOARD_PORT": "8275",
    }
    result = subprocess.run(["bash", str(REPO / "scripts" / "run_main.sh")], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def test_job_submit_runs_pipeline_then_skips_everything(ray_local, tmp_path):
    # ray_local: another Ray instance on the host holds the dashboard agent's default port (52365);
    # the main command's head must still accept jobs (it takes a free agent port).
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    run_dir = tmp_path / "run"
    first = run_main(config, run_dir)
    assert "submitted job mr-ray-" in first and "SUCCEEDED" in first
    # The job log a user reads has no traceback: vLLM's shutdown race is one INFO line (labeler/engine.py).
    assert "Traceback" not in first and "EngineDeadError" not in first
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    systems = report["systems"]
    assert {"bm25", "pretrained"} <= set(systems)
    for metrics in systems.values():
        assert 0.0 < metrics["ndcg@10"] <= 1.0
        assert 0.0 < metrics["recall@100_exact"] <= 1.0
    # The pretrained encoder separates grades better than chance on rule-graded data.
    assert systems["pretrained"]["auc_1_over_0"] > 0.6
    assert (run_dir / "evaluate" / "similarity_hist.png").stat().st_size > 10_000
    # the judge decides with logit offsets fit on half its held-out queries, and the report says so
    fit = json.loads((run_dir / "judge_finetune" / "manifest.json").read_text())["metrics"]["grade_offsets"]
    assert len(fit["offsets"]) == 3 and fit["offsets"][1] == 0.0 and fit["calibration_pairs"] > 0
    assert "per-grade logit offsets" in (run_dir / "evaluate" / "report.md").read_text()
    # every encoder embedded the catalog once: mine embeds Stage 1's (evaluate reads it), evaluate Stage 2's (index reads it)
    used = {stage: json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["catalog_embeddings"] for stage in ("mine", "evaluate", "index")}
    computed = [entry["key"] for entries in used.values() for entry in entries if entry["computed"]]
    assert len(computed) == len(set(computed)) >= 2  # stage1, stage2 (and pretrained, unless another test embedded this catalog)
    assert {(e["encoder"], e["computed"]) for e in used["evaluate"]} >= {("stage1", False), ("stage2", True)}
    assert [(e["encoder"], e["computed"]) for e in used["index"]] == [("stage2", False)]
    second = run_main(config, run_dir)
    assert ": running" not in second
    assert second.count("skipped (manifest matches)") >= 2
