"""prepare: import the configured source into the canonical tables (mr_ray.data)."""

from __future__ import annotations

from mr_ray.data.importers import check_references
from mr_ray.data.prepare import load_source, write_tables


def prepare_stage(ctx) -> dict:
    tables = load_source(ctx.config.data)
    check_references(tables, ctx.config.data.path or ctx.config.data.source)
    counts = write_tables(tables, ctx.out)
    grades = tables["judgments"].column("grade").to_numpy()
    splits = tables["queries"].column("split").to_pylist()
    return {
        "rows": counts,
        "judgment_grades": {str(g): int((grades == g).sum()) for g in (0, 1, 2)},
        "query_splits": {s: splits.count(s) for s in ("train", "dev", "test")},
    }
