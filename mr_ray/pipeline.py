"""The stage graph: plain functions with declared inputs, resumable by manifest.

A stage is `fn(ctx) -> metrics`. It reads its inputs from `ctx.input(name)`
(the output folder of an upstream stage) and writes everything into
`ctx.out` (a temporary folder). When `fn` returns, the runner writes
`manifest.json` (config hash, input hashes, output hash, metrics, wall time)
and renames the folder into place, so a crash never leaves a half-written
output behind. A rerun skips every stage whose manifest still matches its
config section and its inputs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mr_ray.config import ConfigError, RunConfig, section_hash
from mr_ray.outputs import MANIFEST, TEMP_PREFIX, placed_output


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported when the stage runs
    inputs: tuple[str, ...] = ()
    config: tuple[str, ...] = ()  # RunConfig sections (dotted for a subsection) that change the output
    optional: tuple[str, ...] = ()  # inputs used when present (their hash still counts)

    def function(self) -> Callable[["StageContext"], dict]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


# The main job, in order. A stage's `config` lists the RunConfig sections it reads.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", "mr_ray.data.prepare:prepare_stage", (), ("data",)),
    Stage("judge_finetune", "mr_ray.labeler.stages:judge_finetune_stage", ("prepare",), ("judge.kind", "judge.model", "judge.finetune")),
    Stage("label", "mr_ray.labeler.stages:label_stage", ("prepare", "judge_finetune"), ("judge.engine", "judge.label")),
    Stage("audit", "mr_ray.labeler.stages:audit_stage", ("prepare", "judge_finetune", "label"), ("judge.engine", "judge.label", "judge.audit")),
    Stage("synthesize", "mr_ray.labeler.stages:synthesize_stage", ("prepare", "judge_finetune"), ("judge.engine", "judge.label", "judge.synthesize")),
    Stage("stage1", "mr_ray.retriever.train:stage1_stage", ("prepare", "label", "audit", "synthesize"), ("encoder", "stage1")),
    Stage("mine", "mr_ray.retriever.mining:mine_stage", ("prepare", "label", "audit", "synthesize", "stage1", "judge_finetune"), ("encoder", "stage1", "mine", "judge.engine", "judge.label")),
    Stage("stage2", "mr_ray.retriever.train:stage2_stage", ("prepare", "label", "audit", "synthesize", "stage1", "mine"), ("encoder", "stage1", "stage2")),
    Stage("sweep", "mr_ray.retriever.sweep:sweep_stage", ("prepare", "label", "audit", "synthesize", "stage1", "mine"), ("encoder", "stage1", "stage2", "sweep")),
    Stage("evaluate", "mr_ray.evaluate:evaluate_stage", ("prepare", "stage1", "stage2"), ("encoder", "evaluate"), optional=("judge_finetune", "label", "audit")),
    Stage("index", "mr_ray.index.build:index_stage", ("prepare",), ("encoder", "index"), optional=("stage1", "stage2")),
)


@dataclass
class StageContext:
    config: RunConfig
    run_dir: Path
    out: Path
    stage: Stage
    _inputs: dict[str, Path] = field(default_factory=dict)

    def input(self, name: str) -> Path:
        if name not in self._inputs:
            raise KeyError(f"stage {self.stage.name!r} did not declare input {name!r}")
        return self._inputs[name]


def tree_hash(path: Path) -> str:
    """Content hash of a file or folder (names and bytes), ignoring the manifest."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    for file in files:
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def config_section(config: RunConfig, dotted: str):
    """The JSON value of a config section or subsection, e.g. "judge.audit"."""
    node = config
    for key in dotted.split("."):
        node = getattr(node, key)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def expected_identity(stage: Stage, config: RunConfig, run_dir: Path) -> dict:
    """What a stage's manifest must say for its output to be reused."""
    sections = {name: config_section(config, name) for name in stage.config}
    inputs = {}
    for name in stage.inputs + stage.optional:
        upstream = read_manifest(run_dir / name)
        inputs[name] = upstream["output_hash"] if upstream else None
    return {"config_hash": section_hash(sections), "input_hashes": inputs}


def is_current(stage: Stage, config: RunConfig, run_dir: Path) -> bool:
    manifest = read_manifest(run_dir / stage.name)
    if manifest is None:
        return False
    want = expected_identity(stage, config, run_dir)
    return manifest.get("config_hash") == want["config_hash"] and manifest.get("input_hashes") == want["input_hashes"]


def run_stage(stage: Stage, config: RunConfig, run_dir: Path, log=print) -> dict:
    """Run one stage into a temp folder, write its manifest, rename it into place."""
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = expected_identity(stage, config, run_dir)
    upstream = identity["input_hashes"]  # None where an upstream stage has no manifest
    for name in stage.inputs:
        if upstream[name] is None:
            raise RuntimeError(f"stage {stage.name!r} needs the output of {name!r}, which has not run in {run_dir}")
    # The stage folder is replaced only if it holds this stage's previous output (or nothing),
    # and never if it is (or holds) the data source; checked before the stage runs.
    with placed_output(run_dir / stage.name, stage.name, config.data.paths().values()) as tmp:
        ctx = StageContext(config, run_dir, tmp, stage, {name: run_dir / name for name, found in upstream.items() if found is not None})
        log(f"[mr-ray] stage {stage.name}: running")
        started = time.perf_counter()
        metrics = stage.function()(ctx) or {}
        wall = time.perf_counter() - started
        manifest = {
            "stage": stage.name,
            **identity,
            "output_hash": tree_hash(tmp),
            "metrics": metrics,
            "wall_time_s": round(wall, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log(f"[mr-ray] stage {stage.name}: done in {wall:.1f} s")
    return manifest


class RunFolderError(OSError):
    """The run folder cannot take a stage's output (full, read-only)."""


def run_folder_problem(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be written, or None: a probe of one page, flushed to disk."""
    probe = run_dir / f"{TEMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(4096))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        free = shutil.disk_usage(run_dir).free / 2**20
        return f"the run folder {run_dir} cannot be written ({err.strerror}; {free:.1f} MiB free)"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # an immutable folder: nothing was created
    return None


def clean_stale(run_dir: Path) -> None:
    """Remove temp folders a crashed run left behind (their stage never finished)."""
    for stale in list(run_dir.glob(".tmp-*")) + list(run_dir.glob(".old-*")):
        shutil.rmtree(stale, ignore_errors=True)


def run_pipeline(
    config: RunConfig,
    run_dir: str | Path,
    only: list[str] | None = None,
    force: bool = False,
    log=print,
    stages: tuple[Stage, ...] = STAGES,
) -> dict[str, str]:
    """Run the stage graph (or `only` some stages); returns {stage: 'ran' | 'skipped'}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(run_dir)
    unknown = [name for name in only or [] if name not in {s.name for s in stages}]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {[s.name for s in stages]}")
    outcome = {}
    for stage in stages:
        if only and stage.name not in only:
            continue
        if not force and is_current(stage, config, run_dir):
            log(f"[mr-ray] stage {stage.name}: skipped (manifest matches)")
            outcome[stage.name] = "skipped"
            continue
        try:
            run_stage(stage, config, run_dir, log=log)
        except Exception as err:
            # A full or read-only run folder surfaces deep inside a stage (often in a Ray
            # worker, as text): say so plainly when that is what stopped it.
            problem = run_folder_problem(run_dir)
            if problem:
                raise RunFolderError(f"stage {stage.name!r} stopped: {problem}; the finished stages in it are kept") from err
            raise
        outcome[stage.name] = "ran"
    return outcome
