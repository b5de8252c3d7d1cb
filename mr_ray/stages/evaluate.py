"""evaluate: every system scored on the held-out split through the one scoring path (mr_ray.evaluate), the judge's section, and the report (markdown, HTML, plots)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from mr_ray.evaluate import evaluate_systems
from mr_ray.pipeline import Limit, read_manifest
from mr_ray.report.html import render_report_html
from mr_ray.report.markdown import judge_section, render_report
from mr_ray.retriever.encoder import pretrained_model_path
from mr_ray.retriever.st_baseline import st_baseline


def loss_histories(ctx) -> dict[str, list[dict]]:
    """Per training stage among the inputs, its per-epoch metrics (epoch, loss) from its manifest."""
    out = {}
    for name in ctx.stage.inputs:
        history = ((read_manifest(ctx.input(name)) or {}).get("metrics") or {}).get("history")
        if history:
            out[name] = [{"epoch": row["epoch"], "loss": row["loss"]} for row in history if "loss" in row]
    return out


def run_section(ctx) -> tuple[str, dict]:
    """What the run's graph left out (and why), and the settings each trained encoder's stage recorded it
    trained with (and where they came from: the sweep or the config)."""
    by_reason: dict[str, list[str]] = {}
    for name, why in ctx.left_out.items():
        by_reason.setdefault(why, []).append(name)
    lines = [f"{', '.join(names)}: not run ({why})" for why, names in by_reason.items()]
    trained_with = {}
    for folder in ctx.inputs_of("encoder"):
        settings = read_manifest(folder)["metrics"].get("trained_with")
        if settings:
            trained_with[folder.name] = settings
            values = ", ".join(f"{k} {v}" for k, v in settings["params"].items())
            lines.append(f"{folder.name} trained with {values}, from {settings['source']}")
    if not lines:
        return "", {}
    markdown = "\n".join(["## This run", "", *(f"- {line}" for line in lines), ""]) + "\n"
    return markdown, {"not_run": dict(ctx.left_out), "trained_with": trained_with, "summary": lines}


def evaluate_stage(ctx) -> dict:
    """Evaluate the baselines and every trained encoder the graph gave the stage."""
    models: dict[str, str | None] = {}
    if "pretrained" in ctx.config.evaluate.baselines:
        models["pretrained"] = pretrained_model_path()
    if "st-mnrl" in ctx.config.evaluate.baselines:
        model, stats = st_baseline(
            ctx.input("prepare"), ctx.config.encoder.model, ctx.config.encoder.max_seq_length, ctx.config.stage1.seed,
            Limit.of(ctx.config, "stage1.max_train_queries"),
        )
        (ctx.out / "st-mnrl").mkdir()
        (ctx.out / "st-mnrl" / "training.json").write_text(json.dumps({**stats, "model": str(model)}, indent=2))
        models["st-mnrl"] = str(model)
    for folder in ctx.inputs_of("encoder"):
        models[folder.name] = str(folder / "model")
    result = evaluate_systems(ctx.input("prepare"), models, ctx.config.evaluate, ctx.config.encoder, ctx.config.lexical, ctx.out / "similarity_hist.png")
    run_markdown, run_numbers = run_section(ctx)
    judge_markdown, judge_numbers = judge_report(ctx)  # the judge section, when the judge stages ran
    numbers = {**result, **({"run": run_numbers} if run_numbers else {}), **({"judge": judge_numbers} if judge_numbers else {})}
    (ctx.out / "report.json").write_text(json.dumps(numbers, indent=2))
    (ctx.out / "report.md").write_text(
        render_report(result, f"mr-ray evaluation: {ctx.config.name}") + "\n![similarity histograms](similarity_hist.png)\n\n" + run_markdown + judge_markdown
    )
    (ctx.out / "report.html").write_text(
        render_report_html({**result, "judge": judge_numbers, "run": run_numbers}, f"mr-ray evaluation: {ctx.config.name}", loss_histories(ctx), ctx.out / "similarity_hist.png")
    )
    return {name: {k: v for k, v in m.items() if k in ("ndcg@10", "auc_2_over_1")} for name, m in result["systems"].items()}


def judge_report(ctx) -> tuple[str, dict]:
    """The judge section for the evaluate stage, from whichever judge stages ran (empty when none did):
    judge_finetune's held-out evaluation, and human / judge / audited label error against the sample's gold."""

    def stage(name: str):
        try:
            return ctx.input(name)
        except KeyError:
            return None

    def table(folder):
        return pq.read_table(folder).to_pandas() if folder is not None and folder.exists() else None

    finetuned, labelled, audited_dir = stage("judge_finetune"), stage("label"), stage("audit")
    if finetuned is None and labelled is None:
        return "", {}
    finetune_metrics = ((read_manifest(finetuned) or {}).get("metrics") or {}) if finetuned else {}
    prepared = ctx.input("prepare")
    gold, human = table(prepared / "gold"), table(prepared / "judgments")
    human = human[human["source"] == "human"] if human is not None else None
    judged = table(labelled / "judgments") if labelled else None
    audited = None
    if judged is not None and audited_dir is not None:
        rejudged = table(audited_dir / "judgments")
        audited = judged.set_index(["query_id", "product_id"])
        if rejudged is not None and len(rejudged):
            audited.loc[rejudged.set_index(["query_id", "product_id"]).index, "grade"] = rejudged.set_index(["query_id", "product_id"])["grade"]
        audited = audited.reset_index()
    markdown, numbers = judge_section(finetune_metrics.get("holdout_eval"), human, judged, audited, gold, finetune_metrics.get("grade_offsets"))
    return "\n" + markdown, numbers
