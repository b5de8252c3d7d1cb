"""The evaluation report as one self-contained HTML page (`report.html`), for a person to look at.

What it shows: the metrics table; NDCG@10 per system as a bar chart; the
per-grade score histograms of every encoder; the judge's confusion matrix
(the held-out one of the report's `judge` section, when the judge stages ran); the training loss per epoch of
the stages that trained; and, for the test queries that gained and lost most
from the first encoder to the last, both top-5 lists side by side with grades.
Charts are matplotlib PNGs inlined as base64: the page needs no network.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

GRADE_LABELS = {2: "exact", 1: "partial", 0: "irrelevant"}
TABLE_COLUMNS = ["ndcg@10", "judged@10", "condensed_ndcg@10", "recall@100_exact", "precision@10_exact", "auc_2_over_1", "auc_1_over_0", "fusion_weight"]
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
table { border-collapse: collapse; margin: .6rem 0 1.4rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.lists { text-align: left; vertical-align: top; }
img { max-width: 100%; border: 1px solid #eee; }
.g2 { color: #2e7d32; font-weight: 600; } .g1 { color: #ef8f00; font-weight: 600; } .g0 { color: #b71c1c; }
ol { margin: 0; padding-left: 1.3rem; }
"""


def png_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ndcg_chart(systems: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(systems)
    values = [systems[n].get("ndcg@10") or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names)), 3.6))
    bars = ax.bar(range(len(names)), values, color=["tab:green" if "+bm25" in n else "tab:blue" for n in names])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("NDCG@10")
    ax.set_ylim(0, max(values + [0.01]) * 1.15)
    fig.tight_layout()
    return png_data_uri(fig)


def loss_chart(histories: dict[str, list[dict]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for stage, history in histories.items():
        epochs = [row["epoch"] + 1 for row in history]
        ax.plot(epochs, [row["loss"] for row in history], marker="o", label=stage)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.legend()
    fig.tight_layout()
    return png_data_uri(fig)


def cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else html.escape(str(value))


def systems_table(systems: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["system", *TABLE_COLUMNS])
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{cell(metrics.get(c))}</td>" for c in TABLE_COLUMNS) + "</tr>"
        for name, metrics in systems.items()
    )
    return f'<table id="systems"><tr>{head}</tr>{rows}</table>'


def confusion_table(judge: dict) -> str:
    """The judge's 3x3 confusion matrix on its held-out pairs (rows: true grade 0..2, columns: predicted), if the
    judge section (mr_ray.report.markdown) has one."""
    matrix = ((judge or {}).get("holdout") or {}).get("confusion")
    if not matrix:
        return ""
    head = "".join(f"<th>predicted {GRADE_LABELS[g]}</th>" for g in range(len(matrix[0])))
    rows = "".join(
        f"<tr><td>true {GRADE_LABELS.get(g, g)}</td>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for g, row in enumerate(matrix)
    )
    return f'<h2>Judge confusion matrix</h2><table id="judge-confusion"><tr><th></th>{head}</tr>{rows}</table>'


def top_list(rows: list[dict]) -> str:
    if not rows:
        return "<p>nothing retrieved</p>"
    items = "".join(
        f'<li>{html.escape(str(r["title"]))} <span class="g{r["grade"]}">{GRADE_LABELS.get(r["grade"], r["grade"])}</span></li>' for r in rows
    )
    return f"<ol>{items}</ol>"


def changes_table(changes: dict, kind: str) -> str:
    entries = changes.get(kind) or []
    if not entries:
        return f"<p>No query {kind} NDCG@10.</p>"
    before, after = html.escape(changes["before"]), html.escape(changes["after"])
    rows = "".join(
        f"<tr><td>{html.escape(e['query'])}</td><td>{e['ndcg_before']:.3f} &rarr; {e['ndcg_after']:.3f}</td>"
        f'<td class="lists">{top_list(e["before"])}</td><td class="lists">{top_list(e["after"])}</td></tr>'
        for e in entries
    )
    return f'<table id="queries-{kind}"><tr><th>query</th><th>NDCG@10</th><th>top 5, {before}</th><th>top 5, {after}</th></tr>{rows}</table>'


def render_report_html(result: dict, title: str, loss_histories: dict[str, list[dict]], histogram_png: Path | None) -> str:
    """The whole page; `histogram_png` is the per-grade score histogram figure evaluate drew."""
    parts = [
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Split <code>{html.escape(result['split'])}</code>: {result['n_eval_queries']} queries, full-catalog retrieval; "
        f"{result['n_judged_pairs']} judged pairs for score separation. NDCG uses graded gains (exact 2, partial 1); recall and "
        "precision count exact items. <code>+bm25 rrf</code>: reciprocal-rank fusion (k=60) with BM25; <code>+bm25 weighted</code>: "
        "the weighted fusion of cosine and normalised BM25, its weight tuned on dev (its AUCs are on the fused score).</p>",
        "<h2>Systems</h2>",
        systems_table(result["systems"]),
        "<h2>NDCG@10 per system</h2>",
        f'<img id="chart-ndcg" alt="NDCG@10 per system" src="{ndcg_chart(result["systems"])}">',
    ]
    if histogram_png is not None and histogram_png.exists():
        uri = "data:image/png;base64," + base64.b64encode(histogram_png.read_bytes()).decode()
        parts += ["<h2>Score per grade, each encoder</h2>", f'<img id="chart-histograms" alt="score histograms per grade" src="{uri}">']
    summary = (result.get("run") or {}).get("summary")
    if summary:  # what the graph left out, and where the trained stages' settings came from
        parts += ["<h2>This run</h2>", '<ul id="this-run">' + "".join(f"<li>{html.escape(line)}</li>" for line in summary) + "</ul>"]
    parts.append(confusion_table(result.get("judge")))
    if loss_histories:
        parts += ["<h2>Training loss</h2>", f'<img id="chart-loss" alt="training loss per epoch" src="{loss_chart(loss_histories)}">']
    changes = result.get("query_changes")
    if changes:
        parts += [
            f"<h2>Queries that gained most, {html.escape(changes['before'])} &rarr; {html.escape(changes['after'])}</h2>",
            changes_table(changes, "gained"),
            f"<h2>Queries that lost most, {html.escape(changes['before'])} &rarr; {html.escape(changes['after'])}</h2>",
            changes_table(changes, "lost"),
        ]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
