"""The report as markdown: the systems table, what each stage added, NDCG per query phenomenon and the judge section (its held-out metrics, decision offsets and label error against gold)."""

from __future__ import annotations

import pandas as pd

from mr_ray.grades import GRADE_NAMES
from mr_ray.metrics import GRADES, label_error


def confusion_markdown(confusion: list[list[int]]) -> str:
    header = "| true \\ predicted | " + " | ".join(GRADE_NAMES[g] for g in GRADES) + " |"
    rows = [f"| {GRADE_NAMES[g]} | " + " | ".join(str(n) for n in confusion[g]) + " |" for g in GRADES]
    return "\n".join([header, "|---|---|---|---|", *rows])


def metrics_text(metrics: dict) -> str:
    """The metrics as printable lines (for `mr-ray judge eval` and the benches)."""
    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"pairs {metrics['pairs']}  accuracy {fmt(metrics['accuracy'])}  within-one {fmt(metrics['within_one'])}  macro-F1 {fmt(metrics['macro_f1'])}",
        "recall per grade " + "  ".join(f"{GRADE_NAMES[g]} {fmt(metrics['recall'][g])}" for g in GRADES),
        f"AUC(2 over 1) {fmt(metrics['auc_2_over_1'])}  AUC(1 over 0) {fmt(metrics['auc_1_over_0'])}"
        + (f"  RMSE(expected rating) {fmt(metrics['rmse_expected_rating'])}" if "rmse_expected_rating" in metrics else ""),
        "confusion matrix (rows true, columns predicted):",
        confusion_markdown(metrics["confusion"]),
    ]
    return "\n".join(lines)


def judge_section(
    judge_eval: dict | None, human: pd.DataFrame | None, judge: pd.DataFrame | None, audited: pd.DataFrame | None, gold: pd.DataFrame | None,
    offsets: dict | None = None,
) -> tuple[str, dict]:
    """Markdown judge section of the main report and its numbers.

    `judge_eval` is the judge_finetune stage's held-out evaluation (metrics of `judge_metrics`);
    human / judge / audited are judgment tables whose label error against `gold` is reported
    (audited = the judge's labels with the audit's re-judged grades in place); `offsets` is judge_finetune's
    `grade_offsets` fit, when it made one."""
    numbers: dict = {}
    lines = ["## Judge", ""]
    if judge_eval:
        numbers["holdout"] = judge_eval
        lines += [
            f"Held-out human labels ({judge_eval['pairs']} pairs of queries the judge never saw): accuracy {judge_eval['accuracy']:.4f}, "
            f"within-one {judge_eval['within_one']:.4f}, macro-F1 {judge_eval['macro_f1']:.4f}"
            + (
                f"; against gold: accuracy {judge_eval['gold']['accuracy']:.4f}, within-one {judge_eval['gold']['within_one']:.4f} "
                f"(the human labels of the same pairs: {judge_eval['gold']['human_accuracy']:.4f})"
                if judge_eval.get("gold") else ""
            )
            + ". Confusion matrix against the human labels:",
            "",
            confusion_markdown(judge_eval["confusion"]),
            "",
        ]
        if offsets:
            numbers["grade_offsets"] = fit = offsets
            lines += [
                f"The judge decides with per-grade logit offsets {fit['offsets']} (grades 0 / 1 / 2), fit on {fit['calibration_pairs']} human-labelled "
                f"pairs of other held-out queries: their macro-F1 {fit['before_macro_f1']:.4f} -> {fit['after_macro_f1']:.4f}, accuracy "
                f"{fit['before_accuracy']:.4f} -> {fit['after_accuracy']:.4f}.",
                "",
            ]
    if gold is not None:
        rows = []
        for name, table in (("human", human), ("judge", judge), ("audited", audited)):
            error, pairs = label_error(table, gold)
            numbers[f"{name}_label_error"] = error
            numbers[f"{name}_label_pairs"] = pairs
            rows.append(f"| {name} | {pairs} | {'-' if error is None else f'{error:.4f}'} |")
        lines += ["Label error against gold (each set over the pairs it labels):", "", "| labels | pairs | error rate |", "|---|---|---|", *rows, ""]
    return "\n".join(lines), numbers


def render_phenomena(phenomena: dict[str, dict]) -> str:
    """Markdown table of `ndcg_by_phenomenon`: a row per phenomenon, a column per system."""
    systems = [name for name in next(iter(phenomena.values())) if name != "n_queries"]
    lines = [
        "## NDCG by query phenomenon",
        "",
        "| phenomenon | queries | " + " | ".join(systems) + " |",
        "|---|---|" + "---|" * len(systems),
    ]
    for phenomenon, row in phenomena.items():
        cells = [f"{row[name]:.4f}" if row.get(name) is not None else "-" for name in systems]
        lines.append(f"| {phenomenon} | {row['n_queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The method's steps in order, each compared with the row before it; then the method against the baselines.
STAGE_STEPS = (("stage1", "pretrained"), ("stage2", "stage1"), ("stage2", "bm25"), ("stage2", "st-mnrl"))


def render_stage_gains(systems: dict[str, dict]) -> str:
    """What each stage added: relative NDCG@10 and the change of AUC(2 over 1), for the steps whose rows are present."""
    lines = ["## What each stage added", ""]
    for after, before in STAGE_STEPS:
        if after in systems and before in systems and systems[before].get("ndcg@10"):
            a, b = systems[after], systems[before]
            line = f"- {after} over {before}: NDCG@10 {b['ndcg@10']:.4f} -> {a['ndcg@10']:.4f} ({a['ndcg@10'] / b['ndcg@10'] - 1:+.1%})"
            if a.get("auc_2_over_1") is not None and b.get("auc_2_over_1") is not None:
                line += f", AUC(2 over 1) {b['auc_2_over_1']:.4f} -> {a['auc_2_over_1']:.4f}"
            lines.append(line)
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def render_report(result: dict, title: str) -> str:
    """Markdown table of the systems."""
    columns = ["ndcg@10", "judged@10", "condensed_ndcg@10", "recall@100_exact", "precision@10_exact", "mean_cos_grade2", "mean_cos_grade1", "mean_cos_grade0", "auc_2_over_1", "auc_1_over_0"]
    lines = [
        f"# {title}",
        "",
        f"Split `{result['split']}`: {result['n_eval_queries']} queries, full-catalog retrieval; "
        f"{result['n_judged_pairs']} judged pairs for score separation. NDCG uses graded gains "
        "(exact 2, partial 1); recall and precision count exact items only. judged@10 is the share of a system's top 10 "
        "that has a judgment and condensed NDCG@10 its NDCG@10 with unjudged products removed (Sakai 2007): where the "
        "judgments came from another engine's results, full-catalog NDCG counts a system's unjudged finds as irrelevant. "
        "A fused row draws on two top lists, so its condensed figure is not comparable with a single system's.",
        "",
        "| system | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, metrics in result["systems"].items():
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", render_stage_gains(result["systems"])]
    if result.get("phenomena"):
        lines += ["", render_phenomena(result["phenomena"])]
    return "\n".join(lines) + "\n"
