"""mine: the Stage-1 encoder's hard samples of the training queries, re-annotated by the judge (mr_ray.retriever.mining)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mr_ray.embeddings import catalog_vectors
from mr_ray.labeler.label import label_pairs
from mr_ray.pipeline import Limit
from mr_ray.retriever.encoder import embed_dataset, in_blocks
from mr_ray.retriever.examples import read_frame, training_set
from mr_ray.retriever.mining import (
    MINED_SOURCE,
    annotate,
    annotator,
    mine_hard_samples,
    top_lists,
)
from mr_ray.search.retrieval import LexicalIndex


def judge_grades(ctx, judge: Path, mined: pd.DataFrame, queries: pd.DataFrame, products: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Re-annotate mined pairs with the fine-tuned judge in `judge`, of whichever kind (`mr_ray.labeler.label.label_pairs`:
    Ray Data + vLLM, resumable shards)."""
    config = ctx.config.judge
    shards = ctx.run_dir / "cache" / f"mine-shards-{ctx.identity()}"
    judged, failed = label_pairs(
        mined[["query_id", "product_id"]], queries, products, judge / "model", config.engine,
        shards, config.label.shard_rows, source=MINED_SOURCE,
    )
    return judged, len(failed)


def mine_stage(ctx) -> dict:
    """Embed catalog and training queries with the Stage-1 encoder, mine, re-annotate; writes out/mined/."""
    config, encoder = ctx.config.mine, ctx.config.encoder
    model = str(ctx.input("stage1") / "model")
    products, queries, judgments = training_set(ctx.input("prepare"), ctx.config.stage1, Limit.of(ctx.config, "mine.max_queries"), ctx.inputs_of("judgments"))
    catalog = catalog_vectors(ctx.input("prepare") / "products", products, encoder, model, "stage1")  # evaluate's Stage 1 rows reuse them
    product_ids, product_vectors = catalog.ids, np.asarray(catalog.vectors)
    query_ids, query_vectors = embed_dataset(in_blocks(queries[["query_id", "text"]]), "query_id", "text", encoder, model)
    texts = queries.set_index("query_id").loc[query_ids, "text"].tolist()
    lexical = LexicalIndex.build(products["title"].tolist(), ctx.config.lexical) if set(config.sources) - {"dense"} else None
    lists, weight = top_lists(query_ids, query_vectors, texts, product_vectors, products, judgments, config, lexical)
    mined = mine_hard_samples(query_ids, query_vectors, product_ids, product_vectors, judgments, config, lists)
    failed = 0
    judges = ctx.inputs_of("judge")
    who, why = annotator(config, judges)
    if who == "judge":
        grades, failed = judge_grades(ctx, judges[0], mined, queries, products)
    else:
        grades = read_frame(ctx.input("prepare"), who.removeprefix("grades:"))
    annotated = annotate(mined, grades, config.unjudged_grade)
    folder = ctx.out / "mined"
    folder.mkdir()
    annotated.to_parquet(folder / "part-00000.parquet", index=False)
    by_reason = {
        reason: {
            "mined": int((mined["reason"] == reason).sum()),
            "annotated": int((annotated["reason"] == reason).sum()),
            **{f"grade{g}": int(((annotated["reason"] == reason) & (annotated["grade"] == g)).sum()) for g in (0, 1, 2)},
        }
        for reason in ("unjudged", "boundary")
    }
    by_source = {source: int(((mined["reason"] == "unjudged") & (mined["found_by"] == source)).sum()) for source in config.sources}
    return {
        "queries": len(query_ids), "annotator": who, "annotator_why": why, "judge_failures": failed, "by_reason": by_reason,
        "unjudged_by_source": by_source, **({"hybrid_weight": weight} if weight is not None else {}),
    }
