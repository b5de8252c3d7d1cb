"""The vLLM engine inside Ray Data (`ray.data.llm`) that every judge and the query writer run on: its CPU
environment, the processor over rows that carry their prompt, and the causal-LM judge's grade-logprob processor."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from mr_ray.config import JudgeEngineConfig

# Ray starts a worker with this variable set to a module path by calling that function first (how Ray itself
# carries `runtime_env={"worker_process_setup_hook": "<module path>"}`); set per actor, it reaches only the engine's.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
_engine_shutting_down = threading.Event()


class EngineShutdownNoise(logging.Filter):
    """Turns the `EngineDeadError` traceback that vLLM's AsyncLLM logs after a clean shutdown into one calm line.

    `AsyncLLM.shutdown()` stops the engine core before it cancels the output handler, and the handler may
    read the dead-engine marker first and log it as a failure with a traceback (vllm-project/vllm#48745;
    fix proposed in #49000). Every Ray Data vLLM stage ends with that shutdown, so job logs would end with
    a traceback after complete results. Only that record, and only once a shutdown began, is rewritten: an
    engine that dies while working still logs its traceback (and its rows carry the error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _engine_shutting_down.is_set() and type(error).__name__ == "EngineDeadError":
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info, record.exc_text = ENGINE_STOPPED, (), None, None
        return True


ENGINE_STOPPED = "output handler stopped with the engine at shutdown (expected: vllm-project/vllm#48745)"


def quiet_engine_shutdown() -> None:
    """Worker set-up hook of the engine's actor: marks the start of AsyncLLM's shutdown and installs the filter."""
    from vllm.v1.engine import async_llm

    shutdown = async_llm.AsyncLLM.shutdown

    def marked_shutdown(self, *args, **kwargs):
        _engine_shutting_down.set()
        return shutdown(self, *args, **kwargs)

    async_llm.AsyncLLM.shutdown = marked_shutdown
    async_llm.logger.addFilter(EngineShutdownNoise())


def cpu_engine_env(engine: JudgeEngineConfig) -> dict[str, str]:
    """Environment of a CPU engine. vLLM's default on CPU runs the model in a worker process whose
    engine core busy-waits for each step's reply, and binds the worker's threads to all cores but one
    (kept for that spinning core): on 2 cores, one computing thread. In-process, the model gets
    `cpu_threads` threads, one process fewer starts, and nothing spins (bench/judge_throughput.py)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(engine.cpu_threads),
    }


def engine_actor_env(engine: JudgeEngineConfig) -> dict[str, str]:
    """Environment of the engine's actor: the shutdown hook, and on CPU the CPU engine's settings."""
    hook = {SETUP_HOOK_ENV: f"{__name__}.{quiet_engine_shutdown.__name__}"}
    return hook if engine.num_gpus_per_replica > 0 else {**hook, **cpu_engine_env(engine)}


def engine_processor(model_path: str | Path, engine: JudgeEngineConfig, preprocess, postprocess, task_type: str = "generate"):
    """A `ray.data.llm` vLLM processor over rows that already carry their prompt (text or token ids)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    on_gpu = engine.num_gpus_per_replica > 0
    bundle = {"GPU": engine.num_gpus_per_replica, "CPU": 1} if on_gpu else {"CPU": 1}
    config = vLLMEngineProcessorConfig(
        model_source=str(model_path),
        task_type=task_type,
        engine_kwargs={
            "enforce_eager": not on_gpu,  # CPU: no graph capture
            "enable_prefix_caching": task_type == "generate",  # the guideline prefix is shared by every prompt
            "max_model_len": engine.max_model_len,
            "max_num_seqs": engine.max_num_seqs,
            "tensor_parallel_size": engine.tensor_parallel_size,
            "dtype": engine.dtype,
        },
        placement_group_config={"bundles": [bundle] * engine.tensor_parallel_size},
        runtime_env={"env_vars": engine_actor_env(engine)},
        batch_size=engine.batch_size,
        concurrency=engine.concurrency,
        should_continue_on_error=True,  # a failing row is reported, not fatal
        log_engine_metrics=False,
        # Prompts arrive rendered; vLLM tokenizes inside the engine.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def judge_processor(model_path: str | Path, engine: JudgeEngineConfig, grade_ids: list[int]):
    """Processor: rows (query_id, product_id, variant, prompt) -> rows with lp0..lp2 (or an error)."""
    ids = list(grade_ids)

    def preprocess(row: dict) -> dict:
        return {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "variant": row["variant"],
            "prompt": row["prompt"],
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": ids},
        }

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or ""
        values = [np.nan] * len(ids)
        if not error:
            step = (row.get("logprobs") or [{}])[0] or {}
            found = {int(token): info for token, info in step.items() if info is not None}
            missing = [token for token in ids if token not in found]
            if missing:
                error = f"engine returned no logprob for grade token(s) {missing}"
            else:
                values = [float(found[token]["logprob"]) for token in ids]
        return {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "variant": int(row["variant"]),
            "lp0": values[0],
            "lp1": values[1],
            "lp2": values[2],
            "error": error,
        }

    return engine_processor(model_path, engine, preprocess, postprocess)
