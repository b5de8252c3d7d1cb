"""The stage graph: plain functions with declared inputs, resumable by manifest.

A stage is `fn(ctx) -> metrics`. It reads its inputs from `ctx.input(name)`
(the output folder of an upstream stage) or, for the inputs it takes when the
run has them, `ctx.inputs_of(kind)` (every judgments table, the judge, ...),
and writes everything into `ctx.out` (a temporary folder). When `fn` returns,
the runner writes `manifest.json` (config hash, input hashes, output hash,
metrics, wall time) and renames the folder into place, so a crash never
leaves a half-written output behind. A rerun skips every stage whose manifest
still matches its config section and its inputs.

Which stages a run has follows its config and its data (`stage_graph`): no
engagement table, no audit; `judge.kind: none`, no judge stages; no writer,
no synthetic queries; `sweep: null`, no sweep. Each stage then gets the
inputs among the stages kept. A limit that makes a stage drop data
(`max_*` settings) says so in the log and in the manifest (`note_limit`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from mr_ray.config import SWEPT_STAGE2_FIELDS, ConfigError, RunConfig, section_hash
from mr_ray.outputs import (
    MANIFEST,
    OLD_PREFIX,
    TEMP_PREFIX,
    listing_changes,
    manifest_damage,
    placed_output,
    write_manifest,
)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported when the stage runs
    inputs: tuple[str, ...] = ()
    config: tuple[str, ...] = ()  # RunConfig sections (dotted for a subsection) that change the output
    optional: tuple[str, ...] = ()  # inputs used when they have run (their hash still counts)
    provides: str | None = None  # what its output is to a reader that takes every input of a kind (StageContext.inputs_of)

    def function(self) -> Callable[["StageContext"], dict]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


# Every stage the method has, in order, each with every input it can take and the RunConfig sections
# it reads (all it can read: StageContext.config is a ConfigView of them). A run's graph (`stage_graph`) keeps the stages its config and data call for, and of each
# stage's inputs the ones it kept.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", "mr_ray.stages.prepare:prepare_stage", (), ("data",)),
    Stage("judge_finetune", "mr_ray.stages.judge:judge_finetune_stage", ("prepare",), ("judge.kind", "judge.model", "judge.finetune"), provides="judge"),
    Stage("label", "mr_ray.stages.judge:label_stage", ("prepare", "judge_finetune"), ("judge.engine", "judge.label"), provides="judgments"),
    Stage("audit", "mr_ray.stages.judge:audit_stage", ("prepare", "judge_finetune", "label"), ("judge.engine", "judge.label", "judge.audit"), provides="judgments"),
    Stage("synthesize", "mr_ray.stages.judge:synthesize_stage", ("prepare", "judge_finetune"), ("judge.engine", "judge.label", "judge.synthesize"), provides="judgments"),
    Stage("stage1", "mr_ray.stages.train:stage1_stage", ("prepare", "label", "audit", "synthesize"), ("encoder.model", "encoder.max_seq_length", "stage1"), provides="encoder"),
    Stage("mine", "mr_ray.stages.mine:mine_stage", ("prepare", "label", "audit", "synthesize", "stage1", "judge_finetune"), ("encoder", "stage1", "mine", "lexical", "judge.engine", "judge.label")),
    Stage("sweep", "mr_ray.stages.sweep:sweep_stage", ("prepare", "label", "audit", "synthesize", "stage1", "mine"),
          ("encoder", "stage1", *(f"stage2.{name}" for name in SWEPT_STAGE2_FIELDS), "sweep", "lexical", "serve.retrieval"), provides="tuned"),
    Stage("stage2", "mr_ray.stages.train:stage2_stage", ("prepare", "label", "audit", "synthesize", "stage1", "mine", "sweep"), ("encoder.max_seq_length", "stage1", "stage2"), provides="encoder"),
    # evaluate: `name` titles the report; `stage1.seed` and `stage1.max_train_queries` choose the st-mnrl baseline's train queries
    Stage("evaluate", "mr_ray.stages.evaluate:evaluate_stage", ("prepare", "judge_finetune", "label", "audit", "stage1", "stage2"),
          ("name", "encoder", "evaluate", "lexical", "stage1.seed", "stage1.max_train_queries")),
    Stage("index", "mr_ray.stages.index:index_stage", ("prepare",), ("encoder", "index", "lexical"), optional=("stage1", "stage2")),
)
PROVIDES = {stage.name: stage.provides for stage in STAGES}
JUDGE_STAGES = ("judge_finetune", "label", "audit", "synthesize")
NOT_PREPARED = "prepare has not run"  # why a graph holds only prepare: the rest depends on what it writes


@dataclass(frozen=True)
class Graph:
    """The stages of one run, in order, and the stages the method has that this run leaves out, with why."""

    stages: tuple[Stage, ...]
    left_out: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]


def prepared_tables(run_dir: Path) -> set[str] | None:
    """The non-empty tables the run's `prepare` wrote (from its manifest), or None before it has run."""
    manifest = read_manifest(run_dir / "prepare")
    if manifest is None:
        return None
    return {table for table, rows in manifest["metrics"]["rows"].items() if rows}


def stages_left_out(config: RunConfig, tables: set[str]) -> dict[str, str]:
    """The stages this config and data leave out, with the reason a report gives."""
    out: dict[str, str] = {}
    if config.judge.kind == "none":
        out.update({name: "judge.kind: none" for name in JUDGE_STAGES})
    if "engagement" not in tables:
        out.setdefault("audit", "no engagement table")
    if config.judge.synthesize.writer is None:
        out.setdefault("synthesize", "judge.synthesize.writer: null")
    if config.sweep is None:
        out["sweep"] = "sweep: null"
    return out


def stage_graph(config: RunConfig, tables: set[str] | None) -> Graph:
    """The run's graph from its config and the tables `prepare` wrote (None: prepare has not run, so
    only prepare is known): the stages kept, each with the inputs among them."""
    if tables is None:
        return Graph(STAGES[:1], {stage.name: NOT_PREPARED for stage in STAGES[1:]})
    left_out = stages_left_out(config, tables)
    kept = [stage for stage in STAGES if stage.name not in left_out]
    names = {stage.name for stage in kept}
    stages = tuple(
        replace(stage, inputs=tuple(i for i in stage.inputs if i in names), optional=tuple(i for i in stage.optional if i in names))
        for stage in kept
    )
    return Graph(stages, left_out)


def run_graph(config: RunConfig, run_dir: Path) -> Graph:
    """The graph of the run in `run_dir` as far as it is known now (`prepare` settles the rest)."""
    return stage_graph(config, prepared_tables(run_dir))


@dataclass(frozen=True)
class Limit:
    """A config setting that caps how much data a stage takes (value None = all), by its dotted key."""

    setting: str
    value: int | None

    @classmethod
    def of(cls, config: RunConfig, setting: str) -> "Limit":
        return cls(setting, config_section(config, setting))


# The running stage's record of the data its limits left out: (log, notes); None outside a stage.
_LIMIT_NOTES: ContextVar[tuple[Callable, list[str]] | None] = ContextVar("limit_notes", default=None)


def note_limit(limit: Limit | None, kept: int, total: int, unit: str) -> None:
    """Say that `limit` kept `kept` of `total` `unit`, in the running stage's log and its manifest's
    metrics (`limits`); nothing when it dropped nothing."""
    record = _LIMIT_NOTES.get()
    if limit is None or kept >= total or record is None:
        return
    log, notes = record
    note = f"{kept} of {total} {unit} ({limit.setting})"
    if note not in notes:
        notes.append(note)
        log(note)


class UndeclaredConfigRead(RuntimeError):
    """A stage read a config section its `Stage(config=...)` does not declare: its manifest would not change
    when that section does, so a rerun would silently keep an output built from the old value."""


class ConfigView:
    """What a stage sees of the run config: the sections it declares (dotted, e.g. "judge.label"), read-only.

    A declared section comes back as a copy (changing it changes nothing the runner hashes); a parent of
    declared subsections (`judge` for "judge.label") comes back as a narrower view; anything else raises
    UndeclaredConfigRead naming the stage and the section, in tests and in runs alike."""

    __slots__ = ("_node", "_declared", "_stage", "_prefix")

    def __init__(self, node, declared: tuple[str, ...], stage: str, prefix: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_declared", tuple(declared))
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, key: str):
        dotted = f"{self._prefix}{key}"
        if dotted in self._declared:
            value = getattr(self._node, key)
            return value.model_copy(deep=True) if hasattr(value, "model_copy") else value
        if any(name.startswith(dotted + ".") for name in self._declared):
            return ConfigView(getattr(self._node, key), self._declared, self._stage, dotted + ".")
        raise UndeclaredConfigRead(
            f"stage {self._stage!r} read config {dotted!r}, which it does not declare (it declares {list(self._declared)}): "
            "add it to the stage's config sections in mr_ray/pipeline.py STAGES"
        )

    def __setattr__(self, key: str, value) -> None:
        raise UndeclaredConfigRead(f"stage {self._stage!r} tried to set config {self._prefix}{key}: a stage's config is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {list(self._declared)})"


# The running stage's record of the catalog embeddings it used, computed or read from the cache
# (mr_ray.embeddings); the manifest's metrics keep it as `catalog_embeddings`. None outside a stage.
_EMBEDDINGS: ContextVar[list[dict] | None] = ContextVar("embeddings", default=None)


def note_embedding(entry: dict) -> None:
    """Record one catalog embedding the running stage used (its encoder, computed or cached, seconds)."""
    record = _EMBEDDINGS.get()
    if record is not None:
        record.append(entry)


@dataclass
class StageContext:
    """What a stage gets: its declared config sections (`config`, a ConfigView), its declared inputs
    (`input`, `inputs_of`), its temp output folder `out`, and the run folder for caches."""

    config: RunConfig | ConfigView
    run_dir: Path
    out: Path
    stage: Stage
    _inputs: dict[str, Path] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # the run's graph: stages it leaves out, and why

    def __post_init__(self):
        if not isinstance(self.config, ConfigView):
            self.config = ConfigView(self.config, self.stage.config, self.stage.name)

    def identity(self) -> str:
        """A short hash of what the stage's output depends on (its config sections and input hashes): a key for
        work that must outlive a killed stage (checkpoints, labeling shards) and never be reused after a change."""
        return section_hash(expected_identity(self.stage, self.config, self.run_dir))

    def input(self, name: str) -> Path:
        if name not in self._inputs:
            raise KeyError(f"stage {self.stage.name!r} was given no input {name!r}")
        return self._inputs[name]

    def inputs_of(self, kind: str) -> list[Path]:
        """The output folders of every input the graph gave this stage that provides `kind` (judge,
        judgments, encoder, tuned), in graph order."""
        return [folder for name, folder in self._inputs.items() if PROVIDES.get(name) == kind]


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
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


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


def run_stage(stage: Stage, config: RunConfig, run_dir: Path, log=print, left_out: dict[str, str] | None = None) -> dict:
    """Run one stage into a temp folder, write its manifest, rename it into place.

    `left_out`: the stages the run's graph leaves out, and why (the evaluate stage reports them)."""
    # Absolute: the stage hands its paths to Ray workers, whose working directory is not ours (a judge
    # saved by a Ray Train worker to a relative `runs/x/...` landed in the worker's own folder).
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = expected_identity(stage, config, run_dir)
    upstream = identity["input_hashes"]  # None where an upstream stage has no manifest
    for name in stage.inputs:
        if upstream[name] is None:
            raise ConfigError(f"stage {stage.name!r} needs the output of {name!r}, which has not run in {run_dir}")
    # The stage folder is replaced only if it holds this stage's previous output (or nothing),
    # and never if it is (or holds) the data source; checked before the stage runs.
    with placed_output(run_dir / stage.name, stage.name, config.data.paths().values()) as tmp:
        inputs = {name: run_dir / name for name, found in upstream.items() if found is not None}
        ctx = StageContext(config, run_dir, tmp, stage, inputs, dict(left_out or {}))
        log(f"[mr-ray] stage {stage.name}: running")
        limits: list[str] = []
        embeddings: list[dict] = []
        token = _LIMIT_NOTES.set((lambda note: log(f"[mr-ray] stage {stage.name}: {note}"), limits))
        embeddings_token = _EMBEDDINGS.set(embeddings)
        started = time.perf_counter()
        try:
            metrics = stage.function()(ctx) or {}
        finally:
            _LIMIT_NOTES.reset(token)
            _EMBEDDINGS.reset(embeddings_token)
        wall = time.perf_counter() - started
        for entry in embeddings:
            log(f"[mr-ray] stage {stage.name}: catalog vectors of {entry['encoder']}: {'embedded' if entry['computed'] else 'cached'} ({entry['seconds']} s)")
        manifest = write_manifest(tmp, {
            "stage": stage.name,
            **identity,
            "output_hash": tree_hash(tmp),
            "metrics": {**metrics, **({"limits": limits} if limits else {}), **({"catalog_embeddings": embeddings} if embeddings else {})},
            "wall_time_s": round(wall, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
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


def clean_stale(run_dir: Path, stage_names: list[str]) -> None:
    """Remove the temp folders a dead run of ours left behind (their stage never finished): only names we
    make (`.tmp-<stage>-<8 hex>`, `.old-<stage>-<8 hex>`, the write probe), and only under the run lock,
    so no live run of ours owns them; anything else named .tmp-* is the user's and stays."""
    ours = re.compile(rf"^({re.escape(TEMP_PREFIX)}|{re.escape(OLD_PREFIX)})({'|'.join(map(re.escape, [*stage_names, 'probe']))})-[0-9a-f]{{8}}$")
    for stale in run_dir.iterdir():
        if ours.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


LOCK = ".mr-ray-run.lock"


def process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return isinstance(pid, int)  # someone else's live process, or a lock we cannot read the pid of
    return True


def lock_holder(run_dir: Path) -> dict:
    """The run folder's lock ({pid, host, started}; {} when none or unreadable)."""
    try:
        holder = json.loads((run_dir / LOCK).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def check_run_folder(run_dir: Path) -> None:
    """Refuse, in one line, a run folder that is a file or that another live run holds (the CLI, before Ray)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file; give a folder")
    holder = lock_holder(run_dir)
    if holder.get("host") not in (None, socket.gethostname()):
        raise RunFolderError(f"run folder {run_dir} is in use by mr-ray pid {holder.get('pid')} on host {holder.get('host')} "
                             f"since {holder.get('started')}; if that run is gone, delete {run_dir / LOCK}")
    if holder and process_alive(holder.get("pid")):
        raise RunFolderError(f"run folder {run_dir} is in use by another mr-ray run (pid {holder['pid']}, since {holder.get('started')}); "
                             "wait for it or stop it")


@contextmanager
def run_lock(run_dir: Path, log=print):
    """One run per folder: a lock file naming its holder (pid, host, start). A second run refuses in one line
    naming the first; the lock of a run that died on this host is taken over with a warning."""
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_run_folder(run_dir)
            log(f"[mr-ray] warning: run folder {run_dir} was locked by a run that is no longer running (pid {lock_holder(run_dir).get('pid')}); taking it over")
            path.unlink(missing_ok=True)
            continue
        except OSError as err:  # a read-only run folder
            raise RunFolderError(run_folder_problem(run_dir) or f"the run folder {run_dir} cannot take its lock ({err.strerror})") from err
        try:
            os.write(handle, json.dumps(me).encode())
        except OSError as err:  # a full disk
            path.unlink(missing_ok=True)
            raise RunFolderError(run_folder_problem(run_dir) or f"the run folder {run_dir} cannot take its lock ({err.strerror})") from err
        finally:
            os.close(handle)
        break
    else:
        raise RunFolderError(f"run folder {run_dir}: could not take its lock {path}; another run keeps taking it")
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, json.JSONDecodeError):
            pass


def output_damage(stage_dir: Path, verify: bool = False) -> str | None:
    """What changed in a finished stage's output since its manifest was written, or None: the fast check
    compares file names, sizes and mtimes with the manifest's list; `verify` also rehashes every byte."""
    manifest = read_manifest(stage_dir) or {}
    changes = listing_changes(stage_dir, manifest)
    if changes is None and verify and manifest.get("output_hash") and tree_hash(stage_dir) != manifest["output_hash"]:
        changes = "its content differs from the manifest's hash"
    return changes


def set_aside_damaged(stage_dir: Path, log=print) -> None:
    """A stage folder whose manifest is damaged no longer says which files mr-ray wrote, so it is neither
    trusted nor deleted: it is renamed `<stage>.damaged-<time>` (kept for the user) and the stage runs again."""
    damage = manifest_damage(stage_dir)
    if damage is None:
        return
    aside = stage_dir.with_name(f"{stage_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(stage_dir, aside)
    log(f"[mr-ray] stage {stage_dir.name}: its manifest is damaged ({damage}); kept that folder as {aside.name} and running the stage again")


def refuse_left_out(graph: Graph, asked: list[str]) -> None:
    """A ConfigError saying why, for a stage asked for that the graph leaves out (not merely unprepared)."""
    not_in_graph = {name: graph.left_out[name] for name in asked if name not in graph.names() and graph.left_out[name] != NOT_PREPARED}
    if not_in_graph:
        raise ConfigError("; ".join(f"stage {name!r} is not in this run's graph ({why})" for name, why in not_in_graph.items()))


def refuse_unknown(asked: list[str], stages: tuple[Stage, ...] | None = None) -> None:
    known = [s.name for s in stages or STAGES]
    unknown = [name for name in asked if name not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {known}")


def check_asked(config: RunConfig, run_dir: Path, asked: list[str]) -> None:
    """Refuse unknown stage names and stages the run's graph leaves out, before anything starts (the CLI, before Ray)."""
    refuse_unknown(asked)
    refuse_left_out(run_graph(config, run_dir), asked)


def run_pipeline(
    config: RunConfig,
    run_dir: str | Path,
    only: list[str] | None = None,
    force: bool = False,
    log=print,
    stages: tuple[Stage, ...] | None = None,
    until: str | None = None,
    verify: bool = False,
) -> dict[str, str]:
    """Run the run's stage graph (or `only` some of its stages, or every stage `until` one); returns
    {stage: 'ran' | 'skipped'}.

    The graph is `stage_graph` of the config and of what `prepare` wrote, worked out again after every
    stage (prepare settles it); `stages` gives a fixed graph instead. A stage asked for that the graph
    leaves out is a ConfigError saying why. A finished stage is skipped only if its output still matches its
    manifest (`output_damage`; `verify`: every byte). One run per folder at a time (`run_lock`).
    """
    run_dir = Path(run_dir)
    asked = [*(only or []), *([until] if until else [])]
    refuse_unknown(asked, stages)  # a stage the graph leaves out is refused by the loop's first graph
    check_run_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, log):
        clean_stale(run_dir, [stage.name for stage in stages or STAGES])
        return run_graph_stages(config, run_dir, asked, only, force, log, stages, until, verify)


def run_graph_stages(config, run_dir: Path, asked: list[str], only, force: bool, log, stages, until, verify: bool) -> dict[str, str]:
    """`run_pipeline`'s loop, under the run lock."""
    outcome: dict[str, str] = {}
    while True:
        graph = Graph(stages) if stages is not None else run_graph(config, run_dir)
        refuse_left_out(graph, asked)
        names = graph.names()
        wanted = names[: names.index(until) + 1] if until in names else names
        pending = [stage for stage in graph.stages if stage.name not in outcome and stage.name in (only or wanted)]
        if not pending:
            break
        stage = pending[0]
        set_aside_damaged(run_dir / stage.name, log)
        if not force and is_current(stage, config, run_dir):
            damage = output_damage(run_dir / stage.name, verify)
            if damage is None:
                log(f"[mr-ray] stage {stage.name}: skipped (manifest matches)")
                outcome[stage.name] = "skipped"
                continue
            log(f"[mr-ray] stage {stage.name}: its output changed since it was written ({damage}); running it again")
        try:
            run_stage(stage, config, run_dir, log=log, left_out=graph.left_out)
        except Exception as err:
            # A full or read-only run folder surfaces deep inside a stage (often in a Ray
            # worker, as text): say so plainly when that is what stopped it.
            problem = run_folder_problem(run_dir)
            if problem:
                raise RunFolderError(f"stage {stage.name!r} stopped: {problem}; the finished stages in it are kept") from err
            raise
        outcome[stage.name] = "ran"
    missing = [name for name in asked if name not in outcome]
    if missing:  # asked for, but prepare has not run (and was not asked for) to settle the graph
        raise ConfigError("; ".join(f"stage {name!r} needs the output of 'prepare', which has not run in {run_dir}" for name in missing))
    return outcome
