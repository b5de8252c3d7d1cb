"""The `mr-ray` command line: run the pipeline or one stage, import data.

Bad input (a data file, a config, an output folder that would lose something)
is one `error: ...` line on stderr and exit status 2; a traceback means a bug,
and `mr-ray --debug ...` shows it for bad input too. A command imports the modules that pull in torch,
Ray Data or Serve when it runs, so `mr-ray --help` and a refused option answer at once.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from mr_ray.cluster import init_ray
from mr_ray.config import ConfigError, DataConfig, load_config, validated
from mr_ray.outputs import OutputRefused, placed_output, write_manifest
from mr_ray.pipeline import RunFolderError, check_asked, check_run_folder, run_pipeline
from mr_ray.schema import DataError

BAD_INPUT = (DataError, ConfigError, OutputRefused, RunFolderError)
BAD_INPUT_EXIT = 2  # as for a bad option: the user can fix it


def error_line(err: Exception) -> str:
    """Bad input as the one line the user sees."""
    return f"error: {' '.join(str(err).split())}"


class BadInputReportingGroup(TyperGroup):
    """Runs a command; bad input becomes one error line and exit 2 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BAD_INPUT as err:
            if ctx.params.get("debug"):
                raise
            typer.echo(error_line(err), err=True)
            raise typer.Exit(BAD_INPUT_EXIT) from None


app = typer.Typer(help="Mine and Refine on Ray: graded-relevance search embeddings.", no_args_is_help=True, cls=BadInputReportingGroup)
data_app = typer.Typer(help="Data import.", no_args_is_help=True)
app.add_typer(data_app, name="data")
judge_app = typer.Typer(help="The relevance judge.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show the traceback of bad input too")):
    """Mine and Refine on Ray: graded-relevance search embeddings."""
    # `debug` is read by BadInputReportingGroup from the parsed parameters.


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, help="run config YAML (default: built-in sample config)"),
    run_dir: Path = typer.Option(Path("runs/sample"), help="where stage outputs and manifests go"),
    force: bool = typer.Option(False, help="re-run stages even if their manifest matches"),
    verify: bool = typer.Option(False, help="before skipping a stage, rehash every byte of its output (default: names, sizes, mtimes)"),
    address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)"),
):
    """Run the run's stage graph (which stages follow the config and the data); stages whose manifest matches are skipped."""

    cfg = load_config(config)
    check_run_folder(run_dir)  # before Ray starts: a file, or a folder another run holds, is one line
    init_ray(address)
    run_pipeline(cfg, run_dir, force=force, verify=verify)


@app.command()
def stage(
    name: str = typer.Argument(..., help="stage name, e.g. prepare or evaluate"),
    config: Optional[Path] = typer.Option(None, help="run config YAML"),
    run_dir: Path = typer.Option(Path("runs/sample")),
    force: bool = typer.Option(False),
    verify: bool = typer.Option(False, help="rehash every byte of a finished output before skipping it"),
    address: Optional[str] = typer.Option(None),
):
    """Run one stage of the run's graph with the inputs the graph gives it (they must already be in the run
    folder); a stage the graph leaves out (e.g. audit without engagement data) is an error saying why."""

    cfg = load_config(config)
    check_run_folder(run_dir)
    check_asked(cfg, run_dir, [name])  # before Ray starts
    init_ray(address)
    run_pipeline(cfg, run_dir, only=[name], force=force, verify=verify)


IMPORT_KIND = "data-import"


@data_app.command("import")
def import_data(
    source: str = typer.Option(..., help="canonical | homedepot | esci | wands | sample"),
    path: Optional[str] = typer.Option(None, help="file, folder or URI of the source"),
    out: Path = typer.Option(..., help="output folder for canonical Parquet tables"),
):
    """Import a dataset into the canonical Parquet layout (validated; nothing partial is written).

    --out must be new, empty, or a previous `data import` output (which is replaced)."""
    from mr_ray.data.importers import check_references
    from mr_ray.data.prepare import load_source, write_tables

    cfg = validated(DataConfig, {"source": source, "path": path}, "invalid options")
    with placed_output(out, IMPORT_KIND, cfg.paths().values()) as tmp:
        tables = load_source(cfg)
        check_references(tables, path or source)
        counts = write_tables(tables, tmp)
        write_manifest(tmp, {"kind": IMPORT_KIND, "source": source, "path": path, "rows": counts, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
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
    from mr_ray.serve.ports import check_serve_target

    cfg = load_config(config)
    check_serve_target(run_dir, host, port)  # before Ray starts: a wrong folder or a taken port is one line
    init_ray(address, serving=True)
    # A service manager's stop (SIGTERM) ends it as Ctrl-C does: Ray shuts down and the files init_ray made are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve_run(run_dir, cfg.serve, host=host, port=port, blocking=True)


EVALUATE_KIND = "evaluate-report"


@app.command("evaluate")
def evaluate_cmd(
    prepared: Path = typer.Option(..., help="a prepare output (or `mr-ray data import`) folder"),
    out: Path = typer.Option(..., help="folder for report.md, report.json, report.html, similarity_hist.png"),
    split: str = typer.Option("test"),
    model: list[str] = typer.Option([], help="extra encoder as NAME=FOLDER (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="run config YAML for encoder/evaluate settings"),
    address: Optional[str] = typer.Option(None),
):
    """Evaluate BM25, the pretrained encoder and any given encoders on a prepared dataset.

    --out must be new, empty, or a previous `evaluate` output (which is replaced)."""
    from mr_ray.evaluate import evaluate_systems
    from mr_ray.report.html import render_report_html
    from mr_ray.report.markdown import render_report
    from mr_ray.retriever.encoder import pretrained_model_path

    cfg = load_config(config, overrides={"evaluate.split": split})
    models = {"pretrained": pretrained_model_path()} if "pretrained" in cfg.evaluate.baselines else {}
    for item in model:
        name, _, folder = item.partition("=")
        models[name] = folder
    with placed_output(out, EVALUATE_KIND, [prepared, *models.values()]) as tmp:
        init_ray(address)
        result = evaluate_systems(prepared, models, cfg.evaluate, cfg.encoder, cfg.lexical, tmp / "similarity_hist.png")
        (tmp / "report.json").write_text(json.dumps(result, indent=2))
        report = render_report(result, f"mr-ray evaluation: {prepared}")
        (tmp / "report.md").write_text(report + "\n![similarity histograms](similarity_hist.png)\n")
        (tmp / "report.html").write_text(render_report_html(result, f"mr-ray evaluation: {prepared}", {}, tmp / "similarity_hist.png"))
        write_manifest(tmp, {"kind": EVALUATE_KIND, "prepared": str(prepared), "models": models})
    typer.echo(report)


@judge_app.command("eval")
def judge_eval(
    config: Optional[Path] = typer.Option(None, help="run config YAML (its judge.engine section)"),
    run_dir: Path = typer.Option(Path("runs/sample"), help="a run with prepare/ and judge_finetune/ outputs"),
    split: str = typer.Option("test", help="train | dev | test: whose queries' human-judged pairs are labelled"),
    model: Optional[Path] = typer.Option(None, help="judge folder (default: the run's judge_finetune/model)"),
    prepared: Optional[Path] = typer.Option(None, help="prepared data folder (default: the run's prepare/)"),
    max_pairs: Optional[int] = typer.Option(None, min=1, help="label a seeded subsample of the pairs"),
    address: Optional[str] = typer.Option(None),
):
    """Label a split's human-judged pairs with the judge (Ray Data + vLLM); print the confusion matrix and metrics."""
    from mr_ray.labeler.label import evaluate_judge
    from mr_ray.report.markdown import metrics_text

    if split not in ("train", "dev", "test"):
        raise ConfigError(f"--split: {split!r} is not one of train, dev, test")
    cfg = load_config(config)
    model = model or run_dir / "judge_finetune" / "model"
    prepared = prepared or run_dir / "prepare"
    if not (model / "config.json").is_file():
        raise DataError("not a judge model folder (no config.json); run the judge_finetune stage or pass --model", file=str(model))
    init_ray(address)
    result = evaluate_judge(model, prepared, split, cfg.judge.engine, run_dir / "cache" / f"judge-eval-{split}", max_pairs, log=lambda *_: None)
    typer.echo(f"judge {model} on {split}: human labels" + (f" ({result['unjudged']} pairs could not be judged)" if result["unjudged"] else ""))
    typer.echo(metrics_text(result["human"]))
    if "gold" in result:
        typer.echo(f"\nagainst gold (the human labels agree with gold on {result['gold']['human_accuracy']:.4f}):")
        typer.echo(metrics_text(result["gold"]))


if __name__ == "__main__":
    app()
