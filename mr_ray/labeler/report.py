"""How good is a judge: metrics against true grades (sklearn), and the judge section of the main job's report.

The metrics read the judge's per-grade probabilities: the grade is their
argmax, the ranking score is the expected grade sum_g g*p_g (what reranking
and the AUCs use), the expected rating is 1 + that (Home Depot's 1..3 scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from mr_ray.grades import GRADE_NAMES
from mr_ray.labeler.label import label_pairs
from mr_ray.pipeline import read_manifest
from mr_ray.schema import DataError

GRADES = [0, 1, 2]


def _auc(truth: np.ndarray, score: np.ndarray, upper: int) -> float | None:
    """AUC of grade `upper` over grade `upper - 1` by `score` (None when either grade is absent)."""
    keep = (truth == upper) | (truth == upper - 1)
    if len(np.unique(truth[keep])) < 2:
        return None
    return float(roc_auc_score(truth[keep] == upper, score[keep]))


def judge_metrics(truth, probabilities: np.ndarray, rating_mean=None) -> dict:
    """Accuracy, within-one, macro-F1, per-grade recall, confusion matrix (rows true, columns predicted),
    AUC(2 over 1), AUC(1 over 0) and, where `rating_mean` is given, the RMSE of the expected rating."""
    truth = np.asarray(truth, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities.argmax(axis=1)
    expected = probabilities @ np.array(GRADES, dtype=float)
    recall = recall_score(truth, predicted, labels=GRADES, average=None, zero_division=0)
    metrics = {
        "pairs": int(len(truth)),
        "accuracy": float(accuracy_score(truth, predicted)),
        "within_one": float(np.mean(np.abs(predicted - truth) <= 1)),
        "macro_f1": float(f1_score(truth, predicted, labels=GRADES, average="macro", zero_division=0)),
        "recall": {g: float(r) for g, r in zip(GRADES, recall)},
        "auc_2_over_1": _auc(truth, expected, 2),
        "auc_1_over_0": _auc(truth, expected, 1),
        "confusion": confusion_matrix(truth, predicted, labels=GRADES).tolist(),
        "predicted_counts": np.bincount(predicted, minlength=3).tolist(),
    }
    if rating_mean is not None:
        rating = np.asarray(rating_mean, dtype=float)
        has = ~np.isnan(rating)
        metrics["rmse_expected_rating"] = float(np.sqrt(np.mean((1.0 + expected[has] - rating[has]) ** 2))) if has.any() else None
    return metrics


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


def label_error(judgments: pd.DataFrame | None, gold: pd.DataFrame) -> tuple[float | None, int]:
    """Share of pairs whose grade differs from gold (over the pairs in both), and that count."""
    if judgments is None or judgments.empty:
        return None, 0
    merged = judgments[["query_id", "product_id", "grade"]].merge(
        gold[["query_id", "product_id", "grade"]].rename(columns={"grade": "gold"}), on=["query_id", "product_id"]
    )
    if merged.empty:
        return None, 0
    return float((merged["grade"].astype(int) != merged["gold"].astype(int)).mean()), int(len(merged))


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


def judge_report(ctx) -> tuple[str, dict]:
    """The judge section for the evaluate stage, from whichever judge stages ran (empty when none did):
    judge_finetune's held-out evaluation, and human / judge / audited label error against the sample's gold."""
    import pyarrow.parquet as pq

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


def evaluate_judge(model: Path, prepared: Path, split: str, engine, shard_dir: Path, max_pairs: int | None = None, seed: int = 0, log=print) -> dict:
    """Label the `split` queries' human-judged pairs with the judge in `model` (Ray Data + vLLM) and score it
    against the human grades (with rating_mean when the table has it) and, on the sample catalog, against gold."""
    import pyarrow.parquet as pq

    def table(name: str) -> pd.DataFrame | None:
        return pq.read_table(prepared / name).to_pandas() if (prepared / name).exists() else None

    queries, products, judgments = table("queries"), table("products"), table("judgments")
    if queries is None or products is None or judgments is None:
        raise DataError("needs queries/, products/ and judgments/ (a prepare or `mr-ray data import` output)", file=str(prepared))
    if "split" not in queries or not (queries["split"] == split).any():
        raise DataError(f"no queries of split {split!r}", file=str(prepared / "queries"), field="split")
    human = judgments[(judgments["source"] == "human") & judgments["query_id"].isin(queries.loc[queries["split"] == split, "query_id"])]
    if human.empty:
        raise DataError(f"no human judgments on split {split!r} queries", file=str(prepared / "judgments"))
    if max_pairs is not None and len(human) > max_pairs:
        human = human.sample(n=max_pairs, random_state=seed)
    judged, bad = label_pairs(human[["query_id", "product_id"]], queries, products, model, engine, shard_dir, log=log)
    merged = human.merge(judged[["query_id", "product_id", "p0", "p1", "p2"]], on=["query_id", "product_id"])
    result = {"model": str(model), "split": split, "unjudged": int(len(human) - len(merged)),
              "human": judge_metrics(merged["grade"], merged[["p0", "p1", "p2"]].to_numpy(), merged["rating_mean"] if "rating_mean" in merged else None)}
    gold = table("gold")
    if gold is not None:
        with_gold = merged.merge(gold[["query_id", "product_id", "grade"]].rename(columns={"grade": "gold"}), on=["query_id", "product_id"])
        result["gold"] = judge_metrics(with_gold["gold"], with_gold[["p0", "p1", "p2"]].to_numpy())
        result["gold"]["human_accuracy"] = float((with_gold["grade"].astype(int) == with_gold["gold"].astype(int)).mean())
    return result
