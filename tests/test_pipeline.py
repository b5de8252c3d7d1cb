"""The runner: manifests, skipping, re-running on change, nothing half-written on a crash."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mr_ray.config import ConfigError, load_config
from mr_ray.pipeline import (
    Limit,
    Stage,
    StageContext,
    note_limit,
    read_manifest,
    run_pipeline,
    stage_graph,
)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
CALLS: list[str] = []


def produce(ctx):
    CALLS.append("produce")
    (ctx.out / "value.txt").write_text(str(ctx.config.evaluate.seed))
    return {"value": ctx.config.evaluate.seed}


def consume(ctx):
    CALLS.append("consume")
    value = (ctx.input("produce") / "value.txt").read_text()
    (ctx.out / "double.txt").write_text(value * 2)
    return {}


def capped(ctx):
    """A stage whose limit keeps 20 of 150 queries, and one that keeps everything."""
    note_limit(Limit.of(ctx.config, "judge.label.max_queries"), 20, 150, "queries")
    note_limit(Limit.of(ctx.config, "mine.max_queries"), 40, 40, "train queries")
    return {"labelled": 20}


def paths(ctx):
    (ctx.out / "paths.json").write_text(json.dumps({"run_dir": str(ctx.run_dir), "out": str(ctx.out), "input": str(ctx.input("produce"))}))
    return {}


def crash(ctx):
    (ctx.out / "partial.txt").write_text("half")
    raise RuntimeError("killed mid-stage")


STAGES = (
    Stage("produce", f"{__name__}:produce", (), ("evaluate",)),
    Stage("consume", f"{__name__}:consume", ("produce",), ()),
)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def test_second_run_skips_every_stage(tmp_path):
    config = load_config()
    assert run_pipeline(config, tmp_path, stages=STAGES) == {"produce": "ran", "consume": "ran"}
    assert run_pipeline(config, tmp_path, stages=STAGES) == {"produce": "skipped", "consume": "skipped"}
    assert CALLS == ["produce", "consume"]
    manifest = json.loads((tmp_path / "produce" / "manifest.json").read_text())
    assert {"config_hash", "input_hashes", "output_hash", "metrics", "wall_time_s"} <= set(manifest)
    assert json.loads((tmp_path / "consume" / "manifest.json").read_text())["input_hashes"] == {"produce": manifest["output_hash"]}


def test_config_change_reruns_stage_and_downstream(tmp_path):
    run_pipeline(load_config(), tmp_path, stages=STAGES)
    CALLS.clear()
    changed = load_config(overrides={"evaluate.seed": 7})
    assert run_pipeline(changed, tmp_path, stages=STAGES) == {"produce": "ran", "consume": "ran"}
    assert (tmp_path / "consume" / "double.txt").read_text() == "77"


def test_unrelated_config_change_skips(tmp_path):
    run_pipeline(load_config(), tmp_path, stages=STAGES)
    CALLS.clear()
    assert run_pipeline(load_config(overrides={"name": "other"}), tmp_path, stages=STAGES)["produce"] == "skipped"
    assert CALLS == []


def test_crash_keeps_previous_output_and_leaves_no_partial(tmp_path):
    run_pipeline(load_config(), tmp_path, stages=STAGES)
    before = (tmp_path / "produce" / "value.txt").read_text()
    crashing = (Stage("produce", f"{__name__}:crash", (), ("evaluate",)),)
    with pytest.raises(RuntimeError):
        run_pipeline(load_config(overrides={"evaluate.seed": 3}), tmp_path, stages=crashing)
    assert (tmp_path / "produce" / "value.txt").read_text() == before
    assert not list(tmp_path.glob(".tmp-*"))
    # After the crash a rerun with the original config still finds everything current.
    assert run_pipeline(load_config(), tmp_path, stages=STAGES) == {"produce": "skipped", "consume": "skipped"}


def test_stages_get_absolute_paths_from_a_relative_run_dir(tmp_path, monkeypatch):
    # Stages pass their paths to Ray workers, which run in another working directory.
    monkeypatch.chdir(tmp_path)
    stages = (STAGES[0], Stage("paths", f"{__name__}:paths", ("produce",), ()))
    run_pipeline(load_config(), Path("runs/relative"), stages=stages)
    seen = json.loads((tmp_path / "runs" / "relative" / "paths" / "paths.json").read_text())
    assert all(Path(p).is_absolute() for p in seen.values())
    assert seen["run_dir"] == str(tmp_path.resolve() / "runs" / "relative")


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="needs the output of 'produce'"):
        run_pipeline(load_config(), tmp_path, only=["consume"], stages=STAGES)


def test_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        run_pipeline(load_config(), tmp_path, only=["nope"], stages=STAGES)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sample:\n    n_prodcts: 10\n")
    with pytest.raises(ConfigError, match="data.sample.n_prodcts"):
        load_config(bad)
    bad.write_text("evaluate:\n  ndcg_k: ten\n")
    with pytest.raises(ConfigError, match="evaluate.ndcg_k"):
        load_config(bad)


def test_optional_input_counts_when_it_appears(tmp_path):
    with_optional = (Stage("consume_optional", f"{__name__}:produce", (), ("evaluate",), optional=("produce",)),)
    assert run_pipeline(load_config(), tmp_path, stages=with_optional)["consume_optional"] == "ran"
    assert run_pipeline(load_config(), tmp_path, stages=with_optional)["consume_optional"] == "skipped"
    run_pipeline(load_config(), tmp_path, stages=STAGES[:1])
    # The optional upstream now exists: its hash changes the identity, so the stage reruns.
    assert run_pipeline(load_config(), tmp_path, stages=with_optional)["consume_optional"] == "ran"


def test_subsection_config_only_reruns_its_readers(tmp_path):
    """A stage keyed on "judge.audit" reruns when the audit settings change, not when synthesis settings do."""
    stages = (Stage("produce", f"{__name__}:produce", (), ("evaluate.seed", "judge.audit")),)
    run_pipeline(load_config(), tmp_path, stages=stages)
    assert run_pipeline(load_config(overrides={"judge.synthesize.max_products": 3}), tmp_path, stages=stages) == {"produce": "skipped"}
    assert run_pipeline(load_config(overrides={"judge.audit.prompt_variants": 1}), tmp_path, stages=stages) == {"produce": "ran"}
    assert run_pipeline(load_config(overrides={"judge.audit.prompt_variants": 1, "evaluate.seed": 3}), tmp_path, stages=stages) == {"produce": "ran"}


SAMPLE_TABLES = {"products", "queries", "judgments", "engagement", "gold", "pool"}  # what prepare writes for the sample catalog
HOMEDEPOT_TABLES = {"products", "queries", "judgments"}  # human grades, no engagement


def graph_inputs(config, tables) -> dict[str, tuple[str, ...]]:
    return {stage.name: stage.inputs + stage.optional for stage in stage_graph(config, tables).stages}


@pytest.mark.parametrize("kind", ["cross_encoder", "causal_lm"])
def test_graph_with_a_judge_of_either_kind_and_engagement_runs_every_stage(kind):
    config = load_config(None, {"judge.kind": kind})
    inputs = graph_inputs(config, SAMPLE_TABLES)
    assert list(inputs) == ["prepare", "judge_finetune", "label", "audit", "synthesize", "stage1", "mine", "sweep", "stage2", "evaluate", "index"]
    assert inputs["stage1"] == ("prepare", "label", "audit", "synthesize")
    assert inputs["mine"] == ("prepare", "label", "audit", "synthesize", "stage1", "judge_finetune")  # mining re-annotates with the judge
    assert inputs["stage2"] == ("prepare", "label", "audit", "synthesize", "stage1", "mine", "sweep")  # the sweep feeds Stage 2
    assert inputs["evaluate"] == ("prepare", "judge_finetune", "label", "audit", "stage1", "stage2")
    assert stage_graph(config, SAMPLE_TABLES).left_out == {}


def test_graph_without_engagement_has_no_audit():
    # homedepot.yaml's settings with the data swapped out: the graph reads the tables, and the data may be absent here
    graph = stage_graph(load_config(REPO_CONFIGS / "homedepot.yaml", {"data": {"source": "sample"}}), HOMEDEPOT_TABLES)
    inputs = {stage.name: stage.inputs for stage in graph.stages}
    # homedepot.yaml also sets no writer for synthetic queries
    assert "audit" not in inputs and graph.left_out == {"audit": "no engagement table", "synthesize": "judge.synthesize.writer: null"}
    assert inputs["stage1"] == ("prepare", "label")
    assert inputs["mine"] == ("prepare", "label", "stage1", "judge_finetune")
    assert inputs["evaluate"] == ("prepare", "judge_finetune", "label", "stage1", "stage2")
    assert "audit" in stage_graph(load_config(), HOMEDEPOT_TABLES | {"engagement"}).names()


def test_the_graph_reads_the_tables_prepare_wrote_from_its_manifest(tmp_path):
    from mr_ray.pipeline import prepared_tables, run_graph

    assert prepared_tables(tmp_path) is None and run_graph(load_config(), tmp_path).names() == ["prepare"]
    (tmp_path / "prepare").mkdir()
    rows = {"products": 3, "queries": 2, "judgments": 4, "engagement": 0}  # an empty engagement table is no engagement either
    (tmp_path / "prepare" / "manifest.json").write_text(json.dumps({"stage": "prepare", "metrics": {"rows": rows}}))
    assert prepared_tables(tmp_path) == {"products", "queries", "judgments"}
    assert run_graph(load_config(), tmp_path).left_out == {"audit": "no engagement table"}


def test_graph_without_a_judge_trains_on_human_labels_only():
    graph = stage_graph(load_config(None, {"judge.kind": "none"}), SAMPLE_TABLES)
    inputs = {stage.name: stage.inputs + stage.optional for stage in graph.stages}
    assert list(inputs) == ["prepare", "stage1", "mine", "sweep", "stage2", "evaluate", "index"]
    assert inputs["stage1"] == ("prepare",) and inputs["mine"] == ("prepare", "stage1")
    assert inputs["stage2"] == ("prepare", "stage1", "mine", "sweep")
    assert graph.left_out == {name: "judge.kind: none" for name in ("judge_finetune", "label", "audit", "synthesize")}


def test_graph_leaves_out_synthesis_without_a_writer_and_the_sweep_when_null():
    graph = stage_graph(load_config(None, {"judge.synthesize.writer": None, "sweep": None}), SAMPLE_TABLES)
    inputs = {stage.name: stage.inputs for stage in graph.stages}
    assert "synthesize" not in inputs and "sweep" not in inputs
    assert inputs["stage2"] == ("prepare", "label", "audit", "stage1", "mine")
    assert graph.left_out == {"synthesize": "judge.synthesize.writer: null", "sweep": "sweep: null"}


def test_before_prepare_the_graph_is_prepare_alone():
    graph = stage_graph(load_config(), None)
    assert graph.names() == ["prepare"] and set(graph.left_out.values()) == {"prepare has not run"}


def test_a_stage_the_graph_leaves_out_is_a_one_line_error(tmp_path):
    """`mr-ray stage audit` on data without engagement: the runner says why there is no audit, before running anything."""
    from mr_ray.data.prepare import load_source, write_tables
    from mr_ray.pipeline import STAGES, run_stage

    config = load_config(None, {"data.sample": {"n_products": 60, "n_queries": 20}})
    source = tmp_path / "source"
    tables = load_source(config.data)
    write_tables({kind: table for kind, table in tables.items() if kind in ("products", "queries", "judgments")}, source)
    config = load_config(None, {"data": {"source": "canonical", "path": str(source)}})
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="needs the output of 'prepare'"):
        run_pipeline(config, run_dir, only=["stage1"])
    run_stage(STAGES[0], config, run_dir)
    with pytest.raises(ConfigError, match=r"^stage 'audit' is not in this run's graph \(no engagement table\)$"):
        run_pipeline(config, run_dir, only=["audit"])
    # the CLI says the same in one line, before it starts Ray (no "Started a local Ray instance")
    config_file = tmp_path / "canonical.yaml"
    config_file.write_text(f"data:\n  source: canonical\n  path: {source}\n")
    cli = subprocess.run([sys.executable, "-m", "mr_ray.cli", "stage", "audit", "--config", str(config_file), "--run-dir", str(run_dir)],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.strip().splitlines()[-1] == "error: stage 'audit' is not in this run's graph (no engagement table)"
    assert "Ray" not in cli.stderr + cli.stdout
    with pytest.raises(ConfigError, match=r"stage 'label' is not in this run's graph \(judge.kind: none\)"):
        run_pipeline(load_config(None, {"data": {"source": "canonical", "path": str(source)}, "judge.kind": "none"}), run_dir, only=["label"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["prepare"]


def test_a_limit_that_drops_data_is_logged_and_in_the_manifest(tmp_path):
    log: list[str] = []
    stages = (Stage("label", f"{__name__}:capped", (), ("judge.label", "mine.max_queries")),)
    run_pipeline(load_config(None, {"judge.label.max_queries": 20}), tmp_path, stages=stages, log=log.append)
    note = "20 of 150 queries (judge.label.max_queries)"
    assert f"[mr-ray] stage label: {note}" in log
    assert read_manifest(tmp_path / "label")["metrics"] == {"labelled": 20, "limits": [note]}  # the limit that kept all is not mentioned
    assert not any("mine.max_queries" in line for line in log)


def test_library_defaults_take_all_the_data_and_the_sample_job_sets_its_limits():
    defaults, sample = load_config(), load_config(REPO_CONFIGS / "sample.yaml")
    limits = ("judge.finetune.max_examples", "judge.finetune.max_holdout", "judge.label.max_queries", "judge.synthesize.max_products",
              "mine.max_queries", "stage1.max_train_queries", "stage2.max_train_queries", "sweep.max_train_queries",
              "sweep.max_dev_queries", "sweep.max_dev_products", "evaluate.max_queries")
    assert {name: Limit.of(defaults, name).value for name in limits} == dict.fromkeys(limits)
    assert load_config(None, {"judge.kind": "causal_lm"}).judge.finetune.max_examples is None
    assert {name: Limit.of(sample, name).value for name in limits if Limit.of(sample, name).value is not None} == {
        "judge.finetune.max_holdout": 400, "judge.label.max_queries": 20, "judge.synthesize.max_products": 8,
        "sweep.max_train_queries": 64, "sweep.max_dev_queries": 60,
    }


def test_the_report_says_what_the_graph_left_out_and_where_stage2_settings_came_from(tmp_path):
    from mr_ray.stages.evaluate import run_section

    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    trained_with = {"source": "sweep (best of 2 trials, dev NDCG@10 0.7000)", "params": {"scale": 16.0, "temperature": 0.1}}
    (stage2 / "manifest.json").write_text(json.dumps({"stage": "stage2", "metrics": {"trained_with": trained_with}}))
    evaluate = Stage("evaluate", "mr_ray.stages.evaluate:evaluate_stage", ("prepare", "stage2"))
    ctx = StageContext(load_config(), tmp_path, tmp_path, evaluate, {"stage2": stage2}, {"audit": "no engagement table"})
    markdown, numbers = run_section(ctx)
    assert "- audit: not run (no engagement table)" in markdown.splitlines()
    assert "- stage2 trained with scale 16.0, temperature 0.1, from sweep (best of 2 trials, dev NDCG@10 0.7000)" in markdown.splitlines()
    assert numbers == {
        "not_run": {"audit": "no engagement table"}, "trained_with": {"stage2": trained_with},
        "summary": [line[2:] for line in markdown.splitlines() if line.startswith("- ")],  # report.html's list
    }


def test_mining_without_a_judge_falls_back_to_the_human_grades_and_says_so(tmp_path):
    from mr_ray.config import MineConfig
    from mr_ray.retriever.mining import annotator

    assert annotator(MineConfig(), [tmp_path / "judge_finetune"]) == ("judge", "mine.annotator: judge")
    who, why = annotator(MineConfig(), [])
    assert who == "grades:judgments" and "no judge ran (judge.kind: none)" in why
    assert annotator(MineConfig(annotator="grades"), [tmp_path / "judge_finetune"])[0] == "grades:gold"


def echo_identity(ctx):
    """Stands in for a real stage: its output is what it depends on (declared config sections, input hashes)."""
    CALLS.append(ctx.stage.name)
    (ctx.out / "identity.txt").write_text(ctx.identity())
    return {}


def stand_ins(config) -> tuple[Stage, ...]:
    """The real sample graph (every stage's real inputs and config sections), each stage's work replaced by echo_identity."""
    from dataclasses import replace

    return tuple(replace(stage, target=f"{__name__}:echo_identity") for stage in stage_graph(config, SAMPLE_TABLES).stages)


@pytest.mark.parametrize(
    ("change", "reruns"),
    [
        # the BM25 that mining's lexical and hybrid sources, the sweep's hybrid objective, the report and the served index use
        ({"lexical.k1": 1.2}, ["mine", "sweep", "stage2", "evaluate", "index"]),
        ({"serve.retrieval": "dense"}, ["sweep", "stage2", "evaluate", "index"]),  # the served mode is what the sweep maximises
        ({"stage2.epochs": 3}, ["stage2", "evaluate", "index"]),  # how long Stage 2 trains: not the sweep's trials
        ({"stage2.learning_rate": 1e-4}, ["sweep", "stage2", "evaluate", "index"]),  # what the sweep's trials train with
        ({"encoder.max_seq_length": 32}, ["stage1", "mine", "sweep", "stage2", "evaluate", "index"]),  # one length: training to serving
        ({"serve.max_k": 50}, []),  # read when serving, by no stage
    ],
)
def test_a_config_change_reruns_exactly_the_stages_that_declare_it_and_their_downstream(tmp_path, change, reruns):
    config = load_config()
    run_pipeline(config, tmp_path, stages=stand_ins(config))
    CALLS.clear()
    changed = load_config(overrides=change)
    outcome = run_pipeline(changed, tmp_path, stages=stand_ins(changed))
    assert [name for name, what in outcome.items() if what == "ran"] == reruns == CALLS


def reads_stage1(ctx):
    CALLS.append(ctx.config.stage1.epochs)
    return {}


def writes_config(ctx):
    ctx.config.evaluate.seed = 9  # a copy: the runner's config is unchanged
    ctx.config.evaluate = None
    return {}


def test_a_stage_that_reads_an_undeclared_section_fails_loudly_and_writes_nothing(tmp_path):
    from mr_ray.pipeline import UndeclaredConfigRead

    sneaky = (Stage("sneaky", f"{__name__}:reads_stage1", (), ("evaluate", "judge.label")),)
    with pytest.raises(UndeclaredConfigRead, match=r"stage 'sneaky' read config 'stage1', which it does not declare"):
        run_pipeline(load_config(), tmp_path, stages=sneaky)
    assert CALLS == [] and not (tmp_path / "sneaky").exists() and not list(tmp_path.glob(".tmp-*"))
    # a declared subsection does not open its parent's other subsections
    view = StageContext(load_config(), tmp_path, tmp_path, sneaky[0]).config
    assert view.judge.label.max_queries is None and view.evaluate.seed == 0
    with pytest.raises(UndeclaredConfigRead, match="'judge.audit'"):
        view.judge.audit
    with pytest.raises(UndeclaredConfigRead, match="read-only"):
        run_pipeline(load_config(), tmp_path, stages=(Stage("writer", f"{__name__}:writes_config", (), ("evaluate",)),))


def test_every_stage_declares_only_sections_the_config_has():
    from mr_ray.pipeline import STAGES, config_section

    config = load_config()
    for stage in STAGES:
        for section in stage.config:
            config_section(config, section)  # an AttributeError names a declaration with a typo
