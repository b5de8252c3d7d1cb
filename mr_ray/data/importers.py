"""Importers: foreign layouts in, validated canonical Arrow tables out.

Every file is read by `mr_ray.data.reading` and every table ends in
`mr_ray.schema.conform`, so bad input fails here, with the file, row and field,
before anything is written. Paths may be local or any URI pyarrow's
filesystems understand (s3://, gs://, hdfs://).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mr_ray.data.reading import find_table, list_table_files, read_file, require_columns
from mr_ray.grades import (
    UnknownGradeError,
    from_esci,
    from_homedepot_rating,
    from_wands,
)
from mr_ray.schema import (
    JUDGMENTS,
    PRODUCTS,
    QUERIES,
    SPECS,
    DataError,
    check_extra_columns,
    conform,
    duplicate_error,
    first_duplicate,
    locate,
    with_origin,
)

log = logging.getLogger(__name__)


def read_canonical_table(path: str, kind: str, columns: dict[str, str] | None = None) -> pa.Table:
    """Read a file or folder of one table, rename columns (canonical -> source name), validate."""
    files, tables = list_table_files(path), []
    for file in files:
        table = read_file(file)
        if columns:
            rename = {source: canonical for canonical, source in columns.items()}
            table = table.rename_columns([rename.get(name, name) for name in table.column_names])
        check_extra_columns(table, kind, file)
        tables.append(conform(table, kind, file))
    if len(tables) == 1:
        return tables[0]
    # Each file is valid alone; a key repeated across files is reported in the file that repeats it.
    combined = with_origin(pa.concat_tables(tables), [(file, table.num_rows) for file, table in zip(files, tables)])
    found = first_duplicate(combined, SPECS[kind].key)
    if found is not None:
        row, first = found
        raise duplicate_error(combined, SPECS[kind], row, locate(combined, first, path), path)
    return combined


def hash_split(ids: pa.ChunkedArray | list, dev: float = 0.1, test: float = 0.1) -> list[str]:
    """A stable train/dev/test split from a hash of each id (same id, same split, everywhere)."""
    out = []
    for value in ids.to_pylist() if hasattr(ids, "to_pylist") else ids:
        bucket = int(hashlib.md5(str(value).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out.append("test" if bucket < test else "dev" if bucket < test + dev else "train")
    return out


def _with_split(queries: pa.Table, source: str | None = None) -> pa.Table:
    """Queries without a split get the seeded hash split (`hash_split`); with `source`, a user's file, said in a warning."""
    split = queries.column("split")
    if split.null_count == 0:
        return queries
    if source is not None:
        log.warning("warning: %s: %d of %d queries have no split; they get the hash split of their query_id (train 80%%, dev 10%%, test 10%%)",
                    source, split.null_count, len(split))
    filled = [s if s is not None else h for s, h in zip(split.to_pylist(), hash_split(queries.column("query_id")))]
    return queries.set_column(queries.schema.get_field_index("split"), "split", pa.array(filled, pa.string()))


def _map_grades(table: pa.Table, column: str, mapper, source: str) -> pa.Array:
    grades = []
    for row, value in enumerate(table.column(column).to_pylist(), start=1):
        try:
            if isinstance(value, bool):
                raise UnknownGradeError(f"a boolean {value!r} is not a grade")
            grades.append(int(mapper(value)))
        except (UnknownGradeError, TypeError, ValueError) as err:
            raise DataError(str(err), file=source, row=row, field=column) from None
    return pa.array(grades, pa.int8())


def import_canonical(folder: str) -> dict[str, pa.Table]:
    """Our own layout: products, queries, judgments, optional engagement (files or folders)."""
    tables = {}
    for kind in ("products", "queries", "judgments", "engagement"):
        found = find_table(folder, kind)
        if found is None:
            if kind == "engagement":
                continue
            raise DataError(f"no {kind} table (expected {kind}.parquet, .csv, .jsonl or a {kind}/ folder)", file=folder)
        tables[kind] = read_canonical_table(found, kind)
    tables["queries"] = _with_split(tables["queries"], find_table(folder, "queries"))
    return tables


def import_generic(files: dict[str, str], columns: dict[str, dict[str, str]]) -> dict[str, pa.Table]:
    """Any CSV/TSV/JSONL/Parquet files, with a per-table mapping canonical name -> source column."""
    unknown = set(files) - set(SPECS)
    if unknown:
        raise DataError(f"unknown table name(s) {sorted(unknown)}; expected {sorted(SPECS)}")
    tables = {kind: read_canonical_table(path, kind, columns.get(kind)) for kind, path in files.items()}
    if "queries" in tables:
        tables["queries"] = _with_split(tables["queries"], files["queries"])
    return tables


def import_homedepot(folder: str) -> dict[str, pa.Table]:
    """The Home Depot layout of ../shared/data/homedepot: grades from the mean rating."""
    paths = {kind: f"{folder.rstrip('/')}/{kind}.parquet" for kind in ("products", "queries", "judgments")}
    raw = read_file(paths["judgments"])
    require_columns(raw, ("query_id", "product_id", "rating_mean"), paths["judgments"])
    grades = _map_grades(raw, "rating_mean", from_homedepot_rating, paths["judgments"])
    judgments = pa.table(
        {
            "query_id": raw.column("query_id"),
            "product_id": raw.column("product_id"),
            "grade": grades,
            "source": pa.array(["human"] * raw.num_rows),
        }
    )
    return {
        "products": conform(read_file(paths["products"]), PRODUCTS, paths["products"]),
        "queries": _with_split(conform(read_file(paths["queries"]), QUERIES, paths["queries"])),
        "judgments": conform(judgments, JUDGMENTS, paths["judgments"]),
    }


def import_esci(folder: str) -> dict[str, pa.Table]:
    """The Amazon ESCI release: examples + products Parquet; product ids keyed by locale."""
    examples_path = f"{folder.rstrip('/')}/shopping_queries_dataset_examples.parquet"
    products_path = f"{folder.rstrip('/')}/shopping_queries_dataset_products.parquet"
    examples = read_file(examples_path)
    products = read_file(products_path)
    require_columns(examples, ("query_id", "query", "product_id", "product_locale", "esci_label"), examples_path)
    require_columns(products, ("product_id", "product_title", "product_locale"), products_path)

    def keyed(table: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(table.column("product_locale"), pc.cast(table.column("product_id"), pa.string()), ":")

    product_table = pa.table(
        {
            "product_id": keyed(products),
            "title": products.column("product_title"),
            "description": products.column("product_description") if "product_description" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "brand": products.column("product_brand") if "product_brand" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "color": products.column("product_color") if "product_color" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "locale": products.column("product_locale"),
        }
    )
    query_ids = pc.cast(examples.column("query_id"), pa.string())
    queries = pa.table({"query_id": query_ids, "text": examples.column("query"), "locale": examples.column("product_locale")})
    if "split" in examples.column_names:
        # ESCI ships train/test; a hash of the query id carves dev out of train.
        release = examples.column("split").to_pylist()
        hashed = hash_split(query_ids, dev=0.1, test=0.0)
        queries = queries.append_column("split", pa.array([r if r == "test" else h for r, h in zip(release, hashed)]))
    queries = _one_text_per_query(queries, examples_path)
    judgments = pa.table(
        {
            "query_id": query_ids,
            "product_id": keyed(examples),
            "grade": _map_grades(examples, "esci_label", from_esci, examples_path),
            "source": pa.array(["human"] * examples.num_rows),
        }
    )
    return {
        "products": conform(product_table, PRODUCTS, products_path),
        "queries": _with_split(conform(queries, QUERIES, examples_path)),
        "judgments": conform(judgments, JUDGMENTS, examples_path),
    }


def import_wands(folder: str) -> dict[str, pa.Table]:
    """The Wayfair WANDS release: tab-separated product.csv, query.csv, label.csv."""
    base = folder.rstrip("/")
    products = read_file(f"{base}/product.csv", delimiter="\t")
    queries = read_file(f"{base}/query.csv", delimiter="\t")
    labels = read_file(f"{base}/label.csv", delimiter="\t")
    require_columns(products, ("product_id", "product_name"), f"{base}/product.csv")
    require_columns(queries, ("query_id", "query"), f"{base}/query.csv")
    require_columns(labels, ("query_id", "product_id", "label"), f"{base}/label.csv")
    product_table = pa.table(
        {
            "product_id": products.column("product_id"),
            "title": products.column("product_name"),
            "description": products.column("product_description") if "product_description" in products.column_names else pa.nulls(products.num_rows, pa.string()),
            "category": products.column("product_class") if "product_class" in products.column_names else pa.nulls(products.num_rows, pa.string()),
        }
    )
    query_table = pa.table({"query_id": queries.column("query_id"), "text": queries.column("query")})
    judgments = pa.table(
        {
            "query_id": labels.column("query_id"),
            "product_id": labels.column("product_id"),
            "grade": _map_grades(labels, "label", from_wands, f"{base}/label.csv"),
            "source": pa.array(["human"] * labels.num_rows),
        }
    )
    return {
        "products": conform(product_table, PRODUCTS, f"{base}/product.csv"),
        "queries": _with_split(conform(query_table, QUERIES, f"{base}/query.csv")),
        "judgments": conform(judgments, JUDGMENTS, f"{base}/label.csv"),
    }


def _one_text_per_query(queries: pa.Table, source: str) -> pa.Table:
    """ESCI repeats each query on every example row: keep one row per query_id, refuse two texts."""
    frame = queries.to_pandas()
    texts = frame.groupby("query_id", sort=False)["text"].transform("first")
    conflict = (frame["text"] != texts).to_numpy()
    if conflict.any():
        row = int(np.flatnonzero(conflict)[0]) + 1
        query_id = frame["query_id"].iloc[row - 1]
        first = int(np.flatnonzero((frame["query_id"] == query_id).to_numpy())[0]) + 1
        raise DataError(
            f"query_id {query_id!r} has the text {frame['text'].iloc[row - 1]!r} here and {texts.iloc[row - 1]!r} at row {first}",
            file=source,
            row=row,
            field="query",
        )
    return pa.Table.from_pandas(frame.drop_duplicates("query_id"), preserve_index=False)


def check_references(tables: dict[str, pa.Table], source: str) -> None:
    """Every judged or engaged pair must point at a known query and product."""
    known = {"query_id": ("queries", tables["queries"].column("query_id")), "product_id": ("products", tables["products"].column("product_id"))}
    for kind in ("judgments", "engagement", "gold"):
        if kind not in tables:
            continue
        table = tables[kind]
        for field, (name, ids) in known.items():
            unknown = pc.invert(pc.is_in(table.column(field), value_set=ids)).to_numpy(zero_copy_only=False)
            if unknown.any():
                row = int(np.flatnonzero(unknown)[0]) + 1
                value = table.column(field)[row - 1].as_py()
                file, file_row = locate(table, row, f"{source} ({kind})")
                raise DataError(f"{field} {value!r} is not in the {name} table", file=file, row=file_row, field=field)


IMPORTERS = {
    "canonical": import_canonical,
    "homedepot": import_homedepot,
    "esci": import_esci,
    "wands": import_wands,
}

