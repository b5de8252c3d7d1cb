"""Evaluation: full-catalog retrieval with graded gains, and score separation per grade.

Retrieval metrics come from `ranx`:
- NDCG@10 with graded gains (gain = grade: exact 2, partial 1), so ranking an
  exact item above a partial one counts;
- Recall@100 and Precision@10 of *exact* items (grade 2).
Unjudged products count as grade 0. Score separation, for any encoder, uses
the judged pairs: mean cosine per grade and the AUCs of grade 2 over grade 1
and grade 1 over grade 0 (sklearn's ROC AUC), the quantities a search team
thresholds on.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from ranx import Qrels, Run, evaluate
from sklearn.metrics import roc_auc_score

from mr_ray.config import EncoderConfig, EvaluateConfig
from mr_ray.data.prepare import read_table
from mr_ray.retriever.encoder import encode, load_encoder, pretrained_model_path

RunDict = dict[str, dict[str, float]]


def qrels_dict(judgments: pd.DataFrame, min_grade: int = 1) -> dict[str, dict[str, int]]:
    """{query_id: {product_id: grade}} of the pairs graded at least `min_grade`."""
    kept = judgments[judgments["grade"] >= min_grade]
    out: dict[str, dict[str, int]] = {}
    for qid, pid, grade in zip(kept["query_id"], kept["product_id"], kept["grade"]):
        out.setdefault(str(qid), {})[str(pid)] = int(grade)
    return out


def evaluate_retrieval(run: RunDict, judgments: pd.DataFrame, config: EvaluateConfig) -> dict:
    """Graded NDCG, exact-item recall and precision of a run (ranx)."""
    graded = qrels_dict(judgments, min_grade=1)
    exact = qrels_dict(judgments, min_grade=2)
    results = {}
    for name, qrels, metrics in (
        ("graded", graded, [f"ndcg@{config.ndcg_k}"]),
        ("exact", exact, [f"recall@{config.recall_k}", f"precision@{config.precision_k}"]),
    ):
        query_ids = [q for q in qrels if q in run]
        if not query_ids:
            raise ValueError(f"no query of the run has {name} judgments to evaluate against")
        scores = evaluate(
            Qrels({q: qrels[q] for q in query_ids}),
            Run({q: run[q] if run[q] else {"__none__": 0.0} for q in query_ids}),
            metrics,
            make_comparable=True,
        )
        scores = scores if isinstance(scores, dict) else {metrics[0]: scores}
        results.update({metric: float(value) for metric, value in scores.items()})
        results[f"n_queries_{name}"] = len(query_ids)
    return {
        "ndcg@10" if config.ndcg_k == 10 else f"ndcg@{config.ndcg_k}": results[f"ndcg@{config.ndcg_k}"],
        f"recall@{config.recall_k}_exact": results[f"recall@{config.recall_k}"],
        f"precision@{config.precision_k}_exact": results[f"precision@{config.precision_k}"],
        "n_queries": results["n_queries_graded"],
    }


def bm25_run(products: pd.DataFrame, queries: pd.DataFrame, k: int) -> RunDict:
    """BM25 (bm25s, English stopwords) over product titles."""
    import bm25s
    from bm25s.tokenization import Tokenizer

    tokenizer = Tokenizer(stopwords="en")
    corpus = tokenizer.tokenize(products["title"].tolist(), return_as="tuple", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    tokens = tokenizer.tokenize(queries["text"].tolist(), update_vocab=False, return_as="tuple", show_progress=False)
    indices, scores = retriever.retrieve(tokens, k=min(k, len(products)), show_progress=False, n_threads=0)
    product_ids = products["product_id"].to_numpy()
    return {
        str(qid): {str(product_ids[i]): float(s) for i, s in zip(row_i, row_s) if s > 0}
        for qid, row_i, row_s in zip(queries["query_id"], indices, scores)
    }


def embed_catalog(model_path: str | None, products: pd.DataFrame, config: EncoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Product ids and embeddings of the whole catalog, through Ray Data actors."""
    from mr_ray.retriever.encoder import embed_dataset, in_blocks

    return embed_dataset(in_blocks(products[["product_id", "title"]]), "product_id", "title", config, model_path)


def search(product_ids: np.ndarray, product_vectors: np.ndarray, query_ids, query_vectors: np.ndarray, k: int) -> RunDict:
    """Exact inner-product top-k with FAISS (cosine: vectors are normalised)."""
    index = faiss.IndexFlatIP(product_vectors.shape[1])
    index.add(product_vectors)
    scores, rows = index.search(query_vectors, min(k, len(product_ids)))
    return {
        str(qid): {str(product_ids[r]): float(s) for r, s in zip(row_r, row_s) if r >= 0}
        for qid, row_r, row_s in zip(query_ids, rows, scores)
    }


def pair_cosines(model, pairs: pd.DataFrame, batch_size: int, product_vectors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Cosine of each (query text, product title) pair."""
    query_texts = pairs["text"].drop_duplicates().tolist()
    query_vectors = dict(zip(query_texts, encode(model, query_texts, batch_size)))
    if product_vectors is None:
        titles = pairs[["product_id", "title"]].drop_duplicates("product_id")
        product_vectors = dict(zip(titles["product_id"], encode(model, titles["title"].tolist(), batch_size)))
    q = np.stack([query_vectors[t] for t in pairs["text"]])
    p = np.stack([product_vectors[i] for i in pairs["product_id"]])
    return (q * p).sum(axis=1)


def separation_metrics(grades: np.ndarray, cosines: np.ndarray) -> dict:
    """Mean cosine per grade and AUC(2 over 1), AUC(1 over 0)."""
    out = {f"mean_cos_grade{g}": float(cosines[grades == g].mean()) if (grades == g).any() else None for g in (0, 1, 2)}
    for hi, lo in ((2, 1), (1, 0)):
        mask = (grades == hi) | (grades == lo)
        labels = grades[mask] == hi
        out[f"auc_{hi}_over_{lo}"] = float(roc_auc_score(labels, cosines[mask])) if 0 < labels.sum() < len(labels) else None
    return out


def judged_pairs(prepared: Path, query_ids: set[str]) -> pd.DataFrame:
    """The judged pairs of the evaluated queries, with texts and titles.

    The sample catalog's truth is its rule grades on the judged pool; a real
    dataset's truth is its human judgments.
    """
    gold = read_table(prepared, "gold")
    pool = read_table(prepared, "pool")
    if gold is not None and pool is not None:
        pairs = gold.to_pandas().merge(pool.to_pandas(), on=["query_id", "product_id"])
    else:
        judgments = read_table(prepared, "judgments").to_pandas()
        pairs = judgments[judgments["source"] == "human"]
    return pairs[pairs["query_id"].isin(query_ids)][["query_id", "product_id", "grade"]]


def truth_table(prepared: Path) -> pd.DataFrame:
    """Evaluation qrels: the sample's rule grades if present, else human judgments."""
    gold = read_table(prepared, "gold")
    if gold is not None:
        return gold.to_pandas()
    judgments = read_table(prepared, "judgments").to_pandas()
    return judgments[judgments["source"] == "human"]


def eval_queries(prepared: Path, config: EvaluateConfig) -> pd.DataFrame:
    queries = read_table(prepared, "queries").to_pandas()
    chosen = queries[queries["split"] == config.split]
    if chosen.empty:
        raise ValueError(f"no queries in split {config.split!r} to evaluate")
    if config.max_queries and len(chosen) > config.max_queries:
        chosen = chosen.sample(config.max_queries, random_state=config.seed)
    return chosen.reset_index(drop=True)


def evaluate_systems(prepared: Path, models: dict[str, str | None], config: EvaluateConfig, encoder: EncoderConfig, plot_path: Path | None = None) -> dict:
    """Metrics of BM25 (if asked) and of every encoder in `models` (name -> folder; None = pretrained)."""
    products = read_table(prepared, "products").to_pandas()
    queries = eval_queries(prepared, config)
    truth = truth_table(prepared)
    truth = truth[truth["query_id"].isin(set(queries["query_id"]))]
    pairs = judged_pairs(prepared, set(queries["query_id"]))
    pairs = pairs.merge(queries[["query_id", "text"]], on="query_id").merge(products[["product_id", "title"]], on="product_id")
    k = max(config.ndcg_k, config.recall_k, config.precision_k)
    systems: dict[str, dict] = {}
    if "bm25" in config.baselines:
        systems["bm25"] = evaluate_retrieval(bm25_run(products, queries, k), truth, config)
    cosines_by_system = {}
    for name, path in models.items():
        product_ids, product_vectors = embed_catalog(path, products, encoder)
        model = load_encoder(path, encoder.device, encoder.max_seq_length)
        query_vectors = encode(model, queries["text"].tolist(), encoder.batch_size)
        run = search(product_ids, product_vectors, queries["query_id"], query_vectors, k)
        by_id = dict(zip(product_ids, product_vectors))
        cosines = pair_cosines(model, pairs, encoder.batch_size, by_id)
        cosines_by_system[name] = cosines
        systems[name] = {**evaluate_retrieval(run, truth, config), **separation_metrics(pairs["grade"].to_numpy(), cosines)}
    if plot_path is not None and cosines_by_system:
        plot_histograms(cosines_by_system, pairs["grade"].to_numpy(), plot_path)
    return {"split": config.split, "n_eval_queries": len(queries), "n_judged_pairs": len(pairs), "systems": systems}


def plot_histograms(cosines_by_system: dict[str, np.ndarray], grades: np.ndarray, path: Path) -> None:
    """One panel per encoder: cosine histograms of the judged pairs per grade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cosines_by_system), figsize=(4.5 * len(cosines_by_system), 3.4), squeeze=False)
    for ax, (name, cosines) in zip(axes[0], cosines_by_system.items()):
        for grade, label, color in ((0, "irrelevant", "tab:red"), (1, "partial", "tab:orange"), (2, "exact", "tab:green")):
            if (grades == grade).any():
                ax.hist(cosines[grades == grade], bins=40, range=(-0.2, 1.0), alpha=0.55, density=True, label=label, color=color)
        ax.set_title(name)
        ax.set_xlabel("cosine similarity")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(result: dict, title: str) -> str:
    """Markdown table of the systems."""
    columns = ["ndcg@10", "recall@100_exact", "precision@10_exact", "mean_cos_grade2", "mean_cos_grade1", "mean_cos_grade0", "auc_2_over_1", "auc_1_over_0"]
    lines = [
        f"# {title}",
        "",
        f"Split `{result['split']}`: {result['n_eval_queries']} queries, full-catalog retrieval; "
        f"{result['n_judged_pairs']} judged pairs for score separation. NDCG uses graded gains "
        "(exact 2, partial 1); recall and precision count exact items only.",
        "",
        "| system | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, metrics in result["systems"].items():
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_stage(ctx) -> dict:
    """Evaluate the baselines and every trained encoder among the stage's inputs."""
    models: dict[str, str | None] = {}
    if "pretrained" in ctx.config.evaluate.baselines:
        models["pretrained"] = pretrained_model_path()
    for name in ctx.stage.inputs:
        if (ctx.input(name) / "model").is_dir():
            models[name] = str(ctx.input(name) / "model")
    result = evaluate_systems(ctx.input("prepare"), models, ctx.config.evaluate, ctx.config.encoder, ctx.out / "similarity_hist.png")
    (ctx.out / "report.json").write_text(json.dumps(result, indent=2))
    (ctx.out / "report.md").write_text(render_report(result, f"mr-ray evaluation: {ctx.config.name}") + "\n![similarity histograms](similarity_hist.png)\n")
    return {name: {k: v for k, v in m.items() if k in ("ndcg@10", "auc_2_over_1")} for name, m in result["systems"].items()}
