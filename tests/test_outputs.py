"""Outputs are never destructive, and bad input is one error line: through the real `mr-ray` process."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mr_ray.config import load_config
from mr_ray.outputs import OutputRefused
from mr_ray.pipeline import Stage, run_pipeline


def mr_ray(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mr_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def source(folder, product_title="a"):
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"product_id": ["p1"], "title": [product_title]}), folder / "products.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["a"]}), folder / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "product_id": ["p1"], "grade": [2], "source": ["human"]}), folder / "judgments.parquet")
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_refused_outputs_lose_nothing(tmp_path):
    src = source(tmp_path / "src")
    (tmp_path / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    (tmp_path / "link").symlink_to(mine)
    before = snapshot(tmp_path)
    for out, why in (
        (".", "working folder"),
        ("mine", "other files"),
        ("src", "the input"),
        ("notes.txt", "a file"),
        ("link", "symlink"),
    ):
        result = mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", out, cwd=tmp_path)
        assert_one_error_line(result, out, *([] if out == "." else [why]))
        assert snapshot(tmp_path) == before
    # A parent of the input, from elsewhere: refused as such.
    result = mr_ray("data", "import", "--source", "canonical", "--path", str(src / "products.parquet"), "--out", str(src), cwd=mine)
    assert_one_error_line(result, "the input")
    assert snapshot(tmp_path) == before


def test_previous_import_is_replaced_and_bad_input_writes_nothing(tmp_path):
    source(tmp_path / "src")
    result = mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    source(tmp_path / "src", product_title="b")
    result = mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pq.read_table(tmp_path / "out" / "products").column("title").to_pylist() == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp or old folder left
    # Bad input: one line naming file, row and field; the previous output stays as it was.
    (tmp_path / "src" / "products.parquet").unlink()
    (tmp_path / "src" / "products.csv").write_text("product_id,title\np1,a\np1,b\n")
    before = snapshot(tmp_path / "out")
    result = mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", "out", cwd=tmp_path)
    assert_one_error_line(result, "src/products.csv", "row 2", "'product_id'", "duplicate key")
    assert snapshot(tmp_path / "out") == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    # --debug keeps the traceback for whoever needs it.
    result = mr_ray("--debug", "data", "import", "--source", "canonical", "--path", "src", "--out", "out", cwd=tmp_path)
    assert result.returncode != 0 and "DataError" in result.stderr and len(result.stderr.splitlines()) > 5


def test_bad_config_is_one_line_before_ray_starts(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  source: canonical\n  path: nowhere\n")
    result = mr_ray("run", "--config", "run.yaml", "--run-dir", "runs", cwd=tmp_path)
    assert_one_error_line(result, "run.yaml", "data.path nowhere does not exist")
    assert not (tmp_path / "runs").exists()


def write_value(ctx):
    (ctx.out / "value.txt").write_text("new")
    return {}


def test_stage_folder_of_other_files_is_refused(tmp_path):
    stages = (Stage("produce", f"{__name__}:write_value", (), ("evaluate",)),)
    (tmp_path / "produce").mkdir()
    (tmp_path / "produce" / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match="holds other files, not a previous 'produce' output"):
        run_pipeline(load_config(), tmp_path, stages=stages)
    assert [p.name for p in (tmp_path / "produce").iterdir()] == ["notes.txt"]
    (tmp_path / "produce" / "notes.txt").unlink()
    assert run_pipeline(load_config(), tmp_path, stages=stages) == {"produce": "ran"}  # an empty folder is taken
    assert run_pipeline(load_config(), tmp_path, stages=stages, force=True) == {"produce": "ran"}  # its own output is replaced
    assert (tmp_path / "produce" / "value.txt").read_text() == "new"


def test_serve_checks_the_run_folder_and_the_port_before_starting_ray(tmp_path):
    import json
    import socket

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert_one_error_line(mr_ray("serve", "--run-dir", str(a_file), cwd=tmp_path), str(a_file), "not a folder")
    assert_one_error_line(mr_ray("serve", "--run-dir", str(tmp_path / "nowhere"), cwd=tmp_path), "no such folder")
    run = tmp_path / "run"
    run.mkdir()
    assert_one_error_line(mr_ray("serve", "--run-dir", str(run), cwd=tmp_path), str(run), "no finished index/")
    (run / "index").mkdir()
    (run / "index" / "index.json").write_text(json.dumps({"shards": []}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mr_ray("serve", "--run-dir", str(run), "--port", str(port), cwd=tmp_path)
    assert_one_error_line(result, f"cannot listen on 127.0.0.1:{port} (in use)")
    assert "Ray" not in result.stdout + result.stderr  # refused before any cluster started
    assert a_file.read_text() == "mine"


# --- issue 32: the run folder is the user's too ----------------------------------------------------------------

PRODUCE = (Stage("produce", f"{__name__}:write_value", (), ("evaluate",)),)


def test_a_user_file_inside_a_previous_output_stops_its_replacement(tmp_path):
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE) == {"produce": "ran"}
    (tmp_path / "produce" / "my-notes.txt").write_text("mine")  # the user's, beside what the stage wrote
    with pytest.raises(OutputRefused, match=r"holds 1 file\(s\) mr-ray did not write there \(my-notes.txt\)"):
        run_pipeline(load_config(), tmp_path, stages=PRODUCE, force=True)
    assert (tmp_path / "produce" / "my-notes.txt").read_text() == "mine"
    # the same for a second `data import` into its own previous output
    source(tmp_path / "src")
    assert mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", "out", cwd=tmp_path).returncode == 0
    (tmp_path / "out" / "README.txt").write_text("mine")
    result = mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", "out", cwd=tmp_path)
    assert_one_error_line(result, "did not write there (README.txt)")
    assert (tmp_path / "out" / "README.txt").read_text() == "mine"


def test_an_output_inside_the_input_is_refused(tmp_path):
    source(tmp_path / "src")
    result = mr_ray("data", "import", "--source", "canonical", "--path", "src", "--out", "src/canonical", cwd=tmp_path)
    assert_one_error_line(result, "is inside the input src")
    assert not (tmp_path / "src" / "canonical").exists()


def test_only_the_temp_folders_the_tool_names_are_cleaned(tmp_path):
    for name in (".tmp-produce-0123abcd", ".old-produce-89abcdef", ".tmp-my-scratch", ".old-thesis"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    run_pipeline(load_config(), tmp_path, stages=PRODUCE)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".old-thesis", ".tmp-my-scratch"]


def test_a_second_run_on_the_same_folder_refuses_naming_the_first(tmp_path):
    import json
    import os
    import socket

    from mr_ray.pipeline import LOCK, RunFolderError

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-05T06:00:00"}))
        with pytest.raises(RunFolderError, match=rf"in use by another mr-ray run \(pid {holder.pid}, since 2026-12-05T06:00:00\)"):
            run_pipeline(load_config(), tmp_path, stages=PRODUCE)
        assert not (tmp_path / "produce").exists()
        result = mr_ray("run", "--run-dir", str(tmp_path), cwd=tmp_path)
        assert_one_error_line(result, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    log: list[str] = []  # the holder died: its lock is taken over, with a warning
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE, log=log.append) == {"produce": "ran"}
    assert any(f"no longer running (pid {holder.pid}); taking it over" in line for line in log)
    assert not (tmp_path / LOCK).exists()  # released when the run ends
    assert os.getpid() != holder.pid


def test_a_damaged_output_is_noticed_and_its_stage_rerun(tmp_path):
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE) == {"produce": "ran"}
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE) == {"produce": "skipped"}
    (tmp_path / "produce" / "value.txt").unlink()
    log: list[str] = []
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE, log=log.append) == {"produce": "ran"}
    assert any("its output changed since it was written (1 file(s) missing, e.g. value.txt); running it again" in line for line in log)
    # a rewrite of the same size and time passes the fast check; --verify rehashes the bytes
    value = tmp_path / "produce" / "value.txt"
    stat = value.stat()
    value.write_text("NEW")
    os_utime = __import__("os").utime
    os_utime(value, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE) == {"produce": "skipped"}
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE, verify=True) == {"produce": "ran"}
    assert value.read_text() == "new"


@pytest.mark.parametrize("manifest", [b'{"stage": "produce", "files": {"value.t', b"\xff\xfe", b"[1, 2]"], ids=["truncated", "binary", "a list"])
@pytest.mark.parametrize("force", [False, True])
def test_a_stage_with_a_damaged_manifest_is_kept_aside_and_rerun(tmp_path, manifest, force):
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE) == {"produce": "ran"}
    (tmp_path / "produce" / "manifest.json").write_bytes(manifest)
    (tmp_path / "produce" / "notes.txt").write_text("the user's")
    log: list[str] = []
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE, force=force, log=log.append) == {"produce": "ran"}
    (aside,) = tmp_path.glob("produce.damaged-*")
    assert any("its manifest is damaged (" in line and f"kept that folder as {aside.name}" in line for line in log)
    assert (aside / "notes.txt").read_text() == "the user's" and (aside / "manifest.json").read_bytes() == manifest
    assert (tmp_path / "produce" / "value.txt").read_text() == "new"
    assert run_pipeline(load_config(), tmp_path, stages=PRODUCE) == {"produce": "skipped"}


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    assert_one_error_line(mr_ray("run", "--run-dir", "runs", cwd=tmp_path), "runs is a file")
