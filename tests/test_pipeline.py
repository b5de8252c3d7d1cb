"""The runner: manifests, skipping, re-running on change, nothing half-written on a crash."""

import json

import pytest

from mr_ray.config import ConfigError, load_config
from mr_ray.pipeline import Stage, run_pipeline

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


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="needs the output of 'produce'"):
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
    with_optional = (Stage("consume_optional", f"{__name__}:produce", (), (), optional=("produce",)),)
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
