"""Fault drills: real pipeline processes killed or starved mid-run, then rerun.

Each drill runs `mr_ray.pipeline.run_pipeline` in a child process (this file,
run as a script) on its own private Ray cluster, so a SIGKILL takes down
exactly what a crash would: the Ray Train worker or the driver itself. The
checks are on what is left on disk and on the rerun: a stage resumes from its
checkpoint and ends with the output an uninterrupted run gives; a stage
folder is either finished (manifest) or absent; a run folder that cannot be
written fails with the OS's reason and leaves the finished stages as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

CHILD_TIMEOUT_S = 600  # the machine is shared: a tiny stage can take minutes under load
# The sample catalog, tiny, and a Stage 1 that trains on the human labels only
# (no judge: the run's graph has no judge stages): three epochs of six steps.
TINY = {
    "data.sample": {"n_products": 300, "n_queries": 60, "seed": 5},
    "judge.kind": "none",
    "encoder.max_seq_length": 24,
    "stage1": {
        "max_train_queries": 24, "epochs": 3, "queries_per_batch": 4, "products_per_query": 2,
        "learning_rate": 2e-4, "warmup_fraction": 0.0, "judgment_sources": ["human"],
        "augment": {"rate": 0.0},
    },
}


def child_main(spec: dict) -> None:
    """The child process: a private Ray cluster, then the pipeline; prints the outcome as JSON."""
    import ray

    from mr_ray.config import load_config
    from mr_ray.pipeline import run_pipeline

    config = load_config(None, spec.get("overrides", TINY))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    outcome = run_pipeline(config, spec["run_dir"], only=spec["only"])
    print("OUTCOME " + json.dumps(outcome), flush=True)


class Child:
    """A pipeline run in its own process (and session), its output in a log file."""

    def __init__(self, run_dir: Path, only: list[str], log: Path, wrap: list[str] = ()):
        spec = json.dumps({"run_dir": str(run_dir), "only": only})
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*wrap, sys.executable, __file__, spec], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            )
        self.tree: dict[int, psutil.Process] = {}

    def descendants(self) -> list[psutil.Process]:
        """The live processes under the child (Ray's GCS, raylet and workers); remembered for clean-up."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        self.tree.update({p.pid: p for p in found})
        return found

    def wait_for(self, condition, what: str, timeout_s: float = CHILD_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout_s} s:\n{self.output()[-3000:]}")
            self.descendants()
            time.sleep(0.05)

    def kill_named(self, name: str) -> list[int]:
        """SIGKILL every process under the child whose name contains `name`."""
        victims = [p for p in self.descendants() if name in p.name()]
        for victim in victims:
            victim.kill()
        return [v.pid for v in victims]

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            self.reap()

    def reap(self) -> None:
        """Kill whatever the child left running (after a SIGKILLed driver, its Ray cluster)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the child's own session: it and what it started
        except ProcessLookupError:
            pass
        for process in self.tree.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run(run_dir: Path, only: list[str], log: Path, wrap: list[str] = ()) -> tuple[int, str]:
    child = Child(run_dir, only, log, wrap)
    return child.finish(), child.output()


def outcome(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("OUTCOME ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1].removeprefix("OUTCOME "))


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def stage_files(stage_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(stage_dir)): p.read_bytes() for p in sorted(stage_dir.rglob("*")) if p.is_file()}


def assert_finished_and_intact(stage_dir: Path) -> None:
    """A finished stage: its manifest's output hash is still the hash of what is on disk."""
    from mr_ray.pipeline import read_manifest, tree_hash

    manifest = read_manifest(stage_dir)
    assert manifest is not None, f"{stage_dir} has no manifest"
    assert tree_hash(stage_dir) == manifest["output_hash"], f"{stage_dir} changed after it finished"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of prepare and Stage 1: the Stage 1 the resumed run must equal; its prepare seeds every drill."""
    run_dir = tmp_path_factory.mktemp("drill-reference")
    code, output = run(run_dir, ["prepare", "stage1"], run_dir.parent / f"{run_dir.name}.log")
    assert code == 0, output[-3000:]
    return run_dir


def prepared_copy(reference: Path, run_dir: Path) -> Path:
    """A run folder holding the reference's finished prepare stage (its manifest makes it current)."""
    shutil.copytree(reference / "prepare", run_dir / "prepare")
    return run_dir


def test_stage1_resumes_after_its_worker_is_killed(reference, tmp_path):
    import torch
    from safetensors.torch import load_file

    from mr_ray.pipeline import read_manifest

    run_dir = prepared_copy(reference, tmp_path / "run")
    child = Child(run_dir, ["stage1"], tmp_path / "killed.log")
    try:
        # Kill the Ray Train worker once Ray Train has registered a checkpoint (epoch 0 of 3).
        child.wait_for(lambda: any(run_dir.glob("checkpoints/stage1-*/checkpoint_manager_snapshot.json")), "a Stage 1 checkpoint")
        assert child.kill_named("RayTrainWorker"), "no Ray Train worker process to kill"
        assert child.finish() != 0, "the run survived its worker's death: nothing was drilled"
    finally:
        child.reap()
    assert not (run_dir / "stage1").exists(), "a failed stage left an output folder"

    code, output = run(run_dir, ["stage1"], tmp_path / "rerun.log")
    assert code == 0, output[-3000:]
    assert outcome(output) == {"stage1": "ran"}
    metrics = read_manifest(run_dir / "stage1")["metrics"]
    assert metrics["started_at_epoch"] > 0, "the rerun trained from scratch instead of resuming"
    expected = read_manifest(reference / "stage1")["metrics"]
    # Every epoch once, with the uninterrupted run's losses, and the same weights.
    assert [row["epoch"] for row in metrics["history"]] == [0, 1, 2]
    assert [row["loss"] for row in metrics["history"]] == pytest.approx([row["loss"] for row in expected["history"]], rel=1e-5)
    resumed, uninterrupted = (load_file(d / "stage1" / "model" / "model.safetensors") for d in (run_dir, reference))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_killed_driver_leaves_no_folder_taken_for_a_finished_stage(reference, tmp_path):
    from mr_ray.config import load_config
    from mr_ray.pipeline import is_current, run_graph

    run_dir = prepared_copy(reference, tmp_path / "run")
    child = Child(run_dir, ["prepare", "index"], tmp_path / "killed.log")
    try:
        # Between two stages: prepare finished (skipped here), the index half-written in its temp folder.
        child.wait_for(lambda: any(p.is_file() for p in run_dir.glob(".tmp-index-*/**/*")), "a half-written index")
        child.proc.send_signal(signal.SIGKILL)
        child.finish()
    finally:
        child.reap()
    assert "index" not in {p.name for p in run_dir.iterdir()}
    assert any(p.is_file() for p in run_dir.glob(".tmp-index-*/**/*")), "nothing half-written was left to check"
    stages = {s.name: s for s in run_graph(load_config(None, TINY), run_dir).stages}
    assert not is_current(stages["index"], load_config(None, TINY), run_dir)
    assert_finished_and_intact(run_dir / "prepare")

    code, output = run(run_dir, ["prepare", "index"], tmp_path / "rerun.log")
    assert code == 0, output[-3000:]
    assert outcome(output) == {"prepare": "skipped", "index": "ran"}
    assert not [p for p in run_dir.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert_finished_and_intact(run_dir / "index")
    assert is_current(stages["index"], load_config(None, TINY), run_dir)


def test_read_only_run_folder_is_a_clear_error_and_keeps_finished_stages(reference, tmp_path):
    """Read-only for root too: the immutable attribute (chmod does not stop root)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    run_dir = prepared_copy(reference, tmp_path / "run")
    before = stage_files(run_dir / "prepare")
    subprocess.run(["chattr", "+i", str(run_dir)], check=True)
    try:
        code, output = run(run_dir, ["stage1"], tmp_path / "read-only.log")
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)
    assert code != 0
    # refused at the run lock, before any stage
    assert last_line(output).startswith(
        f"mr_ray.pipeline.RunFolderError: the run folder {run_dir} cannot be written (Operation not permitted; "
    ), output[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["prepare"]
    assert stage_files(run_dir / "prepare") == before
    assert_finished_and_intact(run_dir / "prepare")


def test_full_disk_is_a_clear_error_and_keeps_finished_stages(reference, tmp_path):
    """The run folder is a small tmpfs, mounted in a private user and mount namespace and filled up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    copy = tmp_path / "after"
    # Prepare fits; a filler file takes the rest; Stage 1 then has no space. The folder
    # is copied out (filler removed) before the namespace, and its tmpfs, go away.
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {mount} && cp -a {reference / 'prepare'} {mount}/prepare"
        f" && (dd if=/dev/zero of={mount}/filler bs=1M 2>/dev/null; true)"
        f' && {{ "$@"; code=$?; rm {mount}/filler; cp -a {mount} {copy}; exit $code; }}'
    )
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"]).returncode != 0:
        pytest.skip("no private user/mount namespaces here")
    code, output = run(mount, ["prepare", "stage1"], tmp_path / "full.log", wrap)
    assert code != 0
    # at the run lock or inside the stage, whichever writes first on the full disk
    assert last_line(output).startswith("mr_ray.pipeline.RunFolderError: ") and (
        f"the run folder {mount} cannot be written (No space left on device; " in last_line(output)
    ), output[-3000:]
    assert sorted(p.name for p in copy.iterdir() if not p.name.startswith((".tmp-", "checkpoints", "mlruns"))) == ["prepare"], output[-3000:]
    assert stage_files(copy / "prepare") == stage_files(reference / "prepare")
    assert_finished_and_intact(copy / "prepare")


if __name__ == "__main__":
    child_main(json.loads(sys.argv[1]))
