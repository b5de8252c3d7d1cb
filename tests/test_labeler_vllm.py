"""A real (tiny) vLLM labeling run through Ray Data, resumed after the first run was killed."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mr_ray.config import JudgeEngineConfig
from mr_ray.labeler import engine
from mr_ray.labeler.finetune import grade_logits_transformers
from mr_ray.labeler.label import label_pairs
from mr_ray.labeler.model import base_model_folder
from mr_ray.labeler.prompt import normalise_logprobs, render_pair
from mr_ray.schema import conform

ENGINE = JudgeEngineConfig(batch_size=4, max_num_seqs=4, max_model_len=384, kv_cache_gib=1)
SHARD_ROWS = 4


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    return base_model_folder(None, tmp_path_factory.getbasetemp() / "judge-cache")


def catalog(tmp_path: Path):
    products = pd.DataFrame(
        {
            "product_id": [f"P{i}" for i in range(8)],
            "title": ["Stridex red mesh running shoes", "Chefwell nonstick frying pan 10 inch", "Torqmax 20v cordless drill", "Zenfit pink yoga mat 6mm",
                      "Lumora ceramic table lamp", "Voltra 65w phone charger", "Summitgear 4 person camping tent", "Threadly cotton t-shirt, navy"],
            "brand": ["stridex", "chefwell", "torqmax", "zenfit", "lumora", "voltra", "summitgear", "threadly"],
        }
    )
    queries = pd.DataFrame({"query_id": ["q0", "q1", "q2", "q3", "q4"], "text": ["red running shoes", "frying pan", "cordless drill 20v", "yoga mat", "   "]})
    pairs = pd.DataFrame([(q, p) for q in ["q0", "q1", "q2", "q3"] for p in products["product_id"]], columns=["query_id", "product_id"])
    bad = pd.DataFrame({"query_id": ["q4", "q0"], "product_id": ["P0", "P_missing"]})  # blank query text, unknown product
    pairs = pd.concat([pairs, bad], ignore_index=True)
    for name, frame in (("products", products), ("queries", queries), ("pairs", pairs)):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    return products, queries, pairs


KILLED_RUN = textwrap.dedent(
    """
    import sys
    import pandas as pd
    import ray
    from mr_ray.config import JudgeEngineConfig
    from mr_ray.labeler.label import label_pairs

    if __name__ == "__main__":
        folder, model, engine, shard_dir, shard_rows = sys.argv[1:6]
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        read = lambda name: pd.read_parquet(f"{folder}/{name}.parquet")
        label_pairs(read("pairs"), read("queries"), read("products"), model,
                    JudgeEngineConfig.model_validate_json(engine), shard_dir, int(shard_rows))
    """
)


def test_labeling_through_ray_data_and_vllm_resumes_after_a_kill(ray_local, judge_model, tmp_path):
    products, queries, pairs = catalog(tmp_path)
    shard_dir = tmp_path / "shards"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(judge_model), ENGINE.model_dump_json(), str(shard_dir), str(SHARD_ROWS)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not list(shard_dir.glob("shard-*.parquet")) and process.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and every process it started (Ray, vLLM)
        process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}
    n_shards = -(-32 // SHARD_ROWS)
    assert 1 <= len(before) < n_shards, f"the killed run should have finished some but not all shards, got {sorted(before)}"

    judged, bad = label_pairs(pairs, queries, products, judge_model, ENGINE, shard_dir, SHARD_ROWS, log=lambda *_: None)

    after = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.parquet")}
    assert len(after) == n_shards
    assert all(after[name] == mtime for name, mtime in before.items()), "finished shards must not be recomputed"
    # Every well-formed pair judged once; the malformed ones reported with a reason, never labelled.
    assert len(judged) == 32 and not judged.duplicated(["query_id", "product_id"]).any()
    assert set(zip(bad["query_id"], bad["product_id"])) == {("q4", "P0"), ("q0", "P_missing")}
    assert bad["reason"].str.contains("blank").all()
    probabilities = judged[["p0", "p1", "p2"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (judged["grade"].to_numpy() == probabilities.argmax(axis=1)).all()
    np.testing.assert_allclose(judged["confidence"], probabilities.max(axis=1), atol=1e-6)
    assert ((judged["grade_mass"] > 0) & (judged["grade_mass"] <= 1)).all()
    assert set(judged["source"]) == {"llm"}
    conform(pa.Table.from_pandas(judged, preserve_index=False), "judgments", "causal-LM labels")  # the cross-encoder's pass the same check

    # vLLM's grade-token logprobs agree with a plain transformers forward pass of the same prompts.
    lookup = judged.merge(queries, on="query_id").merge(products, on="product_id")
    turns = [render_pair(r.text, {"title": r.title, "brand": r.brand}) for r in lookup.itertuples()]
    reference, _ = normalise_logprobs(grade_logits_transformers(judge_model, turns))
    np.testing.assert_allclose(lookup[["p0", "p1", "p2"]].to_numpy(), reference, atol=2e-3)


def test_the_engine_actors_hook_turns_vllms_shutdown_traceback_into_one_line_and_keeps_a_crashs(monkeypatch):
    # The hook each engine actor runs (engine_processor sets it); vLLM's own AsyncLLM and logger, no engine needed.
    from vllm.v1.engine import async_llm
    from vllm.v1.engine.exceptions import EngineDeadError

    monkeypatch.setattr(async_llm.AsyncLLM, "shutdown", async_llm.AsyncLLM.shutdown)  # restored after the test
    monkeypatch.setattr(async_llm.logger, "filters", list(async_llm.logger.filters))
    monkeypatch.setattr(engine, "_engine_shutting_down", threading.Event())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    async_llm.logger.addHandler(handler)
    try:
        env = engine.engine_actor_env(ENGINE)
        assert env[engine.SETUP_HOOK_ENV] == "mr_ray.labeler.engine.quiet_engine_shutdown"
        engine.quiet_engine_shutdown()

        def handler_fails():
            try:
                raise EngineDeadError()
            except EngineDeadError:
                async_llm.logger.exception("AsyncLLM output_handler failed.")

        handler_fails()  # the engine died while working: the traceback stays
        async_llm.AsyncLLM.__new__(async_llm.AsyncLLM).shutdown()  # a clean shutdown (nothing started, nothing to stop)
        handler_fails()  # vLLM's shutdown race
    finally:
        async_llm.logger.removeHandler(handler)
    crash, shutdown = records
    assert (crash.levelname, crash.getMessage(), crash.exc_info[0]) == ("ERROR", "AsyncLLM output_handler failed.", EngineDeadError)
    assert (shutdown.levelname, shutdown.exc_info) == ("INFO", None)
    assert "vllm-project/vllm#48745" in shutdown.getMessage()
