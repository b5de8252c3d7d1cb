"""The `mr-ray` command line: run the pipeline or one stage, import data."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Optional

import typer

from mr_ray.cluster import init_ray
from mr_ray.config import load_config

app = typer.Typer(help="Mine and Refine on Ray: graded-relevance search embeddings.", no_args_is_help=True)
data_app = typer.Typer(help="Data import.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, help="run config YAML (default: built-in sample config)"),
    run_dir: Path = typer.Option(Path("runs/sample"), help="where stage outputs and manifests go"),
    force: bool = typer.Option(False, help="re-run stages even if their manifest matches"),
    address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)"),
):
    """Run the whole pipeline; stages whose manifest matches are skipped."""
    from mr_ray.pipeline import run_pipeline

    cfg = load_config(config)
    init_ray(address)
    run_pipeline(cfg, run_dir, force=force)


@app.command()
def stage(
    name: str = typer.Argument(..., help="stage name, e.g. prepare or evaluate"),
    config: Optional[Path] = typer.Option(None, help="run config YAML"),
    run_dir: Path = typer.Option(Path("runs/sample")),
    force: bool = typer.Option(False),
    address: Optional[str] = typer.Option(None),
):
    """Run one stage (its inputs must already be in the run folder)."""
    from mr_ray.pipeline import run_pipeline

    cfg = load_config(config)
    init_ray(address)
    run_pipeline(cfg, run_dir, only=[name], force=force)


@data_app.command("import")
def import_data(
    source: str = typer.Option(..., help="canonical | homedepot | esci | wands | sample"),
    path: Optional[str] = typer.Option(None, help="file, folder or URI of the source"),
    out: Path = typer.Option(..., help="output folder for canonical Parquet tables"),
):
    """Import a dataset into the canonical Parquet layout (validated; nothing partial is written)."""
    from mr_ray.config import DataConfig
    from mr_ray.data.importers import check_references
    from mr_ray.data.prepare import load_source, write_tables

    cfg = DataConfig(source=source, path=path)
    tables = load_source(cfg)
    check_references(tables, path or source)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        counts = write_tables(tables, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command("serve")
def serve_cmd(
    run_dir: Path = typer.Option(Path("runs/sample"), help="a finished run (its index/ stage output)"),
    config: Optional[Path] = typer.Option(None, help="run config YAML (its serve section)"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)"),
):
    """Serve search over HTTP from a run's index (Ray Serve); Ctrl-C stops it."""
    from mr_ray.serve.app import serve_run

    cfg = load_config(config)
    init_ray(address)
    serve_run(run_dir, cfg.serve, host=host, port=port, blocking=True)


@app.command("evaluate")
def evaluate_cmd(
    prepared: Path = typer.Option(..., help="a prepare output (or `mr-ray data import`) folder"),
    out: Path = typer.Option(..., help="folder for report.md, report.json, similarity_hist.png"),
    split: str = typer.Option("test"),
    model: list[str] = typer.Option([], help="extra encoder as NAME=FOLDER (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="run config YAML for encoder/evaluate settings"),
    address: Optional[str] = typer.Option(None),
):
    """Evaluate BM25, the pretrained encoder and any given encoders on a prepared dataset."""
    import json

    from mr_ray.evaluate import evaluate_systems, render_report
    from mr_ray.retriever.encoder import pretrained_model_path

    cfg = load_config(config, overrides={"evaluate.split": split})
    models = {"pretrained": pretrained_model_path()} if "pretrained" in cfg.evaluate.baselines else {}
    for item in model:
        name, _, folder = item.partition("=")
        models[name] = folder
    init_ray(address)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_systems(prepared, models, cfg.evaluate, cfg.encoder, out / "similarity_hist.png")
    (out / "report.json").write_text(json.dumps(result, indent=2))
    report = render_report(result, f"mr-ray evaluation: {prepared}")
    (out / "report.md").write_text(report + "\n![similarity histograms](similarity_hist.png)\n")
    typer.echo(report)


if __name__ == "__main__":
    app()
